"""k-ahead linear probes and the effective rank of a frozen language model's hidden states.

The question (arXiv 2511.05963, language modelling): how much does the final hidden state h_t say about
the token k steps ahead? For every k in 1..K one linear probe (D -> V, with a bias) is trained to predict
x_{t+k} from h_t on states of the training split, and is scored on states of the held-out split. k = 1 is
the next token, which the model's own LM head also predicts (``head_ce`` is that head on the same pairs).

- **States**: packed windows of ``seq_len`` tokens from the task's split (spread evenly over it), run through
  the frozen model in eval mode with the task's document masking; h_t is the output of the final norm.
- **Pairs**: (h_t, x_{t+k}) only where x_{t+k} is in h_t's document: no EOS among x_t .. x_{t+k-1} (a
  document's closing EOS is itself a target, as in training; a state at an EOS position has no target) and
  t + k inside the token stream. Targets may lie past the end of the window: they are read from the stream.
- **Fitting**: the same for every model, so probes compare models, not runs of the fitting: features
  standardised with the fitting states' mean and std (an affine change that a linear probe can undo, so it
  changes only the optimisation), weights at zero and biases at the log-frequencies of the fitting targets
  (the probe that ignores h_t, so every probe starts at the unigram CE), AdamW with cosine decay for
  ``steps`` minibatches of ``batch_size`` states drawn with ``seed``. All K probes step together as one
  (K, D, V) tensor on the same minibatch; their parameters are disjoint and the loss is the sum of the K
  mean losses, so each probe follows exactly the steps it would take alone.
- **Held-out documents differ** from the training ones (whole documents are held out; in the standard
  library's code, whole files), so a probe also learns what holds only in the fitting documents: with many
  steps the CE at large k rises above the unigram CE while k = 1 still improves. The defaults (about 1.5
  passes over the fitting states) stop before that dominates; compare models at equal settings.
- **A large vocabulary** (an imported model: SmolLM2 has 49152 tokens) makes K probes of D x V weights too
  slow on a CPU: with ``vocab_cap`` < V the probes predict the ``vocab_cap - 1`` most frequent targets of
  the fitting pairs and one class for all the others. Such CE values are on another label space than a
  1024-token model's; only their shape over k compares.
- **Effective rank** (Roy & Vetterli 2007): exp of the Shannon entropy of the singular values of the
  (N, D) matrix of held-out states (not centred), normalised to sum to 1; r equal non-zero singular
  values give exactly r. It depends on N, so compare models at the same ``eval_tokens``.

:func:`probe_run` does all of it for a run folder (a trained run or one made by ``nextlat import-hf``), with
the run's own task and tokenizer; :func:`collect_states` and :func:`fit_probes` are the parts.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from nextlat.config import ConfigError
from nextlat.data import IGNORE
from nextlat.tasks.manhattan.metrics import effective_rank

__all__ = ["ProbeSettings", "States", "ProbeResult", "future_targets", "collect_states", "fit_probes",
           "effective_rank", "probe_run", "parse_probe_settings"]


@dataclass(frozen=True)
class ProbeSettings:
    """How the probes are fitted and scored; the same settings for every model that is compared."""

    ks: tuple[int, ...] = tuple(range(1, 21))
    """Offsets k: probe k predicts x_{t+k} from h_t (k = 1 is the next token)."""
    fit_tokens: int = 65536
    """States of the training split the probes are fitted on (whole windows, spread over the split)."""
    eval_tokens: int = 32768
    """States of the held-out split they are scored on (and the effective rank is taken of)."""
    steps: int = 200
    """AdamW steps (cosine decay of the learning rate to zero)."""
    batch_size: int = 512
    """States per step (all K probes see the same ones)."""
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0
    """Seed of the minibatch draws."""
    vocab_cap: int = 1024
    """At most this many classes: a larger vocabulary keeps its vocab_cap - 1 most frequent fitting targets and
    pools the rest into one class (CE then on another label space: compare shapes only)."""
    window_batch: int = 16
    """Windows per forward pass when collecting states."""

    def validate(self) -> None:
        if not self.ks or any(int(k) != k or k < 1 for k in self.ks) or len(set(self.ks)) != len(self.ks):
            raise ConfigError(f"probe ks={list(self.ks)}: distinct integers >= 1")
        for name in ("fit_tokens", "eval_tokens", "steps", "batch_size", "window_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"probe {name}={getattr(self, name)}: must be >= 1")
        if self.vocab_cap < 2:
            raise ConfigError(f"probe vocab_cap={self.vocab_cap}: must be >= 2")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ConfigError(f"probe lr={self.lr}, weight_decay={self.weight_decay}: lr > 0, weight_decay >= 0")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ks"] = list(self.ks)
        return d


def parse_probe_settings(items: list[str], base: ProbeSettings | None = None) -> ProbeSettings:
    """``base`` (default settings) with ``KEY=VALUE`` overrides, e.g. ``steps=50`` or ``ks=1,2,4``."""
    base = base or ProbeSettings()
    types = {f.name: f.type for f in dataclasses.fields(ProbeSettings)}
    changes: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().removeprefix("probe.")
        if not eq or key not in types:
            raise ConfigError(f"--probe {item!r}: expected KEY=VALUE with KEY one of {', '.join(types)}")
        try:
            if key == "ks":
                changes[key] = tuple(int(v) for v in value.replace("[", "").replace("]", "").split(",") if v.strip())
            elif types[key] in ("int", int):
                changes[key] = int(value)
            else:
                changes[key] = float(value)
        except ValueError:
            raise ConfigError(f"--probe {item!r}: {value!r} is not a valid {key}") from None
    out = dataclasses.replace(base, **changes)
    out.validate()
    return out


# ----------------------------------------------------------------------------- states


@dataclass
class States:
    """Hidden states and the tokens ahead of them."""

    h: Tensor
    """(N, D) float32 final hidden states."""
    targets: Tensor
    """(N, K) int64: x_{t+k} for the k-th offset, IGNORE where it leaves the document or the stream."""
    ks: tuple[int, ...]


def future_targets(stream: Tensor, starts: Tensor, length: int, ks: tuple[int, ...], eos_id: int, *,
                   eos_opens: bool = False, lead: int = 0) -> Tensor:
    """Tokens k ahead of every position of the windows ``x[s : s + length]`` for s in ``starts``, where x is the
    stream with ``lead`` virtual EOS tokens in front (a text task's ``PackedWindows.lead``).

    Returns (W, length, K) int64: entry [w, t, j] is ``x[s_w + t + ks[j]]`` when that index is inside x and the
    token belongs to the document of ``x[s_w + t]``, else IGNORE. With ``eos_opens`` (``eos_position: start``) an
    EOS opens its document: the target may be the next document's EOS but nothing after it, so no EOS may lie in
    ``x[s_w + t + 1 : s_w + t + k]``. Otherwise an EOS closes its document: it may be the target, but none may lie
    in ``x[s_w + t : s_w + t + k]`` (nothing is predicted from a closing EOS).
    """
    kmax = max(ks)
    n = len(stream) + lead
    k = torch.tensor(ks, dtype=torch.long)  # (K,)
    t = torch.arange(length)[:, None]  # (T, 1)
    idx = t + k  # (T, K) offsets into the segment
    first = t + 1 if eos_opens else t  # (T, 1) the first position an EOS must not occupy
    out = []
    for s in starts.tolist():
        pos = torch.arange(s, min(n, s + length + kmax)) - lead  # stream indices; < 0: a leading EOS
        seg = stream[pos.clamp(min=0)].to(torch.long)  # (L,) the window and the tokens after it
        seg[pos < 0] = eos_id
        L = len(seg)
        eos_before = torch.zeros(L + 1, dtype=torch.long)  # eos_before[i] = number of EOS in seg[:i]
        eos_before[1:] = torch.cumsum(seg == eos_id, 0)
        inside = idx < L
        crossed = eos_before[idx.clamp(max=L)] - eos_before[first.clamp(max=L)] > 0
        y = seg[idx.clamp(max=L - 1)]
        out.append(torch.where(inside & ~crossed, y, torch.full_like(y, IGNORE)))
    return torch.stack(out)  # (W, T, K)


def window_starts(n_windows: int, wanted_tokens: int, seq_len: int) -> Tensor:
    """Indices of ceil(wanted_tokens / seq_len) windows spread evenly over ``n_windows`` (all when fewer)."""
    m = min(n_windows, max(1, math.ceil(wanted_tokens / seq_len)))
    return torch.linspace(0, n_windows - 1, m).round().long().unique()


@torch.no_grad()
def collect_states(model, windows, max_tokens: int, ks: tuple[int, ...], *, batch_size: int = 16,
                   device: torch.device | str = "cpu") -> States:
    """Final hidden states of about ``max_tokens`` positions of ``windows`` (a text task's ``PackedWindows``:
    ``stream``, ``seq_len``, ``eos_id``, ``eos_position``, ``lead``, ``get``), and their future tokens
    (:func:`future_targets`)."""
    idx = window_starts(len(windows), max_tokens, windows.seq_len)
    was_training = model.training
    model.eval()
    hs, ys = [], []
    try:
        for i in range(0, len(idx), batch_size):
            chunk = idx[i : i + batch_size]
            batch = windows.get(chunk).to(device)
            h, _ = model(batch.input_ids, batch.doc_ids)  # (B, T, D)
            hs.append(h.float().flatten(0, 1).cpu())
            ys.append(future_targets(windows.stream, chunk * windows.seq_len, windows.seq_len, ks, windows.eos_id,
                                     eos_opens=windows.eos_position == "start", lead=windows.lead).flatten(0, 1))
    finally:
        model.train(was_training)
    return States(torch.cat(hs), torch.cat(ys), tuple(ks))


# ----------------------------------------------------------------------------- probes


@dataclass
class ProbeResult:
    ks: list[int]
    ce: list[float]
    """Held-out cross-entropy (nats, mean over valid pairs) per k."""
    acc: list[float]
    """Held-out top-1 accuracy per k."""
    n_fit: list[int]
    """Fitting pairs per k."""
    n_eval: list[int]
    """Held-out pairs per k."""
    classes: int
    """Classes the probes choose among (the vocabulary, or vocab_cap with the pooled class)."""
    unigram_ce: list[float]
    """Held-out CE of the fitting targets' frequencies (add-one smoothed) per k: a probe that ignores h_t."""
    fit_loss: list[float] = field(default_factory=list)
    """Mean fitting loss per k over the last tenth of the steps."""
    seconds: float = 0.0


def class_map(fit_targets: Tensor, vocab_size: int, cap: int) -> Tensor | None:
    """None when the vocabulary fits in ``cap`` classes; else (V,) ids -> classes: the cap - 1 most frequent
    fitting targets keep a class each (by frequency, ties by id), every other id maps to class cap - 1."""
    if vocab_size <= cap:
        return None
    y = fit_targets[fit_targets != IGNORE]
    counts = torch.bincount(y, minlength=vocab_size).double()
    order = torch.argsort(-counts, stable=True)  # most frequent first, ties by id
    m = torch.full((vocab_size,), cap - 1, dtype=torch.long)
    m[order[: cap - 1]] = torch.arange(cap - 1)
    return m


def _remap(targets: Tensor, m: Tensor | None) -> Tensor:
    if m is None:
        return targets
    return torch.where(targets == IGNORE, targets, m[targets.clamp(min=0)])


def _log_unigram(y: Tensor, classes: int) -> Tensor:
    """(C,) float64 log-frequencies of the non-IGNORE ids in ``y``, add-one smoothed."""
    freq = torch.bincount(y[y != IGNORE], minlength=classes).double() + 1.0
    return (freq / freq.sum()).log()


def fit_probes(fit: States, held: States, vocab_size: int, settings: ProbeSettings = ProbeSettings(), *,
               device: torch.device | str = "cpu") -> ProbeResult:
    """Fit one linear probe per offset on ``fit`` and score it on ``held`` (see the module's docstring)."""
    settings.validate()
    if fit.ks != held.ks:
        raise ValueError(f"fitting offsets {fit.ks} != held-out offsets {held.ks}")
    t0 = time.perf_counter()
    device = torch.device(device)
    m = class_map(fit.targets, vocab_size, settings.vocab_cap)
    C = vocab_size if m is None else settings.vocab_cap
    y_fit, y_held = _remap(fit.targets, m), _remap(held.targets, m)  # (N, K)
    K, D = len(fit.ks), fit.h.shape[1]
    mean = fit.h.double().mean(0)
    std = fit.h.double().std(0).clamp(min=1e-6)
    x_fit = ((fit.h.double() - mean) / std).float().to(device)  # (N, D)
    y_fit_d = y_fit.to(device)

    # Start from the probe that ignores h_t: zero weights, the bias at the log-frequencies of the fitting targets
    # (add-one smoothed). Every probe then starts at the unigram CE and the steps spend themselves on h_t.
    log_freq = torch.stack([_log_unigram(y_fit[:, j], C) for j in range(K)])  # (K, C)
    W = torch.zeros(K, D, C, device=device, requires_grad=True)
    b = log_freq.float().to(device).requires_grad_(True)
    try:  # the fused kernel (CPU and CUDA) is the fastest; an older torch has it on CUDA only
        opt = torch.optim.AdamW([W, b], lr=settings.lr, weight_decay=settings.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW([W, b], lr=settings.lr, weight_decay=settings.weight_decay)
    # Cosine decay to zero: the last steps average out the minibatch noise instead of adding to it.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / settings.steps)))
    gen = torch.Generator().manual_seed(settings.seed)
    N = x_fit.shape[0]
    tail = max(1, settings.steps // 10)
    tail_sum = torch.zeros(K, dtype=torch.float64)
    for step in range(settings.steps):
        idx = torch.randint(N, (min(settings.batch_size, N),), generator=gen).to(device)
        x, y = x_fit[idx], y_fit_d[idx].T  # (M, D), (K, M)
        logits = torch.baddbmm(b[:, None, :], x.expand(K, *x.shape), W)  # (K, M, C)
        per = F.cross_entropy(logits.reshape(-1, C), y.reshape(-1), ignore_index=IGNORE,
                              reduction="none").view(K, -1)  # (K, M)
        count = (y != IGNORE).sum(1).clamp(min=1)  # (K,)
        losses = per.sum(1) / count  # (K,) each probe's mean loss on this minibatch
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        opt.step()
        sched.step()
        if step >= settings.steps - tail:
            tail_sum += losses.detach().double().cpu()

    ce, acc, n_eval = [], [], []
    with torch.no_grad():
        x_held = ((held.h.double() - mean) / std).float()
        tot = torch.zeros(K, dtype=torch.float64)
        hit = torch.zeros(K, dtype=torch.float64)
        cnt = torch.zeros(K, dtype=torch.float64)
        for s in range(0, x_held.shape[0], 2048):
            x = x_held[s : s + 2048].to(device)
            y = y_held[s : s + 2048].T.to(device)  # (K, m)
            logits = torch.baddbmm(b[:, None, :], x.expand(K, *x.shape), W)  # (K, m, C)
            valid = y != IGNORE
            tot += F.cross_entropy(logits.reshape(-1, C), y.reshape(-1), ignore_index=IGNORE,
                                   reduction="none").view(K, -1).sum(1).double().cpu()
            hit += ((logits.argmax(-1) == y) & valid).sum(1).double().cpu()
            cnt += valid.sum(1).double().cpu()
        for j in range(K):
            n = int(cnt[j])
            ce.append(float(tot[j] / n) if n else float("nan"))
            acc.append(float(hit[j] / n) if n else float("nan"))
            n_eval.append(n)
    unigram = []
    for j in range(K):
        yh = y_held[:, j][y_held[:, j] != IGNORE]
        unigram.append(float(-log_freq[j][yh].mean()) if len(yh) else float("nan"))
    return ProbeResult(list(fit.ks), ce, acc, [int(v) for v in (y_fit != IGNORE).sum(0)], n_eval, C, unigram,
                       (tail_sum / tail).tolist(), time.perf_counter() - t0)


# ----------------------------------------------------------------------------- a run folder


@torch.no_grad()
def head_cross_entropy(model, held: States, device: torch.device | str = "cpu") -> float:
    """The model's own LM head on the held-out states' k = 1 pairs: its next-token CE on exactly those pairs."""
    j = held.ks.index(1)
    y = held.targets[:, j]
    keep = y != IGNORE
    h, y = held.h[keep], y[keep]
    total = 0.0
    for s in range(0, len(y), 4096):
        logits = model.logits(h[s : s + 4096].to(device)).float()
        total += F.cross_entropy(logits, y[s : s + 4096].to(device), reduction="sum").item()
    return total / max(len(y), 1)


def probe_run(path: str | Path, settings: ProbeSettings = ProbeSettings(), *, task_overrides: list[str] = (),
              device: str = "auto") -> dict[str, Any]:
    """Probes, effective rank and next-token CE of the newest checkpoint of a run folder (or a checkpoint).

    Works on any run whose task is ``text`` (trained here or imported by ``nextlat import-hf``): the model's own
    tokenizer comes from its checkpoint, and the corpus from its task section, which ``task_overrides``
    (``task.KEY=VALUE``, as ``nextlat eval --set``) may change, e.g. to probe an imported model on another
    run's documents: the same files, separator, ``val_fraction`` and ``split_seed`` hold out the same documents
    whatever the tokenizer. Returns a JSON-ready dictionary.
    """
    from nextlat.tasks.text import TextTask
    from nextlat.training.build import load_components, resolve_device

    settings.validate()
    dev = resolve_device(device)
    t0 = time.perf_counter()
    comps, meta = load_components(path, dev, task_overrides=list(task_overrides))
    task, model = comps.task, comps.model
    if not isinstance(task, TextTask):
        raise ConfigError(f"{path}: probes need a text run (task.name=text), this one is {task.cfg.name!r}")
    model.requires_grad_(False)
    ks = tuple(settings.ks)
    fit = collect_states(model, task.train_data(), settings.fit_tokens, ks, batch_size=settings.window_batch,
                         device=dev)
    held = collect_states(model, task.val_data(), settings.eval_tokens, ks, batch_size=settings.window_batch,
                          device=dev)
    t_states = time.perf_counter() - t0
    res = fit_probes(fit, held, model.cfg.vocab_size, settings, device=dev)
    head_ce = head_cross_entropy(model, held, dev) if 1 in ks else float("nan")
    return {
        "checkpoint": str(path), "step": meta.get("step"), "settings": settings.to_dict(),
        "task_overrides": list(task_overrides), "vocab_size": model.cfg.vocab_size, "d_model": model.cfg.d_model,
        "corpus": {"files": task.cfg.files, "doc_separator": task.cfg.doc_separator, "seq_len": task.cfg.seq_len,
                   "val_fraction": task.cfg.val_fraction, "split_seed": task.cfg.split_seed},
        **dataclasses.asdict(res),
        "eff_rank": effective_rank(held.h), "head_ce": head_ce,
        "head_ppl": math.exp(head_ce) if head_ce == head_ce else float("nan"),
        "seconds_states": t_states, "seconds": time.perf_counter() - t0,
    }


def probe_metrics(result: dict[str, Any], ks: tuple[int, ...] = (1, 2, 5, 10, 20)) -> dict[str, float]:
    """Flat metrics of a :func:`probe_run` result: ``probe_ce_<k>``, ``probe_acc_<k>`` for ``ks`` it has, and
    ``eff_rank``."""
    out = {"eff_rank": result["eff_rank"]}
    for k in ks:
        if k in result["ks"]:
            j = result["ks"].index(k)
            out[f"probe_ce_{k}"] = result["ce"][j]
            out[f"probe_acc_{k}"] = result["acc"][j]
    return out
