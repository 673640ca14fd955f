"""KV-cached decoding and lossless self-speculative decoding (docs/architecture.md sections 1 and 5).

A target wraps the model: :class:`CachedTarget` keeps a preallocated KV cache (prefill of the
prompts, then only new tokens; rollback = lowering a row's length) and :class:`RecomputeTarget`
reruns whole sequences, the no-cache protocol of the paper's code. :func:`decode` extends prompts
one token per forward pass (:class:`Stepper` is its loop, open to callers that choose tokens
themselves); :func:`speculative_decode` lets a drafter (:mod:`nextlat.decoding.drafters`) propose
tokens that one forward pass verifies. The engine knows nothing of tokenizers; prompts are
token-id tensors of any lengths. ``head`` maps hidden states, with the tokens they were computed
at, to logits (default :func:`~nextlat.decoding.reference.lm_head`; an objective with a next-token
module of its own, BST's text head or JTP's fetch module, passes its own).

A speculative round keeps one *pending* token per row: chosen from the target's distribution but
not yet run through it. :func:`draft` proposes K tokens after it, :func:`verify` runs
[pending, d_1..d_K] in one pass, :func:`accept` keeps the longest valid prefix of the drafts and
chooses the next pending token at the first rejection (a bonus token when all are accepted), and
the target rolls back past the rejected drafts. Greedy acceptance compares with the target
argmax; sampled acceptance is the rule of Leviathan et al. (arXiv 2211.17192) on the processed
distributions both sides sample from, so the output distribution equals plain sampling.

The hot path never waits for the device except where the host must know a value: the cache's
extent is tracked on the host, plain decoding reads its tokens back once at the end (and once per
step only to check ``stop_id``), and a speculative round reads back its accepted counts and
tokens once (plus once per draft step with ``adaptive``). Ids are validated at the prefill.
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from nextlat.decoding.budget import draft_room
from nextlat.decoding.drafters import Drafter
from nextlat.decoding.reference import Head, lm_head
from nextlat.decoding.sampling import GREEDY, Sampling
from nextlat.decoding.stats import DecodeStats, Generation
from nextlat.model import KVCache, Transformer

# ----------------------------------------------------------------------------- targets


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


def compiled_forward(model: Transformer) -> Callable:
    """``model.forward`` under ``torch.compile``, made once per model and kept on it (not a submodule, so not in
    its state dict). Shapes are dynamic: the cache grows by a token each step, which must not recompile. The
    first calls compile (tens of seconds on a CPU); later ones run one fused graph, without Python per op.

    Guards on the model's modules are skipped (about 1 ms a step for a 30-layer model on a CPU): its
    parameters are still read at every call, so weights updated in place are used, but the module structure
    must not change once compiled. A change of dtype or device is caught by the guards kept on the KV cache,
    which is made in the weights' dtype and device. Dynamo keeps its graphs per code object, and without the
    module guards nothing would tell two models apart, so each model compiles its own copy of ``forward``'s
    code: one model's graph never runs on another's weights, and no model uses up another's recompile limit."""
    fn = model.__dict__.get("_compiled_forward")
    if fn is None:
        f = type(model).forward
        own = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
        own.__kwdefaults__ = f.__kwdefaults__
        fn = torch.compile(types.MethodType(own, model), dynamic=True,
                           options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        model.__dict__["_compiled_forward"] = fn
    return fn


def _run(model: Transformer, ids: Tensor, cache: KVCache | None, drafter: Drafter | None, select: Tensor,
         forward: Callable | None = None) -> Tensor:
    """Final hidden states (B, T, D) of ``ids``; a drafter with ``trunk_layers`` observes the trunk on the way.
    ``forward`` replaces ``model.forward`` where no drafter observes (e.g. :func:`compiled_forward`)."""
    if drafter is None or drafter.trunk_layers is None:
        return (forward or model)(ids, cache=cache)[0]
    x, _, ctx = model.forward_layers(ids, cache=cache, n_layers=drafter.trunk_layers)
    drafter.observe(x, ctx, select)
    return model.norm(model.continue_layers(x, ctx, drafter.trunk_layers))


class CachedTarget:
    """The target model behind a KV cache: each call runs only the new tokens.

    ``run`` appends tokens; ``keep`` forgets all but the first n of the last run. Row lengths are
    known on the host as well as on the device, so neither waits for the device. With ``compile``,
    runs after the prefill go through :func:`compiled_forward`.
    """

    def __init__(self, model: Transformer, prompts: list[Tensor], max_len: int, drafter: Drafter | None = None,
                 compile: bool = False):
        device = model.lm_head.weight.device
        self.model, self.drafter = model, drafter
        self.forward = compiled_forward(model) if compile else None
        self.host_lengths = [len(r) for r in prompts]
        width = max(self.host_lengths)
        if width > max_len:
            raise ValueError(f"prompt of {width} tokens does not fit max_len={max_len}")
        lengths = torch.tensor(self.host_lengths, device=device)
        self.cache = model.new_cache(len(prompts), max_len)
        # Right-padded prompts: the padding is written but lies past each row's length, so it is
        # masked out and later overwritten.
        h = _run(model, _pad(prompts, width, device), self.cache, drafter, (lengths - 1)[:, None])
        self.cache.rollback(lengths, width, uniform=len(set(self.host_lengths)) == 1)
        self.h_last = h[torch.arange(len(prompts), device=device), lengths - 1]  # (B, D)
        self.ids_last = torch.stack([r[-1] for r in prompts]).to(device)  # (B,) the tokens h_last was computed at

    def run(self, tokens: Tensor) -> Tensor:
        """Append (B, K) tokens after each row's prefix; return their hidden states (B, K, D)."""
        self.start, self.host_start = self.cache.lengths, self.host_lengths
        B, K = tokens.shape
        self.host_lengths = [n + K for n in self.host_lengths]
        return _run(self.model, tokens, self.cache, self.drafter, torch.arange(K, device=tokens.device).expand(B, K),
                    self.forward)

    def keep(self, n: Tensor, host_n: list[int]) -> None:
        """Keep the first n (B,) tokens of the last run (``host_n``: the same counts on the host); forget the rest."""
        self.host_lengths = [s + k for s, k in zip(self.host_start, host_n)]
        self.cache.rollback(self.start + n, max(self.host_lengths), uniform=len(set(self.host_lengths)) == 1)


class RecomputeTarget:
    """The target model without a cache: every call reruns each row's whole sequence.

    This is the protocol of the paper's code (both the baseline and the speculative loop), kept
    for side-by-side comparison; right padding is harmless because attention is causal.
    """

    def __init__(self, model: Transformer, prompts: list[Tensor], max_len: int, drafter: Drafter | None = None):
        device = model.lm_head.weight.device
        self.model, self.drafter = model, drafter
        self.host_lengths = [len(r) for r in prompts]
        self.lengths = torch.tensor(self.host_lengths, device=device)
        self.ids = _pad(prompts, max_len, device)  # (B, max_len)
        h = _run(model, self.ids[:, : max(self.host_lengths)], None, drafter, (self.lengths - 1)[:, None])
        self.h_last = h[torch.arange(len(prompts), device=device), self.lengths - 1]
        self.ids_last = torch.stack([r[-1] for r in prompts]).to(device)

    def run(self, tokens: Tensor) -> Tensor:
        B, K = tokens.shape
        pos = self.lengths[:, None] + torch.arange(K, device=tokens.device)  # (B, K)
        self.ids.scatter_(1, pos, tokens)
        self.start, self.host_start = self.lengths, self.host_lengths
        self.lengths, self.host_lengths = self.lengths + K, [n + K for n in self.host_lengths]
        h = _run(self.model, self.ids[:, : max(self.host_lengths)], None, self.drafter, pos)
        return h.gather(1, pos[..., None].expand(B, K, h.shape[-1]))

    def keep(self, n: Tensor, host_n: list[int]) -> None:
        self.lengths = self.start + n
        self.host_lengths = [s + k for s, k in zip(self.host_start, host_n)]


def prefill(model: Transformer, prompts: list[Tensor], max_len: int, *, use_cache: bool = True,
            drafter: Drafter | None = None, compile: bool = False) -> CachedTarget | RecomputeTarget:
    """Run the prompts through the target (``target.h_last``: each row's last hidden state (B, D);
    ``target.ids_last``: each row's last prompt token (B,), the token that state was computed at).
    ``compile`` (cached target only): later runs use :func:`compiled_forward`."""
    if not use_cache:
        if compile:
            raise ValueError("compile needs the KV cache (use_cache=True)")
        return RecomputeTarget(model, prompts, max_len, drafter)
    return CachedTarget(model, prompts, max_len, drafter, compile)


def _check_budget(model: Transformer, prompts: list[Tensor], max_new_tokens: int, extra: int) -> int:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    need = max(len(r) for r in prompts) + max_new_tokens + extra
    if need > model.cfg.max_seq_len:
        raise ValueError(f"longest prompt ({max(len(r) for r in prompts)}) + max_new_tokens ({max_new_tokens}) "
                         f"+ draft room ({extra}) exceeds model.max_seq_len={model.cfg.max_seq_len}")
    return need


# ----------------------------------------------------------------------------- bookkeeping


class _Clock:
    """Phase timings that never wait for the device: CUDA events, read once at the end, or the host clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: dict[str, list[tuple]] = {}

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, name: str, start, end) -> None:
        self.spans.setdefault(name, []).append((start, end))

    def seconds(self, name: str) -> float:
        spans = self.spans.get(name, [])
        if self.cuda:
            if spans:
                spans[-1][1].synchronize()
            return sum(a.elapsed_time(b) for a, b in spans) / 1e3
        return sum(b - a for a, b in spans)


class _Emitter:
    """Collects each row's new tokens (host lists) and tracks which rows are still generating."""

    def __init__(self, batch: int, max_new_tokens: int, stop_id: int | None, stats: DecodeStats):
        self.out: list[list[int]] = [[] for _ in range(batch)]
        self.active = [True] * batch
        self.max_new, self.stop_id, self.stats = max_new_tokens, stop_id, stats

    def extend(self, b: int, tokens: list[int]) -> None:
        for token in tokens:
            if not self.active[b]:
                return
            self.out[b].append(token)
            self.stats.new_tokens += 1
            if token == self.stop_id or len(self.out[b]) == self.max_new:
                self.active[b] = False


# ----------------------------------------------------------------------------- plain decoding


class Stepper:
    """Incremental decoding of B rows in lockstep, for callers that choose the tokens themselves.

    ``start(prompts, max_len)`` prefills and ``step(tokens)`` appends one token (B,) per row; both
    return the (B, V) logits of each row's next token. :func:`decode` is this loop with a
    :class:`Sampling` choosing.
    """

    def __init__(self, model: Transformer, *, head: Head | None = None, use_cache: bool = True, compile: bool = False):
        self.model, self.head, self.use_cache, self.compile = model, head or lm_head(model), use_cache, compile

    def start(self, prompts: Tensor | list[Tensor], max_len: int | None = None) -> Tensor:
        rows = _as_rows(prompts)
        self.target = prefill(self.model, rows, max_len or self.model.cfg.max_seq_len, use_cache=self.use_cache,
                              compile=self.compile)
        return self.head(self.target.h_last, self.target.ids_last)

    def step(self, tokens: Tensor) -> Tensor:
        return self.head(self.target.run(tokens[:, None])[:, -1], tokens)


@torch.no_grad()
def decode(model: Transformer, prompts: Tensor | list[Tensor], max_new_tokens: int, *,
           sampling: Sampling = GREEDY, generator: torch.Generator | None = None, stop_id: int | None = None,
           use_cache: bool = True, head: Head | None = None,
           on_token: Callable[[Tensor], None] | None = None, compile: bool = False) -> Generation:
    """Ordinary decoding: one target forward pass per new token (KV-cached unless use_cache=False).

    ``on_token`` is called with each step's (B,) tokens as they are chosen, e.g. to stream text (reading
    them on the host waits for the device once per step). ``compile``: the steps run the model under
    ``torch.compile`` (:func:`compiled_forward`; the first call pays the compilation).
    """
    rows = _as_rows(prompts)
    B, device = len(rows), model.lm_head.weight.device
    stats, clock = DecodeStats(), _Clock(device)
    t0 = clock.mark()
    stepper = Stepper(model, head=head, use_cache=use_cache, compile=compile)
    logits = stepper.start(rows, _check_budget(model, rows, max_new_tokens, 0))
    clock.add("prefill", t0, clock.mark())
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n = max_new_tokens
    for t in range(max_new_tokens):
        tok = sampling.choose(logits, generator)
        out[:, t] = tok
        if on_token is not None:
            on_token(tok)
        if stop_id is not None:
            done |= tok == stop_id
            if bool(done.all()):  # the one read back per step, only to stop early
                n = t + 1
                break
        if t == max_new_tokens - 1:
            break
        logits = stepper.step(tok)
        stats.forward_passes += 1
    emit = _Emitter(B, max_new_tokens, stop_id, stats)
    for b, row in enumerate(out[:, :n].tolist()):
        emit.extend(b, row)
    stats.prefill_time_s = clock.seconds("prefill")
    return Generation(emit.out, stats)


# ----------------------------------------------------------------------------- speculative decoding


@dataclass
class Draft:
    tokens: Tensor  # (B, K) draft tokens
    probs: Tensor | None  # (B, K, V) the drafter distributions they were sampled from (None when greedy)
    lengths: Tensor  # (B,) drafts each row offers for verification (K unless adaptive drafting stopped it early)


def draft(drafter: Drafter, h: Tensor, index: Tensor, pending: Tensor, gamma: int, sampling: Sampling,
          generator: torch.Generator | None, adaptive: float | None = None, active: Tensor | None = None) -> Draft:
    """Propose up to ``gamma`` tokens after each row's pending token, from the drafter at verified state (h, index).

    With ``adaptive``, a row stops at its first draft whose top probability is below the threshold
    (that draft is still verified) and drafting ends once every ``active`` (B,) row has stopped.
    """
    B = len(pending)
    state, token = drafter.begin(h, index), pending
    tokens, probs = [], []
    row_len = torch.full((B,), gamma, dtype=torch.long, device=pending.device)
    for j in range(gamma):
        logits, state = drafter.propose(state, token)
        if sampling.greedy:
            token, q = logits.argmax(-1), None
            conf = torch.softmax(logits.float(), -1).amax(-1) if adaptive is not None else None
        else:
            q = sampling.probs(logits)
            token, conf = sampling.draw(q, generator), q.amax(-1)
        tokens.append(token)
        probs.append(q)
        if adaptive is not None:
            stopped = (row_len == gamma) & (conf < adaptive)
            row_len = torch.where(stopped, torch.full_like(row_len, j + 1), row_len)
            settled = row_len <= j + 1 if active is None else (row_len <= j + 1) | ~active
            if bool(settled.all()):
                break
    K = len(tokens)
    return Draft(torch.stack(tokens, 1), None if sampling.greedy else torch.stack(probs, 1), row_len.clamp(max=K))


def verify(target: CachedTarget | RecomputeTarget, head: Head, pending: Tensor, drafts: Tensor) -> tuple[Tensor, Tensor]:
    """One target pass over [pending, d_1..d_K]: hidden states (B, K + 1, D) and logits (B, K + 1, V).

    Slot j's logits predict the token after the run's j-th token.
    """
    tokens = torch.cat([pending[:, None], drafts], 1)
    h = target.run(tokens)
    return h, head(h, tokens)


def accept(logits: Tensor, d: Draft, sampling: Sampling, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Accepted drafts per row (B,) and the next pending token (B,), from the verify pass's logits (B, K + 1, V).

    Greedy: a draft is accepted while it equals the target's argmax, and the next token is that
    argmax at the first mismatch. Sampled: draft x is accepted with probability min(1, p(x)/q(x));
    at the first rejection the next token is drawn from the residual max(p - q, 0), and after a
    fully accepted draft from p itself (arXiv 2211.17192).
    """
    K = d.tokens.shape[1]
    rows = torch.arange(len(d.tokens), device=d.tokens.device)
    if sampling.greedy:
        best = logits.argmax(-1)  # (B, K + 1)
        ok = d.tokens == best[:, :K]
    else:
        p, q = sampling.probs(logits), d.probs  # (B, K + 1, V), (B, K, V)
        p_d = p[:, :K].gather(-1, d.tokens[..., None]).squeeze(-1)
        q_d = q.gather(-1, d.tokens[..., None]).squeeze(-1)
        u = torch.rand(p_d.shape, generator=generator, device=p_d.device)
        ok = u * q_d < p_d
    ok &= torch.arange(K, device=ok.device)[None, :] < d.lengths[:, None]
    n_acc = torch.cumprod(ok.long(), 1).sum(1)  # (B,)
    if sampling.greedy:
        return n_acc, best[rows, n_acc]
    p_n = p[rows, n_acc]  # (B, V)
    q_n = torch.cat([q, torch.zeros_like(q[:, :1])], 1)[rows, n_acc]  # slot K (bonus) has q = 0
    q_n = torch.where((n_acc < d.lengths)[:, None], q_n, torch.zeros_like(q_n))
    residual = (p_n - q_n).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)  # p == q: nothing to fix
    return n_acc, sampling.draw(residual / residual.sum(-1, keepdim=True), generator)


@torch.no_grad()
def speculative_decode(model: Transformer, drafter: Drafter, prompts: Tensor | list[Tensor], max_new_tokens: int, *,
                       gamma: int = 4, adaptive: float | None = None, sampling: Sampling = GREEDY,
                       generator: torch.Generator | None = None, stop_id: int | None = None,
                       use_cache: bool = True, head: Head | None = None, compile: bool = False) -> Generation:
    """Lossless speculative decoding with per-row acceptance: rounds of draft, verify, accept, roll back.

    gamma: draft tokens per round (the maximum when adaptive; capped by ``drafter.max_draft``).
    adaptive: if set, stop drafting once every active row's drafter top probability falls below
    this threshold. ``compile``: the verify passes run the target under ``torch.compile``
    (:func:`compiled_forward`, as in :func:`decode`; a drafter that observes the trunk runs it eagerly).
    """
    if gamma < 1:
        raise ValueError(f"gamma={gamma}: must be >= 1")
    if adaptive is not None and not 0 <= adaptive < 1:
        raise ValueError(f"adaptive threshold {adaptive}: must be in [0, 1)")
    if drafter.max_draft is not None:
        gamma = min(gamma, drafter.max_draft)
    rows = _as_rows(prompts)
    B, device, head = len(rows), model.lm_head.weight.device, head or lm_head(model)
    stats, clock = DecodeStats(position_tries=[0] * gamma, position_accepts=[0] * gamma), _Clock(device)
    t0 = clock.mark()
    # Room for a round's drafts past the last emitted token, twice: a row that finishes mid-round keeps
    # its accepted drafts and is still run (its output ignored) through later rounds.
    budget = _check_budget(model, rows, max_new_tokens, draft_room(gamma))
    target = prefill(model, rows, budget, use_cache=use_cache, drafter=drafter, compile=compile)
    h_last, last_index = target.h_last, torch.zeros(B, dtype=torch.long, device=device)
    pending = sampling.choose(head(h_last, target.ids_last), generator)  # (B,), exact: from the target itself
    clock.add("prefill", t0, clock.mark())

    emit = _Emitter(B, max_new_tokens, stop_id, stats)
    for b, token in enumerate(pending.tolist()):
        emit.extend(b, [token])
    was_active = list(emit.active)
    active = torch.tensor(was_active, device=device)
    while any(emit.active):
        t0 = clock.mark()
        d = draft(drafter, h_last, last_index, pending, gamma, sampling, generator, adaptive, active)
        t1 = clock.mark()
        h, logits = verify(target, head, pending, d.tokens)
        stats.forward_passes += 1
        n_acc, new_pending = accept(logits, d, sampling, generator)
        # The round's one read back: accepted counts, offered lengths, drafts and next pending tokens.
        back = torch.cat([n_acc[:, None], d.lengths[:, None], d.tokens, new_pending[:, None]], 1).tolist()
        # Roll back: keep pending + accepted drafts; finished rows stay where they are so their cache never grows.
        target.keep(torch.where(active, 1 + n_acc, torch.zeros_like(n_acc)),
                    [1 + r[0] if a else 0 for r, a in zip(back, emit.active)])
        h_last, last_index = h[torch.arange(B, device=device), n_acc], n_acc
        clock.add("draft", t0, t1)
        clock.add("verify", t1, clock.mark())
        for b, (n, offered, *tokens) in enumerate(back):
            if not emit.active[b]:
                continue
            stats.rounds += 1
            stats.drafted += offered
            stats.accepted += n
            for j in range(min(n + 1, offered)):
                stats.position_tries[j] += 1
                stats.position_accepts[j] += int(j < n)
            emit.extend(b, tokens[:n] + [tokens[-1]])
        if emit.active != was_active:  # a row finished: the device mask follows (a copy, only then)
            was_active = list(emit.active)
            active = torch.tensor(was_active, device=device)
        pending = new_pending
    stats.prefill_time_s, stats.draft_time_s = clock.seconds("prefill"), clock.seconds("draft")
    stats.verify_time_s = clock.seconds("verify")
    return Generation(emit.out, stats)
