"""Reference decoding: every step reruns the whole prefix, no cache.

Simple and obviously correct, it is what task evaluations use on short sequences and what the
cached engine must match.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from nextlat.decoding.sampling import GREEDY, Sampling
from nextlat.model import Transformer

Head = Callable[[Tensor, Tensor], Tensor]
"""(hidden states (..., D), the token ids (...) they were computed at) -> next-token logits (..., V).

:func:`lm_head` (the backbone's LM head, which ignores the ids) unless an objective predicts the next
token through a module of its own: BST's text head, JTP's fetch module (which also reads the
embedding of the current token). Every decoder passes, beside each hidden state h_t, the token x_t
that was fed at t, never a later one.
"""


def lm_head(model: Transformer) -> Head:
    """The backbone's own next-token head as a :data:`Head`: ``model.logits(h)``."""
    return lambda h, ids: model.logits(h)


def objective_head(model: Transformer, objective=None) -> Head:
    """The head that plain (goal-free) decoding and evaluation use for a model trained with ``objective``:
    its ``decoding_head(model)`` (JTP's fetch module; the LM head for most objectives), or the LM head when
    there is no objective or it needs a suffix to decode towards (BST: pass its ``decoding_head(model, suffix)``)."""
    if objective is None or getattr(objective, "goal_conditioned", False) or not hasattr(objective, "decoding_head"):
        return lm_head(model)
    return objective.decoding_head(model)


@torch.no_grad()
def generate(model: Transformer, prompt: Tensor, max_new_tokens: int, *, sampling: Sampling = GREEDY,
             generator: torch.Generator | None = None, stop_id: int | None = None, head: Head | None = None) -> Tensor:
    """Extend (B, T) prompts by up to ``max_new_tokens``; rows that emitted ``stop_id`` keep emitting it.

    ``head`` turns the last hidden state and token into logits (default :func:`lm_head`). Returns (B, T + n)
    with n <= max_new_tokens (stops early once every row has stopped).
    """
    if prompt.dim() != 2:
        raise ValueError(f"prompt must have shape (B, T), got {tuple(prompt.shape)}")
    if prompt.shape[1] + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
            f"model.max_seq_len={model.cfg.max_seq_len}"
        )
    head = head or lm_head(model)
    seq = prompt
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        h, _ = model(seq)
        tok = sampling.choose(head(h[:, -1], seq[:, -1]), generator)
        if stop_id is not None:
            tok = torch.where(done, torch.full_like(tok, stop_id), tok)
            done |= tok == stop_id
        seq = torch.cat([seq, tok[:, None]], dim=1)
        if stop_id is not None and bool(done.all()):
            break
    return seq
