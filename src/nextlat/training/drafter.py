"""A NextLat drafter fitted after the fact to a frozen model (docs/architecture.md section 6).

p_psi (``objectives.next_latent.LatentDynamics``) is trained on the frozen model's own final hidden states
with NextLat's latent terms (Smooth-L1 to the next states, forward KL through the frozen head, d-step
rollout; ``NextLatent.latent_terms``), the way EAGLE (arXiv 2401.15077) and MLP speculators (arXiv
2404.19124) fit a drafter beside a pretrained model. The states are computed once per token and kept on
disk (:class:`HiddenCache`, memory-mapped, resumable), so a fitting step costs p_psi and the head only.
The drafter's head is the LM head's rows of the V' most frequent tokens of the fitting data (FR-Spec,
arXiv 2502.14856); its KL reads through that slice too. A drafter folder holds ``drafter.safetensors``
(p_psi's weights and the slice's token ids) and ``drafter.json``; :func:`load_drafter` builds it beside
its model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from nextlat import __version__
from nextlat.data import IGNORE, Batch
from nextlat.decoding.drafters import NextLatDrafter
from nextlat.decoding.engine import decode
from nextlat.decoding.sampling import Sampling
from nextlat.model import Transformer
from nextlat.objectives.base import LossOutput
from nextlat.registry import build_drafter, build_objective, objective_config

DRAFTER_FORMAT = "nextlat-drafter"
DRAFTER_JSON, DRAFTER_WEIGHTS = "drafter.json", "drafter.safetensors"
_STORAGE = {"float16": (np.float16, torch.float16), "bfloat16": (np.uint16, torch.bfloat16),
            "float32": (np.float32, torch.float32), "float64": (np.float64, torch.float64)}
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")


def _bar(total: int, desc: str, unit: str, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not show, dynamic_ncols=True)


# ----------------------------------------------------------------------------- fitting data


def text_files(paths: list[str | Path]) -> list[Path]:
    """The files named, with a folder standing for its text files (``TEXT_SUFFIXES``, recursively), sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"--text {str(p)!r}: no such file or folder")
    return out


def text_documents(paths: list[str | Path], encode: Callable[[str], list[int]], max_tokens: int,
                   seed: int = 0) -> list[list[int]]:
    """Token ids of the files in ``paths`` (one document per file), in a seeded order, up to ``max_tokens``."""
    files = text_files(paths)
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    docs, total = [], 0
    for i in order:
        if total >= max_tokens:
            break
        ids = encode(files[i].read_text(encoding="utf-8", errors="replace"))[: max_tokens - total]
        if len(ids) >= 2:
            docs.append(ids)
            total += len(ids)
    return docs


@torch.no_grad()
def self_distill(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
                 stop_id: int | None = None, batch_size: int = 16, seed: int = 0,
                 progress: bool = True) -> list[list[int]]:
    """The model's own continuations of ``prompts`` (greedy, or sampled at ``temperature``), decoded in batches by
    the engine; each document is the prompt followed by its continuation."""
    g = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    device, docs = model.lm_head.weight.device, []
    with _bar(len(prompts), "self-distillation", "prompt", progress) as bar:
        for i in range(0, len(prompts), batch_size):
            rows = [torch.tensor(p, device=device) for p in prompts[i : i + batch_size]]
            out = decode(model, rows, max_new_tokens, sampling=Sampling(temperature), generator=g, stop_id=stop_id)
            docs += [p + new for p, new in zip(prompts[i : i + batch_size], out.tokens)]
            bar.update(len(rows))
    return docs


def windows(docs: list[list[int]], length: int) -> Tensor:
    """Documents cut into windows of ``length`` tokens (N, length), -1 past a document's end."""
    rows = [d[i : i + length] for d in docs for i in range(0, len(d), length) if len(d) - i >= 2]
    out = torch.full((len(rows), length), -1, dtype=torch.long)
    for r, ids in enumerate(rows):
        out[r, : len(ids)] = torch.tensor(ids)
    return out


def window_batch(tokens: Tensor) -> Batch:
    """A batch of cached windows (B, T) (-1: padding): every position of a window is scored, so the KL reaches
    each state p_psi predicts (the targets only mark positions; no token loss is computed here)."""
    valid = tokens >= 0
    return Batch(tokens.clamp(min=0), torch.where(valid, tokens.clamp(min=0), IGNORE),
                 torch.where(valid, 0, -1))


def draft_vocabulary(tokens: Tensor, size: int) -> Tensor:
    """The ``size`` most frequent ids of ``tokens`` (-1 ignored), ascending: the draft vocabulary."""
    counts = torch.bincount(tokens[tokens >= 0])
    size = min(size, int((counts > 0).sum()))
    return counts.topk(size).indices.sort().values


def _fingerprint(model: Transformer) -> str:
    w = model.lm_head.weight.detach().flatten()
    sample = torch.cat([w[:: max(1, len(w) // 4096)], model.norm.weight.detach().flatten()]).float().cpu()
    return hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the hidden-state cache


class HiddenCache:
    """The frozen model's final hidden states of token windows, in a folder: ``tokens.npy`` (N, T), ``states.bin``
    (N, T, D) memory-mapped in ``dtype``, ``meta.json``, and ``done`` (windows complete). :meth:`build` resumes a
    half-built cache of the same model, windows and dtype where it stopped."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.tokens = torch.from_numpy(np.load(self.folder / "tokens.npy"))
        store, self.dtype = _STORAGE[self.meta["dtype"]]
        N, T = self.tokens.shape
        self._states = np.memmap(self.folder / "states.bin", dtype=store, mode="r+", shape=(N, T, self.meta["d_model"]))

    @property
    def done(self) -> int:
        path = self.folder / "done"
        return int(path.read_text()) if path.is_file() else 0

    def states(self, idx: Tensor) -> Tensor:
        """Hidden states (len(idx), T, D) of windows ``idx``, in the cache's dtype."""
        return torch.from_numpy(np.ascontiguousarray(self._states[idx.numpy()])).view(self.dtype)

    @classmethod
    @torch.no_grad()
    def build(cls, folder: str | Path, model: Transformer, tokens: Tensor, *, dtype: str = "float16",
              batch_size: int = 8, progress: bool = True) -> tuple[HiddenCache, dict[str, float]]:
        """The cache of ``tokens`` (N, T) windows under ``model``, computing only the windows not yet done;
        returns it with the throughput of this call (tokens/s over the windows it computed)."""
        if dtype not in _STORAGE:
            raise ValueError(f"cache dtype {dtype!r}: one of {', '.join(_STORAGE)}")
        folder = Path(folder)
        meta = {"format": "nextlat-hidden-cache", "model": _fingerprint(model), "dtype": dtype,
                "d_model": model.cfg.d_model, "shape": list(tokens.shape),
                "tokens": hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:16]}
        fresh = not (folder / "meta.json").is_file() or json.loads((folder / "meta.json").read_text()) != meta
        if fresh:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "done").unlink(missing_ok=True)
            np.save(folder / "tokens.npy", tokens.numpy())
            N, T = tokens.shape
            np.memmap(folder / "states.bin", dtype=_STORAGE[dtype][0], mode="w+", shape=(N, T, model.cfg.d_model)).flush()
            (folder / "meta.json").write_text(json.dumps(meta))
        cache = cls(folder)
        start, n_tokens, t0 = cache.done, 0, time.perf_counter()
        with _bar(len(tokens), "hidden states", "window", progress) as bar:
            bar.update(start)
            for i in range(start, len(tokens), batch_size):
                batch = window_batch(tokens[i : i + batch_size])
                h = model(batch.input_ids.to(model.lm_head.weight.device), batch.doc_ids.to(model.lm_head.weight.device))[0]
                stored = h.to(cache.dtype)
                if not torch.isfinite(stored).all():
                    raise ValueError(f"hidden states overflow {dtype}: build the cache in bfloat16 or float32")
                raw = stored.cpu().view(torch.int16) if dtype == "bfloat16" else stored.cpu()  # numpy has no bfloat16
                cache._states[i : i + len(h)] = raw.numpy().view(cache._states.dtype)
                cache._states.flush()
                (folder / "done").write_text(str(i + len(h)))  # after the states: a torn write redoes the batch
                n_tokens += int((batch.doc_ids >= 0).sum())
                bar.update(len(h))
        seconds = time.perf_counter() - t0
        return cache, {"cache_tokens": n_tokens, "cache_seconds": seconds,
                       "cache_tokens_per_s": n_tokens / seconds if n_tokens else None}

    def sample(self, step: int, batch_size: int, seed: int) -> tuple[Batch, Tensor]:
        """The windows of fitting step ``step`` (a pure function of (seed, step)): their batch and cached states."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(len(self.tokens), (batch_size,), generator=g)
        return window_batch(self.tokens[idx]), self.states(idx)


# ----------------------------------------------------------------------------- fitting p_psi


def latent_loss(objective, model: Transformer, batch: Batch, h: Tensor, head_w: Tensor) -> LossOutput:
    """NextLat's latent terms (no token loss) of states h (B, T, D) of ``batch``, read through head rows head_w."""
    emb = model.embed_tokens(batch.input_ids)
    scored = batch.targets != IGNORE
    with torch.no_grad():
        logits = F.linear(h[scored], head_w)  # the frozen teacher's logits (N, V')
    return LossOutput(objective.latent_terms(h, emb, batch, logits, head_w))


def fit_dynamics(objective, model: Transformer, sample: Callable[[int], tuple[Batch, Tensor]], head_w: Tensor, *,
                 steps: int, lr: float = 1e-3, warmup: int = 50, progress: bool = True) -> list[float]:
    """Train ``objective.dynamics`` alone for ``steps`` AdamW steps (linear warm-up, cosine to lr / 10) on the batches
    ``sample(step)`` gives (a batch and its hidden states); returns the losses."""
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    params = list(objective.dynamics.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    with _bar(steps, "fitting p_psi", "step", progress) as bar:
        for step in range(steps):
            scale = min(1.0, (step + 1) / max(1, warmup)) * (0.55 + 0.45 * math.cos(math.pi * step / max(1, steps)))
            for group in opt.param_groups:
                group["lr"] = lr * scale
            batch, h = sample(step)
            batch = batch.to(device)
            loss = latent_loss(objective, model, batch, h.to(device, dtype), head_w).loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses


def fit_drafter(model: Transformer, docs: list[list[int]], out: str | Path, *, cache_dir: str | Path, window: int = 128,
                cache_dtype: str = "float16", cache_batch: int = 8, draft_vocab: int = 8192, horizon: int = 4,
                steps: int = 1000, batch_size: int = 8, lr: float = 1e-3, seed: int = 0, progress: bool = True,
                info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit a NextLat drafter to the frozen ``model`` on documents ``docs`` and save it to the folder ``out``.

    The hidden states are cached in ``cache_dir`` (resumed if half built); p_psi is trained for ``steps`` steps
    of ``batch_size`` windows of ``window`` tokens. Returns the report also written to ``drafter.json``.
    """
    model.eval().requires_grad_(False)
    tokens = windows(docs, window)
    if not len(tokens):
        raise ValueError("no fitting text: every document is shorter than two tokens")
    cache, throughput = HiddenCache.build(cache_dir, model, tokens, dtype=cache_dtype, batch_size=cache_batch,
                                          progress=progress)
    vocab = draft_vocabulary(tokens, draft_vocab).to(model.lm_head.weight.device)
    counts = torch.bincount(tokens[tokens >= 0], minlength=model.cfg.vocab_size)
    torch.manual_seed(seed)
    objective = build_objective(objective_config("next_latent", horizon=horizon), model)
    objective.to(model.lm_head.weight.device, model.lm_head.weight.dtype).train()
    head_w = model.lm_head.weight.detach()[vocab]
    t0 = time.perf_counter()
    losses = fit_dynamics(objective, model, lambda s: cache.sample(s, batch_size, seed), head_w, steps=steps, lr=lr,
                          progress=progress)
    fit_seconds = time.perf_counter() - t0
    report = {**(info or {}), "documents": len(docs), "windows": len(tokens), "window": window,
              "fitting_tokens": int((tokens >= 0).sum()), **throughput, "cache_dtype": cache_dtype,
              "draft_vocab": len(vocab), "draft_vocab_coverage": float(counts[vocab.cpu()].sum() / counts.sum()),
              "horizon": horizon, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
              "fit_seconds": fit_seconds, "steps_per_s": steps / fit_seconds, "threads": torch.get_num_threads(),
              "loss_first": losses[0], "loss_last": sum(losses[-20:]) / len(losses[-20:])}
    save_drafter(out, objective, vocab, model, report)
    return report


# ----------------------------------------------------------------------------- drafter folders


def save_drafter(out: str | Path, objective, vocab: Tensor, model: Transformer, fit: dict[str, Any]) -> Path:
    """Write p_psi and the draft vocabulary to the folder ``out`` (safetensors + JSON, no pickle)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {f"dynamics.{k}": v.detach().cpu().contiguous() for k, v in objective.dynamics.state_dict().items()}
    save_file({**state, "vocab": vocab.cpu()}, out / DRAFTER_WEIGHTS)
    info = {"format": DRAFTER_FORMAT, "objective": dataclasses.asdict(objective.cfg),
            "model": {"d_model": model.cfg.d_model, "vocab_size": model.cfg.vocab_size, "fingerprint": _fingerprint(model)},
            "nextlat_version": __version__, "fit": fit}
    (out / DRAFTER_JSON).write_text(json.dumps(info, indent=2))
    return out


def is_drafter_folder(path: str | Path) -> bool:
    return (Path(path) / DRAFTER_JSON).is_file()


def load_drafter(folder: str | Path, model: Transformer) -> NextLatDrafter:
    """The drafter saved in ``folder``, built beside ``model`` (its device and dtype); refused for another model."""
    folder = Path(folder)
    info = json.loads((folder / DRAFTER_JSON).read_text())
    if info.get("format") != DRAFTER_FORMAT:
        raise ValueError(f"{folder / DRAFTER_JSON}: not a {DRAFTER_FORMAT} description")
    m = info["model"]
    if (m["d_model"], m["vocab_size"]) != (model.cfg.d_model, model.cfg.vocab_size) or \
            m.get("fingerprint") not in (None, _fingerprint(model)):
        raise ValueError(f"drafter {str(folder)!r} was fitted to another model (d_model {m['d_model']}, vocabulary "
                         f"{m['vocab_size']}, weights {m.get('fingerprint')})")
    state = load_file(folder / DRAFTER_WEIGHTS)
    vocab = state.pop("vocab")
    objective = build_objective(objective_config(**info["objective"]), model)
    objective.dynamics.load_state_dict({k.removeprefix("dynamics."): v for k, v in state.items()}, strict=True)
    w = model.lm_head.weight
    objective.to(w.device, w.dtype).eval()
    return NextLatDrafter(model, objective, vocab.to(w.device))


def resolve_drafter(spec: str | None, model: Transformer, objective) -> Any:
    """A drafter folder's drafter (:func:`load_drafter`), or the registered drafter named ``spec``
    (None: the objective's own)."""
    if spec is not None and is_drafter_folder(spec):
        return load_drafter(spec, model)
    if spec is not None and Path(spec).is_dir():
        raise ValueError(f"--drafter {spec!r}: a folder without {DRAFTER_JSON} (not a drafter made by fit-drafter)")
    return build_drafter(spec, model, objective)
