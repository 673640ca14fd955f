"""NextLat: next-token prediction plus next-latent prediction (Teoh et al., arXiv 2511.05963).

A small dynamics model p_psi predicts the transformer's next hidden state from the current one
and the next token, h^_{t+1} = h_t + MLP(RMSNorm([E(x_{t+1}), h_t])). It is rolled out d steps
with teacher forcing and trained against stop-gradient targets with a Smooth-L1 loss and a
forward KL through the detached LM head (docs/architecture.md section 1 states every rule implemented here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nextlat.config import ObjectiveConfig
from nextlat.data import IGNORE, Batch, transition_mask
from nextlat.model import RMSNorm, Transformer, init_weights, mlp_hidden_width
from nextlat.objectives.base import LossOutput, LossTerm, Objective, ce_term, check


@dataclass
class NextLatentConfig(ObjectiveConfig):
    """NextLat's settings: rollout horizon, loss weights and the width of p_psi."""

    name: str = "next_latent"
    horizon: int = 1
    """Rollout horizon d: p_psi is rolled out d steps with teacher forcing."""
    lambda_h: float = 1.0
    """Weight of the Smooth-L1 next-hidden-state loss."""
    lambda_kl: float = 1.0
    """Weight of the KL loss through the detached LM head."""
    proj_factor: float = 1.0
    """Dynamics MLP width H = 128 * round(proj_factor * 2D / 128)."""

    def validate(self) -> None:
        check(self.horizon >= 1, "horizon", self.horizon, "must be >= 1")
        check(self.lambda_h >= 0 and self.lambda_kl >= 0, "lambda_h/lambda_kl", (self.lambda_h, self.lambda_kl),
              "must be >= 0")
        check(self.proj_factor > 0, "proj_factor", self.proj_factor, "must be > 0")


class LatentDynamics(nn.Module):
    """p_psi: (h_t, E(x_{t+1})) -> h^_{t+1}, a residual MLP over the normalised concatenation."""

    def __init__(self, d_model: int, proj_factor: float = 1.0, init_std: float = 0.02, eps: float = 1e-5):
        super().__init__()
        hidden = mlp_hidden_width(2 * d_model, proj_factor)
        self.norm = RMSNorm(2 * d_model, eps)
        self.fc1 = nn.Linear(2 * d_model, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, hidden, bias=False)
        self.fc3 = nn.Linear(hidden, d_model, bias=False)
        init_weights(self, init_std)

    def forward(self, h: Tensor, next_emb: Tensor) -> Tensor:
        """h (..., D), next_emb (..., D) -> predicted next hidden state (..., D)."""
        z = self.norm(torch.cat([next_emb, h], dim=-1))  # embedding first, then state
        z = F.gelu(self.fc2(F.gelu(self.fc1(z))))
        return h + self.fc3(z)


class NextLatent(Objective):
    """Loss = CE + lambda_h * L_next-h + lambda_kl * L_kl over a d-step rollout.

    Terms ``next_h@i`` and ``kl@i`` (i = 1..d) each carry weight lambda / d, so the total is
    (1/d) sum_i of per-step means, every mean taken over that step's own valid elements.
    """

    config_class = NextLatentConfig
    default_drafter = "next_latent"

    def __init__(self, cfg: NextLatentConfig, model: Transformer):
        super().__init__(cfg, model)
        mc = model.cfg
        self.dynamics = LatentDynamics(mc.d_model, cfg.proj_factor, mc.init_std, mc.norm_eps)

    def _masks(self, batch: Batch, step: int) -> tuple[Tensor, Tensor]:
        """(latent, kl) masks for transitions t -> t + step, each (B, T - step) bool.

        The latent term scores every transition inside a document (prompts included); the KL
        term additionally requires a token loss at the destination t + step.
        """
        B, T = batch.input_ids.shape
        latent = transition_mask(batch.doc_ids, (B, T), step, batch.input_ids.device)
        kl = latent & (batch.targets[:, step:] != IGNORE)
        return latent, kl

    def counts(self, batch: Batch) -> dict[str, Tensor]:
        out = super().counts(batch)
        D = self.dynamics.fc3.out_features
        for i in range(1, min(self.cfg.horizon, batch.input_ids.shape[1] - 1) + 1):
            latent, kl = self._masks(batch, i)
            if self.cfg.lambda_h > 0:
                out[f"next_h@{i}"] = latent.sum() * D
            if self.cfg.lambda_kl > 0:
                out[f"kl@{i}"] = kl.sum()
        return out

    def forward(self, model: Transformer, batch: Batch) -> LossOutput:
        h, emb = model(batch.input_ids, batch.doc_ids)  # (B, T, D) each
        scored = batch.targets != IGNORE  # (B, T)
        logits = model.logits(h[scored])  # (N, V): the LM head only where a token is scored (as head_ce)
        terms = {"ce": ce_term(logits, batch.targets[scored])}
        if self.cfg.lambda_h == 0 and self.cfg.lambda_kl == 0:
            return LossOutput(terms)  # exactly the next-token loss
        terms.update(self.latent_terms(h, emb, batch, logits, model.lm_head.weight.detach()))
        return LossOutput(terms)

    def latent_terms(self, h: Tensor, emb: Tensor, batch: Batch, logits: Tensor, head_w: Tensor) -> dict[str, LossTerm]:
        """The rollout's ``next_h@i`` and ``kl@i`` terms from hidden states h (B, T, D), input embeddings emb
        (B, T, D) and the teacher's logits (N, V') at the scored positions of ``batch``.

        ``head_w`` (V', D) is the head the KL reads through (the LM head's weight, detached); a drafter fitted to
        a frozen model (:mod:`nextlat.training.drafter`) passes cached states and a slice of the head's rows.
        """
        lam_h, lam_kl, d = self.cfg.lambda_h, self.cfg.lambda_kl, self.cfg.horizon
        terms: dict[str, LossTerm] = {}
        scored = batch.targets != IGNORE  # (B, T)
        T = h.shape[1]
        target_h = h.detach()  # stop-gradient targets
        if lam_kl > 0:
            teacher_logp = F.log_softmax(  # (N, V')
                logits.detach().to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            # row of teacher_logp holding each scored position (B, T); KL destinations are always scored
            row = torch.full(scored.shape, -1, dtype=torch.long, device=h.device)
            row[scored] = torch.arange(len(logits), device=h.device)
        h_hat = h  # rollout state; h^_t = h_t, never detached along the chain
        for i in range(1, min(d, T - 1) + 1):
            # h_hat[:, t] predicts h_{t+i-1}; feed the true token x_{t+i} (teacher forcing).
            h_hat = self.dynamics(h_hat[:, : T - i], emb[:, i:])  # (B, T - i, D)
            latent_mask, kl_mask = self._masks(batch, i)
            if lam_h > 0:
                l1 = F.smooth_l1_loss(h_hat.to(torch.promote_types(h_hat.dtype, torch.float32)),
                                      target_h[:, i:].to(torch.promote_types(target_h.dtype, torch.float32)),
                                      reduction="none", beta=1.0)
                m = latent_mask.unsqueeze(-1)
                terms[f"next_h@{i}"] = LossTerm(
                    (l1 * m).sum(), latent_mask.sum() * h.shape[-1], lam_h / d
                )
            if lam_kl > 0:
                student = F.linear(h_hat[kl_mask], head_w)  # (M, V')
                student_logp = F.log_softmax(student.to(torch.promote_types(student.dtype, torch.float32)), dim=-1)
                teacher = teacher_logp[row[:, i:][kl_mask]]  # (M, V')
                kl = (teacher.exp() * (teacher - student_logp)).sum()  # forward KL(p || q), summed
                terms[f"kl@{i}"] = LossTerm(kl, kl_mask.sum(), lam_kl / d)
        return terms
