"""What a decoding call reports: the new tokens of each row and its counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DecodeStats:
    """Counters of one decoding call (all rows together)."""

    new_tokens: int = 0  # tokens emitted (all rows)
    forward_passes: int = 0  # target forward passes after the prefill
    rounds: int = 0  # speculative rounds x rows that were still active
    drafted: int = 0  # draft tokens proposed to active rows
    accepted: int = 0  # draft tokens accepted
    position_tries: list[int] = field(default_factory=list)  # per draft slot j: rows that reached slot j
    position_accepts: list[int] = field(default_factory=list)  # per draft slot j: rows that accepted slot j
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    prefill_time_s: float = 0.0

    @property
    def accepted_per_round(self) -> float:
        """Accepted drafted tokens per round, not counting the always-correct first token (paper's metric)."""
        return self.accepted / max(self.rounds, 1)

    @property
    def tokens_per_pass(self) -> float:
        """Tokens emitted per row per target forward pass (tau)."""
        return (self.accepted + self.rounds) / max(self.rounds, 1)

    @classmethod
    def total(cls, stats: list[DecodeStats]) -> DecodeStats:
        """The counters of several calls added up (slot by slot for the per-slot counts)."""
        slots = max((len(s.position_tries) for s in stats), default=0)
        return cls(**{name: sum(getattr(s, name) for s in stats)
                      for name in ("new_tokens", "forward_passes", "rounds", "drafted", "accepted", "draft_time_s",
                                   "verify_time_s", "prefill_time_s")},
                   position_tries=[sum(s.position_tries[j] for s in stats if j < len(s.position_tries))
                                   for j in range(slots)],
                   position_accepts=[sum(s.position_accepts[j] for s in stats if j < len(s.position_accepts))
                                     for j in range(slots)])

    def acceptance_by_position(self) -> list[float]:
        return [a / max(t, 1) for a, t in zip(self.position_accepts, self.position_tries)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "new_tokens": self.new_tokens, "forward_passes": self.forward_passes, "rounds": self.rounds,
            "drafted": self.drafted, "accepted": self.accepted, "accepted_per_round": self.accepted_per_round,
            "tokens_per_pass": self.tokens_per_pass, "acceptance_by_position": self.acceptance_by_position(),
            "draft_time_s": self.draft_time_s, "verify_time_s": self.verify_time_s,
            "prefill_time_s": self.prefill_time_s,
        }


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per row (up to and including a stop token)
    stats: DecodeStats
