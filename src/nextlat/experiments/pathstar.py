"""Path-Star: exact-path accuracy of every objective on the recipe's star graph."""

from __future__ import annotations

from nextlat.experiments.base import Arm, Experiment, Metric


def arms(scale: str) -> list[Arm]:
    # Folders named after the recipes, so `nextlat sweep <recipe> --out <exp>/<recipe>` runs are reused.
    return [Arm(label, f"pathstar-{scale}-{obj}", f"pathstar-{scale}-{obj}")
            for label, obj in [("GPT", "next-token"), ("MTP", "mtp"), ("JTP", "jtp"), ("BST", "bst"),
                               ("NextLat", "next-latent")]]


EXPERIMENT = Experiment(
    "pathstar", arms,
    [Metric("acc_greedy", "exact path, greedy %"), Metric("acc_sampled", "exact path, sampled %")],
    paper={"GPT": {"G(2,10)": 49.4, "G(5,5)": 18.6}, "MTP": {"G(2,10)": 66.2, "G(5,5)": 21.2},
           "JTP": {"G(2,10)": 69.5, "G(5,5)": 47.3}, "BST": {"G(2,10)": 98.9, "G(5,5)": 99.9},
           "NextLat": {"G(2,10)": 97.1, "G(5,5)": 99.8}},
    paper_note="Paper: exact-path accuracy (%, sampled at temperature 1) on larger graphs; our graph is the recipe's.",
    scales=("cpu", "paper"),
)
