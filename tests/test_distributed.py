"""Data parallelism (train.parallel) on CPU: two gloo processes against one process on the same global batch.

The comparisons run in float64 (the tests convert model and objective before they are wrapped), so
different summation orders leave differences near 1e-15; TOL bounds them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from nextlat.training import loop
from nextlat.training.distributed import setup

TOL = 1e-10  # float64: losses (relative) and final weights (absolute) of N processes against one
WORLD = 2
SETTINGS = {"train.steps": 4, "train.batch_size": 16, "train.grad_accum": 2, "train.ckpt_every": 2,
            "train.keep_checkpoints": 4, "train.dist_timeout": 60.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def float64_build(*args, **kwargs):
    comps = build(*args, **kwargs)
    comps.model.double()
    comps.objective.double()
    return comps


build = loop.build


def worker(rank: int, world: int, port: int, cfg, out: str, resume: bool, fail_at: int | None, hang: bool) -> None:
    """One process of a distributed run (the environment torchrun would set), trained in float64."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if hang and rank == 1:
        setup(cfg.train)
        time.sleep(120)  # holds the process group without ever joining a collective
        return
    loop.build = float64_build
    trainer = loop.Trainer(cfg, resume=resume, out_dir=out)
    if fail_at is not None and rank == 1:
        step = trainer.train_step

        def failing(s: int):
            if s == fail_at:
                raise RuntimeError(f"rank 1 fails at step {s}")
            return step(s)

        trainer.train_step = failing
    trainer.fit()


def spawn(cfg, out: Path, *, resume: bool = False, fail_at: int | None = None, hang: bool = False) -> None:
    """Run the processes; a free port can be taken by another process before rank 0 binds it, so a run that
    fails with EADDRINUSE (and only that) is tried again on another port."""
    for attempt in range(3):
        try:
            mp.spawn(worker, args=(WORLD, free_port(), cfg, str(out), resume, fail_at, hang), nprocs=WORLD, join=True)
            return
        except mp.ProcessRaisedException as e:
            if "Address already in use" not in str(e) or attempt == 2:
                raise


def one_process(cfg, out: Path, monkeypatch, resume: bool = False) -> None:
    monkeypatch.setattr(loop, "build", float64_build)
    loop.Trainer(cfg, resume=resume, out_dir=out).fit()


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def weights(out: Path, step: int = 4) -> dict[str, torch.Tensor]:
    ckpt = out / "checkpoints" / f"step_{step:07d}"
    return {f"{f}.{k}": v for f in ("model", "objective", "trainer")
            for k, v in load_file(ckpt / f"{f}.safetensors").items() if not k.startswith("rng.")}


def assert_close(a: Path, b: Path, tol: float = TOL) -> None:
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == 4
    assert all(abs(x - y) <= tol * abs(y) for x, y in zip(la, lb)), (la, lb)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)
    assert worst <= tol, worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run folders by (objective, mode), trained once per module: mode 'none' is the one-process reference."""
    return {}, tmp_path_factory.mktemp("dist")


def trained(runs, run_config, monkeypatch, objective: str, mode: str) -> Path:
    done, root = runs
    if (objective, mode) not in done:
        cfg = run_config({**SETTINGS, "objective.name": objective, "train.parallel": mode})
        out = root / f"{objective}-{mode}"
        one_process(cfg, out, monkeypatch) if mode == "none" else spawn(cfg, out)
        done[objective, mode] = out
    return done[objective, mode]


@pytest.mark.parametrize("objective", ["next_token", "next_latent"])
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(runs, run_config, monkeypatch, objective, mode):
    """Same losses at every step, same final weights and optimizer moments, same evaluation."""
    reference = trained(runs, run_config, monkeypatch, objective, "none")
    out = trained(runs, run_config, monkeypatch, objective, mode)
    assert_close(out, reference)
    a, b = (json.loads((o / "results.json").read_text())["eval"] for o in (out, reference))
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-6 for k in a)


def test_resume_after_a_rank_fails(runs, run_config, monkeypatch, tmp_path):
    """Rank 1 fails at step 3: the job ends with its error; resuming from the step-2 checkpoint repeats the
    uninterrupted distributed run exactly (bit for bit)."""
    full = trained(runs, run_config, monkeypatch, "next_latent", "fsdp")
    cfg = run_config({**SETTINGS, "train.parallel": "fsdp"})
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 fails at step 3"):
        spawn(cfg, tmp_path, fail_at=3)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000002"]
    spawn(cfg, tmp_path, resume=True)
    assert losses(tmp_path) == losses(full)
    wa, wb = weights(tmp_path), weights(full)
    assert all(torch.equal(wa[k], wb[k]) for k in wb)


def test_resume_at_another_world_size(runs, run_config, monkeypatch, tmp_path):
    """A checkpoint holds the full state: a two-process run resumes in one process, equal to the uninterrupted
    run up to rounding."""
    full = trained(runs, run_config, monkeypatch, "next_latent", "ddp")
    shutil.copytree(full / "checkpoints" / "step_0000002", tmp_path / "checkpoints" / "step_0000002")
    lines = (full / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= 2))
    one_process(run_config({**SETTINGS, "train.parallel": "none"}), tmp_path, monkeypatch, resume=True)
    assert_close(tmp_path, full)


def test_a_hung_rank_times_out(run_config, tmp_path):
    """A rank that never joins a collective ends the job after train.dist_timeout instead of hanging it."""
    cfg = run_config({**SETTINGS, "train.parallel": "ddp", "train.dist_timeout": 5.0})
    start = time.perf_counter()
    with pytest.raises(mp.ProcessRaisedException, match="(?i)timed? ?out"):
        spawn(cfg, tmp_path, hang=True)
    assert time.perf_counter() - start < 60


@pytest.mark.slow
def test_compile_matches_eager(run_config, tmp_path):
    """train.compile (inductor on CPU) gives the eager losses within 1e-5 relative (float32: fused kernels round
    differently)."""
    out = {}
    for compiled in (False, True):
        cfg = run_config({**SETTINGS, "train.compile": compiled, "train.ckpt_every": 0})
        loop.Trainer(cfg, out_dir=tmp_path / str(compiled)).fit()
        out[compiled] = losses(tmp_path / str(compiled))
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(out[True], out[False])), out
