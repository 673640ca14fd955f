"""The task interface: data, tokenizer and evaluation for one experiment."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from nextlat.config import TaskConfig
from nextlat.data import Batch


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class Dataset(Protocol):
    def __len__(self) -> int: ...

    def get(self, indices: Tensor) -> Batch: ...


class Task:
    """Base class. Subclasses set ``config_class`` and implement the methods below."""

    config_class: type[TaskConfig] = TaskConfig

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg

    @property
    def tokenizer(self) -> Tokenizer:  # pragma: no cover - abstract
        raise NotImplementedError

    def train_data(self) -> Dataset:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model, objective=None, *, device: str | torch.device = "cpu", seed: int = 0,
                 max_examples: int | None = None) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError
