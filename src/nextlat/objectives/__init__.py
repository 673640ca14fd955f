"""Training objectives, selectable by name (``objective.name`` in a recipe)."""

from __future__ import annotations

from nextlat.config import ObjectiveConfig
from nextlat.model import Transformer
from nextlat.objectives.base import LossOutput, LossTerm, Objective
from nextlat.objectives.bst import BeliefState
from nextlat.objectives.jtp import JointTokenPrediction
from nextlat.objectives.mtp import MultiTokenPrediction
from nextlat.objectives.next_latent import LatentDynamics, NextLatent
from nextlat.objectives.next_token import NextToken

OBJECTIVES: dict[str, type[Objective]] = {
    "next_token": NextToken,
    "next_latent": NextLatent,
    "mtp": MultiTokenPrediction,
    "jtp": JointTokenPrediction,
    "bst": BeliefState,
}


def build_objective(cfg: ObjectiveConfig, model: Transformer) -> Objective:
    return OBJECTIVES[cfg.name](cfg, model)


__all__ = ["OBJECTIVES", "BeliefState", "JointTokenPrediction", "LatentDynamics", "LossOutput", "LossTerm",
           "MultiTokenPrediction", "NextLatent", "NextToken", "Objective", "build_objective"]
