"""Countdown (Gandhi et al., "Stream of Search", arXiv 2404.03683), as used by NextLat (arXiv 2511.05963).

Four input numbers and a target; the answer is three equations, each combining two available
numbers with + - * or exact /, whose results become available, the last one reaching the target,
every input used exactly once. One sequence (every integer 0..10000 is a single token)::

    14,83,88,91,23|<pause>x8 83-14=69,91-88=3,69/3=23<eos>

Problem distribution (our choices where the paper leaves them open): targets are drawn uniformly
from min_target..max_target (10..100); a seeded ``held_out_frac`` share (10%) of these targets is
reserved for the out-of-distribution split, which only uses them, while training and in-distribution
test problems never do. Inputs are drawn uniformly, with repetition, from min_input..max_input
(1..99) and shown in draw order. Only solvable problems are kept (redrawn otherwise); problems are
distinct as (multiset of inputs, target) and test problems never occur in training. The answer is
the first solution of a fixed depth-first search (:func:`solve`). Arithmetic rules, shared by the
solver and the scorer: results are non-negative integers <= 10000, division is exact and never by
zero.

Prompt format. The official NextLat code writes the prompt as ``a b c d t`` followed by eight ``|``
pause tokens (13 tokens); ours (``prompt_format: commas``, the default, what every shipped recipe
and saved run uses) separates the numbers with commas, closes the prompt with ``|`` and then puts
``num_pause`` dedicated ``<pause>`` tokens (18 tokens with 8 pauses). Both carry the same
information; ours gives the model five more constant positions to compute in before the answer (the
four commas and the separator), the same for every objective. ``prompt_format: official`` writes
the official prompt (the answer and EOS are the same in both).

Every sequence has the same token length (the prompt, 17 answer tokens and EOS), so the data is one
(n, L) tensor. Token losses cover only the answer and EOS; the pauses belong to the prompt.

Scoring. Evaluation decodes every test answer greedily (and, with ``eval_temperature`` > 0, once
more by sampling) and scores each generation two ways (:func:`score`). ``solved`` (the headline
number) is strict: any valid chain of three equations that uses every input exactly once and ends
at the target, not only the generator's. ``solved_lax`` is the rule of the official NextLat code,
as it was described to us: every equation must be well formed and correct, its operands need only
belong to the numbers available so far (the inputs, the target itself, and the results of earlier
equations; reuse allowed, inputs may go unused, any number of equations), and the last result must
be the target. Strictly solved implies lax-solved, not the reverse (``23-14=9,9+14=23,9+14=23`` is
lax-solved for 14,5,9,7 -> 23).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor

from nextlat.config import ConfigError, TaskConfig
from nextlat.data import IGNORE, Batch
from nextlat.decoding.reference import generate, objective_head
from nextlat.decoding.sampling import GREEDY, Sampling
from nextlat.tasks.base import Task
from nextlat.tasks.vocab import WordTokenizer

MAX_VALUE = 10000
"""Largest number (and number token); no input or intermediate result may exceed it."""
NUM_INPUTS = 4
NUM_EQUATIONS = NUM_INPUTS - 1
EQ_TOKENS = 5  # x op y = z
ANSWER_TOKENS = NUM_EQUATIONS * EQ_TOKENS + NUM_EQUATIONS - 1  # equations and the commas between them
PROMPT_TOKENS = 2 * NUM_INPUTS + 2  # a , b , c , d , target | (prompt_format commas, before the pauses)
PROMPT_FORMATS = ("commas", "official")
OPS = ("+", "-", "*", "/")

Equation = tuple[int, str, int, int]  # (x, op, y, z) meaning x op y = z


@dataclass
class CountdownConfig(TaskConfig):
    name: str = "countdown"
    num_train: int = 100_000
    """Fixed training problems."""
    num_test: int = 1000
    """Test problems per split (in-distribution and held-out targets), disjoint from training."""
    min_input: int = 1
    """Smallest input number."""
    max_input: int = 99
    """Largest input number (inputs are drawn uniformly from min_input..max_input, with repetition)."""
    min_target: int = 10
    """Smallest target."""
    max_target: int = 100
    """Largest target."""
    held_out_frac: float = 0.1
    """Share of the targets reserved for the out-of-distribution test split (seeded by data_seed)."""
    num_pause: int = 8
    """Pause tokens between the prompt and the answer (not scored)."""
    prompt_format: str = "commas"
    """How the numbers and pauses are written: ``commas`` (``14,83,88,91,23|`` then ``num_pause`` ``<pause>``
    tokens; ours) or ``official`` (``14 83 88 91 23`` then ``num_pause`` ``|`` tokens, the official NextLat code's)."""
    data_seed: int = 0
    """Seed of the problem generator and of the held-out targets (fixed across training seeds)."""
    eval_examples: int = 1000
    """Test problems per split used by each evaluation."""
    eval_temperature: float = 0.0
    """0: evaluation decodes greedily only. > 0: it also samples every answer once at this temperature (the
    official NextLat code samples at 1), seeded by the evaluation's seed, and reports the same scores again
    under ``*_sampled_*`` keys."""

    def validate(self) -> None:
        if not 0 <= self.min_input <= self.max_input <= MAX_VALUE:
            raise ConfigError(f"task.min_input={self.min_input}, task.max_input={self.max_input}: "
                              f"need 0 <= min_input <= max_input <= {MAX_VALUE}")
        if not 0 <= self.min_target <= self.max_target <= MAX_VALUE:
            raise ConfigError(f"task.min_target={self.min_target}, task.max_target={self.max_target}: "
                              f"need 0 <= min_target <= max_target <= {MAX_VALUE}")
        if not 0 < self.held_out_frac < 1:
            raise ConfigError(f"task.held_out_frac={self.held_out_frac}: must be in (0, 1)")
        n_targets = self.max_target - self.min_target + 1
        held = num_held_out(n_targets, self.held_out_frac)
        if not 1 <= held < n_targets:
            raise ConfigError(f"task.held_out_frac={self.held_out_frac} holds out {held} of {n_targets} targets "
                              f"({self.min_target}..{self.max_target}); need at least one on each side")
        if self.num_pause < 0:
            raise ConfigError(f"task.num_pause={self.num_pause}: must be >= 0")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ConfigError(f"task.prompt_format={self.prompt_format!r}: must be one of {', '.join(PROMPT_FORMATS)}")
        if not 0 <= self.eval_temperature < float("inf"):
            raise ConfigError(f"task.eval_temperature={self.eval_temperature}: must be >= 0 (0 = greedy only)")
        for key in ("num_train", "num_test", "eval_examples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"task.{key}={getattr(self, key)}: must be >= 1")


def prompt_tokens(cfg: CountdownConfig) -> int:
    """Tokens before the answer: the numbers, their separators and the pauses."""
    if cfg.prompt_format == "official":
        return NUM_INPUTS + 1 + cfg.num_pause  # a b c d target, then the pauses
    return PROMPT_TOKENS + cfg.num_pause


def num_held_out(n_targets: int, frac: float) -> int:
    """Held-out targets out of ``n_targets``: ``frac`` of them, rounded, at least one."""
    return max(1, round(frac * n_targets))


# ----------------------------------------------------------------------------- arithmetic


def apply_op(x: int, op: str, y: int) -> int | None:
    """x op y under the Countdown rules, or None when not allowed (negative, inexact or by-zero division, > 10000)."""
    if op == "+":
        z = x + y
    elif op == "-":
        z = x - y
    elif op == "*":
        z = x * y
    elif op == "/":
        if y == 0 or x % y:
            return None
        z = x // y
    else:
        raise ValueError(f"unknown operator {op!r} (known: {' '.join(OPS)})")
    return z if 0 <= z <= MAX_VALUE else None


def _combinations(a: int, b: int) -> list[Equation]:
    """Every allowed equation on the pair {a, b}, larger operand first (except 0 / b)."""
    hi, lo = (a, b) if a >= b else (b, a)
    out = [(hi, "+", lo, hi + lo), (hi, "-", lo, hi - lo), (hi, "*", lo, hi * lo)]
    out = [e for e in out if e[3] <= MAX_VALUE]
    if lo and hi % lo == 0:
        out.append((hi, "/", lo, hi // lo))
    elif lo == 0 and hi:
        out.append((0, "/", hi, 0))
    return out


def _pair_reaches(a: int, b: int, t: int) -> Equation | None:
    """One equation on {a, b} whose result is ``t``, or None."""
    hi, lo = (a, b) if a >= b else (b, a)
    if hi + lo == t:
        return (hi, "+", lo, t)
    if hi - lo == t:
        return (hi, "-", lo, t)
    if hi * lo == t:
        return (hi, "*", lo, t)
    if lo and hi == t * lo:
        return (hi, "/", lo, t)
    if t == 0 and lo == 0 and hi:
        return (0, "/", hi, 0)
    return None


def _search(nums: tuple[int, ...], target: int) -> list[Equation] | None:
    if len(nums) == 2:
        eq = _pair_reaches(nums[0], nums[1], target)
        return None if eq is None else [eq]
    seen = set()
    n = len(nums)
    for i in range(n):
        for j in range(i + 1, n):
            pair = (nums[i], nums[j]) if nums[i] <= nums[j] else (nums[j], nums[i])
            if pair in seen:  # equal values give equal sub-searches
                continue
            seen.add(pair)
            rest = tuple(nums[k] for k in range(n) if k != i and k != j)
            for eq in _combinations(*pair):
                tail = _search(rest + (eq[3],), target)
                if tail is not None:
                    return [eq, *tail]
    return None


def _ops(a: Tensor, b: Tensor) -> Tensor:
    """Results of the four operations on broadcastable integer tensors, stacked on a new last dim of 4.

    -1 marks a disallowed result or an operand that is already -1 (the rules of :func:`_combinations`).
    """
    a, b = torch.broadcast_tensors(a, b)
    hi, lo = torch.maximum(a, b), torch.minimum(a, b)
    q = hi // lo.clamp(min=1)
    prod = hi * lo
    out = torch.stack([hi + lo, hi - lo, prod, q], dim=-1)
    ok = torch.stack([hi + lo <= MAX_VALUE, lo >= 0, prod <= MAX_VALUE,
                      ((lo > 0) & (q * lo == hi)) | ((lo == 0) & (hi > 0))], dim=-1)
    return torch.where(ok & (lo >= 0)[..., None], out, -1)


def _reaches(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Whether one allowed operation on broadcastable (a, b) gives t (a or b of -1: no). Avoids division."""
    hi, lo = torch.maximum(a, b), torch.minimum(a, b)
    hit = (hi + lo == t) | (hi - lo == t) | (hi * lo == t) | ((lo > 0) & (hi == t * lo)) | ((t == 0) & (lo == 0) & (hi > 0))
    return hit & (lo >= 0)


def solvable(numbers: Tensor, targets: Tensor) -> Tensor:
    """Vectorised test of which (N, 4) input rows can reach their (N,) targets: (N,) bool.

    Enumerates every order of combining four numbers (a pair, then either the other pair or a
    number with the pair's result, then the last two), the same search space as :func:`solve`.
    """
    if numbers.dim() != 2 or numbers.shape[1] != NUM_INPUTS or targets.shape != numbers.shape[:1]:
        raise ValueError(f"solvable expects (N, {NUM_INPUTS}) numbers and (N,) targets, "
                         f"got {tuple(numbers.shape)} and {tuple(targets.shape)}")
    # int32 is exact here: operands never exceed MAX_VALUE, so products stay below 2^31.
    x, t = numbers.to(torch.int32), targets.to(torch.int32)[:, None, None]  # t: (N, 1, 1)
    hit = torch.zeros(x.shape[0], dtype=torch.bool)
    for i, j, k, m in ((0, 1, 2, 3), (0, 2, 1, 3), (0, 3, 1, 2), (1, 2, 0, 3), (1, 3, 0, 2), (2, 3, 0, 1)):
        v = _ops(x[:, i], x[:, j])  # (N, 4): the first result
        a, b = x[:, k, None], x[:, m, None]  # (N, 1): the untouched inputs
        hit |= _reaches(_ops(x[:, k], x[:, m])[:, :, None], v[:, None, :], t).flatten(1).any(1)  # the two pairs
        hit |= _reaches(_ops(a, v), b[:, :, None], t).flatten(1).any(1)  # (a with v), then with b
        hit |= _reaches(_ops(b, v), a[:, :, None], t).flatten(1).any(1)  # (b with v), then with a
    return hit


def solve(numbers: tuple[int, ...] | list[int], target: int) -> tuple[Equation, ...] | None:
    """One solution (len(numbers) - 1 equations) reaching ``target`` from ``numbers``, or None.

    Depth-first over pairs of available numbers and the allowed operations; deterministic (the
    same problem always gets the same solution).
    """
    numbers = tuple(numbers)
    if len(numbers) < 2:
        raise ValueError(f"solve needs at least two numbers, got {numbers}")
    if any(not 0 <= v <= MAX_VALUE for v in (*numbers, target)):
        raise ValueError(f"numbers {numbers} and target {target} must lie in 0..{MAX_VALUE}")
    sol = _search(numbers, target)
    return None if sol is None else tuple(sol)


def format_equations(equations: tuple[Equation, ...] | list[Equation]) -> str:
    """'83-14=69,91-88=3,69/3=23'."""
    return ",".join(f"{x}{op}{y}={z}" for x, op, y, z in equations)


# ----------------------------------------------------------------------------- tokenizer


class CountdownTokenizer(WordTokenizer):
    """Token id v is the integer v (0..10000); then + - * / = , | <pause> <eos>.

    Text has no spaces ('14,83,88,91,23|...'); encode also skips whitespace. Numbers must be written
    canonically (no leading zeros, no sign).
    """

    SYMBOLS = ("+", "-", "*", "/", "=", ",", "|", "<pause>", "<eos>")
    _PIECE = re.compile(r"\s*(\d+|<[a-z]*>?|.)")

    sep = ""

    def __init__(self):
        super().__init__([str(i) for i in range(MAX_VALUE + 1)] + list(self.SYMBOLS),
                         f"Countdown vocabulary (integers 0..{MAX_VALUE} without leading zeros, "
                         f"{' '.join(self.SYMBOLS)})")
        (self.plus_id, self.minus_id, self.times_id, self.div_id, self.eq_id, self.comma_id, self.sep_id,
         self.pause_id, self.eos_id) = (self.stoi[s] for s in self.SYMBOLS)
        self.op_ids = {self.stoi[op]: op for op in OPS}

    def split(self, text: str) -> list[str]:
        return self._PIECE.findall(text.rstrip())

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; two numbers in a row are written with a space between them (the official prompt)."""
        out = []
        for k, i in enumerate(ids):
            if k and 0 <= i <= MAX_VALUE and 0 <= ids[k - 1] <= MAX_VALUE:
                out.append(" ")
            out.append(self.itos[i] if 0 <= i < self.vocab_size else f"<{i}?>")
        return "".join(out)


# ----------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    numbers: tuple[int, ...]  # the inputs, in prompt order
    target: int
    solution: tuple[Equation, ...]  # the generator's solution

    @property
    def key(self) -> tuple[tuple[int, ...], int]:
        """Identity of the problem: inputs as a multiset, and the target."""
        return tuple(sorted(self.numbers)), self.target


def split_targets(cfg: CountdownConfig) -> tuple[list[int], list[int]]:
    """(in-distribution targets, held-out targets), a seeded partition of min_target..max_target."""
    targets = list(range(cfg.min_target, cfg.max_target + 1))
    held = set(random.Random(f"countdown-targets-{cfg.data_seed}").sample(
        targets, num_held_out(len(targets), cfg.held_out_frac)))
    return [t for t in targets if t not in held], sorted(held)


def generate_problems(n: int, targets: list[int], min_input: int, max_input: int, seed: int | str,
                      exclude: set | None = None, block: int = 8192) -> list[Problem]:
    """``n`` distinct solvable problems with targets from ``targets``, none of whose keys is in ``exclude``.

    Candidates are drawn in blocks and screened with :func:`solvable`; the kept ones, in draw
    order, are solved by :func:`solve`. The result is a pure function of the arguments.
    """
    if n < 1 or not targets or not 0 <= min_input <= max_input <= MAX_VALUE:
        raise ValueError(f"generate_problems: bad request n={n}, {len(targets)} targets, inputs {min_input}..{max_input}")
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[Problem] = []
    attempts, cap = 0, 50 * n + 10_000
    while len(out) < n:
        if attempts >= cap:
            raise ValueError(f"could not draw {n} distinct solvable Countdown problems in {cap} attempts "
                             f"(inputs {min_input}..{max_input}, {len(targets)} targets; found {len(out)}): "
                             "widen the input or target range, or ask for fewer problems")
        size = min(block, cap - attempts)
        attempts += size
        cands = [(tuple(rng.randint(min_input, max_input) for _ in range(NUM_INPUTS)), rng.choice(targets))
                 for _ in range(size)]
        ok = solvable(torch.tensor([c[0] for c in cands]), torch.tensor([c[1] for c in cands])).tolist()
        for (numbers, target), good in zip(cands, ok):
            key = (tuple(sorted(numbers)), target)
            if key in seen:
                continue
            seen.add(key)  # unsolvable keys too: they are never screened again
            if good:
                sol = _search(numbers, target)
                assert sol is not None, f"solvable() and solve() disagree on {numbers} -> {target}"
                out.append(Problem(numbers, target, tuple(sol)))
                if len(out) == n:
                    break
    return out


def encode_problem(p: Problem, tok: CountdownTokenizer, num_pause: int, prompt_format: str = "commas") -> list[int]:
    if prompt_format == "official":
        ids = [*p.numbers, p.target] + [tok.sep_id] * num_pause
    elif prompt_format == "commas":
        ids = []
        for v in p.numbers:
            ids += [v, tok.comma_id]
        ids += [p.target, tok.sep_id] + [tok.pause_id] * num_pause
    else:
        raise ValueError(f"unknown prompt format {prompt_format!r} (known: {', '.join(PROMPT_FORMATS)})")
    for k, (x, op, y, z) in enumerate(p.solution):
        ids += ([tok.comma_id] if k else []) + [x, tok.stoi[op], y, tok.eq_id, z]
    return ids + [tok.eos_id]


# ----------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Score:
    solved: bool
    """len(numbers) - 1 (three) well-formed, correct equations on available numbers, ending at the target."""
    final_eq_valid: bool
    """The last comma-separated equation alone is well formed, arithmetically correct and equals the target."""
    solved_lax: bool
    """The official NextLat code's rule: well-formed, correct equations whose operands are inputs, the target or
    earlier results (reuse allowed, not every input used, any number of equations), the last one giving the target."""
    reason: str = ""
    """Why the answer is not (strictly) solved ('' when it is)."""


_TOKENIZER: CountdownTokenizer | None = None


def _tokenizer() -> CountdownTokenizer:
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = CountdownTokenizer()
    return _TOKENIZER


def _parse_equation(ids: list[int], tok: CountdownTokenizer) -> Equation | str:
    """``x op y = z`` from 5 token ids, or a message saying why it is malformed / wrong."""
    if len(ids) != EQ_TOKENS:
        return f"equation {tok.decode(ids)!r} has {len(ids)} tokens, expected x op y = z"
    x, op, y, eq, z = ids
    if not (0 <= x <= MAX_VALUE and 0 <= y <= MAX_VALUE and 0 <= z <= MAX_VALUE) or op not in tok.op_ids \
            or eq != tok.eq_id:
        return f"equation {tok.decode(ids)!r} is not of the form x op y = z"
    if apply_op(x, tok.op_ids[op], y) != z:
        return f"equation {tok.decode(ids)!r} is wrong"
    return (x, tok.op_ids[op], y, z)


def _lax_solved(numbers: tuple[int, ...], target: int, equations: list[Equation | str]) -> bool:
    """The official rule on parsed comma-separated pieces (a str piece is malformed or wrong)."""
    available = {*numbers, target}
    for eq in equations:
        if isinstance(eq, str) or eq[0] not in available or eq[2] not in available:
            return False
        available.add(eq[3])
    return equations[-1][3] == target


def score(numbers: tuple[int, ...] | list[int], target: int, answer: str | list[int] | Tensor) -> Score:
    """Check an answer (text like '83-14=69,91-88=3,69/3=23', or its token ids, without EOS) for a problem.

    Strict (``solved``): accepts any valid chain of len(numbers) - 1 comma-separated equations
    ``x op y = z``: each equation's operands are taken from the pool (the inputs, then earlier results,
    each usable once), its result joins the pool, and the pool must end as just the target (so every
    input is used exactly once). ``final_eq_valid`` looks at the last comma-separated piece alone.
    ``solved_lax`` is the official code's rule on the same comma-separated pieces (see :class:`Score`).
    Malformed answers score as unsolved: this raises only on a bad problem, never on the answer.
    """
    numbers = tuple(numbers)
    if len(numbers) < 2 or any(not isinstance(v, int) or not 0 <= v <= MAX_VALUE for v in (*numbers, target)):
        raise ValueError(f"score: numbers {numbers} (at least two) and target {target!r} must be integers "
                         f"in 0..{MAX_VALUE}")
    n_eq = len(numbers) - 1
    tok = _tokenizer()
    if isinstance(answer, str):
        try:
            ids = tok.encode(answer)
        except ValueError as e:
            return Score(False, False, False, str(e))
    else:
        ids = [int(i) for i in (answer.tolist() if isinstance(answer, Tensor) else answer)]
    segments: list[list[int]] = [[]]
    for i in ids:
        if i == tok.comma_id:
            segments.append([])
        else:
            segments[-1].append(i)
    equations = [_parse_equation(seg, tok) for seg in segments]
    last = equations[-1]
    final_ok = not isinstance(last, str) and last[3] == target
    lax = _lax_solved(numbers, target, equations)
    if len(segments) != n_eq:
        return Score(False, final_ok, lax, f"{len(segments)} equation(s), expected {n_eq}")
    pool = Counter(numbers)
    for eq in equations:
        if isinstance(eq, str):
            return Score(False, final_ok, lax, eq)
        x, _, y, z = eq
        need = Counter([x, y])
        if any(pool[v] < c for v, c in need.items()):
            return Score(False, final_ok, lax,
                         f"{format_equations([eq])}: operands not available in {sorted(pool.elements())}")
        pool -= need
        pool[z] += 1
    if pool != Counter([target]):
        return Score(False, final_ok, lax, f"ends with {sorted(pool.elements())}, expected only the target {target}")
    assert lax, (numbers, target, equations)  # a strict solution satisfies the lax rule
    return Score(True, final_ok, True)


def score_rows(problems: list[Problem], rows: Tensor) -> list[Score]:
    """Score generated answers: (B, n) token rows (what follows each prompt) for ``problems`` (B of them).

    A row's answer is everything before its first EOS (the whole row when it has none, which then
    parses only if the row is exactly the answer's length, as with goal-conditioned decoding).
    """
    if rows.dim() != 2 or rows.shape[0] != len(problems):
        raise ValueError(f"score_rows: rows of shape {tuple(rows.shape)} do not match {len(problems)} problems")
    eos = _tokenizer().eos_id
    out = []
    for p, row in zip(problems, rows.tolist()):
        answer = row[: row.index(eos)] if eos in row else row
        out.append(score(p.numbers, p.target, answer))
    return out


# ----------------------------------------------------------------------------- data and task


class CountdownData:
    """Encoded problems as one (n, L) tensor (every sequence has the same length), with the problems."""

    def __init__(self, problems: list[Problem], tok: CountdownTokenizer, cfg: CountdownConfig):
        if not problems:
            raise ValueError("CountdownData needs at least one problem")
        self.problems = problems
        self.seqs = torch.tensor([encode_problem(p, tok, cfg.num_pause, cfg.prompt_format) for p in problems],
                                 dtype=torch.long)  # (n, L)
        self.prompt_len = prompt_tokens(cfg)  # up to the last pause
        self.answer_len = ANSWER_TOKENS + 1  # equations and EOS
        assert self.seqs.shape[1] == self.prompt_len + self.answer_len

    def __len__(self) -> int:
        return self.seqs.shape[0]

    def get(self, indices: Tensor) -> Batch:
        seqs = self.seqs[indices]
        inputs, targets = seqs[:, :-1], seqs[:, 1:].clone()
        # Token losses only on the answer and EOS: targets inside the prompt (pauses included) are masked.
        targets[:, : self.prompt_len - 1] = IGNORE
        return Batch(inputs, targets)


class CountdownTask(Task):
    config_class = CountdownConfig
    EVAL_CHUNK = 1000

    def __init__(self, cfg: CountdownConfig):
        super().__init__(cfg)
        self.cfg: CountdownConfig = cfg
        self._tok = _tokenizer()
        self._splits: dict[str, CountdownData] | None = None

    @property
    def tokenizer(self) -> CountdownTokenizer:
        return self._tok

    @property
    def seq_len(self) -> int:
        """Model input length (the sequence without its last token)."""
        return prompt_tokens(self.cfg) + ANSWER_TOKENS

    def problems(self) -> dict[str, list[Problem]]:
        """{'train', 'test_id', 'test_ood'} problems; a pure function of the config."""
        c = self.cfg
        id_targets, ood_targets = split_targets(c)
        seed = f"countdown-{c.data_seed}"
        train = generate_problems(c.num_train, id_targets, c.min_input, c.max_input, f"{seed}-train")
        test_id = generate_problems(c.num_test, id_targets, c.min_input, c.max_input, f"{seed}-test",
                                    exclude={p.key for p in train})
        test_ood = generate_problems(c.num_test, ood_targets, c.min_input, c.max_input, f"{seed}-ood")
        return {"train": train, "test_id": test_id, "test_ood": test_ood}

    def _data(self, split: str) -> CountdownData:
        if self._splits is None:
            self._splits = {k: CountdownData(v, self._tok, self.cfg) for k, v in self.problems().items()}
        return self._splits[split]

    def train_data(self) -> CountdownData:
        return self._data("train")

    def test_data(self, split: str = "test_id") -> CountdownData:
        if split not in ("test_id", "test_ood"):
            raise ValueError(f"unknown Countdown test split {split!r} (test_id, test_ood)")
        return self._data(split)

    def prompts(self, n: int, length: int | None = None, seed: int = 0) -> list[Tensor]:
        """Prompts (numbers, target and pauses) of ``n`` in-distribution test problems chosen by ``seed``.

        ``length`` is ignored: every prompt has the same length (:func:`prompt_tokens`).
        """
        data = self.test_data()
        if not 1 <= n <= len(data):
            raise ValueError(f"prompts: n={n} must be in 1..{len(data)} (the in-distribution test problems)")
        chosen = sorted(random.Random(seed).sample(range(len(data)), n))
        return [data.seqs[i, : data.prompt_len].clone() for i in chosen]

    def _decode(self, model, objective, prompt: Tensor, sampling: Sampling = GREEDY,
                generator: torch.Generator | None = None) -> Tensor:
        """(B, P) prompts -> (B, n) answer tokens, chosen by ``sampling`` (greedy by default) with ``generator``."""
        P = prompt.shape[1]
        if getattr(objective, "goal_conditioned", False):
            # BST: decode the known-length answer towards the only known suffix, EOS.
            suffix = torch.full((prompt.shape[0], 1), self._tok.eos_id, dtype=prompt.dtype, device=prompt.device)
            return generate(model, prompt, ANSWER_TOKENS, sampling=sampling, generator=generator,
                            head=objective.decoding_head(model, suffix))[:, P:]
        return generate(model, prompt, ANSWER_TOKENS + 1, sampling=sampling, generator=generator,
                        stop_id=self._tok.eos_id, head=objective_head(model, objective))[:, P:]

    def decodings(self) -> list[tuple[str, Sampling]]:
        """(key infix, sampling) of each decoding an evaluation runs: greedy (''), then sampled when configured."""
        out = [("", GREEDY)]
        if self.cfg.eval_temperature > 0:
            out.append(("_sampled", Sampling(temperature=self.cfg.eval_temperature)))
        return out

    @torch.no_grad()
    def evaluate(self, model, objective=None, *, device="cpu", seed: int = 0,
                 max_examples: int | None = None) -> dict[str, float]:
        """Shares of the test problems solved, on both splits (``id``, ``ood``), from the same generations:
        strictly (``solved_*``, the headline), under the official code's lax rule (``solved_lax_*``) and with a
        valid final equation (``final_eq_valid_*``); see :func:`score`.

        Decoding is greedy; with ``task.eval_temperature`` > 0 every answer is also sampled once at that
        temperature and scored the same way (``solved_sampled_*``, ``solved_lax_sampled_*``,
        ``final_eq_valid_sampled_*``). Each split's sampling starts from a generator seeded with ``seed``, so
        the sampled metrics are reproducible. Decoding goes through the objective's ``decoding_head``; a
        goal-conditioned one (BST) decodes the 17 answer tokens towards the suffix EOS.
        """
        n_max = max_examples or self.cfg.eval_examples
        was_training = model.training
        model.eval()
        out = {}
        for infix, sampling in self.decodings():
            for split, tag in (("test_id", "id"), ("test_ood", "ood")):
                data = self.test_data(split)
                n = min(len(data), n_max)
                g = None if sampling.greedy else torch.Generator(device=device).manual_seed(seed)
                scores: list[Score] = []
                for start in range(0, n, self.EVAL_CHUNK):  # chunks bound the memory of large test sets
                    prompt = data.seqs[start : min(n, start + self.EVAL_CHUNK), : data.prompt_len].to(device)
                    scores += score_rows(data.problems[start : start + len(prompt)],
                                         self._decode(model, objective, prompt, sampling, g).cpu())
                out[f"solved{infix}_{tag}"] = sum(s.solved for s in scores) / n
                out[f"solved_lax{infix}_{tag}"] = sum(s.solved_lax for s in scores) / n
                out[f"final_eq_valid{infix}_{tag}"] = sum(s.final_eq_valid for s in scores) / n
        model.train(was_training)
        return out
