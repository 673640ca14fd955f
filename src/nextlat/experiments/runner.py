"""Experiments: every objective the paper compares on one task, over seeds, as one resumable command.

An experiment is a list of *arms* (a recipe plus overrides, e.g. MTP at d = 4), a list of metrics
read from each run's final evaluation, the paper's numbers for the same rows, and optional figures.
``run_experiment`` queues every (arm, seed) run at once (:func:`nextlat.experiments.sweep.run_jobs`), skips
finished runs and resumes interrupted ones, then writes ``results.md`` and ``results.json`` (every
seed's value, mean and standard deviation, the paper's value) and the figures into the
experiment folder. ``report`` redoes the table and figures from whatever runs have finished.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nextlat.config import ConfigError
from nextlat.experiments.sweep import Job, finished_runs, is_finished, run_jobs, seed_results, stats_of
from nextlat.registry import load_config
from nextlat.training.checkpoint import atomic_write_text


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
    figures: Callable[[Path, list[Arm], list[int]], dict[str, Any]] | None = None
    """Draws the figures into the folder; returns extra results for results.json (e.g. curves)."""
    scales: tuple[str, ...] = SCALES
    """Scales with recipes: cpu (minutes on a CPU), gpu (minutes on one GPU), paper (the paper's set-up)."""


def _objective_arms(task: str, scale: str, horizons: dict[str, list[int]]) -> list[Arm]:
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


def _pathstar_arms(scale: str) -> list[Arm]:
    # Folders named after the recipes, so `nextlat sweep <recipe> --out <exp>/<recipe>` runs are reused.
    return [Arm(label, f"pathstar-{scale}-{obj}", f"pathstar-{scale}-{obj}")
            for label, obj in [("GPT", "next-token"), ("MTP", "mtp"), ("JTP", "jtp"), ("BST", "bst"),
                               ("NextLat", "next-latent")]]


def _countdown_arms(scale: str) -> list[Arm]:
    return _objective_arms("countdown", scale, {"next_token": [], "bst": [], "mtp": [1, 4, 8], "jtp": [1, 4, 8],
                                                "next_latent": [1, 4, 8]})


def _a5_arms(scale: str) -> list[Arm]:
    def trained_on(recipe: str) -> int:  # the scales differ: 12 and 36 at the paper's, 6 and 18 on CPU
        return load_config(recipe).task.train_len

    short, long = f"a5-{scale}-next-token", f"a5-{scale}-next-token-long"
    posthoc_steps = {"cpu": 4000, "gpu": 3000, "paper": 40000}[scale]  # a quarter / 30% / a tenth of training
    return [Arm(f"GPT (trained on {trained_on(short)})", "next-token", short),
            Arm(f"GPT (trained on {trained_on(long)})", "next-token-long", long),
            Arm("NextLat d=1", "next-latent", f"a5-{scale}-next-latent"),
            # The control the paper does not run: the same dynamics model fitted afterwards to the frozen GPT.
            Arm("GPT + post-hoc dynamics d=1", "posthoc-dynamics", f"a5-{scale}-next-latent",
                (f"train.steps={posthoc_steps}",), backbone_of="next-token")]


def _trained_models(out: Path, arm: Arm, seeds: list[int]) -> Iterator[tuple[Path, Any]]:
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


def _a5_figures(out: Path, arms: list[Arm], seeds: list[int]) -> dict[str, Any]:
    """Accuracy by position on the longest test words, per arm (and the NextLat dynamics run as an RNN)."""
    import torch

    from nextlat.experiments.plots import plot_curves
    from nextlat.tasks.a5 import rnn_accuracy_by_position, transformer_accuracy_by_position

    per_label: dict[str, list[list[float]]] = {}
    for arm in arms:
        for _, comps in _trained_models(out, arm, seeds):
            model, objective = comps.model.eval(), comps.objective.eval()
            L = max(comps.task.cfg.eval_lengths)
            data = comps.task.test_data(L)
            batch = data.get(torch.arange(min(len(data), comps.task.cfg.eval_examples))).to(next(model.parameters()).device)
            if L <= model.cfg.max_seq_len and arm.backbone_of is None:  # a frozen backbone repeats its source arm
                acc = transformer_accuracy_by_position(model, batch.input_ids, batch.targets)
                per_label.setdefault(arm.label, []).append(acc.tolist())
            dynamics = getattr(objective, "dynamics", None)
            if dynamics is not None:
                acc = rnn_accuracy_by_position(model, dynamics, batch.input_ids, batch.targets)
                label = f"{arm.label} (RNN)" if arm.backbone_of else f"{arm.label}, dynamics as RNN"
                per_label.setdefault(label, []).append(acc.tolist())
    curves = {}
    for label, runs in per_label.items():
        t = torch.tensor(runs)  # (seeds, L)
        curves[label] = {"x": list(range(1, t.shape[1] + 1)), "mean": t.mean(0).tolist(),
                         "std": (t.std(0) if len(runs) > 1 else torch.zeros(t.shape[1])).tolist(), "n": len(runs)}
    if curves:
        plot_curves(curves, out / "a5_accuracy_vs_length.png", xlabel="position t (sequence length)",
                    ylabel="accuracy of the state s_t", title="A5 state tracking (mean ± std over seeds)")
    return {"curves": curves}


def _manhattan_arms(scale: str) -> list[Arm]:
    return _objective_arms("manhattan", scale, {"next_token": [], "mtp": [8], "jtp": [8], "next_latent": [8]})


def _manhattan_figures(out: Path, arms: list[Arm], seeds: list[int]) -> dict[str, Any]:
    """Map reconstruction of each arm's first finished seed: the streets its greedy traversals use or invent."""
    from nextlat.tasks.manhattan.metrics import draw_map, map_reconstruction, valid_trajectories

    maps = {}
    for arm in arms:
        run, comps = next(_trained_models(out, arm, seeds), (None, None))
        if run is None:
            continue
        task, model = comps.task, comps.model.eval()
        res = valid_trajectories(model, task.graph, task.tokenizer, task.test_pairs(task.cfg.eval_valid),
                                 max_len=task.move_cap(model))
        m = map_reconstruction(task.graph, res.traversals)
        draw_map(task.graph, m, out / f"map_{arm.slug}.png", title=f"{arm.label} ({run.name})")
        maps[arm.label] = {"run": str(run), "true_edges": len(m.true_edges), "invented_edges": len(m.invented),
                           "valid": res.valid}
    return {"maps": maps}


EXPERIMENTS: dict[str, Experiment] = {
    "pathstar": Experiment(
        "pathstar", _pathstar_arms,
        [Metric("acc_greedy", "exact path, greedy %"), Metric("acc_sampled", "exact path, sampled %")],
        paper={"GPT": {"G(2,10)": 49.4, "G(5,5)": 18.6}, "MTP": {"G(2,10)": 66.2, "G(5,5)": 21.2},
               "JTP": {"G(2,10)": 69.5, "G(5,5)": 47.3}, "BST": {"G(2,10)": 98.9, "G(5,5)": 99.9},
               "NextLat": {"G(2,10)": 97.1, "G(5,5)": 99.8}},
        paper_note="Paper: exact-path accuracy (%, sampled at temperature 1) on larger graphs; our graph is the recipe's.",
        scales=("cpu", "paper"),
    ),
    "countdown": Experiment(
        "countdown", _countdown_arms,
        [Metric("solved_id", "solved, in-distribution %"), Metric("solved_ood", "solved, held-out targets %"),
         Metric("final_eq_valid_id", "final equation valid %")],
        paper={"GPT": {"solved %": 33.1}, "BST": {"solved %": 42.3},
               **{f"MTP d={d}": {"solved %": v} for d, v in zip((1, 4, 8), (39.2, 49.7, 57.3))},
               **{f"JTP d={d}": {"solved %": v} for d, v in zip((1, 4, 8), (39.0, 49.4, 55.0))},
               **{f"NextLat d={d}": {"solved %": v} for d, v in zip((1, 4, 8), (54.8, 57.6, 58.7))}},
        paper_note="Paper: % of 10k test problems solved (inputs 1..99), 12x768 models trained 100k steps x 1024. "
                   "The CPU scale draws inputs from 1..20 and trains 4x128 models for 2000 steps x 64.",
        scales=("cpu", "paper"),
    ),
    "a5": Experiment(
        "a5", _a5_arms,
        [Metric("acc@12", "acc, length 12 %"), Metric("rnn_acc@12", "RNN acc, length 12 %"),
         Metric("acc@36", "acc, length 36 %"),
         Metric("acc_last@36", "last position, length 36 %"), Metric("rnn_acc@36", "RNN acc, length 36 %"),
         Metric("rnn_acc_last@36", "RNN last position, length 36 %"), Metric("rnn_acc@100", "RNN acc, length 100 %")],
        paper_note="Paper: the NextLat dynamics model run as an RNN stays above 95% at length 36 after training "
                   "on 12; transformers (even one trained on 36) fail. The CPU scale trains on 6 (and 18).",
        figures=_a5_figures,
    ),
    "manhattan": Experiment(
        "manhattan", _manhattan_arms,
        [Metric("next_token", "next-token test %"), Metric("valid", "valid trajectories %"),
         Metric("compression", "compression", percent=False), Metric("eff_rank", "effective rank", percent=False),
         Metric("detour", "detour robustness %"), Metric("map_invented_edges", "invented streets", percent=False)],
        paper={"GPT": {"next-token": 100, "valid": 97.0, "compression": 0.65, "rank": 160.1, "detour": 85.0},
               "MTP d=8": {"next-token": 100, "valid": 98.1, "compression": 0.64, "rank": 57.7, "detour": 95.0},
               "JTP d=8": {"next-token": 100, "valid": 97.1, "compression": 0.32, "rank": 215.8, "detour": 87.0},
               "NextLat d=8": {"next-token": 100, "valid": 98.7, "compression": 0.71, "rank": 52.7, "detour": 95.0}},
        paper_note="Paper (Table 1): the real Manhattan graph, 48x384 models trained 400k steps x 256. "
                   "Pass --graph PATH for a street graph file; without it the runs use the procedural city.",
        figures=_manhattan_figures,
    ),
}


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]


def select_arms(arms: list[Arm], slugs: list[str] | None) -> list[Arm]:
    """The arms named by ``slugs``, in that order (all arms when ``slugs`` is None)."""
    if slugs is None:
        return arms
    by_slug = {a.slug: a for a in arms}
    for slug in slugs:
        if slug not in by_slug:
            raise ConfigError(f"--arms {slug!r}: not an arm of this experiment; choose from {', '.join(by_slug)}")
    if len(set(slugs)) != len(slugs):
        raise ConfigError(f"--arms {' '.join(slugs)}: an arm is named twice")
    return [by_slug[s] for s in slugs]


def check_scale(name: str, scale: str) -> None:
    """Refuse a scale that the experiment has no recipes for, naming the ones it has."""
    scales = get_experiment(name).scales
    if scale not in scales:
        raise ConfigError(f"--scale {scale!r}: the {name} experiment has recipes at the scales {', '.join(scales)}")


def plan(name: str, scale: str, seeds: list[int], out: Path, overrides: list[str] = (),
         arms: list[str] | None = None) -> list[Job]:
    """The runs of an experiment, seed-major (every arm's first seed comes before any second seed).
    ``arms`` restricts and orders the arms by folder name (e.g. cheap arms first)."""
    check_scale(name, scale)
    arms = select_arms(get_experiment(name).arms(scale), arms)
    planned = {a.slug for a in arms}
    jobs = []
    for s in seeds:
        for arm in arms:
            after, extra = None, ()
            if arm.backbone_of is not None:
                after = out / arm.backbone_of / f"seed_{s}"
                if arm.backbone_of not in planned and not is_finished(after):
                    raise ConfigError(f"--arms {arm.slug}: starts from arm {arm.backbone_of!r}, whose seed {s} has not "
                                      f"finished ({after}); name {arm.backbone_of} in --arms as well")
                extra = (f"train.init_from={after}", "train.freeze_backbone=true")
            jobs.append(Job(out / arm.slug / f"seed_{s}", arm.recipe, s, (*arm.overrides, *extra, *overrides), after))
    for job in jobs[: len(arms)]:  # fail fast on a bad recipe or override before anything trains
        load_config(job.recipe, list(job.overrides))
    return jobs


def default_folder(name: str, scale: str, graph: str | Path | None = None) -> Path:
    """``runs/experiments/<name>-<scale>``, then ``-<graph file name>`` for runs on a given street graph (so
    they never share a folder with the procedural city's runs)."""
    tag = f"-{Path(graph).stem}" if graph else ""
    return Path(f"runs/experiments/{name}-{scale}{tag}")


def run_experiment(name: str, *, scale: str = "cpu", seeds: list[int] = (0, 1, 2), parallel: int = 1,
                   out: Path | None = None, overrides: list[str] = (), arms: list[str] | None = None) -> dict[str, Any]:
    """Train the experiment's runs that have not finished, then tabulate every finished run (all arms, also
    those left out by ``arms``)."""
    out = Path(out or default_folder(name, scale))
    jobs = plan(name, scale, list(seeds), out, overrides, arms)
    out.mkdir(parents=True, exist_ok=True)
    failed = run_jobs(jobs, parallel)
    result = report(name, scale, list(seeds), out)
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed ({', '.join(str(j.run_dir) for j in failed)}); "
                           f"the table covers the others")
    return result


def _fmt(v: float, percent: bool) -> str:
    return f"{100 * v:.1f}" if percent else f"{v:.3f}"


def report(name: str, scale: str, seeds: list[int], out: Path) -> dict[str, Any]:
    """Write ``results.md`` / ``results.json`` (and figures) from the finished runs under ``out``."""
    check_scale(name, scale)
    exp = get_experiment(name)
    arms = exp.arms(scale)
    rows = []
    for arm in arms:
        per_seed = seed_results(out / arm.slug, seeds)
        steps = sorted({json.loads((run / "results.json").read_text())["step"]
                        for run in finished_runs(out / arm.slug, seeds)})
        row = {"label": arm.label, "recipe": arm.recipe, "overrides": list(arm.overrides),
               "seeds": sorted(per_seed), "steps": steps, "metrics": {}, "paper": exp.paper.get(arm.label, {})}
        for m in exp.metrics:
            vals = [per_seed[s][m.key] for s in sorted(per_seed) if m.key in per_seed[s]]
            if vals:
                row["metrics"][m.key] = {"per_seed": vals, **stats_of(vals)}
        rows.append(row)
    result: dict[str, Any] = {"experiment": name, "scale": scale, "seeds": seeds, "rows": rows,
                              "paper_note": exp.paper_note}
    if any(r["metrics"] for r in rows):
        from nextlat.experiments.plots import plot_bars

        first = exp.metrics[0]
        plot_bars(rows, first.key, first.label, out / f"{name}.png", title=f"{name} ({scale} scale)",
                  percent=first.percent)
    if exp.figures is not None:
        result.update(exp.figures(out, arms, seeds))

    paper_cols = sorted({c for r in rows for c in r["paper"]})
    head = ["objective", "seeds", *[m.label for m in exp.metrics], *[f"paper {c}" for c in paper_cols]]
    lines = [f"# {name} ({scale} scale)", "",
             "Each cell: mean ± std over seeds, then every seed's value in brackets.", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        cells = [r["label"], str(len(r["seeds"]))]
        for m in exp.metrics:
            s = r["metrics"].get(m.key)
            if s is None:
                cells.append("–")
            else:
                vals = ", ".join(_fmt(v, m.percent) for v in s["per_seed"])
                cells.append(f"{_fmt(s['mean'], m.percent)} ± {_fmt(s['std'], m.percent)} [{vals}]")
        cells += [f"{r['paper'][c]:g}" if c in r["paper"] else "–" for c in paper_cols]
        lines.append("| " + " | ".join(cells) + " |")
    if exp.paper_note:
        lines += ["", exp.paper_note]
    trained = {r["label"]: ", ".join(map(str, r["steps"])) for r in rows if r["steps"]}
    if len(set(trained.values())) == 1:
        lines += ["", f"Steps trained, from the runs: {next(iter(trained.values()))} (every run)."]
    elif trained:
        lines += ["", "Steps trained, from the runs: " + "; ".join(f"{k} {v}" for k, v in trained.items()) + "."]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "results.json", json.dumps(result, indent=2) + "\n")
    print("\n".join(lines))
    return result

