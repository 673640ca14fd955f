"""Batch format, document masking helpers and a stateless, resumable sampler.

Every task produces :class:`Batch` objects. Targets are explicit and aligned with the inputs:
the logits at position t are scored against ``targets[:, t]`` (for language modelling that is
``input_ids[:, t + 1]``; for A5 it is the running product). ``IGNORE`` (-100) marks positions with
no token loss (prompts, padding). ``doc_ids`` numbers the documents packed into a row, so
attention and RoPE positions restart at every document and transitions that cross a document
boundary can be masked; -1 marks padding. ``doc_ids=None`` means one document per row and no
padding (the fast causal-attention path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE = -100


@dataclass
class Batch:
    input_ids: Tensor  # (B, T) int64
    targets: Tensor  # (B, T) int64, IGNORE where no token loss
    doc_ids: Tensor | None = None  # (B, T) int64, -1 for padding

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(self.input_ids.shape)}")
        if self.targets.shape != self.input_ids.shape:
            raise ValueError(
                f"targets shape {tuple(self.targets.shape)} != input_ids shape {tuple(self.input_ids.shape)}"
            )
        if self.doc_ids is not None and self.doc_ids.shape != self.input_ids.shape:
            raise ValueError(
                f"doc_ids shape {tuple(self.doc_ids.shape)} != input_ids shape {tuple(self.input_ids.shape)}"
            )

    def to(self, device: torch.device | str) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.targets), move(self.doc_ids))

    def split(self, n: int) -> list[Batch]:
        """Split along the batch dimension into ``n`` equal micro-batches."""
        chunks = lambda t: [None] * n if t is None else list(t.chunk(n))  # noqa: E731
        return [Batch(*parts) for parts in zip(chunks(self.input_ids), chunks(self.targets), chunks(self.doc_ids))]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def doc_ids_from_eos(input_ids: Tensor, eos_id: int, *, eos_opens: bool) -> Tensor:
    """Document index per token of packed rows (B, T) -> (B, T), numbered from 0 in each row.

    ``eos_opens=True`` (the official NextLat convention, the text task's default): an EOS opens its
    document, like a BOS at the document's position 0, and the tokens before a row's first EOS continue a
    document opened in an earlier row. ``eos_opens=False`` (nextlat 0.1.0): an EOS closes its document and
    the next token opens a new one.
    """
    is_eos = (input_ids == eos_id).long()
    count = torch.cumsum(is_eos, dim=1)
    if eos_opens:
        return count - is_eos[:, :1]  # a row that starts with an EOS starts at document 0 too
    return count - is_eos


def positions_from_doc_ids(doc_ids: Tensor) -> Tensor:
    """RoPE position of each token inside its document: (B, T) -> (B, T)."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    return idx - start_idx


def attention_mask_from_doc_ids(doc_ids: Tensor) -> Tensor:
    """Causal mask restricted to each document: (B, T) -> (B, 1, T, T) bool, True = may attend."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)
    return (causal & same_doc).unsqueeze(1)


def transition_mask(doc_ids: Tensor | None, shape: tuple[int, int], step: int, device: torch.device) -> Tensor:
    """Valid (t -> t + step) transitions: both ends in the same real document. (B, T - step) bool."""
    B, T = shape
    if doc_ids is None:
        return torch.ones(B, T - step, dtype=torch.bool, device=device)
    src, dst = doc_ids[:, : T - step], doc_ids[:, step:]
    return (src == dst) & (dst >= 0)


class StatelessSampler:
    """Shuffled epochs over ``n`` examples, derived from (seed, epoch) alone.

    The examples of optimizer step s are a pure function of s, so a resumed run sees exactly the
    data an uninterrupted one would, with no sampler state to save.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._cache: tuple[int, Tensor] | None = None

    def _perm(self, epoch: int) -> Tensor:
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = (epoch, torch.randperm(self.n, generator=g))
        return self._cache[1]

    def indices(self, step: int) -> Tensor:
        start = step * self.batch_size
        out = []
        while len(out) < self.batch_size:
            epoch, offset = divmod(start + len(out), self.n)
            take = min(self.batch_size - len(out), self.n - offset)
            out.extend(self._perm(epoch)[offset : offset + take].tolist())
        return torch.tensor(out, dtype=torch.long)
