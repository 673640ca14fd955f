"""JTP baseline: joint multi-token prediction through a teacher-forced bottleneck (Ahn, Lamb, Langford,
arXiv 2503.21801), as the NextLat paper's code runs it.

Every prediction of a JTP model, the next token included, comes out of a small fetch module that
reads the final hidden state h_t together with the tokens from x_t on: the slots
TC(h_t, E(x_t)), TC(h_t, E(x_{t+1})), ..., TC(h_t, E(x_{t+d})), with TC(h, e) = LayerNorm(e + gamma * h)
and gamma a learned scalar starting at 0.1, go through one causal self-attention layer (at most 4
heads, a learned bias for every (query slot, key slot) pair), then an RMSNorm and the backbone's
LM head. There is no residual from h_t around the attention: h_t reaches the logits only through TC.
``objective.fetch_residual`` adds h_t back before the final norm, as our design notes read the JTP paper;
it is off by default (the NextLat code's version) and kept as an ablation.

Slot j has seen x_t..x_{t+j} and predicts x_{t+j+1}. Slot 0 sees only TC(h_t, E(x_t)), and x_t is
the token fed at t, so it is an ordinary causal next-token predictor: it gives the ``ce`` term in
training, and evaluation and decoding use it too (:meth:`JointTokenPrediction.decoding_head`). The
backbone's LM head is never applied to h_t itself. Slots 1..d give the d future-token terms; at
decoding time they are unused (tokens after x_t are not known yet).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nextlat.data import IGNORE, Batch
from nextlat.decoding.reference import Head
from nextlat.model import RMSNorm, Transformer, init_weights
from nextlat.objectives.base import FutureTokenConfig, FutureTokenObjective, LossOutput, future_targets, head_ce

MAX_HEADS = 4
"""The fetch module's attention uses min(4, model.n_head) heads, as the paper's code does."""


class Fetch(nn.Module):
    """(h_t, E(x_t..x_{t+j})) -> normalised states predicting x_{t+j+1}: one causal attention layer over
    up to d + 1 slots, with a learned (heads, d + 1, d + 1) bias, then RMSNorm; no residual from h_t unless
    ``residual`` (then RMSNorm(h_t + attention output))."""

    def __init__(self, d_model: int, n_head: int, horizon: int, init_std: float = 0.02, eps: float = 1e-5,
                 residual: bool = False):
        super().__init__()
        self.residual = residual
        self.n_head = min(MAX_HEADS, n_head)
        if d_model % self.n_head:
            raise ValueError(f"objective jtp: model.d_model={d_model} must divide into the fetch module's "
                             f"{self.n_head} heads (min({MAX_HEADS}, model.n_head))")
        self.head_dim = d_model // self.n_head
        self.gamma = nn.Parameter(torch.tensor(0.1))  # weight of h_t in TC; the paper starts it at 0.1
        self.ln = nn.LayerNorm(d_model, eps=eps)
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        L = horizon + 1
        self.rel_bias = nn.Parameter(torch.zeros(self.n_head, L, L))  # per head, query slot, key slot (keys <= query)
        self.norm = RMSNorm(d_model, eps)
        init_weights(self, init_std)

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        """h (N, D) hidden states, e (N, L, D) embeddings of x_t..x_{t+L-1} (L <= d + 1) -> (N, L, D) outputs."""
        N, L, D = e.shape
        z = self.ln(e + self.gamma * h[:, None])  # TC(h_t, E(x_{t+j})), (N, L, D)
        q, k, v = (proj(z).view(N, L, self.n_head, self.head_dim).transpose(1, 2)  # (N, H, L, Dh)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        causal = torch.ones(L, L, dtype=torch.bool, device=e.device).tril()
        bias = self.rel_bias[:, :L, :L].masked_fill(~causal, float("-inf"))  # (H, L, L)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        y = self.o_proj(y.transpose(1, 2).reshape(N, L, D))
        return self.norm(y + h[:, None] if self.residual else y)


@dataclass
class JTPConfig(FutureTokenConfig):
    """JTP's settings: d future tokens (``horizon``) and the weight of their mean loss."""

    name: str = "jtp"
    fetch_residual: bool = False
    """Add h_t back to the fetch module's attention output before its norm (an ablation; the NextLat paper's
    code has no such residual)."""


class JointTokenPrediction(FutureTokenObjective):
    """Loss = CE(slot 0, x_{t+1}) + lambda_future * mean over j = 1..d of CE(slot j, x_{t+j+1}).

    h_t is the backbone's final-norm hidden state. Slot j at position t is scored against
    ``targets[:, t + j]``, masked past the sequence end, across document boundaries and where that
    target is IGNORE; slots past the end of a sequence read its last token, and only feed masked
    outputs (attention is causal). The fetch module runs only at positions where some slot is scored
    (on Path-Star and Countdown the prompt positions cost nothing); each position is computed on its
    own, so this changes no value. Terms ``ce`` and ``jtp@j`` (weight lambda_future / d).
    """

    term_prefix = "jtp"
    config_class = JTPConfig
    state_version = 2
    state_change = ("JTP now follows the paper's code: the next token is predicted by the fetch module's slot 0 "
                    "(not by the LM head on h_t), without an h_t residual, with at most 4 heads and a "
                    "(heads, d + 1, d + 1) attention bias")

    def __init__(self, cfg: JTPConfig, model: Transformer):
        super().__init__(cfg, model)
        mc = model.cfg
        self.fetch = Fetch(mc.d_model, mc.n_head, cfg.horizon, mc.init_std, mc.norm_eps, cfg.fetch_residual)

    def forward(self, model: Transformer, batch: Batch) -> LossOutput:
        h, emb = model(batch.input_ids, batch.doc_ids)  # (B, T, D) each
        B, T, D = h.shape
        steps = self.future_steps(T)
        L = (steps[-1] if steps else 0) + 1  # slots x_t .. x_{t+L-1}
        # targets of slot j at position t, (B, T) each: j = 0 the next token, then the future ones padded to T.
        slot_targets = [batch.targets] + [F.pad(future_targets(batch, j), (0, j), value=IGNORE) for j in steps]
        keep = torch.stack(slot_targets).ne(IGNORE).any(0)  # (B, T): positions with a scored slot
        rows, cols = keep.nonzero(as_tuple=True)  # (N,) each
        idx = (cols[:, None] + torch.arange(L, device=h.device)).clamp(max=T - 1)  # (N, L) token of each slot
        out = self.fetch(h[rows, cols], emb[rows[:, None], idx])  # (N, L, D)
        terms = {"ce": head_ce(model, out[:, 0], batch.targets[rows, cols])}
        for j in steps:
            terms[f"jtp@{j}"] = head_ce(model, out[:, j], slot_targets[j][rows, cols],
                                        self.cfg.lambda_future / self.cfg.horizon)
        return LossOutput(terms)

    def decoding_head(self, model: Transformer) -> Head:
        """Slot 0 as a decoding head: (h_t (..., D), x_t (...)) -> lm_head(fetch(TC(h_t, E(x_t)))) (..., V), the
        prediction the ``ce`` term trains. Only h_t and the token fed at t are read."""

        def head(h: Tensor, ids: Tensor) -> Tensor:
            if ids.shape != h.shape[:-1]:
                raise ValueError(f"jtp head: ids of shape {tuple(ids.shape)} for states of shape {tuple(h.shape)}")
            D = h.shape[-1]
            e = model.embed_tokens(ids.reshape(-1, 1))  # (N, 1, D)
            return model.logits(self.fetch(h.reshape(-1, D), e.to(h.dtype))[:, 0]).view(*ids.shape, -1)

        return head
