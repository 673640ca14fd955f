"""Turning logits into tokens: temperature, top-k, top-p, greedy argmax and sampling."""

from __future__ import annotations

import torch
from torch import Tensor


def process_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Apply temperature, top-k and top-p to (..., V) logits; returns the probabilities sampled from."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0 for sampling (use greedy for 0)")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def next_tokens(logits: Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """(B, V) logits -> (B,) tokens: argmax when temperature is 0, otherwise a sample."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = process_logits(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
