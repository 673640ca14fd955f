"""Drafters for self-speculative decoding: they propose the tokens one target pass then verifies.

A drafter is built from a model and a trained objective, ``Drafter(model, objective)``, and raises
a ValueError naming what the objective lacks. A new drafter implements:

- ``begin(h, index) -> state``: the start of a round. ``h`` (B, D) is the target's exact final
  hidden state at the last verified position, ``index`` (B,) that position's slot in the target's
  latest run (0 after the prefill).
- ``propose(state, token) -> (logits, state)``: (B, V) logits of the token after ``token`` (the
  pending token first, then each draft in turn).

Optionally it sets ``max_draft`` (a cap on drafts per round; None: no cap) and, to read the
target's residual stream rather than its final states, ``trunk_layers`` together with
``observe(x, ctx, select)``, called on every target run (prefill and verify passes) with the
stream after that many blocks. Register it in ``nextlat.registry.DRAFTERS``; an objective names
its own with the class attribute ``default_drafter``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from nextlat.model import KVCache, LayerContext, Transformer


class Drafter:
    """Base class: see the module docstring for what a drafter implements."""

    max_draft: int | None = None
    trunk_layers: int | None = None

    def begin(self, h: Tensor, index: Tensor) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def propose(self, state: Any, token: Tensor) -> tuple[Tensor, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def observe(self, x: Tensor, ctx: LayerContext, select: Tensor) -> None:
        """Trunk output x (B, T, D) of the target's latest run; ``select`` (B, K) are the positions of x that
        ``begin``'s index refers to (the run's new tokens). Called only when ``trunk_layers`` is set."""


class NextLatDrafter(Drafter):
    """Drafts with NextLat's latent dynamics (arXiv 2511.05963): h^ <- p_psi(h^, E(x)), x <- head(h^).

    It can roll past its training horizon, so the draft length is not capped. With ``vocab`` (V',) token ids
    the head is only those rows of the LM head (a draft vocabulary, FR-Spec, arXiv 2502.14856): the logits of
    every other token are -inf, so drafts come from the slice and a sampled draft's q is zero outside it.
    Verification keeps the full head, so greedy output and the sampled distribution are unchanged.
    """

    def __init__(self, model: Transformer, objective: torch.nn.Module, vocab: Tensor | None = None):
        dynamics = getattr(objective, "dynamics", None)
        if dynamics is None:
            raise ValueError(f"drafter 'next_latent' needs latent dynamics (objective.dynamics, trained by the "
                             f"next_latent objective); {type(objective).__name__} has none")
        self.model, self.dynamics = model, dynamics
        self.vocab = vocab
        self.head_w = None if vocab is None else model.lm_head.weight.detach()[vocab].contiguous()  # (V', D)

    def begin(self, h: Tensor, index: Tensor) -> Tensor:
        return h

    def propose(self, state: Tensor, token: Tensor) -> tuple[Tensor, Tensor]:
        h = self.dynamics(state, self.model.embed_tokens(token))  # (B, D)
        if self.vocab is None:
            return self.model.logits(h), h
        small = F.linear(h, self.head_w)  # (B, V')
        full = small.new_full((len(h), self.model.lm_head.weight.shape[0]), float("-inf"))
        return full.index_copy_(1, self.vocab, small), h


class MTPDrafter(Drafter):
    """Fixed-horizon drafts from multi-token heads (Gloeckle et al., arXiv 2404.19737).

    At the last verified position, head k predicts the token k + 1 steps ahead. Head 0 is the
    backbone's own last block, so the pending token is the target's choice, and heads 1..d give
    drafts 1..d at once, computed during the verify pass that produced that position; they do not
    look at the pending token. Heads 1..d are transformer blocks over the trunk's residual stream,
    so with a KV cache they keep one of their own. It shares the target cache's lengths, so the
    target's rollback is the heads' rollback too.
    """

    def __init__(self, model: Transformer, objective: torch.nn.Module):
        heads = getattr(objective, "heads", None)
        if heads is None or not hasattr(objective, "head_state"):
            raise ValueError(f"drafter 'mtp' needs multi-token heads (objective.heads and head_state, trained by "
                             f"the mtp objective); {type(objective).__name__} has none")
        self.model, self.mtp = model, objective
        self.max_draft = len(heads)
        self.trunk_layers = model.cfg.n_layer - 1
        self.cache: KVCache | None = None
        self.logits: Tensor | None = None  # (B, K, d, V): head logits at the latest run's selected positions

    def _head_cache(self, target: KVCache) -> KVCache:
        c = self.model.cfg
        shape = (self.max_draft, *target.shape[1:])
        if self.cache is None or self.cache.shape != shape or self.cache.dtype != target.dtype \
                or self.cache.device != target.device:
            self.cache = KVCache(self.max_draft, target.shape[1], c.kv_heads, target.max_len, c.head_width,
                                 target.device, target.dtype)
        # Positions past a row's length are masked and later overwritten, so a reused cache needs no clearing.
        self.cache.lengths, self.cache.end, self.cache.uniform = target.lengths, target.end, target.uniform
        return self.cache

    def observe(self, x: Tensor, ctx: LayerContext, select: Tensor) -> None:
        hctx = ctx
        if ctx.cache is not None:
            hctx = LayerContext(ctx.cos, ctx.sin, ctx.mask, self._head_cache(ctx.cache), ctx.causal)
        idx = select[..., None].expand(-1, -1, x.shape[-1])  # (B, K, D)
        out = [self.model.logits(self.mtp.head_state(self.model, x, hctx, k).gather(1, idx))  # (B, K, V) each
               for k in range(1, self.max_draft + 1)]
        self.logits = torch.stack(out, 2)

    def begin(self, h: Tensor, index: Tensor) -> tuple[Tensor, int]:
        return self.logits[torch.arange(len(index), device=index.device), index], 0  # (B, d, V), next head

    def propose(self, state: tuple[Tensor, int], token: Tensor) -> tuple[Tensor, tuple[Tensor, int]]:
        logits, j = state
        return logits[:, j], (logits, j + 1)
