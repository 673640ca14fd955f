"""BST baseline: the Belief State Transformer (Hu et al., arXiv 2410.23506), as the NextLat paper's code runs it.

A forward encoder (the backbone) reads prefixes left to right; a backward encoder (a second
transformer of the same architecture, owned by the objective) reads suffixes right to left. Both
read the backbone's token embedding. For a prefix x_0..x_t and a suffix x_s..x_e of one document
(x_e its last token) with a non-empty gap between them (t + 2 <= s <= e), one text head reads
z = [f_t; b_s] (width 2D):

    z <- z + SwiGLU(z)      (2D -> 128 * round(16D/3/128) -> 2D, no biases)
    z <- RMSNorm(z)         (over the 2D features)
    [z_next; z_prev] = z    (D each)

and the backbone's LM head turns z_next into the prediction of x_{t+1} (the token after the
prefix) and z_prev into that of x_{s-1} (the token before the suffix). So BST trains the LM head
too, but never on h_t alone: a BST model decodes through :meth:`BeliefState.decoding_head`, given
the suffix it decodes towards.

**Pairs.** Prefixes start at the answer: a pair exists only where both its labels are scored
targets (``targets[:, i]`` labels x_{i+1}), so x_t is the answer-start token or later (``=`` on
Path-Star, the last pause token on Countdown: the position of the first scored target). The paper's
code takes prefixes from the answer start and scores every pair; on tasks whose scored targets run
from there to the end of the document (Path-Star, Countdown) the two pair sets are the same, and
ours also keeps a prompt token or padding from ever being a label elsewhere. Every pair scores both
heads and the loss is the mean over pairs of (CE_next + CE_prev) / 2 (terms ``ce`` and ``prev``,
each a sum over the pairs with weight 1/2). The shortest suffix is the document's last token, EOS
on Path-Star and Countdown: b_enc([EOS]) is the state decoding without a goal uses, and there is no
separate empty suffix. ``bst_pair_fraction`` < 1 keeps every pair whose suffix is the last token
(the pairs decoding uses) and a seeded share of the others.

Choices of ours that do not change what is learned: documents of packed rows are kept apart (each
pair lies inside one document); each prefix and suffix state goes through the first SwiGLU layer
once, split into its half of the (2D -> H) weights, however many pairs it is part of; pair sampling
is a pure function of the batch's tokens, so ``counts`` and ``forward`` draw the same pairs; the
next-token targets are checked against the inputs.

A row's tokens are x_0..x_T: ``input_ids`` followed by the last target (so the targets must be
next-token targets; this is checked).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nextlat.config import ObjectiveConfig
from nextlat.data import IGNORE, Batch
from nextlat.decoding.reference import Head
from nextlat.model import RMSNorm, Transformer, init_weights, mlp_hidden_width
from nextlat.objectives.base import LossOutput, Objective, ce_term, check


class TextHead(nn.Module):
    """[f; b] (2D) -> RMSNorm([f; b] + SwiGLU([f; b])) (2D): the first D features give the next token, the last D
    the previous one, both through the backbone's LM head."""

    def __init__(self, d_model: int, init_std: float = 0.02, eps: float = 1e-5):
        super().__init__()
        width, hidden = 2 * d_model, mlp_hidden_width(2 * d_model, 8 / 3)
        self.d_model = d_model
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)
        self.norm = RMSNorm(width, eps)
        init_weights(self, init_std)

    def forward(self, f: Tensor, b: Tensor) -> Tensor:
        """f (..., D), b (..., D), broadcastable -> (..., 2D)."""
        f, b = torch.broadcast_tensors(f, b)
        z = torch.cat([f, b], -1)
        return self.norm(z + self.down_proj(F.silu(self.gate_proj(z)) * self.up_proj(z)))

    def pairs(self, f: Tensor, b: Tensor, row: Tensor, prefix: Tensor, suffix: Tensor) -> Tensor:
        """(P, 2D) outputs of the pairs (f[row, prefix], b[row, suffix]) of (B, T, D) and (B, T', D) states.

        The first layer is linear in [f; b], so each distinct state is projected once by its half of the
        weights and a pair adds the two projections: the same values as :meth:`forward` on each pair.
        """
        D = self.d_model
        f_ids, f_of = torch.unique(row * f.shape[1] + prefix, return_inverse=True)
        b_ids, b_of = torch.unique(row * b.shape[1] + suffix, return_inverse=True)
        fu, bu = f.flatten(0, 1)[f_ids], b.flatten(0, 1)[b_ids]  # (F, D), (S, D) the distinct states
        w = torch.cat([self.gate_proj.weight, self.up_proj.weight])  # (2H, 2D)
        pf, pb = F.linear(fu, w[:, :D]), F.linear(bu, w[:, D:])  # (F, 2H), (S, 2H)
        gate, up = (pf[f_of] + pb[b_of]).chunk(2, -1)  # (P, H) each
        z = torch.cat([fu[f_of], bu[b_of]], -1)  # (P, 2D)
        return self.norm(z + self.down_proj(F.silu(gate) * up))


@dataclass
class Pairs:
    """Scored (prefix, suffix) pairs, each a (P,) index tensor.

    Pair p of row ``row`` has the gap x_{t+1}..x_{j+1} with t = ``prefix`` (forward state index,
    next-token label ``targets[row, t]``) and j = ``last`` (previous-token label ``targets[row, j]``);
    its suffix x_{j+2}..x_e is the suffix state j of :meth:`BeliefState.suffix_states`.
    """

    row: Tensor
    prefix: Tensor
    last: Tensor


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
    """Share of each sequence's (prefix, suffix) pairs scored per step, beside the pairs whose suffix is the
    document's last token (EOS), which are always scored (1 scores every pair once)."""

    def validate(self) -> None:
        check(0 < self.bst_pair_fraction <= 1, "bst_pair_fraction", self.bst_pair_fraction, "must be in (0, 1]")


class BeliefState(Objective):
    """Loss = mean over the scored pairs of (CE_next + CE_prev) / 2 (terms ``ce`` and ``prev``, weight 1/2 each)."""

    config_class = BeliefStateConfig
    goal_conditioned = True
    state_version = 2
    state_change = ("BST now follows the paper's code: one residual SwiGLU text head over [f; b] read by the "
                    "backbone's LM head (not two pair heads), a token embedding shared by both encoders, "
                    "and b_enc([EOS]) instead of a learned empty suffix")

    def __init__(self, cfg: BeliefStateConfig, model: Transformer):
        super().__init__(cfg, model)
        mc = model.cfg
        self.backward_encoder = Transformer(mc)
        # It reads the backbone's embedding, and is read only through the text head: its own embedding and
        # LM head would be dead weight.
        self.backward_encoder.embed_tokens = None
        self.backward_encoder.lm_head = None
        self.text_head = TextHead(mc.d_model, mc.init_std, mc.norm_eps)

    # ------------------------------------------------------------------ pairs

    def valid_pairs(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(valid, at_end), each (B, T, T - 1) bool over (t, j): the gap x_{t+1}..x_{j+1} (j >= t) and a non-empty
        suffix x_{j+2}..x_e lie in x_t's document and both labels, x_{t+1} and x_{j+1}, are scored (so the
        prefix ends at the answer start or later); ``at_end`` says the suffix is the document's last token alone."""
        T = batch.input_ids.shape[1]
        docs = batch.doc_ids if batch.doc_ids is not None else torch.zeros_like(batch.input_ids)
        token_docs = _token_docs(batch)  # (B, T): document of x_{i+1}
        scored = batch.targets != IGNORE  # (B, T)
        suffix_docs = token_docs[:, 1:]  # (B, T - 1): document of x_{j+2}
        after = torch.cat([token_docs[:, 2:], torch.full_like(token_docs[:, :1], -2)], 1)[:, : T - 1]  # of x_{j+3}
        ordered = torch.ones(T, T - 1, dtype=torch.bool, device=docs.device).triu()  # j >= t
        prefix_ok = (docs >= 0) & scored  # (B, T): x_{t+1} is scored, so x_t is the answer start or later
        valid = (ordered & prefix_ok[:, :, None] & scored[:, None, : T - 1]
                 & (suffix_docs[:, None, :] == docs[:, :, None]))
        at_end = (after != suffix_docs)[:, None, :].expand_as(valid)
        return valid, at_end

    def pairs(self, batch: Batch) -> Pairs:
        """The valid pairs of every row; with ``bst_pair_fraction`` < 1, every pair whose suffix is the last token
        and round(fraction * n) of each row's n other pairs, drawn with a seed taken from the batch."""
        valid, at_end = self.valid_pairs(batch)
        frac = self.cfg.bst_pair_fraction
        if frac < 1:
            B = valid.shape[0]
            other = valid & ~at_end
            n = other.flatten(1).sum(1)  # (B,)
            keep = (n.double() * frac + 0.5).floor().long()
            g = torch.Generator(device=valid.device).manual_seed(batch_seed(batch.input_ids))
            score = torch.rand(valid.shape, generator=g, device=valid.device).masked_fill(~other, 2.0)
            rank = score.view(B, -1).argsort(1).argsort(1).view_as(valid)  # rank of each pair's score in its row
            valid = (valid & at_end) | (other & (rank < keep[:, None, None]))
        row, t, j = valid.nonzero(as_tuple=True)
        return Pairs(row, t, j)

    # ------------------------------------------------------------------ encoders

    def _backward(self, model: Transformer, tokens: Tensor, docs: Tensor | None = None) -> Tensor:
        """(B, S) tokens in reading order (right to left) -> (B, S, D) backward states, on the backbone's embedding."""
        be = self.backward_encoder
        ctx = be.context(tokens, docs)
        return be.norm(be.continue_layers(model.embed(tokens), ctx, 0))

    def suffix_states(self, model: Transformer, batch: Batch) -> Tensor:
        """(B, T - 1, D) suffix states: index j has read x_e..x_{j+2} (its document's part, right to left)."""
        B, T = batch.input_ids.shape
        if T < 2:
            return model.embed_tokens.weight.new_zeros(B, 0, model.cfg.d_model)
        last, real = _last_token(batch)
        tokens = torch.cat([batch.input_ids[:, 2:], last[:, None]], dim=1)  # x_2..x_T, (B, T - 1)
        docs = None
        if batch.doc_ids is not None or not bool(real.all()):
            docs = _token_docs(batch)[:, 1:].flip(1)  # documents of x_T..x_2
        return self._backward(model, tokens.flip(1), docs).flip(1)

    def suffix_state(self, model: Transformer, suffix: Tensor, batch: int) -> Tensor:
        """(B, S) suffix tokens, S >= 1 -> (B, D) backward state after reading them right to left.

        There is no empty suffix: without a goal, BST decodes towards [EOS], as the paper's code does.
        """
        if not isinstance(suffix, Tensor) or suffix.dim() != 2 or suffix.shape[0] != batch or suffix.shape[1] == 0:
            shape = tuple(suffix.shape) if isinstance(suffix, Tensor) else suffix
            raise ValueError(f"suffix must have shape ({batch}, S) with S >= 1 (BST decodes towards a suffix, "
                             f"[EOS] without a goal), got {shape}")
        return self._backward(model, suffix.flip(1))[:, -1]

    # ------------------------------------------------------------------ loss

    def counts(self, batch: Batch) -> dict[str, Tensor]:
        n = torch.as_tensor(len(self.pairs(batch).row), device=batch.targets.device)
        return {"ce": n, "prev": n}

    def forward(self, model: Transformer, batch: Batch) -> LossOutput:
        x, y = batch.input_ids, batch.targets
        mismatch = (y[:, :-1] != IGNORE) & (y[:, :-1] != x[:, 1:])
        if bool(mismatch.any()):
            raise ValueError("objective bst needs next-token targets: targets[:, t] must equal input_ids[:, t + 1] "
                             "wherever it is not IGNORE")
        f, _ = model(x, batch.doc_ids)  # (B, T, D) prefix states
        b = self.suffix_states(model, batch)  # (B, T - 1, D)
        p = self.pairs(batch)
        D = model.cfg.d_model
        z = self.text_head.pairs(f, b, p.row, p.prefix, p.last)  # (P, 2D)
        return LossOutput({"ce": ce_term(model.logits(z[:, :D]), y[p.row, p.prefix], 0.5),
                           "prev": ce_term(model.logits(z[:, D:]), y[p.row, p.last], 0.5)})

    # ------------------------------------------------------------------ decoding

    def next_logits(self, model: Transformer, input_ids: Tensor, suffix: Tensor) -> Tensor:
        """(B, T) prefixes -> (B, T, V) next-token logits after each prefix, towards the (B, S) suffix."""
        f, _ = model(input_ids)
        b = self.suffix_state(model, suffix, input_ids.shape[0]).to(f.dtype)
        return model.logits(self.text_head(f, b[:, None])[..., : model.cfg.d_model])

    def prev_logits(self, model: Transformer, input_ids: Tensor, suffixes: list[Tensor]) -> Tensor:
        """(B, T) prefixes and K suffixes (B, S_k) -> (B, K, V) previous-token logits for the token just
        before each suffix, given the whole prefix (its last state, encoded once)."""
        f, _ = model(input_ids)
        f_last = f[:, -1]
        z = torch.stack([self.text_head(f_last, self.suffix_state(model, s, input_ids.shape[0]).to(f.dtype))
                         for s in suffixes], 1)  # (B, K, 2D)
        return model.logits(z[..., model.cfg.d_model :])

    def decoding_head(self, model: Transformer, suffix: Tensor) -> Head:
        """The text head as a decoding head (``head=`` of ``nextlat.decoding``): prefix states (B, ..., D) ->
        next-token logits (B, ..., V) towards the (B, S) ``suffix`` (e.g. [EOS] alone), encoded once, here."""
        b = self.suffix_state(model, suffix, suffix.shape[0] if isinstance(suffix, Tensor) else -1)  # (B, D)
        D = model.cfg.d_model

        def head(f: Tensor, ids: Tensor) -> Tensor:
            if b.shape[0] != f.shape[0]:
                raise ValueError(f"suffix has {b.shape[0]} rows, the decoded batch {f.shape[0]}")
            s = b.to(f.dtype).view(f.shape[0], *[1] * (f.dim() - 2), -1)
            return model.logits(self.text_head(f, s)[..., :D])

        return head
