"""Run recipes over several seeds, several at a time, and tabulate every seed's result.

Each run trains in its own process (``nextlat train --resume``) in its own folder, so an
interrupted sweep or experiment picks up where it stopped and finished runs are skipped. A sweep
is one recipe over seeds (``<out>/seed_<k>``); an experiment (:mod:`nextlat.experiments.runner`) queues
the runs of all its arms at once so that no core idles while another arm finishes. Summaries list
every seed's final evaluation (never only the best) plus mean and standard deviation.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nextlat.config import ConfigError
from nextlat.registry import load_config
from nextlat.training.checkpoint import CheckpointError, atomic_write_text, read_run_config
from nextlat.training.runs import check_compatible


@dataclass(frozen=True)
class Job:
    """One training run: ``nextlat train <recipe> --set <overrides> --set train.seed=<seed>`` into ``run_dir``."""

    run_dir: Path
    recipe: str
    seed: int
    overrides: tuple[str, ...] = ()
    after: Path | None = None
    """Run folder that must hold a finished run before this one starts (e.g. the backbone it is fitted to)."""

    @property
    def done(self) -> bool:
        return is_finished(self.run_dir)


def run_jobs(jobs: list[Job], parallel: int = 1, devices: list[str] | None = None) -> list[Job]:
    """Train the unfinished ``jobs``, ``parallel`` at a time (CPU threads split among them); returns the failed ones.

    ``devices``: GPU ids; one job runs on each (``CUDA_VISIBLE_DEVICES``), so ``parallel`` is their number.

    Output of each run goes to ``<run_dir>/train.log``. Runs resume from their newest checkpoint. A job with
    ``after`` waits for that run to finish; if it fails (or is not among ``jobs`` and not finished), the job
    fails without starting.
    """
    if devices:
        parallel = len(devices)
    if parallel < 1:
        raise ValueError(f"parallel={parallel}: must be >= 1")
    threads = max(1, (os.cpu_count() or 1) // parallel)
    for job in jobs:
        if job.done:
            check_finished(job)
    pending = [j for j in jobs if not j.done]
    running: list[tuple[Job, subprocess.Popen, Any, str | None]] = []
    failed: list[Job] = []
    while pending or running:
        queued = {j.run_dir for j in pending} | {r[0].run_dir for r in running}
        for job in [j for j in pending if j.after is not None and j.after not in queued and not is_finished(j.after)]:
            pending.remove(job)
            failed.append(job)
            print(f"[runs] FAILED {job.run_dir}: {job.after} did not finish, and this run starts from it", flush=True)
        while len(running) < parallel:
            job = next((j for j in pending if j.after is None or is_finished(j.after)), None)
            if job is None:
                break
            pending.remove(job)
            job.run_dir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "nextlat.cli", "train", job.recipe, "--resume", "--out", str(job.run_dir),
                   "--set", f"train.threads={threads}",  # first, so that a train.threads of the user's wins
                   *sum((["--set", o] for o in job.overrides), []),
                   "--set", f"train.seed={job.seed}", "--set", "train.progress=false"]
            free = [d for d in devices or [] if d not in {r[3] for r in running}]
            device = free[0] if free else None
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": device} if device is not None else None
            log = open(job.run_dir / "train.log", "a")
            on = f" on device {device}" if device is not None else ""
            print(f"[runs] start {job.run_dir}{on}: {' '.join(cmd[3:])}", flush=True)
            running.append((job, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, device))
        time.sleep(1)
        for item in list(running):
            job, proc, log, _ = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                if proc.returncode != 0:
                    failed.append(job)
                    print(f"[runs] FAILED {job.run_dir} (exit {proc.returncode}); see {job.run_dir / 'train.log'}",
                          flush=True)
                else:
                    print(f"[runs] done {job.run_dir}", flush=True)
    return failed


def run_sweep(recipe: str, seeds: list[int], overrides: list[str], out: Path, jobs: int = 1) -> dict[str, Any]:
    """Train ``recipe`` once per seed into ``<out>/seed_<k>`` and write ``summary.{json,md}``."""
    out.mkdir(parents=True, exist_ok=True)
    failed = run_jobs([Job(out / f"seed_{s}", recipe, s, tuple(overrides)) for s in seeds], jobs)
    summary = summarize(out, seeds)
    if failed:
        raise RuntimeError(f"seeds {[j.seed for j in failed]} failed; the summary covers the others")
    return summary


def check_finished(job: Job) -> None:
    """Refuse to count a finished run that was trained with other settings than ``job`` asks for (e.g. another
    graph or objective in the same folder); an unfinished one is checked by ``nextlat train --resume``."""
    planned = load_config(job.recipe, [*job.overrides, f"train.seed={job.seed}"])
    saved = read_run_config(job.run_dir / "config.yaml")
    try:
        check_compatible(saved, planned)
    except CheckpointError as e:
        raise ConfigError(f"{job.run_dir} holds a finished run with other settings than planned "
                          f"({e}); move it away or choose another output "
                          "folder") from None


def is_finished(run_dir: Path) -> bool:
    """A run is finished once its trainer has written the final ``results.json``."""
    return (run_dir / "results.json").is_file()


def finished_runs(out: Path, seeds: list[int]) -> list[Path]:
    """Run folders ``<out>/seed_<k>`` of the given seeds that hold a final ``results.json``, in seed order."""
    return [run for run in (out / f"seed_{s}" for s in seeds) if is_finished(run)]


def seed_results(out: Path, seeds: list[int]) -> dict[int, dict[str, float]]:
    """Final evaluation of every finished seed under ``out`` (``seed_<k>/results.json``)."""
    return {int(run.name.removeprefix("seed_")): json.loads((run / "results.json").read_text())["eval"]
            for run in finished_runs(out, seeds)}


def stats_of(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarize(out: Path, seeds: list[int]) -> dict[str, Any]:
    """Collect ``results.json`` of every finished seed into summary.json and summary.md."""
    per_seed = seed_results(out, seeds)
    keys = sorted({k for m in per_seed.values() for k in m})
    stats = {k: stats_of([m[k] for m in per_seed.values() if k in m]) for k in keys}
    summary = {"out": str(out), "per_seed": per_seed, "stats": stats}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    lines = ["| seed | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for s, m in per_seed.items():
        lines.append(f"| {s} | " + " | ".join(f"{m.get(k, float('nan')):.3f}" for k in keys) + " |")
    if per_seed:
        lines.append("| mean ± std | " + " | ".join(f"{stats[k]['mean']:.3f} ± {stats[k]['std']:.3f}" for k in keys) + " |")
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary
