"""Experiments: every objective the paper compares on one task, over seeds, as one resumable command.

An experiment (:class:`nextlat.experiments.base.Experiment`, one module each, named in
:data:`nextlat.registry.EXPERIMENTS`) is a list of *arms* (a recipe plus overrides, e.g. MTP at d = 4), a list
of metrics read from each run's final evaluation, the paper's numbers for the same rows, and optional figures.
``run_experiment`` queues every (arm, seed) run at once (:func:`nextlat.experiments.sweep.run_jobs`), skips
finished runs and resumes interrupted ones, then writes ``results.md`` and ``results.json`` (every
seed's value, mean and standard deviation, the paper's value) and the figures into the
experiment folder. ``report`` redoes the table and figures from whatever runs have finished.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nextlat.config import ConfigError
from nextlat.experiments.base import Arm, Experiment
from nextlat.experiments.sweep import Job, finished_runs, is_finished, run_jobs, seed_results, stats_of
from nextlat.registry import EXPERIMENTS, UnknownName, load_config, lookup
from nextlat.training.checkpoint import atomic_write_text


def get_experiment(name: str) -> Experiment:
    """The experiment that :data:`nextlat.registry.EXPERIMENTS` names ``name`` (imported on first use)."""
    try:
        return lookup(EXPERIMENTS, name, "experiment")
    except UnknownName as e:
        raise ConfigError(str(e)) from None


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


def default_folder(name: str, scale: str, graph: str | Path | None = None, *, tag: str = "") -> Path:
    """``runs/experiments/<name>-<scale>``, then ``-<graph file name>`` for runs on a given street graph (so
    they never share a folder with the procedural city's runs), or ``-<tag>`` (e.g. the lm experiment's corpus)."""
    tag = f"-{Path(graph).stem}" if graph else f"-{tag}" if tag else ""
    return Path(f"runs/experiments/{name}-{scale}{tag}")


def check_options(exp: Experiment, options: dict[str, Any] | None) -> dict[str, Any]:
    """The experiment's own options (``Experiment.options``); refuses any other name."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(exp.options))
    if unknown:
        raise ConfigError(f"the {exp.name} experiment takes no option {', '.join(unknown)}"
                          + (f" (it takes {', '.join(exp.options)})" if exp.options else ""))
    return options


def run_experiment(name: str, *, scale: str = "cpu", seeds: list[int] = (0, 1, 2), parallel: int = 1,
                   out: Path | None = None, overrides: list[str] = (), arms: list[str] | None = None,
                   devices: list[str] | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the experiment's runs that have not finished (one per GPU of ``devices`` when given), then tabulate
    every finished run (all arms, also those left out by ``arms``). ``options``: the experiment's own."""
    out = Path(out or default_folder(name, scale))
    check_options(get_experiment(name), options)
    jobs = plan(name, scale, list(seeds), out, overrides, arms)
    out.mkdir(parents=True, exist_ok=True)
    failed = run_jobs(jobs, parallel, devices)
    result = report(name, scale, list(seeds), out, options)
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed ({', '.join(str(j.run_dir) for j in failed)}); "
                           f"the table covers the others")
    return result


def _fmt(v: float, percent: bool) -> str:
    return f"{100 * v:.1f}" if percent else f"{v:.3f}"


def report(name: str, scale: str, seeds: list[int], out: Path, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``results.md`` / ``results.json`` (and figures) from the finished runs under ``out``."""
    check_scale(name, scale)
    exp = get_experiment(name)
    options = check_options(exp, options)
    arms = exp.arms(scale)
    rows = []
    for arm in arms:
        per_seed = seed_results(out / arm.slug, seeds)
        if exp.run_metrics is not None:
            for run in finished_runs(out / arm.slug, seeds):
                per_seed[int(run.name.removeprefix("seed_"))].update(exp.run_metrics(run, **options))
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
    notes: list[str] = []
    if exp.figures is not None:
        extra = exp.figures(out, arms, seeds, **options)
        notes = extra.pop("notes", [])
        result.update(extra)

    shown = [m for m in exp.metrics if not m.optional or any(m.key in r["metrics"] for r in rows)]
    paper_cols = sorted({c for r in rows for c in r["paper"]})
    head = ["objective", "seeds", *[m.label for m in shown], *[f"paper {c}" for c in paper_cols]]
    lines = [f"# {name} ({scale} scale)", "",
             "Each cell: mean ± std over seeds, then every seed's value in brackets.", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        cells = [r["label"], str(len(r["seeds"]))]
        for m in shown:
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
    if notes:
        lines += ["", *notes]
    trained = {r["label"]: ", ".join(map(str, r["steps"])) for r in rows if r["steps"]}
    if len(set(trained.values())) == 1:
        lines += ["", f"Steps trained, from the runs: {next(iter(trained.values()))} (every run)."]
    elif trained:
        lines += ["", "Steps trained, from the runs: " + "; ".join(f"{k} {v}" for k, v in trained.items()) + "."]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "results.json", json.dumps(result, indent=2) + "\n")
    print("\n".join(lines))
    return result

