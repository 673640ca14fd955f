"""Reference decoding: greedy and sampled generation that recomputes the prefix every step.

Simple and obviously correct, it is what task evaluations use on short sequences and what a
cached engine must match. Sampling takes an explicit ``torch.Generator`` for reproducibility.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nextlat.decoding.sampling import next_tokens
from nextlat.model import Transformer


@torch.no_grad()
def generate(model: Transformer, prompt: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
             stop_id: int | None = None) -> Tensor:
    """Extend (B, T) prompts by up to ``max_new_tokens``; rows that emitted ``stop_id`` keep emitting it.

    Returns (B, T + n) with n <= max_new_tokens (stops early once every row has stopped).
    """
    if prompt.dim() != 2:
        raise ValueError(f"prompt must have shape (B, T), got {tuple(prompt.shape)}")
    if prompt.shape[1] + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
            f"model.max_seq_len={model.cfg.max_seq_len}"
        )
    seq = prompt
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        h, _ = model(seq)
        tok = next_tokens(model.logits(h[:, -1]), temperature, top_k, top_p, generator)
        if stop_id is not None:
            tok = torch.where(done, torch.full_like(tok, stop_id), tok)
            done |= tok == stop_id
        seq = torch.cat([seq, tok[:, None]], dim=1)
        if stop_id is not None and bool(done.all()):
            break
    return seq
