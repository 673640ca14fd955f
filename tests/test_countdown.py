"""Countdown task: solver, scorer, held-out targets, tokenizer, loss masks, evaluation and a short training run."""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter

import pytest
import torch

from nextlat.config import ConfigError, with_settings
from nextlat.data import IGNORE
from nextlat.registry import config_from_dict
from nextlat.tasks.countdown import (
    ANSWER_TOKENS,
    MAX_VALUE,
    PROMPT_TOKENS,
    CountdownConfig,
    CountdownTask,
    CountdownTokenizer,
    _search,
    format_equations,
    generate_problems,
    score,
    score_rows,
    solvable,
    solve,
    split_targets,
)
from nextlat.training.build import build
from nextlat.training.loop import Trainer

SMALL = dict(num_train=400, num_test=60, eval_examples=8)


def _tiny_run(**overrides) -> dict:
    run = {
        "run_name": "tiny-countdown",
        "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "max_seq_len": 64},
        "objective": {"name": "next_latent", "horizon": 2, "lambda_h": 2.0, "lambda_kl": 1.0},
        "task": {"name": "countdown", "num_train": 64, "num_test": 8, "eval_examples": 4},
        "train": {"steps": 3, "batch_size": 8, "lr": 1e-3, "log_every": 1, "progress": False, "device": "cpu",
                  "precision": "fp32", "seed": 0},
    }
    return with_settings(run, overrides)


@pytest.fixture(scope="module")
def small_task() -> CountdownTask:
    return CountdownTask(CountdownConfig(**SMALL))


# ----------------------------------------------------------------------------- solver


def test_every_generated_problem_has_a_valid_solution(small_task):
    problems = small_task.problems()
    for split, ps in problems.items():
        for p in ps:
            assert len(p.numbers) == 4 and all(1 <= v <= 99 for v in p.numbers) and 10 <= p.target <= 100
            assert len(p.solution) == 3 and p.solution[-1][3] == p.target
            assert solve(p.numbers, p.target) == p.solution, split  # deterministic solver
            text = format_equations(p.solution)
            assert score(p.numbers, p.target, text).solved, (p, text)
            ids = small_task.tokenizer.encode(text)
            assert len(ids) == ANSWER_TOKENS and score(p.numbers, p.target, ids) == score(p.numbers, p.target, text)


@pytest.mark.parametrize("lo, hi, t_lo, t_hi", [(1, 99, 10, 100), (0, 9, 0, 40), (0, 3, 0, 12), (1, 99, 0, MAX_VALUE)])
def test_vectorised_screen_agrees_with_the_search(lo, hi, t_lo, t_hi):
    rng = random.Random(lo * 7 + hi)
    cands = [(tuple(rng.randint(lo, hi) for _ in range(4)), rng.randint(t_lo, t_hi)) for _ in range(1500)]
    ref = [_search(n, t) is not None for n, t in cands]
    got = solvable(torch.tensor([c[0] for c in cands]), torch.tensor([c[1] for c in cands])).tolist()
    assert got == ref
    assert 0 < sum(ref) < len(ref)  # both outcomes are exercised


def test_solver_examples_and_errors():
    assert solve((14, 83, 88, 91), 23) is not None
    assert solve((1, 1, 1, 1), 50) is None
    assert solve((10, 20), 200) == ((20, "*", 10, 200),)
    with pytest.raises(ValueError, match="10001"):
        solve((10001, 1, 2, 3), 10)
    with pytest.raises(ValueError, match="at least two"):
        solve((5,), 5)


def test_impossible_request_raises_a_clear_error():
    with pytest.raises(ValueError, match="could not draw 1 distinct solvable"):
        generate_problems(1, list(range(10, 101)), 1, 1, seed=0)  # 1,1,1,1 reaches at most 4


# ----------------------------------------------------------------------------- scorer

NUMS, TARGET = (1, 2, 3, 4), 10


@pytest.mark.parametrize("answer", [
    "4*3=12,12-2=10,10*1=10",
    "1+2=3,3+3=6,6+4=10",  # an intermediate result equal to an input
    "2*3=6,4*1=4,6+4=10",  # two independent pairs, then their results
    "3+4=7,2+1=3,7+3=10",
    "4*3=12,12-2=10,10/1=10",
    "3*4=12,12-2=10,1*10=10",  # operand order is free for + and *
])
def test_scorer_accepts_any_valid_chain(answer):
    s = score(NUMS, TARGET, answer)
    assert s.solved and s.final_eq_valid and s.reason == "", (answer, s)


def test_scorer_accepts_an_alternative_to_the_generators_solution():
    generated = format_equations(solve(NUMS, TARGET))
    alternatives = ["4*3=12,12-2=10,10*1=10", "1+2=3,3+3=6,6+4=10", "2*3=6,4*1=4,6+4=10"]
    assert sum(a != generated for a in alternatives) >= 2
    for a in alternatives:
        assert score(NUMS, TARGET, a).solved
    # repeated inputs: each copy is used once
    assert score((5, 5, 2, 1), 10, "5+5=10,2-1=1,10*1=10").solved
    assert not score((5, 5, 2, 1), 10, "1*2=2,5/5=1,2*5=10").solved  # a third 5


@pytest.mark.parametrize("answer, reason", [
    ("4*3=13,13-3=10,10*1=10", "'4*3=13' is wrong"),  # wrong arithmetic
    ("3/2=1,1+4=5,5*1=5", "'3/2=1' is wrong"),  # inexact division
    ("1-2=0,3*4=12,12-2=10", "'1-2=0' is wrong"),  # a negative result cannot be written
    ("4*3=12,12-4=8,8+2=10", "operands not available"),  # reuses 4 (and leaves 1 unused)
    ("5+3=8,8+2=10,10*1=10", "operands not available"),  # 5 is not an input
    ("4*3=12,12-2=10,10+1=11", "expected only the target 10"),  # wrong final target
    ("4*3=12,12-2=10", "2 equation(s), expected 3"),
    ("4*3=12,12-2=10,10*1=10,10*1=10", "4 equation(s), expected 3"),
    ("4*3=12,,12-2=10,10*1=10", "4 equation(s), expected 3"),
    ("4*3=12 12-2=10,10*1=10", "2 equation(s), expected 3"),  # missing comma
    ("4*3=12|12-2=10,10*1=10", "2 equation(s), expected 3"),  # separator instead of comma
    ("", "1 equation(s), expected 3"),
    ("4*3=12,12-2=10,10*1=10<eos>", "has 6 tokens"),  # trailing EOS
    ("4*3,12-2=10,10*1=10", "has 3 tokens"),  # missing '=' and result
    ("4*3 12,12-2=10,10*1=10", "has 4 tokens"),  # missing '='
    ("4*3=12=12,12-2=10,10*1=10", "has 7 tokens"),
    ("4*3=12,<pause>12-2=10,10*1=10", "has 6 tokens"),  # stray pause
    ("4 3*=12,12-2=10,10*1=10", "not of the form"),  # wrong token order
    ("<pause>*3=12,12-2=10,10*1=10", "not of the form"),  # a pause where a number belongs
    ("4x3=12,12-2=10,10*1=10", "'x' is not in the Countdown vocabulary"),
    ("04*3=12,12-2=10,10*1=10", "'04' is not in the Countdown vocabulary"),  # leading zero
])
def test_scorer_rejects_invalid_answers(answer, reason):
    s = score(NUMS, TARGET, answer)
    assert not s.solved and reason in s.reason, (answer, s)


def test_final_equation_flag():
    assert score(NUMS, TARGET, "4*3=13,13-3=10,10*1=10").final_eq_valid  # bad start, valid final equation
    assert score(NUMS, TARGET, "4*3=12,12-2=10").final_eq_valid  # too short, but ends well
    assert not score(NUMS, TARGET, "4*3=12,12-2=10,10+1=11").final_eq_valid  # wrong target
    assert not score(NUMS, TARGET, "4*3=12,12-2=10,10*1=11").final_eq_valid  # wrong arithmetic
    assert not score(NUMS, TARGET, "4*3=12,12-2=10,10*1=10<pause>").final_eq_valid  # malformed


def test_scorer_takes_ids_and_tensors_and_never_raises_on_the_answer():
    tok = CountdownTokenizer()
    ids = tok.encode("4*3=12,12-2=10,10*1=10")
    assert score(NUMS, TARGET, ids).solved and score(NUMS, TARGET, torch.tensor(ids)).solved
    for bad in ([-5, 99999, 3], [tok.eos_id] * 17, [tok.vocab_size + 3] * 5, list(range(17))):
        assert not score(NUMS, TARGET, bad).solved
    with pytest.raises(ValueError, match="10001"):
        score((1, 2, 3, 10001), 10, "1+2=3")
    with pytest.raises(ValueError, match="at least two"):
        score((1,), 10, "1+2=3")


# ----------------------------------------------------------------------------- lax scorer (the official code's rule)


def test_lax_scorer_accepts_what_the_strict_one_rejects():
    """14 5 9 7 -> 23: the target is used as an operand, 14 three times, 5 and 7 never; lax yes, strict no."""
    s = score((14, 5, 9, 7), 23, "23-14=9,9+14=23,9+14=23")
    assert s.solved_lax and not s.solved and s.final_eq_valid
    assert "operands not available" in s.reason
    assert solve((14, 5, 9, 7), 23) is not None  # a solvable problem, as in the test sets


# References written from the rules' descriptions, on the answer text, with plain loops.
_REF_EQ = re.compile(r"(\d+)([-+*/])(\d+)=(\d+)")


def _ref_equation(piece: str):
    """(x, y, z) of a correct 'x op y=z' (results non-negative integers <= MAX_VALUE, exact division), else None."""
    m = _REF_EQ.fullmatch(piece)
    if m is None:
        return None
    x, op, y, z = int(m[1]), m[2], int(m[3]), int(m[4])
    if op == "+":
        r = x + y
    elif op == "-":
        r = x - y
    elif op == "*":
        r = x * y
    else:
        r = x // y if y != 0 and x % y == 0 else None
    if r is None or not 0 <= r <= MAX_VALUE or r != z:
        return None
    return x, y, z


def _ref_strict(numbers, target, answer: str) -> bool:
    """len(numbers) - 1 equations; each takes its two operands out of the pool (inputs, then results, each
    usable once) and puts its result in; at the end the pool is exactly [target]."""
    pieces = answer.split(",")
    if len(pieces) != len(numbers) - 1:
        return False
    pool = list(numbers)
    for piece in pieces:
        eq = _ref_equation(piece)
        if eq is None:
            return False
        x, y, z = eq
        for v in (x, y):
            if v not in pool:
                return False
            pool.remove(v)
        pool.append(z)
    return pool == [target]


def _ref_lax(numbers, target, answer: str) -> bool:
    """Every equation correct with both operands among the inputs, the target and earlier results (reuse and
    unused inputs allowed, any count), and the last result equal to the target."""
    available = list(numbers) + [target]
    last = None
    for piece in answer.split(","):
        eq = _ref_equation(piece)
        if eq is None:
            return False
        x, y, z = eq
        if x not in available or y not in available:
            return False
        available.append(z)
        last = z
    return last == target


LAX_TABLE = [  # numbers, target, answer, strict, lax
    ((1, 2, 3, 4), 10, "4*3=12,12-2=10,10*1=10", True, True),
    ((1, 2, 3, 4), 10, "1+2=3,3+3=6,6+4=10", True, True),
    ((1, 2, 3, 4), 10, "4*3=12,12-2=10", False, True),  # two equations, 1 unused
    ((1, 2, 3, 4), 10, "4+4=8,8+2=10", False, True),  # 4 reused
    ((1, 2, 3, 4), 10, "10*1=10", False, True),  # the target as an operand
    ((1, 2, 3, 4), 10, "10-4=6,6+4=10,10*1=10", False, True),
    ((1, 2, 3, 4), 10, "4*3=12,12-2=10,10+1=11", False, False),  # ends elsewhere
    ((1, 2, 3, 4), 10, "4*3=13,13-3=10,10*1=10", False, False),  # wrong arithmetic
    ((1, 2, 3, 4), 10, "5+5=10", False, False),  # 5 never available
    ((1, 2, 3, 4), 10, "4*3=12,12-2=10,10*1=10,10*1=10", False, True),  # four equations
    ((1, 2, 3, 4), 10, "4*3=12,,12-2=10", False, False),  # an empty piece
    ((1, 2, 3, 4), 10, "4*3=12,12-2=10,", False, False),  # a trailing comma
    ((1, 2, 3, 4), 10, "", False, False),
    ((5, 5, 2, 1), 10, "5+5=10,2-1=1,10*1=10", True, True),
    ((5, 5, 2, 1), 10, "1*2=2,5/5=1,2*5=10", False, True),  # a third 5 (lax: reuse)
    ((0, 3, 6, 2), 0, "0/3=0,6-2=4,4*0=0", True, True),  # 0 / x is allowed
    ((0, 3, 6, 2), 0, "3/0=0,6-2=4,4*0=0", False, False),  # x / 0 is not
    ((0, 3, 6, 2), 4, "3/2=1,6-2=4", False, False),  # inexact division
    ((14, 5, 9, 7), 23, "23-14=9,9+14=23,9+14=23", False, True),
    ((14, 5, 9, 7), 23, "14*9=126,126/7=18,18+5=23", True, True),
]


@pytest.mark.parametrize("numbers, target, answer, strict, lax", LAX_TABLE)
def test_scorers_on_a_table_of_small_cases(numbers, target, answer, strict, lax):
    assert (_ref_strict(numbers, target, answer), _ref_lax(numbers, target, answer)) == (strict, lax)
    s = score(numbers, target, answer)
    assert (s.solved, s.solved_lax) == (strict, lax), s


def test_scorers_agree_with_the_references_on_random_small_answers():
    """Random answers over tiny numbers (operands mostly available, some results off by one): both rules match
    their loop references on every case, strict implies lax, and all three outcomes occur."""
    rng = random.Random(7)
    outcomes = Counter()
    for _ in range(4000):
        numbers = tuple(rng.randint(0, 6) for _ in range(4))
        other = rng.randint(0, 12)  # a target drawn beforehand, which the free draws may use as an operand
        pool, seen = list(numbers), [*numbers, other]  # what a strict / a lax chain may use
        by_pool = rng.random() < 0.5  # draw operands as the strict rule does, or freely
        pieces, z = [], 0
        for _ in range(rng.choice([1, 2, 3, 3, 3, 4])):
            if by_pool and len(pool) >= 2:
                x, y = (pool.pop(rng.randrange(len(pool))) for _ in range(2))
            else:
                x, y = (rng.choice(seen) if rng.random() < 0.9 else rng.randint(0, 12) for _ in range(2))
            op = rng.choice("+-*/")
            z = {"+": x + y, "-": x - y, "*": x * y, "/": x // y if y else 0}[op]
            if rng.random() < 0.1 or z < 0:  # a wrong result (a negative one cannot be written)
                z = abs(z) + 1
            pieces.append(f"{x}{op}{y}={z}")
            pool.append(z)
            seen.append(z)
        target = z if rng.random() < 0.6 else other  # the last result, mostly
        answer = ",".join(pieces)
        strict, lax = _ref_strict(numbers, target, answer), _ref_lax(numbers, target, answer)
        s = score(numbers, target, answer)
        assert (s.solved, s.solved_lax) == (strict, lax), (numbers, target, answer, s)
        assert not strict or lax
        outcomes[strict, lax] += 1
    assert min(outcomes[True, True], outcomes[False, True], outcomes[False, False]) >= 100, outcomes


# ----------------------------------------------------------------------------- splits


def test_held_out_targets_and_disjoint_splits(small_task):
    cfg = small_task.cfg
    id_targets, ood_targets = split_targets(cfg)
    assert len(ood_targets) == 9 and sorted(id_targets + ood_targets) == list(range(10, 101))
    problems = small_task.problems()
    assert len(problems["train"]) == SMALL["num_train"]
    assert len(problems["test_id"]) == len(problems["test_ood"]) == SMALL["num_test"]
    held = set(ood_targets)
    assert not {p.target for p in problems["train"]} & held
    assert not {p.target for p in problems["test_id"]} & held
    assert {p.target for p in problems["test_ood"]} <= held
    keys = {split: [p.key for p in ps] for split, ps in problems.items()}
    for split, ks in keys.items():
        assert len(set(ks)) == len(ks), f"duplicate problems in {split}"
    assert not set(keys["train"]) & set(keys["test_id"])
    assert not set(keys["train"]) & set(keys["test_ood"])
    # a pure function of the config; another data seed holds out other targets
    assert CountdownTask(CountdownConfig(**SMALL)).problems() == problems
    assert split_targets(CountdownConfig(**SMALL, data_seed=1))[1] != ood_targets


@pytest.mark.parametrize("field, value, pattern", [
    ("held_out_frac", 0.0, r"task\.held_out_frac=0\.0"),
    ("held_out_frac", 1.0, r"task\.held_out_frac=1\.0"),
    ("held_out_frac", 0.999, r"task\.held_out_frac=0\.999 holds out 91 of 91"),
    ("max_input", 0, r"task\.max_input=0"),
    ("max_input", 10001, r"task\.max_input=10001"),
    ("min_target", 200, r"task\.min_target=200"),
    ("num_pause", -1, r"task\.num_pause=-1"),
    ("num_train", 0, r"task\.num_train=0"),
    ("eval_examples", 0, r"task\.eval_examples=0"),
    ("eval_temperature", -1.0, r"task\.eval_temperature=-1\.0"),
    ("prompt_format", "spaces", r"task\.prompt_format='spaces'"),
])
def test_bad_config_values_are_named(field, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict({"task": {"name": "countdown", field: value}})


# ----------------------------------------------------------------------------- tokenizer and data


def test_tokenizer_round_trip_and_number_tokens():
    tok = CountdownTokenizer()
    assert tok.vocab_size == MAX_VALUE + 1 + 9
    for i in range(MAX_VALUE + 1):
        assert tok.encode(str(i)) == [i]
    text = "14,83,88,91,23|" + "<pause>" * 8 + "83-14=69,91-88=3,69/3=23<eos>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) == PROMPT_TOKENS + 8 + ANSWER_TOKENS + 1
    assert tok.encode("1 + 2 = 3") == tok.encode("1+2=3")
    for bad in ("10001", "007", "x", "<pad>", "<pause", "^"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            tok.encode(f"1+{bad}=3")


def test_sequences_and_prompt_masking(small_task):
    data, tok = small_task.train_data(), small_task.tokenizer
    P = data.prompt_len
    assert P == PROMPT_TOKENS + 8 and data.answer_len == ANSWER_TOKENS + 1
    assert data.seqs.shape == (SMALL["num_train"], P + ANSWER_TOKENS + 1)
    assert data.seqs.shape[1] - 1 == small_task.seq_len
    p = data.problems[0]
    expected = ",".join(map(str, (*p.numbers, p.target))) + "|" + "<pause>" * 8 + format_equations(p.solution) + "<eos>"
    assert tok.decode(data.seqs[0].tolist()) == expected
    batch = data.get(torch.arange(len(data)))
    assert batch.doc_ids is None and torch.equal(batch.input_ids, data.seqs[:, :-1])
    scored = batch.targets != IGNORE
    # only the answer and EOS are scored: exactly the last ANSWER_TOKENS + 1 targets of every row
    assert scored.sum(1).eq(ANSWER_TOKENS + 1).all()
    assert torch.equal(batch.targets[:, P - 1 :], data.seqs[:, P:])
    assert (batch.targets[:, : P - 1] == IGNORE).all()
    # the pause tokens (and '|') are inputs but never targets
    pause_targets = (data.seqs[:, 1:] == tok.pause_id) | (data.seqs[:, 1:] == tok.sep_id)
    assert pause_targets.sum(1).eq(9).all() and not (pause_targets & scored).any()
    assert (batch.targets[:, -1] == tok.eos_id).all()


def test_prompts_for_decoding_benchmarks(small_task):
    prompts = small_task.prompts(5, seed=3)
    data = small_task.test_data()
    assert len(prompts) == 5 and all(p.shape == (data.prompt_len,) for p in prompts)
    assert all(int(p[-1]) == small_task.tokenizer.pause_id for p in prompts)
    rows = {tuple(r) for r in data.seqs[:, : data.prompt_len].tolist()}
    assert all(tuple(p.tolist()) in rows for p in prompts)
    assert [p.tolist() for p in small_task.prompts(5, 64, seed=3)] == [p.tolist() for p in prompts]
    with pytest.raises(ValueError, match="n=1000"):
        small_task.prompts(1000)


# ----------------------------------------------------------------------------- evaluation


def test_true_answers_score_as_solved(small_task):
    """The scoring path of evaluate gives 1.0 on the true answers, with or without the trailing EOS."""
    for split in ("test_id", "test_ood"):
        data = small_task.test_data(split)
        answers = data.seqs[:, data.prompt_len :]  # (n, 18): equations + EOS
        for rows in (answers, answers[:, :-1]):
            scores = score_rows(data.problems, rows)
            assert all(s.solved and s.final_eq_valid for s in scores)
        broken = answers.clone()
        broken[:, 0] = small_task.tokenizer.pause_id
        assert not any(s.solved for s in score_rows(data.problems, broken))
    with pytest.raises(ValueError, match="do not match"):
        score_rows(data.problems[:2], answers)


class _Oracle(torch.nn.Module):
    """Puts all mass on the true continuation of whichever test sequence the prefix belongs to."""

    def __init__(self, seqs: torch.Tensor, vocab: int):
        super().__init__()
        self.seqs, self.vocab = seqs, vocab
        self.cfg = type("C", (), {"max_seq_len": 64})()

    def forward(self, ids, doc_ids=None):
        B, T = ids.shape
        nxt = torch.zeros(B, T, dtype=torch.long)
        for b in range(B):
            row = next(s for s in self.seqs if torch.equal(s[:T], ids[b]))
            nxt[b] = row[1 : T + 1]
        return nxt, None

    def logits(self, nxt):
        return torch.nn.functional.one_hot(nxt, self.vocab).float() * 50.0


def test_evaluate_scores_a_perfect_model_as_one(small_task):
    seqs = torch.cat([small_task.test_data("test_id").seqs, small_task.test_data("test_ood").seqs])
    out = small_task.evaluate(_Oracle(seqs, small_task.tokenizer.vocab_size), max_examples=6)
    assert out == {f"{k}_{s}": 1.0 for k in ("solved", "solved_lax", "final_eq_valid") for s in ("id", "ood")}


@pytest.mark.parametrize("objective", ["next_latent", "bst"])
def test_evaluate_on_untrained_model(objective):
    comps = build(config_from_dict(_tiny_run(**{"objective.name": objective})))
    comps.model.train()
    out = comps.task.evaluate(comps.model, comps.objective)
    assert set(out) == {f"{k}_{s}" for k in ("solved", "solved_lax", "final_eq_valid") for s in ("id", "ood")}
    assert all(0.0 <= v <= 1.0 for v in out.values())
    assert comps.model.training  # restored


def test_jtp_decodes_through_its_fetch_module(monkeypatch):
    """Countdown's evaluation decodes a JTP model through its slot-0 head (``decoding_head``), called with the states
    and the tokens they were computed at."""
    from nextlat.decoding.reference import generate

    comps = build(config_from_dict(_tiny_run(**{"objective.name": "jtp"})))
    model, objective, task = comps.model.eval(), comps.objective, comps.task
    head, calls = objective.decoding_head(model), []

    def spy(h, ids):
        calls.append((tuple(h.shape[:-1]), tuple(ids.shape)))
        return head(h, ids)

    monkeypatch.setattr(objective, "decoding_head", lambda m: spy)
    prompt = task.test_data().seqs[:4, : task.test_data().prompt_len]
    got = task._decode(model, objective, prompt)
    assert calls and all(a == b for a, b in calls)
    with torch.no_grad():
        assert torch.equal(got, generate(model, prompt, ANSWER_TOKENS + 1, stop_id=task.tokenizer.eos_id,
                                         head=head)[:, prompt.shape[1] :])
    expected = {f"{m}_{s}" for m in ("solved", "solved_lax", "final_eq_valid") for s in ("id", "ood")}
    assert set(task.evaluate(model, objective)) == expected


def test_next_latent_trains_on_countdown(tmp_path):
    cfg = config_from_dict(_tiny_run(**{"train.steps": 4}))
    results = Trainer(cfg, out_dir=tmp_path).fit()
    assert set(results["eval"]) >= {"solved_id", "solved_ood"}
    losses = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_losses = [r["loss"] for r in losses if r["kind"] == "train"]
    assert len(train_losses) == 4 and all(math.isfinite(v) for v in train_losses)


# ----------------------------------------------------------------------------- sampled evaluation


def test_sampled_evaluation_is_seeded_and_uses_the_sampler():
    from nextlat.decoding.reference import generate
    from nextlat.decoding.sampling import Sampling

    task = CountdownTask(CountdownConfig(**SMALL, eval_temperature=1.0))
    tok = task.tokenizer
    P = task.test_data().prompt_len
    seqs = torch.cat([task.test_data("test_id").seqs, task.test_data("test_ood").seqs])
    first = torch.log(torch.tensor([0.6, 0.4], dtype=torch.float64))

    class Model(_Oracle):
        def forward(self, ids, doc_ids=None):
            B, T = ids.shape
            h = torch.full((B, T, 2), -1, dtype=torch.long)  # (true next token, position)
            h[..., 1] = torch.arange(T)
            h[..., 0] = tok.eos_id
            for b in range(B):
                row = next((s for s in self.seqs if torch.equal(s[:T], ids[b])), None)
                if row is not None:
                    h[b, :, 0] = row[1 : T + 1]
            return h, None

        def logits(self, h):
            nxt, pos = h[..., 0], h[..., 1]
            out = torch.full((*nxt.shape, self.vocab), -1e4, dtype=torch.float64)
            out.scatter_(-1, nxt[..., None], 0.0)
            at_first = pos == P - 1  # predicting the first answer token: true 0.6, pause 0.4
            out[at_first] = -1e4
            out[at_first, nxt[at_first]] = first[0]
            out[at_first, tok.pause_id] = first[1]
            return out

    model = Model(seqs, tok.vocab_size)
    out = task.evaluate(model, max_examples=60, seed=5)
    assert out == task.evaluate(model, max_examples=60, seed=5)  # reproducible
    assert out != task.evaluate(model, max_examples=60, seed=6)  # and the seed matters
    for k in ("solved", "solved_lax", "final_eq_valid"):
        assert out[f"{k}_id"] == out[f"{k}_ood"] == 1.0  # greedy takes the likelier first token
    # the sampled metrics are the scores of the sampler's own draws under a generator seeded the same way
    for split, tag in (("test_id", "id"), ("test_ood", "ood")):
        data = task.test_data(split)
        g = torch.Generator().manual_seed(5)
        rows = generate(model, data.seqs[:60, :P], ANSWER_TOKENS + 1, sampling=Sampling(temperature=1.0),
                        generator=g, stop_id=tok.eos_id)[:, P:]
        scores = score_rows(data.problems[:60], rows)
        assert out[f"solved_sampled_{tag}"] == sum(s.solved for s in scores) / 60
        assert out[f"solved_lax_sampled_{tag}"] == sum(s.solved_lax for s in scores) / 60
        assert out[f"final_eq_valid_sampled_{tag}"] == sum(s.final_eq_valid for s in scores) / 60
    # T = 1: a problem is solved when the first token is drawn right, p = 0.6 (120 draws: 5 standard errors)
    rate = (out["solved_sampled_id"] + out["solved_sampled_ood"]) / 2
    assert abs(rate - 0.6) < 5 * (0.24 / 120) ** 0.5, rate
    assert out["solved_lax_sampled_id"] == out["solved_sampled_id"]  # a pause first makes both fail
    # greedy only by default: no sampled keys
    greedy_only = CountdownTask(CountdownConfig(**SMALL)).evaluate(model, max_examples=4)
    assert not any("sampled" in k for k in greedy_only)


def test_sampled_evaluation_of_untrained_models_including_bst():
    for objective in ("next_latent", "bst"):
        comps = build(config_from_dict(_tiny_run(**{"objective.name": objective, "task.eval_temperature": 1.0})))
        out = comps.task.evaluate(comps.model, comps.objective, seed=1)
        assert set(out) == {f"{k}{d}_{s}" for k in ("solved", "solved_lax", "final_eq_valid")
                            for d in ("", "_sampled") for s in ("id", "ood")}
        assert out == comps.task.evaluate(comps.model, comps.objective, seed=1)


# ----------------------------------------------------------------------------- the official prompt format


def test_official_prompt_format():
    task = CountdownTask(CountdownConfig(**SMALL, prompt_format="official"))
    data, tok = task.train_data(), task.tokenizer
    P = data.prompt_len
    assert P == 5 + 8 and task.seq_len == P + ANSWER_TOKENS and data.seqs.shape[1] == P + ANSWER_TOKENS + 1
    p = data.problems[0]
    text = " ".join(map(str, (*p.numbers, p.target))) + "|" * 8 + format_equations(p.solution) + "<eos>"
    assert tok.decode(data.seqs[0].tolist()) == text and tok.encode(text) == data.seqs[0].tolist()
    # the same problems and answers as the default format; only the prompt differs
    ours = CountdownTask(CountdownConfig(**SMALL)).train_data()
    assert ours.problems == data.problems and torch.equal(ours.seqs[:, ours.prompt_len :], data.seqs[:, P:])
    batch = data.get(torch.arange(len(data)))
    assert (batch.targets != IGNORE).sum(1).eq(ANSWER_TOKENS + 1).all()
    assert torch.equal(batch.targets[:, P - 1 :], data.seqs[:, P:])
    seqs = torch.cat([task.test_data("test_id").seqs, task.test_data("test_ood").seqs])
    assert set(task.evaluate(_Oracle(seqs, tok.vocab_size), max_examples=6).values()) == {1.0}
