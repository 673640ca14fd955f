"""Countdown: problems solved by every objective, the multi-token ones at horizons 1, 4 and 8."""

from __future__ import annotations

from nextlat.experiments.base import Arm, Experiment, Metric, objective_arms


def arms(scale: str) -> list[Arm]:
    return objective_arms("countdown", scale, {"next_token": [], "bst": [], "mtp": [1, 4, 8], "jtp": [1, 4, 8],
                                               "next_latent": [1, 4, 8]})


EXPERIMENT = Experiment(
    "countdown", arms,
    [Metric("solved_id", "solved, in-distribution %"), Metric("solved_ood", "solved, held-out targets %"),
     Metric("final_eq_valid_id", "final equation valid %")],
    paper={"GPT": {"solved %": 33.1}, "BST": {"solved %": 42.3},
           **{f"MTP d={d}": {"solved %": v} for d, v in zip((1, 4, 8), (39.2, 49.7, 57.3))},
           **{f"JTP d={d}": {"solved %": v} for d, v in zip((1, 4, 8), (39.0, 49.4, 55.0))},
           **{f"NextLat d={d}": {"solved %": v} for d, v in zip((1, 4, 8), (54.8, 57.6, 58.7))}},
    paper_note="Paper: % of 10k test problems solved (inputs 1..99), 12x768 models trained 100k steps x 1024. "
               "The CPU scale draws inputs from 1..20 and trains 4x128 models for 2000 steps x 64.",
    scales=("cpu", "paper"),
)
