"""Learning-rate schedules and the AdamW parameter groups."""

from __future__ import annotations

import math

import pytest

from nextlat.config import TrainConfig
from nextlat.training.optim import build_optimizer, lr_at


def _lrs(cfg: TrainConfig) -> list[float]:
    return [lr_at(s, cfg) for s in range(cfg.steps)]


def test_constant_with_warmup():
    cfg = TrainConfig(steps=20, lr=1e-3, schedule="constant", warmup_steps=4)
    lrs = _lrs(cfg)
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert all(v == 1e-3 for v in lrs[4:])
    assert _lrs(TrainConfig(steps=5, lr=2e-3)) == [2e-3] * 5


def test_cosine_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1e-3, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    lrs = _lrs(cfg)
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-3)  # the decay starts from the peak
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # monotone after warmup
    # halfway through the decay the rate is halfway between peak and floor
    assert lr_at(55, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lr_at(40, cfg) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 30 / 90)))
    # it reaches min_lr_ratio * lr at the end of the schedule (and stays there)
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    assert lrs[-1] == pytest.approx(1e-4, abs=1e-6)
    assert min(lrs) >= 1e-4 - 1e-12


def test_wsd_is_flat_then_linear_decay():
    cfg = TrainConfig(steps=100, lr=1e-3, schedule="wsd", warmup_steps=5, decay_frac=0.2, min_lr_ratio=0.0)
    lrs = _lrs(cfg)
    assert lrs[4] == pytest.approx(1e-3)
    assert all(v == 1e-3 for v in lrs[5:80])  # stable phase up to the last 20% of the steps
    for s in range(80, 100):  # linear decay over decay_frac * steps, ending at the floor
        assert lrs[s] == pytest.approx(1e-3 * (1 - (s - 79) / 20))
    assert lrs[-1] == pytest.approx(0.0)
    with_floor = TrainConfig(steps=10, lr=1.0, schedule="wsd", decay_frac=0.5, min_lr_ratio=0.2)
    assert _lrs(with_floor) == pytest.approx([1, 1, 1, 1, 1, 0.84, 0.68, 0.52, 0.36, 0.2])


def test_weight_decay_only_on_matrices_and_embeddings(make_model, make_objective):
    model = make_model()
    objective = make_objective(model, name="next_latent")
    opt = build_optimizer({"model": model, "objective": objective}, TrainConfig(weight_decay=0.1, beta2=0.95))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert any(p is model.embed_tokens.weight for p in decay["params"])
    assert any(p is objective.dynamics.fc1.weight for p in decay["params"])
    assert any(p is model.norm.weight for p in no_decay["params"])
    n_all = sum(1 for _ in model.parameters()) + sum(1 for _ in objective.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == n_all
    assert decay["betas"] == (0.9, 0.95)
