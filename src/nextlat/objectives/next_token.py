"""GPT baseline: next-token cross-entropy only."""

from __future__ import annotations

from nextlat.data import Batch
from nextlat.model import Transformer
from nextlat.objectives.base import LossOutput, Objective


class NextToken(Objective):
    uses_horizon = False

    def forward(self, model: Transformer, batch: Batch) -> LossOutput:
        h, _ = model(batch.input_ids, batch.doc_ids)
        return LossOutput({"ce": self.token_loss(model, h, batch)})
