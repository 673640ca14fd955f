"""Manhattan walks: world-model metrics of every objective at horizon 8, and the street map each one implies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nextlat.experiments.base import Arm, Experiment, Metric, objective_arms, trained_models


def arms(scale: str) -> list[Arm]:
    return objective_arms("manhattan", scale, {"next_token": [], "mtp": [8], "jtp": [8], "next_latent": [8]})


def figures(out: Path, arms: list[Arm], seeds: list[int]) -> dict[str, Any]:
    """Map reconstruction of each arm's first finished seed: the streets its greedy traversals use or invent."""
    from nextlat.tasks.manhattan.metrics import draw_map, map_reconstruction, valid_trajectories

    maps = {}
    for arm in arms:
        run, comps = next(trained_models(out, arm, seeds), (None, None))
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


EXPERIMENT = Experiment(
    "manhattan", arms,
    [Metric("next_token", "next-token test %"), Metric("valid", "valid trajectories %"),
     Metric("compression", "compression", percent=False), Metric("eff_rank", "effective rank", percent=False),
     Metric("detour", "detour robustness %"), Metric("map_invented_edges", "invented streets", percent=False)],
    paper={"GPT": {"next-token": 100, "valid": 97.0, "compression": 0.65, "rank": 160.1, "detour": 85.0},
           "MTP d=8": {"next-token": 100, "valid": 98.1, "compression": 0.64, "rank": 57.7, "detour": 95.0},
           "JTP d=8": {"next-token": 100, "valid": 97.1, "compression": 0.32, "rank": 215.8, "detour": 87.0},
           "NextLat d=8": {"next-token": 100, "valid": 98.7, "compression": 0.71, "rank": 52.7, "detour": 95.0}},
    paper_note="Paper (Table 1): the real Manhattan graph, 48x384 models trained 400k steps x 256. "
               "Pass --graph PATH for a street graph file; without it the runs use the procedural city.",
    figures=figures,
)
