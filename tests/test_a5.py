"""A5 word problem: group tables, data, tokenizer, RNN evaluation of the dynamics model, training."""

from __future__ import annotations

import itertools
import json
import runpy
from pathlib import Path

import pytest
import torch

from nextlat.cli import main
from nextlat.config import ConfigError, with_settings
from nextlat.registry import build_task, config_from_dict, task_class
from nextlat.tasks.a5 import (
    ELEMENTS,
    IDENTITY,
    INV,
    MUL,
    A5Config,
    A5Task,
    A5Tokenizer,
    rnn_accuracy_by_position,
    running_product,
    transformer_accuracy_by_position,
)
from nextlat.training.build import build
from nextlat.training.checkpoint import read_checkpoint, resolve_checkpoint
from nextlat.training.loop import Trainer

TINY_A5 = {
    "run_name": "tiny-a5",
    "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "max_seq_len": 16},
    "objective": {"name": "next_latent", "horizon": 1, "lambda_h": 1.0, "lambda_kl": 0.0},
    "task": {"name": "a5", "train_len": 6, "eval_lengths": [6, 10], "num_train": 64, "num_test": 12,
             "eval_examples": 12},
    "train": {"steps": 3, "batch_size": 16, "lr": 1e-3, "log_every": 1, "progress": False, "device": "cpu",
              "precision": "fp32", "seed": 0},
}


def tiny(**overrides):
    return config_from_dict(with_settings(TINY_A5, overrides))


def perm_matrix(p: tuple[int, ...]) -> torch.Tensor:
    """Matrix sending basis vector e_i to e_{p(i)}; applying a then b is P_b @ P_a."""
    m = torch.zeros(5, 5, dtype=torch.long)
    for i, image in enumerate(p):
        m[image, i] = 1
    return m


# ----------------------------------------------------------------------------- the group


def test_elements_are_the_60_even_permutations_identity_first():
    assert len(ELEMENTS) == 60 and len(set(ELEMENTS)) == 60
    assert ELEMENTS[IDENTITY] == (0, 1, 2, 3, 4) and IDENTITY == 0
    assert list(ELEMENTS) == sorted(ELEMENTS)
    # even = determinant +1 of the permutation matrix; the odd ones are exactly the other 60
    even = {p for p in itertools.permutations(range(5)) if round(torch.det(perm_matrix(p).double()).item()) == 1}
    assert set(ELEMENTS) == even


def test_multiplication_table_is_a_group_in_the_documented_convention():
    n = 60
    assert MUL.shape == (n, n) and MUL.dtype == torch.long
    assert MUL.min() >= 0 and MUL.max() < n  # closure
    a, b, c = (torch.arange(n).view(-1, 1, 1), torch.arange(n).view(1, -1, 1), torch.arange(n).view(1, 1, -1))
    assert torch.equal(MUL[MUL[a, b], c], MUL[a, MUL[b, c]])  # associativity over all 216k triples
    assert torch.equal(MUL[IDENTITY], torch.arange(n)) and torch.equal(MUL[:, IDENTITY], torch.arange(n))
    assert (MUL[torch.arange(n), INV] == IDENTITY).all() and (MUL[INV, torch.arange(n)] == IDENTITY).all()
    for row in MUL:  # Latin square: every row and column is a permutation of the elements
        assert sorted(row.tolist()) == list(range(n))
    # a * b means "apply a, then b": its matrix is P_b @ P_a
    for i, j in [(1, 2), (5, 17), (59, 30), (33, 33)]:
        assert torch.equal(perm_matrix(ELEMENTS[MUL[i, j]]), perm_matrix(ELEMENTS[j]) @ perm_matrix(ELEMENTS[i]))
    assert not torch.equal(MUL, MUL.T)  # A5 is not abelian, so the convention matters


# ----------------------------------------------------------------------------- data and tokens


def test_targets_are_running_products():
    task = A5Task(A5Config(train_len=7, num_train=50, num_test=5))
    batch = task.train_data().get(torch.arange(50))
    assert batch.input_ids.shape == batch.targets.shape == (50, 7)
    assert batch.input_ids.dtype == batch.targets.dtype == torch.long and batch.doc_ids is None
    for x, s in zip(batch.input_ids.tolist(), batch.targets.tolist()):
        state = perm_matrix(ELEMENTS[IDENTITY])
        for t, xt in enumerate(x):
            state = perm_matrix(ELEMENTS[xt]) @ state  # apply x_t after everything so far
            assert torch.equal(state, perm_matrix(ELEMENTS[s[t]]))
    assert torch.equal(running_product(batch.input_ids), batch.targets)


def test_data_is_fixed_by_seed_and_test_sets_differ():
    cfg = A5Config(train_len=12, eval_lengths=[12, 36], num_train=100, num_test=40)
    a, b = A5Task(cfg), A5Task(cfg)
    assert torch.equal(a.train_data().inputs, b.train_data().inputs)
    assert torch.equal(a.test_data(36).targets, b.test_data(36).targets)
    assert a.test_data(36).inputs.shape == (40, 36)
    assert not torch.equal(a.train_data().inputs[:40], a.test_data(12).inputs)
    other = A5Task(A5Config(train_len=12, num_train=100, data_seed=1))
    assert not torch.equal(a.train_data().inputs, other.train_data().inputs)
    # inputs are (roughly) uniform over the 60 elements
    counts = torch.bincount(A5Task(A5Config(num_train=5000)).train_data().inputs.long().flatten(), minlength=60)
    assert counts.min() > 0.7 * counts.float().mean()


def test_tokenizer_round_trip_and_errors():
    tok = A5Tokenizer()
    assert tok.vocab_size == 61 and tok.eos_id == 60 and A5Task(A5Config()).vocab_size == 61
    assert tok.encode("01234") == [IDENTITY]
    text = " ".join("".join(map(str, p)) for p in ELEMENTS[:5]) + " <eos>"
    assert tok.decode(tok.encode(text)) == text
    for bad in ("10234", "0123", "x", "e0"):  # 10234 is an odd permutation
        with pytest.raises(ValueError, match=repr(bad)):
            tok.encode(f"01234 {bad}")


@pytest.mark.parametrize("key,value,pattern", [
    ("train_len", 0, r"task.train_len=0"),
    ("eval_lengths", [12, 0], r"task.eval_lengths\[1\]=0"),
    ("eval_lengths", [], r"task.eval_lengths"),
    ("eval_lengths", [12, 12], r"distinct"),
    ("num_train", 0, r"task.num_train=0"),
    ("num_test", -1, r"task.num_test=-1"),
    ("eval_examples", 0, r"task.eval_examples=0"),
    ("eval_lengths", "12", r"task.eval_lengths: expected a list"),
])
def test_bad_config_values_raise(key, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        tiny(**{f"task.{key}": value})


def test_registered_and_prompts():
    assert task_class("a5") is A5Task
    task = build_task(A5Config(train_len=5))
    prompts = task.prompts(3)
    assert len(prompts) == 3 and all(p.shape == (5,) and p.dtype == torch.long for p in prompts)
    assert all(torch.equal(p, q) for p, q in zip(prompts, task.prompts(3, seed=0)))
    assert task.prompts(2, length=9)[0].shape == (9,)


# ----------------------------------------------------------------------------- evaluation


def _tiny_model_and_data(L: int = 9):
    comps = build(tiny())
    task = comps.task
    data = task.test_data(L)
    return comps, data.get(torch.arange(len(data)))


def test_rnn_with_oracle_dynamics_reproduces_the_transformer():
    """Dynamics that return the transformer's own h_t make the RNN score exactly like the transformer.

    In float64: the RNN's first state comes from a one-token forward pass, another kernel shape than the whole
    word's; float32 rounds the two differently (by BLAS), which could flip a near-tied argmax of this random model."""
    (comps, batch) = _tiny_model_and_data()
    model = comps.model.eval().double()
    inputs, targets = batch.input_ids, batch.targets
    with torch.no_grad():
        h_true, emb = model(inputs)  # (B, L, D)
    calls = []

    def oracle(h, next_emb):
        t = len(calls) + 1  # called for positions 2..L in order (0-based index t)
        expected_prev = h_true[:, 0] if t == 1 else calls[-1]
        assert torch.allclose(h, expected_prev, rtol=1e-10, atol=1e-12)
        assert torch.equal(next_emb, emb[:, t])  # the training-time embedding of x_t
        calls.append(h_true[:, t])
        return h_true[:, t]

    rnn = rnn_accuracy_by_position(model, oracle, inputs, targets)
    tf = transformer_accuracy_by_position(model, inputs, targets)
    assert len(calls) == inputs.shape[1] - 1
    assert rnn.shape == tf.shape == (inputs.shape[1],)
    assert torch.equal(rnn, tf)


def test_evaluate_scores_a_perfect_model_and_dynamics_as_one():
    task = A5Task(A5Config(train_len=4, eval_lengths=[3, 7], num_train=8, num_test=10, eval_examples=10))

    class Oracle(torch.nn.Module):
        """h_t is the one-hot of the true state; the embedding is the one-hot of the token."""

        cfg = type("C", (), {"max_seq_len": 64})()

        def embed(self, ids):
            return torch.nn.functional.one_hot(ids, 60).float()

        def forward(self, ids, doc_ids=None):
            return self.embed(running_product(ids)), self.embed(ids)

        def logits(self, h):
            return h * 50.0

    class PerfectDynamics(torch.nn.Module):
        def dynamics(self, h, next_emb):
            return torch.nn.functional.one_hot(MUL[h.argmax(-1), next_emb.argmax(-1)], 60).float()

    out = task.evaluate(Oracle(), PerfectDynamics())
    # every state is a one-hot of norm 1, so the RNN's states keep the transformer's scale exactly
    keys = ("acc", "acc_last", "rnn_acc", "rnn_acc_last", "rnn_norm_ratio")
    assert out == {f"{k}@{L}": 1.0 for L in (3, 7) for k in keys}


def test_rnn_norm_ratio_measures_drift_off_the_trained_states():
    """A dynamics model that doubles the state each step ends 2^(L-1) times the first state's norm."""
    comps = build(tiny())
    model, task = comps.model.eval().double(), comps.task  # float64: evaluate and this test run other shapes
    L, T = task.cfg.eval_lengths[-1], task.cfg.train_len

    class Doubling(torch.nn.Module):
        def dynamics(self, h, next_emb):
            return 2 * h

    out = task.evaluate(model, Doubling())
    words = task.test_data(L).inputs.long()
    with torch.no_grad():
        first = model(words[:, :1])[0][:, 0].norm(dim=-1).mean()
        trained = model(words[:, :T])[0].norm(dim=-1).mean()
    assert out[f"rnn_norm_ratio@{L}"] == pytest.approx((2 ** (L - 1) * first / trained).item(), rel=1e-10)


def test_evaluate_keys_and_state():
    comps = build(tiny())
    model, objective, task = comps.model, comps.objective, comps.task
    model.train()
    out = task.evaluate(model, objective)
    keys = ("acc", "acc_last", "rnn_acc", "rnn_acc_last", "rnn_norm_ratio")
    assert set(out) == {f"{k}@{L}" for L in (6, 10) for k in keys}
    assert all(0.0 <= v <= 1.0 for k, v in out.items() if "norm" not in k)
    assert all(v > 0 for k, v in out.items() if "norm" in k)
    assert model.training and objective.training
    assert task.evaluate(model, objective) == out  # deterministic (same process, same inputs)
    # Chunked evaluation computes the same metrics: in float64, so that the only difference left is the
    # order of summation (another chunk size runs other kernel shapes, which round float32 differently).
    model.double(), objective.double()
    whole = task.evaluate(model, objective)
    task.EVAL_CHUNK = 5
    chunked = task.evaluate(model, objective)
    assert chunked.keys() == whole.keys()
    for k in whole:
        assert chunked[k] == (pytest.approx(whole[k], rel=1e-12) if "norm" in k else whole[k]), k
    # a next-token objective has no dynamics: no rnn keys
    gpt = build(tiny(**{"objective.name": "next_token"}))
    assert set(gpt.task.evaluate(gpt.model, gpt.objective)) == {f"{k}@{L}" for L in (6, 10) for k in ("acc", "acc_last")}
    # lengths past the model's position table get only the RNN metrics, with a warning
    long = build(tiny(**{"task.eval_lengths": [6, 20]}))
    with pytest.warns(UserWarning, match="eval length 20"):
        keys = set(long.task.evaluate(long.model, long.objective))
    assert "acc@20" not in keys and "rnn_acc@20" in keys and "acc@6" in keys


def test_next_latent_trains_on_a5(tmp_path):
    cfg = tiny(**{"train.steps": 4})
    trainer = Trainer(cfg, out_dir=tmp_path / "run")
    before = {k: v.clone() for k, v in trainer.objective.state_dict().items()}
    results = trainer.fit()
    assert "rnn_acc@10" in results["eval"] and "acc_last@6" in results["eval"]
    after = trainer.objective.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the dynamics model was trained
    # the loss has the token and latent terms, and they are finite
    batch = trainer.data.get(torch.arange(8))
    out = trainer.objective(trainer.model, batch)
    assert set(out.terms) == {"ce", "next_h@1"} and torch.isfinite(out.loss())


def test_eval_takes_other_lengths_and_refuses_non_task_overrides(tmp_path, capsys):
    """`nextlat eval RUN --set task.eval_lengths=[...]` scores a trained run at lengths it was not planned for."""
    run = tmp_path / "run"
    Trainer(tiny(**{"train.steps": 2}), out_dir=run).fit()
    capsys.readouterr()
    sets = ["--set", "task.eval_lengths=[9]", "--set", "task.eval_examples=5"]
    assert main(["eval", str(run), "--device", "cpu", *sets]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["set"] == ["task.eval_lengths=[9]", "task.eval_examples=5"]
    assert {"acc@9", "rnn_acc@9", "rnn_acc_last@9"} <= set(res) and "acc@6" not in res
    # the saved run is untouched
    assert read_checkpoint(resolve_checkpoint(run)).cfg.task.eval_lengths == [6, 10]
    for bad, named in [("model.n_layer=3", "model.n_layer"), ("task.name=pathstar", "task.name"),
                       ("task.eval_lengths=[0]", "task.eval_lengths[0]=0"), ("task.lengths=[9]", "task.lengths")]:
        assert main(["eval", str(run), "--device", "cpu", "--set", bad]) == 2, bad
        assert named in capsys.readouterr().err, bad


def test_rnn_diagnostics_script_runs_on_a_trained_run(tmp_path, capsys):
    run = tmp_path / "run"
    trainer = Trainer(tiny(**{"train.steps": 2}), out_dir=run)
    trainer.fit()
    capsys.readouterr()
    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "a5_rnn_diagnostics.py"))
    # the projection leaves a state on the final norm's image (g * u with rms(u) = 1) where it is, and puts a
    # state off it (scaled) back
    norm = trainer.model.norm
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, norm.weight.numel()))
        u = torch.randn(4, norm.weight.numel())
        h = norm.weight * u / u.pow(2).mean(-1, keepdim=True).sqrt()
        project = script["projected"](lambda s, e: s, norm)
        assert torch.allclose(project(h, None), h, atol=1e-4) and torch.allclose(project(3 * h, None), h, atol=1e-4)
    script["main"]([str(run)])
    out = capsys.readouterr().out
    assert "one-step relative error at positions 2..6" in out and "entries of |g| < 0.05" in out
    assert out.count("RNN, projected") == 2 and "length  10" in out  # both evaluation lengths, both variants


def test_jtp_is_evaluated_through_its_fetch_module():
    """acc@L of a JTP model is the accuracy of its slot-0 next-token head, not of the LM head on h_t."""
    comps = build(tiny(**{"objective.name": "jtp", "objective.horizon": 1}))
    model, objective, task = comps.model.double(), comps.objective.double(), comps.task
    out = task.evaluate(model, objective)
    head = objective.decoding_head(model)
    for L in comps.cfg.task.eval_lengths:
        data = task.test_data(L)
        batch = data.get(torch.arange(min(len(data), comps.cfg.task.eval_examples)))
        with torch.no_grad():
            h = model(batch.input_ids)[0]
            pred = head(h, batch.input_ids).argmax(-1)
            assert not torch.equal(pred, model.logits(h).argmax(-1))
        per_pos = (pred == batch.targets).double().mean(0)
        assert out[f"acc@{L}"] == pytest.approx(per_pos.mean().item(), rel=1e-12)
        assert out[f"acc_last@{L}"] == pytest.approx(per_pos[-1].item(), rel=1e-12)
