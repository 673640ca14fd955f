"""The training loop: one objective, one task, exact accumulation, logging, evaluation, checkpoints.

A run folder holds ``config.yaml``, ``metrics.jsonl`` (one JSON object per log line or
evaluation), ``checkpoints/step_*`` and ``results.json`` (the final evaluation). A resumed run
continues from the newest checkpoint and reproduces the uninterrupted run exactly on CPU: the
data of step s is a pure function of (seed, s) and all other state is in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from nextlat.config import Config, ConfigError, TrainConfig
from nextlat.data import Batch, StatelessSampler
from nextlat.model import Transformer
from nextlat.objectives.base import Objective, mean_parts
from nextlat.training.build import Components, autocast_context, build, uses_bf16
from nextlat.training.checkpoint import (
    Checkpoint,
    CheckpointError,
    atomic_write_text,
    list_checkpoints,
    load_trainer_state,
    load_weights,
    objective_fits,
    read_checkpoint,
    remove_stale_saves,
    resolve_checkpoint,
    save_checkpoint,
)
from nextlat.training.distributed import Parallel, clip_grad_norm, parallelize, setup
from nextlat.training.optim import build_optimizer, lr_at, named_parameters
from nextlat.training.runs import MetricsLog, check_compatible, holds_run, lock_run_folder


class Trainer:
    def __init__(self, cfg: Config, *, resume: bool = False, out_dir: str | Path | None = None):
        cfg = dataclasses.replace(cfg, task=cfg.task.with_absolute_paths())  # the saved run works from any folder
        t = cfg.train
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.par = setup(t)
        self.device = self.par.device
        self.out = Path(out_dir) if out_dir is not None else cfg.output_dir
        self.start_step = 0
        self._lock = None
        self._created = False
        try:
            resume_from = self._prepare_folder_on_main(cfg, resume)
            self._setup(cfg, resume, resume_from)
        except BaseException:
            self._abandon()
            raise

    def _prepare_folder_on_main(self, cfg: Config, resume: bool) -> Path | None:
        """Rank 0 creates, locks and checks the run folder and clears stale checkpoint writes; it tells the other
        ranks what to resume from (or its error, which every rank then raises)."""
        found: list[Any] = [None, None]
        if self.par.is_main:
            try:
                self._created = self._make_folder()
                self._lock = lock_run_folder(self.out)
                found[0] = self._check_out_dir(cfg, resume)
                stale = remove_stale_saves(self.out)
                if stale:
                    print(f"[nextlat] cleared {len(stale)} checkpoint write(s) left by stopped runs: "
                          f"{', '.join(p.name for p in stale)}", file=sys.stderr)
            except (ConfigError, CheckpointError) as e:
                found[1] = str(e)
                if self.par.mode == "none":
                    raise
        if self.par.mode != "none":
            torch.distributed.broadcast_object_list(found)
        if found[1] is not None:
            raise ConfigError(found[1])
        return None if found[0] is None else Path(found[0])

    def _make_folder(self) -> bool:
        """Create the run folder; whether it was created."""
        if self.out.is_dir():
            return False
        blocker = next((p for p in (self.out, *self.out.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise ConfigError(f"run folder {str(self.out)!r}: {str(blocker)!r} is a file, not a folder; "
                              "pass --out another path")
        try:
            self.out.mkdir(parents=True)
        except OSError as e:
            raise ConfigError(f"cannot create the run folder {str(self.out)!r}: {e.strerror}") from None
        return True

    def _check_out_dir(self, cfg: Config, resume: bool) -> Path | None:
        existing = list_checkpoints(self.out)
        if not resume:
            if (self.out / "results.json").is_file():
                raise ConfigError(f"run folder {str(self.out)!r} already holds a finished run (results: "
                                  f"{self.out / 'results.json'}); to train again, pass --out another folder or "
                                  "remove this one")
            if holds_run(self.out):
                state = f"newest checkpoint: {existing[-1].name}" if existing else "no checkpoint yet"
                raise ConfigError(f"run folder {str(self.out)!r} already holds an unfinished run ({state}); pass "
                                  "--resume to continue it, or --out another folder (or remove this one) to start "
                                  "afresh (nothing was overwritten)")
            return None
        if not existing:
            return None  # nothing to resume: start fresh
        saved = read_checkpoint(existing[-1]).cfg
        try:
            check_compatible(saved, cfg)
        except CheckpointError as e:
            raise CheckpointError(f"cannot resume: {e}") from None
        return existing[-1]

    def _setup(self, cfg: Config, resume: bool, resume_from: Path | None) -> None:
        t = cfg.train
        init = read_checkpoint(resolve_checkpoint(t.init_from)) if t.init_from and resume_from is None else None
        # A resumed or initialised run keeps its checkpoint's tokenizer.
        comps = build(cfg, self.device, ckpt_dir=resume_from or (init.path if init else None))
        self.cfg, self.task, self.model, self.objective = comps.cfg, comps.task, comps.model, comps.objective
        if init is not None:
            _initialise(init, comps)
        if t.freeze_backbone:
            self.model.requires_grad_(False)
        ckpt = read_checkpoint(resume_from) if resume_from is not None else None
        if ckpt is not None:
            load_weights(ckpt, self.model, self.objective)  # the full weights, before FSDP shards them
        parallelize(self.model, self.objective, t, self.par)
        self.modules = {"model": self.model, "objective": self.objective}
        self.optimizer = build_optimizer(self.modules, t)
        self.param_names = {id(p): name for name, p in named_parameters(self.modules)}
        self.data = self.task.train_data()
        self.sampler = StatelessSampler(len(self.data), t.batch_size, t.seed)
        self.log = MetricsLog(self.out / "metrics.jsonl")
        if ckpt is not None:
            state = load_trainer_state(ckpt, None, self.param_names)
            self.par.load_optimizer_state(self.optimizer, state, self.param_names)
            self.start_step = ckpt.step
        if self.par.is_main:
            if resume:
                # Records past the restart point (all of them when no checkpoint was reached) will be re-run.
                self.log.truncate_after(self.start_step)
            (self.out / "config.yaml").write_text(self.cfg.to_yaml())

    def _abandon(self) -> None:
        """After a failure: remove the run folder if this trainer created it and no run went into it; release it."""
        if self._created and not holds_run(self.out):
            shutil.rmtree(self.out, ignore_errors=True)
        self.close()

    # ------------------------------------------------------------------ steps

    def train_step(self, step: int) -> dict[str, float]:
        lr = lr_at(step, self.cfg.train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.data.get(self.par.shard(self.sampler.indices(step))).to(self.device)
        metrics = optimizer_step(self.model, self.objective, self.optimizer, batch, self.cfg.train, self.device,
                                 self.par)
        if not math.isfinite(metrics["loss"]):
            t = self.cfg.train
            tips = [f"lower train.lr (now {t.lr:g})"]
            if t.grad_clip == 0:
                tips.append("set train.grad_clip (e.g. 1.0)")
            if t.warmup_steps == 0:
                tips.append("set train.warmup_steps (e.g. 100)")
            if uses_bf16(self.device, t.precision):
                tips.append("set train.precision=fp32 (now bf16)")
            raise FloatingPointError(f"loss became {metrics['loss']} at step {step + 1}; try: {', '.join(tips)}")
        return {**metrics, "lr": lr}

    def evaluate(self) -> dict[str, float]:
        """Rank 0 evaluates; the other ranks return {}."""
        modules = self.par.evaluation_modules(self.model, self.objective)
        if modules is None:
            return {}
        return self.task.evaluate(*modules, device=self.device, seed=self.cfg.train.seed)

    def save(self, step: int, metrics: dict[str, Any]) -> Path | None:
        """Rank 0 writes the full state; the other ranks return None."""
        model, objective = self.par.full_weights(self.model, self.objective)
        opt = self.par.full_optimizer_state(self.optimizer, self.param_names)
        if not self.par.is_main:
            return None
        path = save_checkpoint(self.out / "checkpoints" / f"step_{step:07d}", cfg=self.cfg, model=model,
                               objective=objective, step=step, metrics=metrics, optimizer=opt,
                               artifacts=self.task.artifacts())
        kept = list_checkpoints(self.out)[: -self.cfg.train.keep_checkpoints]
        for old in kept:
            shutil.rmtree(old, ignore_errors=True)
        return path

    # ------------------------------------------------------------------ loop

    def close(self) -> None:
        """Release the run folder for other processes (``fit`` does this when it ends)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        self.par.close()

    def fit(self) -> dict[str, Any]:
        try:
            return self._fit()
        except BaseException:
            self._abandon()
            raise
        finally:
            self.close()

    def _fit(self) -> dict[str, Any]:
        t = self.cfg.train
        self.model.train()
        n_params = sum(p.numel() for p in self.model.parameters())
        n_extra = sum(p.numel() for p in self.objective.parameters())
        main = self.par.is_main
        bar = tqdm(total=t.steps, initial=self.start_step, disable=not (t.progress and main), dynamic_ncols=True,
                   desc=self.cfg.run_name, mininterval=1.0, file=sys.stderr)
        say = (bar.write if t.progress else print) if main else (lambda _: None)
        where = f"{self.par.world} x {self.par.mode} " if self.par.mode != "none" else ""
        say(f"[nextlat] {self.cfg.run_name}: {self.cfg.objective.name} on {self.cfg.task.name}, "
            f"{n_params / 1e6:.2f}M backbone + {n_extra / 1e6:.2f}M objective params, device {where}{self.device}, "
            f"steps {self.start_step}->{t.steps}, out {self.out}")
        last_eval: dict[str, Any] = {}
        window_tokens, window_start = 0, time.perf_counter()
        for step in range(self.start_step, t.steps):
            metrics = self.train_step(step)
            done = step + 1
            window_tokens += metrics.pop("tokens")
            bar.update(1)
            if done % t.log_every == 0 or done == t.steps:
                elapsed = time.perf_counter() - window_start
                metrics["tok_per_s"] = window_tokens / max(elapsed, 1e-9)
                window_tokens, window_start = 0, time.perf_counter()
                if main:
                    self.log.write({"step": done, "kind": "train", **metrics})
                bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k not in ("lr", "grad_norm")})
                if not t.progress:
                    say(f"step {done}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            if (t.eval_every and done % t.eval_every == 0) or done == t.steps:
                last_eval = self.evaluate()
                if main:
                    self.log.write({"step": done, "kind": "eval", **last_eval})
                say(f"[eval step {done}] " + " ".join(f"{k}={v:.4f}" for k, v in last_eval.items()))
                window_start = time.perf_counter()  # evaluation time does not count as training throughput
            if (t.ckpt_every and done % t.ckpt_every == 0) or done == t.steps:
                self.save(done, {**metrics, **last_eval})
        bar.close()
        if self.start_step >= t.steps:  # no step ran (a finished run was resumed): evaluate the final weights again
            last_eval = self.evaluate()
        results = {"run_name": self.cfg.run_name, "step": t.steps, "objective": self.cfg.objective.name,
                   "seed": t.seed, "eval": last_eval}
        if main:
            atomic_write_text(self.out / "results.json", json.dumps(results, indent=2))
        self.par.barrier()  # the other ranks wait for rank 0's results
        return results


def optimizer_step(model: Transformer, objective: Objective, optimizer: torch.optim.Optimizer, batch: Batch,
                   t: TrainConfig, device: torch.device, par: Parallel | None = None) -> dict[str, float]:
    """One optimizer step on ``batch`` (this process's slice of the global batch under ``par``) split into
    ``t.grad_accum`` micro-batches; returns the global batch's loss metrics."""
    par = par or Parallel.local(model, objective, device)
    micro = batch.split(t.grad_accum)
    # Counts over the whole step and every process, so every term is an exact mean over its valid elements.
    counts = par.global_counts(objective.total_counts(micro))
    sums: dict[str, float] = {}
    total = 0.0
    for i, mb in enumerate(micro):
        with par.sync_grads(i == len(micro) - 1):
            with autocast_context(device, t.precision):
                out = par.step(mb)
                loss = out.loss(counts)
            # DDP and FSDP average the processes' gradients; the global loss is their sum.
            (loss * par.world if par.world > 1 else loss).backward()
        total += loss.item()
        for name, term in out.terms.items():
            sums[name] = sums.get(name, 0.0) + term.sum.item()
    if par.mode != "none":
        values = par.all_reduce(torch.tensor([total, *sums.values()], dtype=torch.float64, device=par.device))
        total, sums = values[0].item(), dict(zip(sums, values[1:].tolist()))
    metrics = {"loss": total, **mean_parts(sums, counts)}
    if t.grad_clip > 0:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        metrics["grad_norm"] = clip_grad_norm(params, t.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    metrics["tokens"] = batch.num_tokens * par.world
    return metrics


def _initialise(init: Checkpoint, comps: Components) -> None:
    """Start from ``init``'s backbone, and from its objective's weights too when they fit this run's objective
    (same objective with the same parameter names and shapes, e.g. a NextLat dynamics model trained at
    another horizon or loss weight); otherwise the objective starts fresh."""
    where = f"train.init_from={comps.cfg.train.init_from!r}"
    if init.cfg.model != comps.cfg.model:
        raise CheckpointError(f"{where}: its model settings {dataclasses.asdict(init.cfg.model)} differ from this "
                              f"run's {dataclasses.asdict(comps.cfg.model)}")
    with_objective = init.cfg.objective.name == comps.cfg.objective.name and objective_fits(init, comps.objective)
    load_weights(init, comps.model, comps.objective if with_objective else None)
    print(f"[nextlat] initialised from {init.path} (backbone{' and objective' if with_objective else ''})")


def train(cfg: Config, *, resume: bool = False) -> dict[str, Any]:
    return Trainer(cfg, resume=resume).fit()
