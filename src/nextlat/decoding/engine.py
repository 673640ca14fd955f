"""KV-cached decoding and lossless self-speculative decoding (DESIGN.md section 3).

A target wraps the model: :class:`CachedTarget` keeps a preallocated KV cache (prefill of the
prompts, then only new tokens; rollback = lowering a row's length) and :class:`RecomputeTarget`
reruns whole sequences, the no-cache protocol of the paper's code. ``decode`` extends prompts one
token per forward pass; ``speculative_decode`` lets a :class:`Drafter` propose tokens that one
forward pass verifies. Two drafters: :class:`NextLatDrafter` (the latent dynamics, any draft
length) and :class:`MTPDrafter` (multi-token heads, a fixed horizon). The engine knows nothing of
tokenizers; prompts are token-id tensors of any lengths.

The round structure keeps one *pending* token per row: chosen from the target model's
distribution but not yet run through it. A round drafts K tokens after the pending one, verifies
[pending, d_1..d_K] in one pass (gamma + 1 positions), accepts the longest valid prefix of
the drafts, chooses the next pending token from the target at the first rejection (or a bonus
token when all are accepted), and rolls the cache back past the rejected drafts. Greedy
acceptance compares with the target argmax; sampled acceptance is the Leviathan et al. rule
(arXiv 2211.17192) on the processed distributions (temperature, top-k, top-p) both sides
actually sample from, so the output distribution equals plain sampling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from nextlat.decoding.budget import draft_room
from nextlat.decoding.sampling import process_logits
from nextlat.model import KVCache, LayerContext, Transformer


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen: greedy when temperature is 0, else sampled from the processed distribution."""

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
        """The distribution actually sampled from: (..., V) logits -> (..., V) probabilities."""
        return process_logits(logits, self.temperature, self.top_k, self.top_p)

    def choose(self, logits: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor | None]:
        """(B, V) logits -> (B,) tokens and the (B, V) probabilities used (None when greedy)."""
        if self.greedy:
            return logits.argmax(-1), None
        probs = self.probs(logits)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1), probs


class Drafter:
    """Proposes draft tokens after a verified position (base class; the hooks default to no-ops).

    ``begin`` receives the exact final hidden state of the last verified position (B, D) and that
    position's index (B,) within the target's latest run (0 after the prefill); ``propose`` takes
    the drafter state and the latest token (pending or drafted) and returns logits (B, V) for the
    token after it plus the new state. ``max_draft`` caps the draft length (None: no cap, e.g.
    NextLat can roll past its training horizon).

    A drafter that reads the target's intermediate states (MTP heads continue from the trunk) sets
    ``trunk_layers``: the target then calls ``start`` once, ``observe`` with the residual stream
    after that many blocks on every run, and ``rollback`` whenever it forgets rejected positions.
    """

    max_draft: int | None = None
    trunk_layers: int | None = None

    def start(self, batch: int, max_len: int, cached: bool) -> None:
        """A new decoding call of ``batch`` rows up to ``max_len`` tokens, with or without a KV cache."""

    def observe(self, x: Tensor, ctx: LayerContext, select: Tensor) -> None:
        """Trunk output x (B, T, D) of the target's latest run; ``select`` (B, K) are the positions of x
        that ``begin``'s index refers to (the run's new tokens)."""

    def rollback(self, lengths: Tensor) -> None:
        """The target keeps only the first ``lengths`` (B,) positions of each row."""

    def begin(self, h_last: Tensor, index: Tensor) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def propose(self, state: Any, token: Tensor) -> tuple[Tensor, Any]:  # pragma: no cover - abstract
        raise NotImplementedError


class NextLatDrafter(Drafter):
    """Drafts with the latent dynamics: h^ <- p_psi(h^, E(x)), x <- head(h^)."""

    def __init__(self, model: Transformer, dynamics: torch.nn.Module):
        self.model, self.dynamics = model, dynamics

    def begin(self, h_last: Tensor, index: Tensor) -> Tensor:
        return h_last

    def propose(self, state: Tensor, token: Tensor) -> tuple[Tensor, Tensor]:
        h = self.dynamics(state, self.model.embed_tokens(token))  # (B, D)
        return self.model.logits(h), h


class MTPDrafter(Drafter):
    """Fixed-horizon drafts from multi-token heads (Gloeckle et al., arXiv 2404.19737).

    At the last verified position, head k predicts the token k + 1 steps ahead. Head 0 is the
    backbone's own last block, so the pending token is the target's choice, and heads 1..d give
    drafts 1..d at once, computed during the verify pass that produced that position; they do not
    look at the pending token. Heads 1..d are transformer blocks over the trunk's residual stream,
    so with a KV cache they keep one of their own, written and rolled back with the target's.
    """

    def __init__(self, model: Transformer, mtp: torch.nn.Module):
        self.model, self.mtp = model, mtp  # mtp: a MultiTokenPrediction objective (heads 1..d, head_state)
        self.max_draft = mtp.cfg.horizon
        self.trunk_layers = model.cfg.n_layer - 1
        self.cache: KVCache | None = None
        self.logits: Tensor | None = None  # (B, K, d, V): head logits at the latest run's selected positions

    def start(self, batch: int, max_len: int, cached: bool) -> None:
        c, w = self.model.cfg, self.model.lm_head.weight
        self.cache = KVCache(self.max_draft, batch, c.n_head, max_len, c.d_model // c.n_head, w.device,
                             w.dtype) if cached else None

    def observe(self, x: Tensor, ctx: LayerContext, select: Tensor) -> None:
        hctx = ctx if self.cache is None else LayerContext(ctx.cos, ctx.sin, ctx.mask, self.cache)
        idx = select[..., None].expand(-1, -1, x.shape[-1])  # (B, K, D)
        out = [self.model.logits(self.mtp.head_state(self.model, x, hctx, k).gather(1, idx))  # (B, K, V) each
               for k in range(1, self.max_draft + 1)]
        if self.cache is not None:
            self.cache.lengths += x.shape[1]
        self.logits = torch.stack(out, 2)

    def rollback(self, lengths: Tensor) -> None:
        if self.cache is not None:
            self.cache.rollback(lengths)

    def begin(self, h_last: Tensor, index: Tensor) -> tuple[Tensor, int]:
        return self.logits[torch.arange(len(index), device=index.device), index], 0  # (B, d, V), next head

    def propose(self, state: tuple[Tensor, int], token: Tensor) -> tuple[Tensor, tuple[Tensor, int]]:
        logits, j = state
        return logits[:, j], (logits, j + 1)


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _as_rows(prompts: Tensor | list[Tensor]) -> list[Tensor]:
    rows = list(prompts) if isinstance(prompts, (list, tuple)) else list(prompts.unbind(0))
    if not rows:
        raise ValueError("no prompts given")
    for i, r in enumerate(rows):
        if r.dim() != 1 or r.numel() == 0:
            raise ValueError(f"prompt {i} must be a non-empty 1-D tensor of token ids, got shape {tuple(r.shape)}")
    return rows


def _pad(rows: list[Tensor], width: int, device: torch.device) -> Tensor:
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r.to(device)
    return ids


def _run(model: Transformer, ids: Tensor, cache: KVCache | None, drafter: Drafter | None, select: Tensor) -> Tensor:
    """Final hidden states (B, T, D) of ``ids``; a drafter with ``trunk_layers`` observes the trunk on the way."""
    if drafter is None or drafter.trunk_layers is None:
        return model(ids, cache=cache)[0]
    x, _, ctx = model.forward_layers(ids, cache=cache, n_layers=drafter.trunk_layers)
    drafter.observe(x, ctx, select)
    return model.norm(model.continue_layers(x, ctx, drafter.trunk_layers))


class CachedTarget:
    """The target model behind a KV cache: each call runs only the new tokens."""

    def __init__(self, model: Transformer, prompts: list[Tensor], max_len: int, drafter: Drafter | None = None):
        device = model.lm_head.weight.device
        self.model, self.drafter = model, drafter
        lengths = torch.tensor([len(r) for r in prompts], device=device)
        if int(lengths.max()) > max_len:
            raise ValueError(f"prompt of {int(lengths.max())} tokens does not fit max_len={max_len}")
        self.cache = model.new_cache(len(prompts), max_len)
        if drafter is not None:
            drafter.start(len(prompts), max_len, cached=True)
        # Right-padded prompts: the padding is written but lies past each row's length, so it is
        # masked out and later overwritten.
        h = _run(model, _pad(prompts, int(lengths.max()), device), self.cache, drafter, (lengths - 1)[:, None])
        self._rollback(lengths)
        self.h_last = h[torch.arange(len(prompts), device=device), lengths - 1]  # (B, D)

    def _rollback(self, lengths: Tensor) -> None:
        self.cache.rollback(lengths)
        if self.drafter is not None:
            self.drafter.rollback(lengths)

    def run(self, tokens: Tensor) -> Tensor:
        """Append (B, K) tokens after each row's prefix; return their hidden states (B, K, D)."""
        self.start = self.cache.lengths.clone()
        B, K = tokens.shape
        return _run(self.model, tokens, self.cache, self.drafter, torch.arange(K, device=tokens.device).expand(B, K))

    def keep(self, n: Tensor) -> None:
        """Keep the first n (B,) of the tokens of the last run; forget the rest."""
        self._rollback(self.start + n)


class RecomputeTarget:
    """The target model without a cache: every call reruns each row's whole sequence.

    This is the protocol of the paper's code (both the baseline and the speculative loop), kept
    for side-by-side comparison; right padding is harmless because attention is causal.
    """

    def __init__(self, model: Transformer, prompts: list[Tensor], max_len: int, drafter: Drafter | None = None):
        device = model.lm_head.weight.device
        self.model, self.drafter = model, drafter
        self.lengths = torch.tensor([len(r) for r in prompts], device=device)
        self.ids = _pad(prompts, max_len, device)  # (B, max_len)
        if drafter is not None:
            drafter.start(len(prompts), max_len, cached=False)
        h = _run(model, self.ids[:, : int(self.lengths.max())], None, drafter, (self.lengths - 1)[:, None])
        self.h_last = h[torch.arange(len(prompts), device=device), self.lengths - 1]

    def run(self, tokens: Tensor) -> Tensor:
        B, K = tokens.shape
        pos = self.lengths[:, None] + torch.arange(K, device=tokens.device)  # (B, K)
        self.ids.scatter_(1, pos, tokens)
        h = _run(self.model, self.ids[:, : int(pos.max()) + 1], None, self.drafter, pos)
        return h.gather(1, pos[..., None].expand(B, K, h.shape[-1]))

    def keep(self, n: Tensor) -> None:
        self.lengths = self.lengths + n


def _target(model: Transformer, prompts: list[Tensor], max_len: int, use_cache: bool,
            drafter: Drafter | None = None) -> CachedTarget | RecomputeTarget:
    return (CachedTarget if use_cache else RecomputeTarget)(model, prompts, max_len, drafter)


def _check_budget(model: Transformer, prompts: list[Tensor], max_new_tokens: int, extra: int) -> int:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    need = max(len(r) for r in prompts) + max_new_tokens + extra
    if need > model.cfg.max_seq_len:
        raise ValueError(f"longest prompt ({max(len(r) for r in prompts)}) + max_new_tokens ({max_new_tokens}) "
                         f"+ draft room ({extra}) exceeds model.max_seq_len={model.cfg.max_seq_len}")
    return need


class _Emitter:
    """Collects each row's new tokens and tracks which rows are still generating."""

    def __init__(self, batch: int, max_new_tokens: int, stop_id: int | None, stats: DecodeStats):
        self.out: list[list[int]] = [[] for _ in range(batch)]
        self.active = torch.ones(batch, dtype=torch.bool)
        self.max_new, self.stop_id, self.stats = max_new_tokens, stop_id, stats

    def __call__(self, b: int, token: int) -> None:
        if self.active[b]:
            self.out[b].append(token)
            self.stats.new_tokens += 1
            if token == self.stop_id or len(self.out[b]) == self.max_new:
                self.active[b] = False


@torch.no_grad()
def decode(model: Transformer, prompts: Tensor | list[Tensor], max_new_tokens: int, *,
           sampling: Sampling = Sampling(), generator: torch.Generator | None = None,
           stop_id: int | None = None, use_cache: bool = True) -> Generation:
    """Ordinary decoding: one target forward pass per new token (KV-cached unless use_cache=False)."""
    rows = _as_rows(prompts)
    device = model.lm_head.weight.device
    stats = DecodeStats()
    _sync(device)
    t0 = time.perf_counter()
    target = _target(model, rows, _check_budget(model, rows, max_new_tokens, 0), use_cache)
    logits = model.logits(target.h_last)
    _sync(device)
    stats.prefill_time_s = time.perf_counter() - t0
    emit = _Emitter(len(rows), max_new_tokens, stop_id, stats)
    ones = torch.ones(len(rows), dtype=torch.long, device=device)
    while True:
        tok, _ = sampling.choose(logits, generator)
        for b in range(len(rows)):
            emit(b, int(tok[b]))
        if not bool(emit.active.any()):
            break
        h = target.run(tok[:, None])
        target.keep(ones)
        stats.forward_passes += 1
        logits = model.logits(h[:, -1])
    return Generation(emit.out, stats)


@torch.no_grad()
def speculative_decode(model: Transformer, drafter: Drafter, prompts: Tensor | list[Tensor], max_new_tokens: int, *,
                       gamma: int = 4, adaptive: float | None = None, sampling: Sampling = Sampling(),
                       generator: torch.Generator | None = None, stop_id: int | None = None,
                       use_cache: bool = True) -> Generation:
    """Lossless speculative decoding with per-row acceptance.

    gamma: draft tokens per round (the maximum when adaptive). adaptive: if set, stop drafting
    once every active row's drafter top probability falls below this threshold.
    """
    if gamma < 1:
        raise ValueError(f"gamma={gamma}: must be >= 1")
    if adaptive is not None and not 0 <= adaptive < 1:
        raise ValueError(f"adaptive threshold {adaptive}: must be in [0, 1)")
    if drafter.max_draft is not None:
        gamma = min(gamma, drafter.max_draft)
    rows = _as_rows(prompts)
    B = len(rows)
    device = model.lm_head.weight.device
    arange_b = torch.arange(B, device=device)
    stats = DecodeStats(position_tries=[0] * gamma, position_accepts=[0] * gamma)
    _sync(device)
    t0 = time.perf_counter()
    # Room for a round's drafts past the last emitted token, twice: a row that finishes mid-round keeps
    # its accepted drafts and is still run (its output ignored) through later rounds.
    target = _target(model, rows, _check_budget(model, rows, max_new_tokens, draft_room(gamma)), use_cache, drafter)
    h_last, last_index = target.h_last, torch.zeros(B, dtype=torch.long, device=device)
    pending, _ = sampling.choose(model.logits(h_last), generator)  # (B,), exact: from the target itself
    _sync(device)
    stats.prefill_time_s = time.perf_counter() - t0

    emit = _Emitter(B, max_new_tokens, stop_id, stats)
    active = emit.active
    for b in range(B):
        emit(b, int(pending[b]))
    while bool(active.any()):
        # ---- draft: K tokens after the pending one
        _sync(device)
        t0 = time.perf_counter()
        state = drafter.begin(h_last, last_index)
        token = pending
        drafts, q_probs, row_len = [], [], torch.full((B,), gamma, dtype=torch.long, device=device)
        for j in range(gamma):
            d_logits, state = drafter.propose(state, token)
            if sampling.greedy:
                token, q = d_logits.argmax(-1), None
                conf = torch.softmax(d_logits.float(), -1).amax(-1) if adaptive is not None else None
            else:
                token, q = sampling.choose(d_logits, generator)
                conf = q.amax(-1) if adaptive is not None else None
            drafts.append(token)
            q_probs.append(q)
            if adaptive is not None:
                # A row stops at its first unconfident draft (that draft is still verified).
                stopped = (row_len == gamma) & (conf < adaptive)
                row_len = torch.where(stopped, torch.full_like(row_len, j + 1), row_len)
                if bool((row_len[active.to(device)] <= j + 1).all()):
                    break
        K = len(drafts)
        row_len = row_len.clamp(max=K)
        draft = torch.stack(drafts, 1)  # (B, K)
        _sync(device)
        t1 = time.perf_counter()
        stats.draft_time_s += t1 - t0

        # ---- verify: one pass over [pending, d_1..d_K]
        h = target.run(torch.cat([pending[:, None], draft], 1))  # (B, K + 1, D)
        stats.forward_passes += 1
        p_logits = model.logits(h)  # (B, K + 1, V): slot j predicts the token after position start + j
        if sampling.greedy:
            best = p_logits.argmax(-1)  # (B, K + 1)
            ok = draft == best[:, :K]
        else:
            p = sampling.probs(p_logits)  # (B, K + 1, V)
            q = torch.stack(q_probs, 1)  # (B, K, V)
            p_d = p[:, :K].gather(-1, draft[..., None]).squeeze(-1)
            q_d = q.gather(-1, draft[..., None]).squeeze(-1)
            u = torch.rand(p_d.shape, generator=generator, device=device)
            ok = u * q_d < p_d  # accept with probability min(1, p/q)
        ok &= torch.arange(K, device=device)[None, :] < row_len[:, None]
        n_acc = torch.cumprod(ok.long(), 1).sum(1)  # (B,) accepted drafts per row
        # Next pending token: target argmax / residual sample at the first rejection, bonus sample if none.
        if sampling.greedy:
            new_pending = best[arange_b, n_acc]
        else:
            p_n = p[arange_b, n_acc]  # (B, V)
            q_pad = torch.cat([q, torch.zeros_like(q[:, :1])], 1)  # slot K (bonus) has q = 0
            q_n = q_pad[arange_b, n_acc]
            q_n = torch.where((n_acc < row_len)[:, None], q_n, torch.zeros_like(q_n))
            residual = (p_n - q_n).clamp(min=0)
            residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)  # p == q: nothing to fix
            new_pending = torch.multinomial(residual / residual.sum(-1, keepdim=True), 1, generator=generator)[:, 0]
        # Keep pending + accepted drafts; finished rows stay where they are so their cache never grows.
        target.keep(torch.where(active.to(device), 1 + n_acc, torch.zeros_like(n_acc)))
        h_last, last_index = h[arange_b, n_acc], n_acc
        _sync(device)
        stats.verify_time_s += time.perf_counter() - t1

        # ---- bookkeeping and emission
        n_list, len_list = n_acc.tolist(), row_len.tolist()
        for b in range(B):
            if not active[b]:
                continue
            stats.rounds += 1
            stats.drafted += len_list[b]
            stats.accepted += n_list[b]
            for j in range(min(n_list[b] + 1, len_list[b])):
                stats.position_tries[j] += 1
                stats.position_accepts[j] += int(j < n_list[b])
            for j in range(n_list[b]):
                emit(b, int(draft[b, j]))
            emit(b, int(new_pending[b]))
        pending = new_pending
    return Generation(emit.out, stats)
