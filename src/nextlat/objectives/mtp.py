"""MTP baseline: multi-token prediction with independent heads (Gloeckle et al., arXiv 2404.19737).

A shared trunk (the backbone's first n_layer - 1 blocks) feeds d + 1 heads, each one transformer
block plus its own final norm, all sharing the LM head; head k predicts the token k + 1 steps ahead.
Head 0 *is* the backbone's last block and final norm, so a model trained with MTP is still a plain
backbone for export and ordinary decoding; heads 1..d belong to the objective (docs/architecture.md section 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from nextlat.data import Batch
from nextlat.model import Block, LayerContext, RMSNorm, Transformer, init_weights
from nextlat.objectives.base import FutureTokenConfig, FutureTokenObjective, LossOutput, future_targets, head_ce


@dataclass
class MTPConfig(FutureTokenConfig):
    """MTP's settings: d extra heads (``horizon``) and the weight of their mean loss."""

    name: str = "mtp"


class MultiTokenPrediction(FutureTokenObjective):
    """Loss = CE_0 + lambda_future * mean(CE_1..d).

    Head k at position t is scored against ``targets[:, t + k]`` (the target k positions further
    along), masked where the chain t -> t + k leaves its document and wherever that target is
    IGNORE (prompts, padding). Terms ``ce`` (head 0) and ``mtp@k`` (weight lambda_future / d).
    """

    term_prefix = "mtp"
    config_class = MTPConfig
    default_drafter = "mtp"

    def __init__(self, cfg: MTPConfig, model: Transformer):
        super().__init__(cfg, model)
        mc = model.cfg
        self.heads = nn.ModuleList(Block(mc) for _ in range(cfg.horizon))
        self.norms = nn.ModuleList(RMSNorm(mc.d_model, mc.norm_eps) for _ in range(cfg.horizon))
        init_weights(self, mc.init_std)

    def head_state(self, model: Transformer, x: Tensor, ctx: LayerContext, k: int) -> Tensor:
        """Normalised output (B, T, D) of head k on the trunk's residual stream x (B, T, D).

        Head k >= 1 uses layer k - 1 of a cache in ``ctx``: heads 1..d keep a cache of their own
        (:class:`nextlat.decoding.drafters.MTPDrafter`), never the backbone's.
        """
        if k == 0:
            n = model.cfg.n_layer
            return model.norm(model.layers[n - 1](x, ctx, n - 1))
        return self.norms[k - 1](self.heads[k - 1](x, ctx, k - 1))

    def forward(self, model: Transformer, batch: Batch) -> LossOutput:
        x, _, ctx = model.forward_layers(batch.input_ids, batch.doc_ids, n_layers=model.cfg.n_layer - 1)  # (B, T, D)
        # Head 0 repeats exactly the backbone's last block and norm: with lambda_future = 0 this is next-token training.
        terms = {"ce": self.token_loss(model, self.head_state(model, x, ctx, 0), batch)}
        T, d = x.shape[1], self.cfg.horizon
        for k in self.future_steps(T):
            h = self.head_state(model, x, ctx, k)[:, : T - k]  # (B, T - k, D); later positions have no target
            terms[f"mtp@{k}"] = head_ce(model, h, future_targets(batch, k), self.cfg.lambda_future / d)
        return LossOutput(terms)
