"""Training-cost benchmark: every objective on the same model, batch and device, side by side.

Variants are interleaved within each round (next-token, then each objective at each horizon), so
slow drifts of a shared machine hit all of them alike; the reported ratio is the median over
rounds of (variant step time / next-token step time in the same round), with its min and max.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from nextlat.bench import spread, sync, write_json
from nextlat.config import Config, ObjectiveConfig
from nextlat.registry import OBJECTIVES, load_config, objective_config, objective_settings
from nextlat.training.build import build, resolve_device
from nextlat.training.loop import optimizer_step
from nextlat.training.optim import build_optimizer


def variant_objective(base: Config, name: str, horizon: int) -> ObjectiveConfig:
    """Objective ``name`` at ``horizon`` (if it takes one), with the settings of the recipe's objective section
    that it shares (e.g. ``proj_factor`` for NextLat); the others take their defaults."""
    own = objective_settings(name) - {"name"}
    shared = {k: v for k, v in dataclasses.asdict(base.objective).items() if k in own}
    return objective_config(name, **{**shared, **({"horizon": horizon} if "horizon" in own else {})})


def bench_train(recipe: str, overrides: list[str] | None = None, *, objectives: list[str], horizons: list[int],
                repeats: int = 5, steps: int = 5, warmup: int = 2, json_out: str | None = None) -> list[dict]:
    base = load_config(recipe, overrides)
    device = resolve_device(base.train.device)
    if base.train.threads > 0:
        torch.set_num_threads(base.train.threads)
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown:
        raise ValueError(f"unknown objective {unknown[0]!r} (known: {', '.join(sorted(OBJECTIVES))})")
    # Objectives that ignore the horizon (e.g. bst) are measured once.
    variants = [("next_token", 1)] + [(o, d) for o in objectives if o != "next_token"
                                      for d in (horizons if "horizon" in objective_settings(o) else horizons[:1])]
    runs = []
    batch = None  # one batch for every variant: the task, and so its (possibly slow to make) data, is shared
    for name, d in variants:
        cfg = dataclasses.replace(base, objective=variant_objective(base, name, d))
        comps = build(cfg, device)
        opt = build_optimizer({"model": comps.model, "objective": comps.objective}, cfg.train)
        if batch is None:
            batch = comps.task.train_data().get(torch.arange(cfg.train.batch_size)).to(device)
        runs.append({"objective": name, "horizon": d, "comps": comps, "opt": opt, "batch": batch, "times": [],
                     "peak_mem": 0})

    def run_steps(r: dict, n: int) -> float:
        comps = r["comps"]
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            optimizer_step(comps.model, comps.objective, r["opt"], r["batch"], comps.cfg.train, device)
        sync(device)
        return (time.perf_counter() - t0) / n

    if steps < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"bench-train needs steps >= 1, repeats >= 1 and warmup >= 0 (got {steps}, {repeats}, {warmup})")
    for r in runs:
        if warmup:
            run_steps(r, warmup)
    for _ in range(repeats):
        for r in runs:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            r["times"].append(run_steps(r, steps))
            if device.type == "cuda":
                r["peak_mem"] = max(r["peak_mem"], torch.cuda.max_memory_allocated(device))

    ref = runs[0]["times"]
    rows = []
    for r in runs:
        ratios = [t / t0 for t, t0 in zip(r["times"], ref)]
        tokens = r["batch"].num_tokens
        med = statistics.median(r["times"])
        rows.append({
            "objective": r["objective"],
            "horizon": r["horizon"] if "horizon" in objective_settings(r["objective"]) else None,
            "params_backbone": sum(p.numel() for p in r["comps"].model.parameters()),
            "params_objective": sum(p.numel() for p in r["comps"].objective.parameters()),
            "step_s_median": med,
            "step_s_min": min(r["times"]),
            "step_s_max": max(r["times"]),
            "steps_per_s": 1 / med,
            "tokens_per_s": tokens / med,
            **dict(zip(("ratio_median", "ratio_min", "ratio_max"), spread(ratios))),
            "peak_mem_mib": r["peak_mem"] / 2**20 if device.type == "cuda" else None,
        })
    m = base.model
    print(f"bench-train: {m.n_layer} layers x {m.d_model}, batch {base.train.batch_size} x "
          f"{runs[0]['batch'].input_ids.shape[1]} tokens, device {device}, precision {base.train.precision}, "
          f"{repeats} rounds x {steps} steps (interleaved), threads {torch.get_num_threads()}")
    print(f"{'objective':12s} {'d':>2s} {'params':>9s} {'s/step':>9s} {'steps/s':>8s} {'tok/s':>9s} "
          f"{'x next-token [min, max]':>26s} {'peak MiB':>9s}")
    for row in rows:
        params = row["params_backbone"] + row["params_objective"]
        mem = f"{row['peak_mem_mib']:.0f}" if row["peak_mem_mib"] is not None else "n/a"
        print(f"{row['objective']:12s} {row['horizon'] or '-':>2} {params / 1e6:8.2f}M {row['step_s_median']:9.4f} "
              f"{row['steps_per_s']:8.2f} {row['tokens_per_s']:9.0f} "
              f"{row['ratio_median']:10.3f} [{row['ratio_min']:.3f}, {row['ratio_max']:.3f}] {mem:>9s}")
    if json_out:
        meta = {"recipe": recipe, "overrides": overrides or [], "device": str(device), "repeats": repeats,
                "steps": steps, "threads": torch.get_num_threads(), "config": base.to_dict()}
        write_json({"meta": meta, "rows": rows}, json_out)
    return rows
