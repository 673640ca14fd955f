"""AdamW with decoupled weight decay on matrices and embeddings only, and learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from nextlat.config import TrainConfig


def build_optimizer(modules: dict[str, nn.Module], cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on every parameter with two or more dimensions (matrices, embeddings); none on
    norm scales or other vectors. Parameters are ordered by name so optimizer state maps to names. The fused
    AdamW kernel is used when the parameters live on CUDA."""
    decay, no_decay = [], []
    for _, p in named_parameters(modules):
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = bool(decay or no_decay) and (decay or no_decay)[0].device.type == "cuda"  # the fused kernel on CUDA
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)


def named_parameters(modules: dict[str, nn.Module]) -> list[tuple[str, nn.Parameter]]:
    """All parameters of several modules, named '<module>.<param>'."""
    return [(f"{prefix}.{name}", p) for prefix, m in modules.items() for name, p in m.named_parameters()]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: hold the peak, then decay linearly over the final decay_frac of the run.
    decay_steps = max(1, round(cfg.decay_frac * cfg.steps))
    decay_start = cfg.steps - decay_steps
    if step < decay_start:
        return cfg.lr
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return cfg.lr + (floor - cfg.lr) * progress
