"""The composition root: a configuration's task, backbone and objective, built or loaded from a checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nextlat.config import Config, ConfigError
from nextlat.model import Transformer
from nextlat.objectives.base import Objective
from nextlat.registry import build_objective, build_task, with_task_overrides
from nextlat.tasks.base import Task
from nextlat.training.checkpoint import load_weights, read_checkpoint, resolve_checkpoint


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r}: CUDA is not available on this machine")
    return torch.device(name)


def uses_bf16(device: torch.device, precision: str) -> bool:
    """Whether ``train.precision`` trains in bf16 on ``device``."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast_context(device: torch.device, precision: str):
    if uses_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Components:
    """Everything a configuration builds: task, backbone, objective (vocab size resolved)."""

    cfg: Config
    task: Task
    model: Transformer
    objective: Objective


def build(cfg: Config, device: torch.device | str = "cpu", *, ckpt_dir: str | Path | None = None) -> Components:
    """Build task, model and objective; fills ``model.vocab_size`` from the task's vocabulary.

    ``ckpt_dir``: build the task of that checkpoint (its stored tokenizer rather than one rebuilt from data).
    """
    task = build_task(cfg.task, ckpt_dir)
    vocab = task.vocab_size
    if cfg.model.vocab_size == 0:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    elif cfg.model.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the task's vocabulary ({vocab})")
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model).to(device)
    objective = build_objective(cfg.objective, model).to(device)
    return Components(cfg, task, model, objective)


def load_components(path: str | Path, device: torch.device | str = "cpu",
                    task_overrides: list[str] | None = None) -> tuple[Components, dict[str, Any]]:
    """Build the model and objective of a checkpoint and load its weights (strict, no pickle).

    ``task_overrides`` (``task.KEY=VALUE``, see :func:`with_task_overrides`) change how the task
    evaluates the trained model, e.g. ``task.eval_lengths=[18]``.
    """
    ckpt = read_checkpoint(resolve_checkpoint(path))
    cfg = with_task_overrides(ckpt.cfg, task_overrides) if task_overrides else ckpt.cfg
    comps = build(cfg, device, ckpt_dir=ckpt.path)
    load_weights(ckpt, comps.model, comps.objective)
    return comps, ckpt.meta


