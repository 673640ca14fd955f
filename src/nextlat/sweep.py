"""Run one recipe over several seeds and tabulate the per-seed results.

Each seed trains in its own process (``nextlat train --resume``) under ``<out>/seed_<k>``, so an
interrupted sweep picks up where it stopped and finished seeds are skipped. The summary lists
every seed's final evaluation (never only the best) plus mean and standard deviation.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def run_sweep(recipe: str, seeds: list[int], overrides: list[str], out: Path, jobs: int = 1) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    pending = [s for s in seeds if not (out / f"seed_{s}" / "results.json").is_file()]
    running: list[tuple[int, subprocess.Popen, Any]] = []
    failed: list[int] = []
    while pending or running:
        while pending and len(running) < jobs:
            seed = pending.pop(0)
            run_dir = out / f"seed_{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "nextlat.cli", "train", recipe, "--resume", "--out", str(run_dir),
                   *sum((["--set", o] for o in overrides), []),
                   "--set", f"train.seed={seed}", "--set", f"train.threads={threads}", "--set", "train.progress=false"]
            log = open(run_dir / "train.log", "a")
            print(f"[sweep] seed {seed}: {' '.join(cmd[3:])} (log {run_dir / 'train.log'})", flush=True)
            running.append((seed, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(2)
        for item in list(running):
            seed, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                if proc.returncode != 0:
                    failed.append(seed)
                    print(f"[sweep] seed {seed} failed (exit {proc.returncode}); see {out / f'seed_{seed}' / 'train.log'}")
                else:
                    print(f"[sweep] seed {seed} done", flush=True)
    summary = summarize(out, seeds)
    if failed:
        raise RuntimeError(f"seeds {failed} failed; the summary covers the others")
    return summary


def summarize(out: Path, seeds: list[int]) -> dict[str, Any]:
    """Collect ``results.json`` of every finished seed into summary.json and summary.md."""
    per_seed = {}
    for s in seeds:
        f = out / f"seed_{s}" / "results.json"
        if f.is_file():
            per_seed[s] = json.loads(f.read_text())["eval"]
    keys = sorted({k for m in per_seed.values() for k in m})
    stats = {}
    for k in keys:
        vals = [m[k] for m in per_seed.values() if k in m]
        stats[k] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                    "min": min(vals), "max": max(vals), "n": len(vals)}
    summary = {"out": str(out), "per_seed": per_seed, "stats": stats}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = ["| seed | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for s, m in per_seed.items():
        lines.append(f"| {s} | " + " | ".join(f"{m.get(k, float('nan')):.3f}" for k in keys) + " |")
    lines.append("| mean ± std | " + " | ".join(f"{stats[k]['mean']:.3f} ± {stats[k]['std']:.3f}" for k in keys) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary
