"""Training objectives, selectable by name (``objective.name`` in a recipe)."""

from __future__ import annotations

from nextlat.config import ObjectiveConfig
from nextlat.model import Transformer
from nextlat.objectives.base import LossOutput, LossTerm, Objective
from nextlat.objectives.next_latent import LatentDynamics, NextLatent
from nextlat.objectives.next_token import NextToken

OBJECTIVES: dict[str, type[Objective]] = {
    "next_token": NextToken,
    "next_latent": NextLatent,
}


def build_objective(cfg: ObjectiveConfig, model: Transformer) -> Objective:
    return OBJECTIVES[cfg.name](cfg, model)


__all__ = ["OBJECTIVES", "LatentDynamics", "LossOutput", "LossTerm", "NextLatent", "NextToken", "Objective",
           "build_objective"]
