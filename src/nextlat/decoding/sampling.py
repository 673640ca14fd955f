"""How tokens are chosen from logits: greedy argmax, or a sample after temperature, top-k and top-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sampling:
    """Greedy when ``temperature`` is 0; otherwise sampled from the processed distribution (:meth:`probs`).

    Every decoding loop of the library chooses its tokens through this one class, so greedy and
    sampled decoding mean the same everywhere. Sampling takes an explicit ``torch.Generator``.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: Tensor) -> Tensor:
        """The distribution sampled from: (..., V) logits -> (..., V) probabilities (in at least float32)."""
        if self.greedy:
            raise ValueError("temperature=0 is greedy: there is no distribution to sample from")
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / self.temperature
        if self.top_k > 0:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = torch.sort(probs, dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = (sorted_p.cumsum(-1) - sorted_p) >= self.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    @staticmethod
    def draw(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, V) probabilities -> (B,) sampled tokens."""
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    def choose(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, V) logits -> (B,) tokens: the argmax when greedy, else a sample of :meth:`probs`."""
        if self.greedy:
            return logits.argmax(-1)
        return self.draw(self.probs(logits), generator)


GREEDY = Sampling()
