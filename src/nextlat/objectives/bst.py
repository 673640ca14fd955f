"""BST baseline: the Belief State Transformer (Hu et al., arXiv 2410.23506).

A forward encoder (the backbone) reads prefixes left to right and a backward encoder (a second
transformer of the same architecture, owned by the objective) reads suffixes right to left. For a
prefix x_0..x_t and a suffix x_s..x_e of one document with a non-empty gap between them
(s >= t + 2), the concatenation [f_t, b_s] feeds a next-token head predicting x_{t+1} and a
previous-token head predicting x_{s-1}. The suffix may be empty (s = e + 1, a learned state), so
the next-token head also decodes without a goal; with a goal it decodes towards it. The
backbone's own LM head is not trained: a BST model decodes through ``decoding_head`` (given to
the decoders of ``nextlat.decoding`` as ``head``) and is scored through ``next_logits``.

A row's tokens are x_0..x_T: ``input_ids`` followed by the last target (so the targets must be
next-token targets; this is checked). The label of x_{i+1} is ``targets[:, i]``: a token whose
target is IGNORE (prompts, padding) is never predicted by either head, so on Path-Star only
answer tokens are scored, as for every other objective. There are O(T^2) pairs;
``bst_pair_fraction`` scores a seeded share of each row's valid pairs, the same for ``counts``
and ``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nextlat.config import ObjectiveConfig
from nextlat.data import IGNORE, Batch
from nextlat.model import Transformer, init_weights
from nextlat.objectives.base import LossOutput, Objective, ce_term, check


class PairHead(nn.Module):
    """(prefix state f, suffix state b) -> logits: Linear(D -> V) of GELU(W_f f + W_b b); no biases.

    This is an MLP on the concatenation [f, b] (its Linear(2D -> D) split in two halves), so each
    state is projected once per position and a pair only adds two rows. One hidden layer rather
    than a linear map: a linear head scores prefix and suffix additively (w_v . f + u_v . b), so it
    could not express "the successor of this node on the arm that ends at that goal".
    """

    def __init__(self, d_model: int, vocab_size: int, init_std: float = 0.02):
        super().__init__()
        self.prefix_proj = nn.Linear(d_model, d_model, bias=False)
        self.suffix_proj = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, vocab_size, bias=False)
        init_weights(self, init_std)

    def forward(self, f: Tensor, b: Tensor) -> Tensor:
        """f (..., D), b (..., D), broadcastable -> (..., V) logits."""
        return self.out(F.gelu(self.prefix_proj(f) + self.suffix_proj(b)))

    def pair_logits(self, f: Tensor, b: Tensor, row: Tensor, prefix: Tensor, suffix: Tensor) -> Tensor:
        """(P, V) logits of the pairs (f[row, prefix], b[row, suffix]) of (B, T, D) prefix and suffix states."""
        return self.out(F.gelu(self.prefix_proj(f)[row, prefix] + self.suffix_proj(b)[row, suffix]))


@dataclass
class Pairs:
    """Scored (prefix, suffix) pairs, each a (P,) index tensor.

    Pair p of row ``row`` has the gap x_{t+1}..x_{j+1} with t = ``prefix`` (forward state index,
    next-token label ``targets[row, t]``) and j = ``last`` (previous-token label
    ``targets[row, j]``); ``suffix`` indexes the suffix states of :meth:`BeliefState.suffix_states`.
    """

    row: Tensor
    prefix: Tensor
    last: Tensor
    suffix: Tensor


def batch_seed(input_ids: Tensor) -> int:
    """A seed that is a pure function of the tokens (the same on every device): pair sampling is
    deterministic given the batch, so ``counts`` and ``forward`` draw the same pairs."""
    ids = input_ids.flatten().long()
    weights = (torch.arange(ids.numel(), device=ids.device) * 1_000_003 + 7) % 16_777_213 + 1
    return int((ids * weights).sum())


def _last_token(batch: Batch) -> tuple[Tensor, Tensor]:
    """x_T (B,), the last target (0 where it is IGNORE), and whether it is a real token (B,)."""
    last = batch.targets[:, -1]
    real = last != IGNORE
    return torch.where(real, last, torch.zeros_like(last)), real


def _token_docs(batch: Batch) -> Tensor:
    """Document of x_{i+1}, the token labelled by targets[:, i]: (B, T). x_T continues the last input's document."""
    docs = batch.doc_ids if batch.doc_ids is not None else torch.zeros_like(batch.input_ids)
    _, real = _last_token(batch)
    last_doc = torch.where(real, docs[:, -1], torch.full_like(docs[:, -1], -1))
    return torch.cat([docs[:, 1:], last_doc[:, None]], dim=1)


@dataclass
class BeliefStateConfig(ObjectiveConfig):
    """BST's settings."""

    name: str = "bst"
    bst_pair_fraction: float = 1.0
    """Share of each sequence's valid (prefix, suffix) pairs scored per step (1 scores every pair once)."""

    def validate(self) -> None:
        check(0 < self.bst_pair_fraction <= 1, "bst_pair_fraction", self.bst_pair_fraction, "must be in (0, 1]")


class BeliefState(Objective):
    """Loss = mean next-token CE + mean previous-token CE over the sampled pairs (terms ``ce``, ``prev``)."""

    config_class = BeliefStateConfig

    def __init__(self, cfg: BeliefStateConfig, model: Transformer):
        super().__init__(cfg, model)
        mc = model.cfg
        self.backward_encoder = Transformer(mc)
        self.backward_encoder.lm_head = None  # read only through the heads below: its own LM head would be dead weight
        # The empty suffix's state, on the unit-RMS scale of the encoders' final-norm outputs.
        self.empty_suffix = nn.Parameter(torch.randn(mc.d_model))
        self.next_head = PairHead(mc.d_model, mc.vocab_size, mc.init_std)
        self.prev_head = PairHead(mc.d_model, mc.vocab_size, mc.init_std)

    # ------------------------------------------------------------------ pairs

    def valid_pairs(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(valid, nonempty), each (B, T, T) bool over (t, j): the gap x_{t+1}..x_{j+1} (t <= j) lies in
        x_t's document and holds a scored label at either end; ``nonempty`` says the suffix x_{j+2}.. does too."""
        T = batch.input_ids.shape[1]
        docs = batch.doc_ids if batch.doc_ids is not None else torch.zeros_like(batch.input_ids)
        token_docs = _token_docs(batch)  # (B, T)
        scored = batch.targets != IGNORE  # (B, T)
        ordered = torch.ones(T, T, dtype=torch.bool, device=docs.device).triu()  # j >= t
        valid = (ordered & (docs >= 0)[:, :, None] & (token_docs[:, None, :] == docs[:, :, None])
                 & (scored[:, :, None] | scored[:, None, :]))
        suffix_docs = torch.cat([token_docs[:, 1:], torch.full_like(token_docs[:, :1], -2)], dim=1)  # doc of x_{j+2}
        nonempty = suffix_docs[:, None, :] == docs[:, :, None]
        return valid, nonempty

    def pairs(self, batch: Batch) -> Pairs:
        """The valid pairs of every row, subsampled to ``bst_pair_fraction`` of each row's count (rounded, at least one)."""
        valid, nonempty = self.valid_pairs(batch)
        frac = self.cfg.bst_pair_fraction
        if frac < 1:
            B = valid.shape[0]
            n = valid.flatten(1).sum(1)  # (B,)
            keep = torch.where(n > 0, (n.double() * frac + 0.5).floor().clamp(min=1), 0).long()
            g = torch.Generator(device=valid.device).manual_seed(batch_seed(batch.input_ids))
            score = torch.rand(valid.shape, generator=g, device=valid.device).masked_fill(~valid, 2.0)
            rank = score.view(B, -1).argsort(1).argsort(1).view_as(valid)  # rank of each pair's score in its row
            valid = valid & (rank < keep[:, None, None])
        row, t, j = valid.nonzero(as_tuple=True)
        T = valid.shape[1]
        suffix = torch.where(nonempty[row, t, j], j, T - 1)  # suffix state index; T - 1 is the empty suffix
        return Pairs(row, t, j, suffix)

    # ------------------------------------------------------------------ encoders

    def suffix_states(self, batch: Batch) -> Tensor:
        """(B, T, D) suffix states: index j < T - 1 reads x_{j+2}..x_e right to left; index T - 1 is the empty suffix."""
        B, T = batch.input_ids.shape
        empty = self.empty_suffix.expand(B, 1, -1)
        if T < 2:
            return empty
        last, real = _last_token(batch)
        tokens = torch.cat([batch.input_ids[:, 2:], last[:, None]], dim=1)  # x_2..x_T, (B, T - 1)
        docs = None
        if batch.doc_ids is not None or not bool(real.all()):
            docs = _token_docs(batch)[:, 1:].flip(1)  # documents of x_T..x_2
        b, _ = self.backward_encoder(tokens.flip(1), docs)  # (B, T - 1, D), right to left
        return torch.cat([b.flip(1), empty.to(b.dtype)], dim=1)

    def suffix_state(self, suffix: Tensor | None, batch: int) -> Tensor:
        """(B, S) suffix tokens -> (B, D) backward state after reading them right to left (None or S = 0: empty)."""
        if suffix is not None and (suffix.dim() != 2 or suffix.shape[0] != batch):
            raise ValueError(f"suffix must have shape ({batch}, S), got {tuple(suffix.shape)}")
        if suffix is None or suffix.shape[1] == 0:
            return self.empty_suffix.expand(batch, -1)
        b, _ = self.backward_encoder(suffix.flip(1))
        return b[:, -1]

    # ------------------------------------------------------------------ loss

    def counts(self, batch: Batch) -> dict[str, Tensor]:
        p = self.pairs(batch)
        return {"ce": (batch.targets[p.row, p.prefix] != IGNORE).sum(),
                "prev": (batch.targets[p.row, p.last] != IGNORE).sum()}

    def forward(self, model: Transformer, batch: Batch) -> LossOutput:
        x, y = batch.input_ids, batch.targets
        mismatch = (y[:, :-1] != IGNORE) & (y[:, :-1] != x[:, 1:])
        if bool(mismatch.any()):
            raise ValueError("objective bst needs next-token targets: targets[:, t] must equal input_ids[:, t + 1] "
                             "wherever it is not IGNORE")
        f, _ = model(x, batch.doc_ids)  # (B, T, D) prefix states
        b = self.suffix_states(batch)  # (B, T, D)
        p = self.pairs(batch)
        terms = {}
        for name, head, label_index in (("ce", self.next_head, p.prefix), ("prev", self.prev_head, p.last)):
            labels = y[p.row, label_index]  # (P,)
            scored = labels != IGNORE  # only pairs whose label this head scores pay for its logits
            logits = head.pair_logits(f, b, p.row[scored], p.prefix[scored], p.suffix[scored])  # (P', V)
            terms[name] = ce_term(logits, labels[scored])
        return LossOutput(terms)

    # ------------------------------------------------------------------ decoding

    def next_logits(self, model: Transformer, input_ids: Tensor, suffix: Tensor | None = None) -> Tensor:
        """(B, T) prefixes -> (B, T, V) next-token-head logits after each prefix, given a (B, S) suffix (None: empty)."""
        f, _ = model(input_ids)
        b = self.suffix_state(suffix, input_ids.shape[0]).to(f.dtype)
        return self.next_head(f, b[:, None])

    def prev_logits(self, model: Transformer, input_ids: Tensor, suffixes: list[Tensor]) -> Tensor:
        """(B, T) prefixes and K suffixes (B, S_k) -> (B, K, V) previous-token-head logits for the token just
        before each suffix, given the whole prefix (its last state, encoded once)."""
        f, _ = model(input_ids)
        f_last = f[:, -1]
        return torch.stack([self.prev_head(f_last, self.suffix_state(s, input_ids.shape[0]).to(f.dtype))
                            for s in suffixes], 1)

    def decoding_head(self, model: Transformer, suffix: Tensor | None = None):
        """The text head the decoders use for this objective (``head=`` of ``nextlat.decoding``): hidden states
        (B, ..., D) -> next-token-head logits (B, ..., V), towards the (B, S) ``suffix`` (None: empty, plain
        decoding). The suffix is encoded once, here."""
        b = None if suffix is None else self.suffix_state(suffix, suffix.shape[0])  # (B, D)

        def head(f: Tensor) -> Tensor:
            if b is not None and b.shape[0] != f.shape[0]:
                raise ValueError(f"suffix has {b.shape[0]} rows, the decoded batch {f.shape[0]}")
            s = self.empty_suffix.expand(f.shape[0], -1) if b is None else b
            return self.next_head(f, s.to(f.dtype).view(f.shape[0], *[1] * (f.dim() - 2), -1))

        return head
