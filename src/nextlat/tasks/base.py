"""The task interface: data, tokenizer and evaluation for one experiment."""

from __future__ import annotations

from pathlib import Path
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

    @classmethod
    def from_checkpoint(cls, cfg: TaskConfig, ckpt_dir: str | Path) -> Task:
        """The task of a saved model.

        Tasks whose vocabulary depends on data (a trained tokenizer) read it back from the files that
        :meth:`artifacts` stored in ``ckpt_dir``, so a checkpoint works without the data it was trained on.
        """
        return cls(cfg)

    @property
    def tokenizer(self) -> Tokenizer:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """Token ids the model must cover; a task may know it without building its tokenizer (or data)."""
        return self.tokenizer.vocab_size

    def artifacts(self) -> dict[str, bytes]:
        """Files (name -> content) to store in every checkpoint, e.g. a trained tokenizer; none by default."""
        return {}

    def train_data(self) -> Dataset:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model, objective=None, *, device: str | torch.device = "cpu", seed: int = 0,
                 max_examples: int | None = None) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def summary(self, metrics: dict[str, float]) -> str:
        """One line a person reads first about a final evaluation; by default every metric as key=value."""
        return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())

    def prompt_prefix(self) -> list[int]:
        """Token ids that open every sequence the model was trained on (a BOS), to put before a free-text
        prompt; none by default."""
        return []

    def prompts(self, n: int, length: int | None = None, seed: int = 0) -> list[Tensor]:
        """``n`` held-out prompts (1-D token-id tensors) for decoding benchmarks."""
        raise NotImplementedError(f"task {self.cfg.name!r} provides no decoding prompts")
