"""The objective interface.

An objective is an ``nn.Module`` that owns its extra parameters (dynamics model, extra heads) and
scores a backbone on a batch. It returns named loss terms as *sums with counts*, so that gradient
accumulation and data parallelism reproduce the exact per-element mean: the trainer can divide
each sum by a count taken over the whole optimizer step instead of one micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nextlat.config import ConfigError, ObjectiveConfig
from nextlat.data import IGNORE, Batch, transition_mask
from nextlat.decoding.reference import Head, lm_head
from nextlat.model import Transformer


@dataclass
class LossTerm:
    sum: Tensor  # scalar: the term summed over its valid elements
    count: Tensor  # scalar: the number of valid elements
    weight: float  # coefficient in the total loss


@dataclass
class LossOutput:
    terms: dict[str, LossTerm]

    def loss(self, counts: dict[str, Tensor] | None = None) -> Tensor:
        """Total loss: sum_k weight_k * sum_k / count_k (counts default to this batch's own)."""
        total = None
        for name, term in self.terms.items():
            n = (counts[name] if counts is not None else term.count).clamp(min=1)
            part = term.weight * term.sum / n
            total = part if total is None else total + part
        return total

    @property
    def n_tokens(self) -> int:
        """Positions scored by the token loss."""
        return int(self.terms["ce"].count)

    def parts(self) -> dict[str, float]:
        """Per-term means of this batch (see :func:`mean_parts`)."""
        return mean_parts({k: t.sum.item() for k, t in self.terms.items()}, {k: t.count for k, t in self.terms.items()})


def mean_parts(sums: dict[str, float], counts: dict[str, Tensor | int]) -> dict[str, float]:
    """Per-term means for logging; rollout terms named 'x@i' are averaged into 'x'."""
    groups: dict[str, list[float]] = {}
    for name, s in sums.items():
        groups.setdefault(name.split("@")[0], []).append(s / max(float(counts[name]), 1.0))
    return {k: sum(v) / len(v) for k, v in groups.items()}


def ce_term(logits: Tensor, targets: Tensor, weight: float = 1.0) -> LossTerm:
    """Cross-entropy of (..., V) logits against (...) targets, summed over the targets that are not IGNORE."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least fp32; float64 stays float64
    ce = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return LossTerm(ce, (targets != IGNORE).sum(), weight)


def head_ce(model: Transformer, h: Tensor, targets: Tensor, weight: float = 1.0) -> LossTerm:
    """Cross-entropy of the LM head on hidden states h (..., D) against targets (...).

    Logits are computed only where the target is scored: on prompt-heavy tasks (Path-Star,
    Countdown) and padded batches, masked positions cost no (D x V) head product.
    """
    keep = targets != IGNORE
    return ce_term(model.logits(h[keep]), targets[keep], weight)


def future_targets(batch: Batch, k: int) -> Tensor:
    """Targets k positions ahead, (B, T) -> (B, T - k): ``targets[:, t + k]`` at t, IGNORE where t and t + k
    are not in one real document (so a future-token head never scores across a boundary or into padding)."""
    B, T = batch.targets.shape
    keep = transition_mask(batch.doc_ids, (B, T), k, batch.targets.device)
    return batch.targets[:, k:].masked_fill(~keep, IGNORE)


def check(ok: bool, key: str, value, why: str) -> None:
    """Raise ConfigError ``objective.<key>=<value>: <why>`` unless ``ok`` (the objectives' config validation)."""
    if not ok:
        raise ConfigError(f"objective.{key}={value!r}: {why}")


@dataclass
class FutureTokenConfig(ObjectiveConfig):
    """Settings of the objectives that add d future-token losses (MTP, JTP)."""

    horizon: int = 1
    """Number d of future tokens predicted beyond the next one."""
    lambda_future: float = 1.0
    """Weight lambda of the mean future-token loss (0 leaves the next-token loss alone: for MTP exactly
    next-token training, for JTP its next-token loss through the fetch module)."""

    def validate(self) -> None:
        check(self.horizon >= 1, "horizon", self.horizon, "must be >= 1")
        check(self.lambda_future >= 0, "lambda_future", self.lambda_future, "must be >= 0")


class Objective(nn.Module):
    """Base class: ``forward(model, batch) -> LossOutput``; ``counts(batch)`` needs no model.

    A subclass sets ``config_class``, the dataclass of its ``objective.*`` settings (a subclass of
    :class:`ObjectiveConfig` defined beside it, validated by its ``validate``), and is named in
    :data:`nextlat.registry.OBJECTIVES`.
    """

    config_class: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig

    default_drafter: str | None = None
    """The speculative-decoding drafter (a ``nextlat.registry.DRAFTERS`` name) this objective trains, if any."""

    goal_conditioned: ClassVar[bool] = False
    """Whether the objective's next-token predictions need a known suffix (BST): its ``decoding_head``
    then takes ``(model, suffix)``, and tasks decode it towards the suffix they know."""

    state_version: ClassVar[int] = 1
    """Version of what this objective's weights mean; raised when a change makes older checkpoints of it
    unloadable (``training.checkpoint`` refuses them, naming ``state_change``)."""
    state_change: ClassVar[str] = ""
    """What changed at ``state_version`` (shown when an older checkpoint is refused)."""

    def __init__(self, cfg: ObjectiveConfig, model: Transformer):
        super().__init__()
        self.cfg = cfg

    def counts(self, batch: Batch) -> dict[str, Tensor]:
        """Valid-element counts of every term, from the masks alone (for exact accumulation)."""
        return {"ce": (batch.targets != IGNORE).sum()}

    def total_counts(self, batches: list[Batch]) -> dict[str, Tensor]:
        """Counts summed over the micro-batches of one optimizer step: the denominators of its exact means."""
        total: dict[str, Tensor] = {}
        for batch in batches:
            for k, v in self.counts(batch).items():
                total[k] = total.get(k, 0) + v
        return total

    def decoding_head(self, model: Transformer) -> Head:
        """The next-token head that evaluation and decoding use for a model trained with this objective
        (``head=`` of ``nextlat.decoding``): the backbone's LM head unless the objective overrides it."""
        return lm_head(model)

    def token_loss(self, model: Transformer, h: Tensor, batch: Batch) -> LossTerm:
        """Summed next-token cross-entropy of the LM head on h (B, T, D) over positions whose target is not IGNORE."""
        return head_ce(model, h, batch.targets)

    def forward(self, model: Transformer, batch: Batch) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError


class FutureTokenObjective(Objective):
    """Shared by objectives that add d future-token cross-entropies (terms ``<prefix>@k``, k = 1..d)."""

    config_class = FutureTokenConfig

    term_prefix = "future"

    def future_steps(self, T: int) -> range:
        """Future offsets k with at least one target inside a length-T sequence (k < T); none when lambda is 0."""
        return range(1, min(self.cfg.horizon, T - 1) + 1) if self.cfg.lambda_future > 0 else range(0)

    def counts(self, batch: Batch) -> dict[str, Tensor]:
        out = super().counts(batch)
        for k in self.future_steps(batch.input_ids.shape[1]):
            out[f"{self.term_prefix}@{k}"] = (future_targets(batch, k) != IGNORE).sum()
        return out
