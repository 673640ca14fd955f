"""The A5 word problem: state tracking in the alternating group on five points.

Inputs are uniformly random elements x_1..x_L of A5 (the 60 even permutations of 0..4); the
target at every position t is the running product s_t = x_1 * x_2 * ... * x_t, i.e. the state
reached after applying every input so far (Merrill et al., "The Illusion of State", arXiv
2404.08819; Liu et al., arXiv 2210.10749). A5 is non-solvable, so the problem is NC1-complete
and a fixed-depth transformer cannot track the state for arbitrary lengths; a recurrent model
can. NextLat (arXiv 2511.05963) trains at length 12 and reports that its dynamics model, run as
an RNN from the first hidden state, stays accurate far beyond the training length.

**Composition convention.** A permutation is a tuple ``p`` with ``p[i]`` the image of point i.
The product ``a * b`` means "apply a, then b": ``(a * b)(i) = b(a(i))``. Products therefore read
left to right in the order the inputs are applied, and the state update is s_t = s_{t-1} * x_t.

Every position is scored (no prompt masking); sequences carry no EOS and no doc_ids.
"""

from __future__ import annotations

import hashlib
import itertools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from nextlat.config import ConfigError, TaskConfig
from nextlat.data import Batch
from nextlat.decoding.reference import objective_head
from nextlat.tasks.base import Task
from nextlat.tasks.vocab import WordTokenizer

Perm = tuple[int, ...]

# ----------------------------------------------------------------------------- the group


def is_even(p: Perm) -> bool:
    """True when ``p`` has an even number of inversions."""
    return sum(p[i] > p[j] for i in range(len(p)) for j in range(i + 1, len(p))) % 2 == 0


def compose(a: Perm, b: Perm) -> Perm:
    """``a * b``: apply ``a`` first, then ``b``, so ``(a * b)[i] = b[a[i]]``."""
    return tuple(b[a[i]] for i in range(len(a)))


ELEMENTS: tuple[Perm, ...] = tuple(sorted(p for p in itertools.permutations(range(5)) if is_even(p)))
"""The 60 elements of A5 in sorted (lexicographic) order; index 0 is the identity (0, 1, 2, 3, 4)."""
INDEX: dict[Perm, int] = {p: i for i, p in enumerate(ELEMENTS)}
ORDER = len(ELEMENTS)  # 60
IDENTITY = INDEX[tuple(range(5))]  # 0


def multiplication_table() -> Tensor:
    """(60, 60) int64: ``table[a, b]`` is the index of ``ELEMENTS[a] * ELEMENTS[b]`` (a first, then b)."""
    return torch.tensor([[INDEX[compose(a, b)] for b in ELEMENTS] for a in ELEMENTS], dtype=torch.long)


def inverse_table() -> Tensor:
    """(60,) int64: ``inv[a]`` is the index of the inverse of ``ELEMENTS[a]``."""
    out = []
    for p in ELEMENTS:
        q = [0] * 5
        for i, image in enumerate(p):
            q[image] = i
        out.append(INDEX[tuple(q)])
    return torch.tensor(out, dtype=torch.long)


MUL = multiplication_table()
INV = inverse_table()


def running_product(x: Tensor) -> Tensor:
    """Prefix products of element indices: (B, L) -> (B, L), out[:, t] = x[:, 0] * ... * x[:, t].

    The output has the dtype of ``x`` (uint8 keeps large data sets small; the scan indexes one
    column at a time, so no int64 copy of the whole tensor is made).
    """
    table = MUL.to(x.device)
    out = torch.empty_like(x)
    if x.shape[1] == 0:
        return out
    state = x[:, 0].long()  # (B,)
    out[:, 0] = state
    for t in range(1, x.shape[1]):
        state = table[state, x[:, t].long()]
        out[:, t] = state
    return out


# ----------------------------------------------------------------------------- config and tokens


@dataclass
class A5Config(TaskConfig):
    name: str = "a5"
    train_len: int = 12
    """Length of every training sequence (inputs x_1..x_L, one target per input)."""
    eval_lengths: list[int] = field(default_factory=lambda: [12, 36, 100])
    """Test sequence lengths; each gets its own held-out set and its own ``...@L`` metrics."""
    num_train: int = 200_000
    """Fixed training sequences, drawn once from ``data_seed``."""
    num_test: int = 1000
    """Held-out test sequences per evaluation length."""
    data_seed: int = 0
    """Seed of the data generator (fixed across training seeds); test sets use seeds derived from it."""
    eval_examples: int = 1000
    """Test sequences per length used by each evaluation."""

    def validate(self) -> None:
        if self.train_len < 1:
            raise ConfigError(f"task.train_len={self.train_len}: must be >= 1")
        if not self.eval_lengths:
            raise ConfigError("task.eval_lengths=[]: give at least one evaluation length")
        for i, n in enumerate(self.eval_lengths):
            if n < 1:
                raise ConfigError(f"task.eval_lengths[{i}]={n}: must be >= 1")
        if len(set(self.eval_lengths)) != len(self.eval_lengths):
            raise ConfigError(f"task.eval_lengths={self.eval_lengths}: lengths must be distinct")
        for key in ("num_train", "num_test", "eval_examples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"task.{key}={getattr(self, key)}: must be >= 1")


class A5Tokenizer(WordTokenizer):
    """One token per group element, written in one-line notation ("01234" is the identity, id 0).

    Token ids equal element indices 0..59. Id 60 is ``<eos>``: the Tokenizer protocol needs an
    end-of-sequence id, but A5 data never contains it (vocab_size is 61; the model learns never to
    predict it).
    """

    EOS = "<eos>"

    def __init__(self):
        super().__init__(["".join(map(str, p)) for p in ELEMENTS] + [self.EOS],
                         f"A5 vocabulary (even permutations of 01234 in one-line notation, e.g. '01234', "
                         f"'12034'; and {self.EOS})")
        self.eos_id = self.stoi[self.EOS]


# ----------------------------------------------------------------------------- data


def derived_seed(*parts: object) -> int:
    """A stable 63-bit seed from any labels (the same in every process, unlike ``hash``)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()
    return int(digest[:15], 16)


def random_words(n: int, length: int, seed: int, dtype: torch.dtype = torch.long) -> Tensor:
    """``n`` uniformly random words of ``length`` element indices: (n, length) of ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, ORDER, (n, length), generator=g, dtype=dtype)


class A5Data:
    """Fixed words and their running products, stored as uint8 (ids < 256) to keep large sets small."""

    def __init__(self, inputs: Tensor):
        self.inputs = inputs.to(torch.uint8)  # (n, L) x_1..x_L
        self.targets = running_product(self.inputs)  # (n, L) s_1..s_L, uint8

    @classmethod
    def random(cls, n: int, length: int, seed: int) -> A5Data:
        """``n`` uniformly random words of ``length`` elements, a pure function of ``seed``."""
        return cls(random_words(n, length, seed, dtype=torch.uint8))

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def length(self) -> int:
        return self.inputs.shape[1]

    def get(self, indices: Tensor) -> Batch:
        return Batch(self.inputs[indices].long(), self.targets[indices].long())


# ----------------------------------------------------------------------------- evaluation


def correct_by_position(model, states: Tensor, targets: Tensor) -> Tensor:
    """(B, L, D) states and (B, L) targets -> (L,) int64: how many rows ``model.logits`` decodes to s_t."""
    return (model.logits(states).argmax(-1) == targets).sum(0)


def accuracy_by_position(model, states: Tensor, targets: Tensor) -> Tensor:
    """(B, L, D) states and (B, L) targets -> (L,) float: how often ``model.logits`` decodes s_t."""
    return correct_by_position(model, states, targets).float() / targets.shape[0]


@torch.no_grad()
def transformer_accuracy_by_position(model, inputs: Tensor, targets: Tensor) -> Tensor:
    """Teacher-forced accuracy per position: (B, L) inputs and targets -> (L,) float.

    One causal forward pass over the whole word; position t is right when the argmax of
    ``model.logits(h_t)`` is the running product s_t.
    """
    return accuracy_by_position(model, model(inputs)[0], targets)


@torch.no_grad()
def rnn_states(model, dynamics: Callable[[Tensor, Tensor], Tensor], inputs: Tensor) -> Tensor:
    """The dynamics model run as an RNN over (B, L) inputs: its states, (B, L, D).

    The transformer encodes only the first token: h_1 = model(x_1). Then, for t = 2..L in order,
    h_t = dynamics(h_{t-1}, E(x_t)), with E(x_t) = ``model.embed(x_t)``, the same input embedding
    the NextLat objective feeds p_psi in training (the ``emb`` returned by the forward pass).
    ``dynamics`` maps (B, D), (B, D) -> (B, D).
    """
    emb = model.embed(inputs)  # (B, L, D)
    h = model(inputs[:, :1])[0][:, 0]  # (B, D)
    states = [h]
    for t in range(1, inputs.shape[1]):
        h = dynamics(h, emb[:, t])
        states.append(h)
    return torch.stack(states, dim=1)


@torch.no_grad()
def rnn_accuracy_by_position(model, dynamics: Callable[[Tensor, Tensor], Tensor], inputs: Tensor,
                             targets: Tensor) -> Tensor:
    """Accuracy per position of the dynamics model run as an RNN (:func:`rnn_states`), every state
    decoded with ``model.logits``: (B, L) inputs and targets -> (L,) float."""
    return accuracy_by_position(model, rnn_states(model, dynamics, inputs), targets)


# ----------------------------------------------------------------------------- the task


class A5Task(Task):
    config_class = A5Config
    EVAL_CHUNK = 1000

    def __init__(self, cfg: A5Config):
        super().__init__(cfg)
        self.cfg: A5Config = cfg
        self._tok = A5Tokenizer()
        self._train: A5Data | None = None
        self._test: dict[int, A5Data] = {}

    @property
    def tokenizer(self) -> A5Tokenizer:
        return self._tok

    @property
    def seq_len(self) -> int:
        return self.cfg.train_len

    def train_data(self) -> A5Data:
        if self._train is None:
            c = self.cfg
            self._train = A5Data.random(c.num_train, c.train_len, derived_seed("a5", "train", c.data_seed))
        return self._train

    def test_data(self, length: int) -> A5Data:
        """The held-out words of ``length`` (any length; drawn from a seed of their own).

        With 60^L possible words, overlap with the training set is negligible for L >= 5 and is not
        excluded.
        """
        if length not in self._test:
            c = self.cfg
            self._test[length] = A5Data.random(c.num_test, length, derived_seed("a5", "test", c.data_seed, length))
        return self._test[length]

    def prompts(self, n: int, length: int | None = None, seed: int = 0) -> list[Tensor]:
        """``n`` random words of ``length`` elements (default train_len), 1-D int64, a pure function of ``seed``."""
        length = length or self.cfg.train_len
        if n < 1 or length < 1:
            raise ValueError(f"prompts: n={n} and length={length} must be >= 1")
        return list(random_words(n, length, derived_seed("a5", "prompts", self.cfg.data_seed, seed)))

    @torch.no_grad()
    def evaluate(self, model, objective=None, *, device="cpu", seed: int = 0,
                 max_examples: int | None = None) -> dict[str, float]:
        """Per-token state accuracy at every evaluation length L.

        - ``acc@L``: transformer, teacher-forced, accuracy averaged over all L positions (through the
          objective's next-token head: the LM head, or JTP's fetch module);
        - ``acc_last@L``: transformer accuracy at position L (the final state);
        - ``rnn_acc@L`` / ``rnn_acc_last@L``: the same for the dynamics model run as an RNN
          (:func:`rnn_states`), only for objectives with a ``dynamics`` model (NextLat);
        - ``rnn_norm_ratio@L``: the mean norm of the RNN's state at position L, over all test words,
          divided by the mean norm of the transformer's own states at the training positions
          (1..min(L, train_len)) of the same words. Both means are taken over the whole test set (sums
          of norms over counts), so the ratio does not depend on how evaluation is chunked. Near 1 the
          RNN stays on the scale of the states its dynamics model was fitted to; a drift off them shows
          as a ratio growing with L.

        Accuracies are counts of correct positions over the test set, exact under any chunking.
        Transformer metrics need L <= model.cfg.max_seq_len; longer lengths get only the RNN metrics
        (with a warning). Evaluation is deterministic: ``seed`` is unused.
        """
        dynamics = getattr(objective, "dynamics", None)
        head = objective_head(model, objective)  # acc@L: the objective's next-token head (JTP: its fetch module)
        max_len = model.cfg.max_seq_len
        modules = [m for m in (model, objective) if isinstance(m, torch.nn.Module)]
        was_training = [m.training for m in modules]
        for m in modules:
            m.eval()
        out: dict[str, float] = {}
        for L in self.cfg.eval_lengths:
            data = self.test_data(L)
            n = min(len(data), max_examples or self.cfg.eval_examples)
            fits = L <= max_len
            if not fits:
                warnings.warn(f"A5 eval length {L} exceeds model.max_seq_len={max_len}: "
                              f"acc@{L} is not computed", stacklevel=2)
            tf_correct = torch.zeros(L, dtype=torch.long, device=device)
            rnn_correct = torch.zeros(L, dtype=torch.long, device=device)
            last_norm_sum = torch.zeros((), dtype=torch.float64, device=device)  # RNN state at position L
            ref_norm_sum = torch.zeros((), dtype=torch.float64, device=device)  # transformer, training positions
            ref_count = 0
            T = self.cfg.train_len
            for start in range(0, n, self.EVAL_CHUNK):  # chunks bound memory on large test sets
                idx = torch.arange(start, min(n, start + self.EVAL_CHUNK))
                batch = data.get(idx).to(device)
                if fits:  # one causal pass serves the accuracy and (its first T states) the norm reference
                    h = model(batch.input_ids)[0]  # (rows, L, D)
                    tf_correct += (head(h, batch.input_ids).argmax(-1) == batch.targets).sum(0)
                if dynamics is not None:
                    states = rnn_states(model, dynamics, batch.input_ids)  # (rows, L, D)
                    rnn_correct += correct_by_position(model, states, batch.targets)
                    trained = h[:, :T] if fits else model(batch.input_ids[:, :T])[0]  # (rows, <= T, D)
                    last_norm_sum += states[:, -1].norm(dim=-1).double().sum()
                    ref_norm_sum += trained.norm(dim=-1).double().sum()
                    ref_count += trained.shape[0] * trained.shape[1]
            if fits:
                per_pos = tf_correct.double() / n
                out[f"acc@{L}"] = per_pos.mean().item()
                out[f"acc_last@{L}"] = per_pos[-1].item()
            if dynamics is not None:
                per_pos = rnn_correct.double() / n
                out[f"rnn_acc@{L}"] = per_pos.mean().item()
                out[f"rnn_acc_last@{L}"] = per_pos[-1].item()
                out[f"rnn_norm_ratio@{L}"] = ((last_norm_sum / n) / (ref_norm_sum / ref_count)).item()
        for m, mode in zip(modules, was_training):
            m.train(mode)
        return out
