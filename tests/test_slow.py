"""Slow end-to-end checks (``make test-slow``): the training pipeline actually learns."""

from __future__ import annotations

import pytest

from nextlat.registry import load_config
from nextlat.training.loop import Trainer


@pytest.mark.slow
def test_pathstar_next_token_learns_to_follow_edges(tmp_path):
    """Within 800 steps next-token training copies the source and follows edges given the true prefix
    (positions 3 and 4), the skills it reaches even when it cannot plan the first branch."""
    cfg = load_config("pathstar-cpu-next-token", [
        "train.steps=800", "train.eval_every=0", "train.ckpt_every=0", "train.progress=false", "train.log_every=100",
        "task.eval_examples=500",
    ])
    results = Trainer(cfg, out_dir=tmp_path / "run").fit()["eval"]
    assert results["pos_acc_1"] > 0.99
    assert results["pos_acc_3"] > 0.9 and results["pos_acc_4"] > 0.99
    assert results["acc_greedy"] > 0.3  # the Clever-Hans ceiling is 1/deg = 0.5
