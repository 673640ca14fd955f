"""JTP baseline: joint multi-token prediction through a teacher-forced bottleneck (Ahn, Lamb, Langford,
arXiv 2503.21801).

A small fetch module reads the final hidden state h_t together with the true next tokens: the
sequence TC(h_t, E(x_t)), TC(h_t, E(x_{t+1})), ..., TC(h_t, E(x_{t+d})), with TC(h, e) =
LayerNorm(e + gamma * h), goes through one causal self-attention layer with a learned relative
position bias; h_t is added back, then a final norm and the shared LM head. Output j has seen
x_t..x_{t+j} and predicts x_{t+j+1}; outputs 1..d give the d future-token terms, while the next
token itself is the backbone's ordinary loss from h_t (docs/architecture.md section 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nextlat.data import Batch
from nextlat.model import RMSNorm, Transformer, init_weights
from nextlat.objectives.base import FutureTokenConfig, FutureTokenObjective, LossOutput, future_targets, head_ce


class Fetch(nn.Module):
    """(h_t, E(x_t..x_{t+j})) -> states predicting x_{t+j+1}: one causal attention layer over d + 1 slots."""

    def __init__(self, d_model: int, n_head: int, horizon: int, init_std: float = 0.02, eps: float = 1e-5):
        super().__init__()
        self.n_head, self.head_dim = n_head, d_model // n_head
        self.gamma = nn.Parameter(torch.tensor(0.1))  # weight of h_t in TC; the paper starts it at 0.1
        self.ln = nn.LayerNorm(d_model, eps=eps)
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.rel_bias = nn.Parameter(torch.zeros(n_head, horizon + 1))  # per head, by distance query - key = 0..d
        self.norm = RMSNorm(d_model, eps)
        init_weights(self, init_std)

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        """h (N, D) hidden states, e (N, L, D) embeddings of x_t..x_{t+L-1} -> (N, L, D) normalised outputs."""
        N, L, D = e.shape
        z = self.ln(e + self.gamma * h[:, None])  # TC(h_t, E(x_{t+j})), (N, L, D)
        q, k, v = (proj(z).view(N, L, self.n_head, self.head_dim).transpose(1, 2)  # (N, H, L, Dh)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        dist = torch.arange(L, device=e.device)[:, None] - torch.arange(L, device=e.device)  # (L, L) query - key
        bias = self.rel_bias[:, dist.clamp(min=0)].masked_fill(dist < 0, float("-inf"))  # (H, L, L), causal
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        y = self.o_proj(y.transpose(1, 2).reshape(N, L, D))
        return self.norm(h[:, None] + y)  # h_t added back, then the final norm


@dataclass
class JTPConfig(FutureTokenConfig):
    """JTP's settings: d future tokens (``horizon``) and the weight of their mean loss."""

    name: str = "jtp"


class JointTokenPrediction(FutureTokenObjective):
    """Loss = CE + lambda_future * mean over j = 1..d of CE(output j, x_{t+j+1}).

    h_t is the backbone's final-norm hidden state; the fetch module runs over all (B, T) positions
    at once as a (B * T, d + 1, D) batch. Output j at position t is scored against
    ``targets[:, t + j]``, masked past the sequence end, across document boundaries and where that
    target is IGNORE. Terms ``ce`` and ``jtp@j`` (weight lambda_future / d).
    """

    term_prefix = "jtp"
    config_class = JTPConfig

    def __init__(self, cfg: JTPConfig, model: Transformer):
        super().__init__(cfg, model)
        mc = model.cfg
        self.fetch = Fetch(mc.d_model, mc.n_head, cfg.horizon, mc.init_std, mc.norm_eps)

    def forward(self, model: Transformer, batch: Batch) -> LossOutput:
        h, emb = model(batch.input_ids, batch.doc_ids)  # (B, T, D) each
        terms = {"ce": self.token_loss(model, h, batch)}
        steps = self.future_steps(h.shape[1])
        if not steps:
            return LossOutput(terms)  # exactly the next-token loss
        B, T, D = h.shape
        L = steps[-1] + 1  # slots x_t .. x_{t+d}
        # Slot j of position t reads x_{t+j}; past the end it repeats the last token. Those slots and all
        # later ones of that position only feed outputs whose targets are masked (attention is causal).
        idx = (torch.arange(T, device=h.device)[:, None] + torch.arange(L, device=h.device)).clamp(max=T - 1)
        out = self.fetch(h.reshape(B * T, D), emb[:, idx].reshape(B * T, L, D)).view(B, T, L, D)
        for j in steps:
            terms[f"jtp@{j}"] = head_ce(model, out[:, : T - j, j], future_targets(batch, j),
                                        self.cfg.lambda_future / self.cfg.horizon)
        return LossOutput(terms)
