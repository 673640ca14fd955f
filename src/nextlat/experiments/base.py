"""What an experiment is: arms (a recipe plus overrides), metrics, the paper's numbers and figures.

Each paper experiment is a module of this package exposing one ``EXPERIMENT`` and named by one line of
:data:`nextlat.registry.EXPERIMENTS`; :mod:`nextlat.experiments.runner` trains and tabulates it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nextlat.experiments.sweep import finished_runs


@dataclass(frozen=True)
class Arm:
    label: str
    """Row label in the result table, e.g. 'NextLat d=4'."""
    slug: str
    """Folder of the arm's runs inside the experiment folder."""
    recipe: str
    overrides: tuple[str, ...] = ()
    backbone_of: str | None = None
    """Slug of another arm: each seed of this arm starts from that arm's run of the same seed with the backbone
    frozen, and trains only the objective's own parameters (a post-hoc fit, e.g. a dynamics model on a GPT)."""


@dataclass(frozen=True)
class Metric:
    key: str
    """Key of the task's evaluation in ``results.json``."""
    label: str
    """Column label."""
    percent: bool = True
    """Shown multiplied by 100 (the value is a fraction)."""
    optional: bool = False
    """Left out of the table when no run reports it (a metric only some configurations compute, e.g. sampled
    decoding); a required metric gets a column of dashes instead."""


SCALES = ("cpu", "gpu", "paper")


@dataclass
class Experiment:
    name: str
    arms: Callable[[str], list[Arm]]
    """Arms at a scale (one of ``scales``)."""
    metrics: list[Metric]
    paper: dict[str, dict[str, float]] = field(default_factory=dict)
    """The paper's values: arm label -> metric label -> value (as printed in the paper)."""
    paper_note: str = ""
    figures: Callable[..., dict[str, Any]] | None = None
    """``figures(folder, arms, seeds, **options)`` draws the figures into the folder and returns extra results for
    results.json (e.g. curves); a list of lines under ``"notes"`` is appended to results.md instead."""
    scales: tuple[str, ...] = SCALES
    """Scales with recipes: cpu (minutes on a CPU), gpu (minutes on one GPU), paper (the paper's set-up)."""
    run_metrics: Callable[..., dict[str, float]] | None = None
    """``run_metrics(run_folder, **options)``: metrics computed after training from a finished run (e.g. probes of
    its frozen model), merged into that run's final evaluation for the table; {} for a run it cannot measure."""
    options: tuple[str, ...] = ()
    """Names of the experiment's own options (e.g. the lm experiment's reference run), passed by the runner as
    keyword arguments to ``figures`` and ``run_metrics``."""


def objective_arms(task: str, scale: str, horizons: dict[str, list[int]]) -> list[Arm]:
    """Arms ``<task>-<scale>-<objective>`` for each objective, one per horizon where it has one."""
    labels = {"next_token": "GPT", "next_latent": "NextLat", "mtp": "MTP", "jtp": "JTP", "bst": "BST"}
    arms = []
    for obj, hs in horizons.items():
        recipe = f"{task}-{scale}-{obj.replace('_', '-')}"
        if not hs:
            arms.append(Arm(labels[obj], obj.replace("_", "-"), recipe))
        for d in hs:
            arms.append(Arm(f"{labels[obj]} d={d}", f"{obj.replace('_', '-')}-d{d}", recipe, (f"objective.horizon={d}",)))
    return arms


def trained_models(out: Path, arm: Arm, seeds: list[int]) -> Iterator[tuple[Path, Any]]:
    """(run folder, components) of the arm's finished runs, on the GPU when there is one. A finished run whose
    checkpoints are gone (results copied from another machine without them) is left out of the figures with a
    note; its numbers still count in the table."""
    from nextlat.training.build import load_components, resolve_device
    from nextlat.training.checkpoint import CheckpointError, resolve_checkpoint

    for run in finished_runs(out / arm.slug, seeds):
        try:
            resolve_checkpoint(run)
        except CheckpointError:
            print(f"[experiment] {run}: no checkpoint, left out of the figures", flush=True)
            continue
        yield run, load_components(run, resolve_device("auto"))[0]
