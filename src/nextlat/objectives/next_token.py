"""GPT baseline: next-token cross-entropy only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from nextlat.config import ObjectiveConfig
from nextlat.data import Batch
from nextlat.model import Transformer
from nextlat.objectives.base import LossOutput, Objective


@dataclass
class NextTokenConfig(ObjectiveConfig):
    """The GPT baseline has no settings of its own."""

    name: str = "next_token"
    has_parameters: ClassVar[bool] = False


class NextToken(Objective):
    config_class = NextTokenConfig

    def forward(self, model: Transformer, batch: Batch) -> LossOutput:
        h, _ = model(batch.input_ids, batch.doc_ids)
        return LossOutput({"ce": self.token_loss(model, h, batch)})
