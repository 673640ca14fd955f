"""Trainer: exact resume, exact gradient accumulation, run-folder safety, metrics log."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from nextlat.config import ConfigError
from nextlat.training.checkpoint import CheckpointError, list_checkpoints
from nextlat.training.loop import Trainer


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _assert_same_weights(a: Trainer, b: Trainer) -> None:
    for module_a, module_b in ((a.model, b.model), (a.objective, b.objective)):
        sa, sb = module_a.state_dict(), module_b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


def _losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_is_bit_for_bit(run_config, tmp_path):
    """Crash mid-run (after step 3 was logged, newest checkpoint at step 2), resume, finish: same as uninterrupted.

    Bit for bit within one process (one machine, one thread: conftest): the same steps run the same kernels."""
    cfg = run_config(**{"train.steps": 6, "train.ckpt_every": 2, "train.schedule": "cosine", "train.warmup_steps": 2,
                        "train.grad_clip": 0.5})
    full = Trainer(cfg, out_dir=tmp_path / "full")
    full.fit()

    first = Trainer(cfg, out_dir=tmp_path / "resumed")
    real_step = first.train_step

    def crash_at_4(step):
        if step == 3:  # steps 0..2 done (3 logged), checkpoint of step 2 written
            raise _Interrupt
        return real_step(step)

    first.train_step = crash_at_4
    with pytest.raises(_Interrupt):
        first.fit()
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step_0000002"]
    assert max(r["step"] for r in _records(tmp_path / "resumed")) == 3

    second = Trainer(cfg, out_dir=tmp_path / "resumed", resume=True)
    assert second.start_step == 2
    second.fit()
    _assert_same_weights(full, second)
    # identical optimizer moments, too
    for p_full, p_res in zip(full.optimizer.param_groups[0]["params"], second.optimizer.param_groups[0]["params"]):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(full.optimizer.state[p_full][key], second.optimizer.state[p_res][key])

    recs = _records(tmp_path / "resumed")
    keys = [(r["step"], r["kind"]) for r in recs]
    assert len(keys) == len(set(keys)), f"duplicated metrics records: {keys}"
    assert [s for s, k in keys if k == "train"] == list(range(1, 7))
    assert _losses(recs) == _losses(_records(tmp_path / "full"))
    assert json.loads((tmp_path / "resumed" / "results.json").read_text()) == \
        json.loads((tmp_path / "full" / "results.json").read_text())


def test_resume_with_more_steps_is_bit_for_bit(run_config, tmp_path):
    """Train k steps with train.steps=k, then resume with train.steps=N: same weights as N steps at once
    (bit for bit within one process, as above)."""
    n, k = 5, 2
    full = Trainer(run_config(**{"train.steps": n}), out_dir=tmp_path / "full")
    full.fit()
    Trainer(run_config(**{"train.steps": k, "train.ckpt_every": k}), out_dir=tmp_path / "split").fit()
    resumed = Trainer(run_config(**{"train.steps": n}), out_dir=tmp_path / "split", resume=True)
    assert resumed.start_step == k
    resumed.fit()
    _assert_same_weights(full, resumed)
    recs = _records(tmp_path / "split")
    keys = [(r["step"], r["kind"]) for r in recs]
    assert len(keys) == len(set(keys))
    assert _losses(recs) == _losses(_records(tmp_path / "full"))


def test_resume_refuses_a_changed_config(run_config, tmp_path):
    Trainer(run_config(**{"train.steps": 1}), out_dir=tmp_path).fit()
    with pytest.raises(CheckpointError, match=r"train\.lr changed"):
        Trainer(run_config(**{"train.steps": 2, "train.lr": 0.5}), out_dir=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="'objective' differs"):
        Trainer(run_config(**{"train.steps": 2, "objective.horizon": 1}), out_dir=tmp_path, resume=True)


def test_resume_without_checkpoint_starts_fresh_without_stale_records(run_config, tmp_path):
    """A run that died before its first checkpoint: --resume starts over and the log holds no stale steps."""
    cfg = run_config(**{"train.steps": 3, "train.ckpt_every": 0})
    crashed = Trainer(cfg, out_dir=tmp_path)
    real_step = crashed.train_step
    crashed.train_step = lambda step: (_ for _ in ()).throw(_Interrupt) if step == 2 else real_step(step)
    with pytest.raises(_Interrupt):
        crashed.fit()
    assert not list_checkpoints(tmp_path) and _records(tmp_path)
    fresh = Trainer(cfg, out_dir=tmp_path, resume=True)
    assert fresh.start_step == 0
    fresh.fit()
    keys = [(r["step"], r["kind"]) for r in _records(tmp_path)]
    assert len(keys) == len(set(keys)), f"duplicated metrics records: {keys}"


def test_refuses_existing_run_without_resume(run_config, tmp_path):
    cfg = run_config(**{"train.steps": 1})
    Trainer(cfg, out_dir=tmp_path).fit()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="already holds a finished run .*; to train again, pass --out another folder "
                                          "or remove this one"):
        Trainer(cfg, out_dir=tmp_path)
    (tmp_path / "results.json").unlink()
    with pytest.raises(ConfigError, match=r"already holds an unfinished run \(newest checkpoint: step_0000001\); pass "
                                          "--resume to continue it"):
        Trainer(cfg, out_dir=tmp_path)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "results.json"}
    assert {p: b for p, b in before.items() if p.name != "results.json"} == after


def test_grad_accum_gives_the_same_step(run_config, tmp_path):
    """grad_accum=2 gives the same loss (and update) as grad_accum=1: accumulation uses global counts.

    In float64: micro-batches run matmuls of other shapes, which round float32 differently (by BLAS)."""
    one = Trainer(run_config(**{"train.grad_accum": 1}), out_dir=tmp_path / "a")
    two = Trainer(run_config(**{"train.grad_accum": 2}), out_dir=tmp_path / "b")
    for t in (one, two):  # in place, before any step: the optimizer keeps the same parameters
        t.model.double(), t.objective.double()
    m1, m2 = one.train_step(0), two.train_step(0)
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-10, abs=1e-12)
    for key in ("ce", "next_h", "kl", "grad_norm"):
        assert m1[key] == pytest.approx(m2[key], rel=1e-10, abs=1e-12), key
    for pa, pb in zip(one.model.parameters(), two.model.parameters()):
        assert pa.dtype == torch.float64
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12)


def test_zero_aux_weights_train_exactly_like_next_token(run_config, tmp_path):
    """With lambda_h = lambda_kl = 0, NextLat training reproduces next-token training weight for weight."""
    nt = Trainer(run_config(**{"objective.name": "next_token", "train.steps": 3}), out_dir=tmp_path / "nt")
    nl = Trainer(run_config(**{"objective.lambda_h": 0.0, "objective.lambda_kl": 0.0, "train.steps": 3}),
                 out_dir=tmp_path / "nl")
    for step in range(3):
        assert nt.train_step(step)["loss"] == nl.train_step(step)["loss"]
    for (name, a), (_, b) in zip(nt.model.named_parameters(), nl.model.named_parameters()):
        assert torch.equal(a, b), name


def test_fit_writes_run_folder(run_config, tmp_path):
    cfg = run_config(**{"train.steps": 3, "train.log_every": 2, "train.ckpt_every": 1, "train.keep_checkpoints": 2})
    results = Trainer(cfg, out_dir=tmp_path).fit()
    assert sorted(p.name for p in list_checkpoints(tmp_path)) == ["step_0000002", "step_0000003"]
    recs = _records(tmp_path)
    assert [(r["step"], r["kind"]) for r in recs] == [(2, "train"), (3, "train"), (3, "eval")]
    for key in ("loss", "ce", "next_h", "kl", "lr", "tok_per_s"):
        assert key in recs[0]
    assert results["eval"] == {k: v for k, v in recs[-1].items() if k not in ("step", "kind")}
    assert json.loads((tmp_path / "results.json").read_text())["eval"] == results["eval"]
    assert (tmp_path / "config.yaml").is_file()
    assert not list(tmp_path.rglob("*.tmp*"))


def test_training_reduces_the_loss(run_config, tmp_path):
    cfg = run_config(**{"train.steps": 12, "train.lr": 3e-3, "train.log_every": 1})
    Trainer(cfg, out_dir=tmp_path).fit()
    losses = _losses(_records(tmp_path))
    assert losses[12] < losses[1]


def test_resuming_a_finished_run_keeps_its_results(run_config, tmp_path):
    cfg = run_config(**{"train.steps": 2})
    Trainer(cfg, out_dir=tmp_path).fit()
    before = json.loads((tmp_path / "results.json").read_text())
    assert before["eval"]
    again = Trainer(cfg, out_dir=tmp_path, resume=True)
    assert again.start_step == 2
    assert again.fit() == before
    assert json.loads((tmp_path / "results.json").read_text()) == before


def test_post_hoc_dynamics_fit_trains_only_the_objective(run_config, tmp_path):
    """init_from a next-token run + freeze_backbone: the backbone stays bit-for-bit, p_psi learns."""
    Trainer(run_config(**{"objective.name": "next_token", "train.steps": 3}), out_dir=tmp_path / "gpt").fit()
    base = Trainer(run_config(**{"objective.name": "next_token", "train.steps": 3}), out_dir=tmp_path / "gpt",
                   resume=True)
    cfg = run_config(**{"train.steps": 12, "train.lr": 3e-3, "train.init_from": str(tmp_path / "gpt"),
                        "train.freeze_backbone": True})
    fit = Trainer(cfg, out_dir=tmp_path / "fit")
    assert all(not p.requires_grad for p in fit.model.parameters())
    trained = {id(p) for group in fit.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in fit.objective.parameters()}
    before = {k: v.clone() for k, v in fit.objective.state_dict().items()}
    fit.fit()
    for k, v in base.model.state_dict().items():
        assert torch.equal(v, fit.model.state_dict()[k]), k
    assert any(not torch.equal(before[k], v) for k, v in fit.objective.state_dict().items())
    records = [r for r in _records(tmp_path / "fit") if r["kind"] == "train"]
    assert records[-1]["next_h"] < records[0]["next_h"]
    assert records[-1]["ce"] == pytest.approx(records[0]["ce"], rel=0.2)  # the head is frozen too


def test_init_from_loads_the_objective_only_when_its_weights_fit(run_config, tmp_path):
    Trainer(run_config(**{"train.steps": 2}), out_dir=tmp_path / "nl").fit()
    src = Trainer(run_config(**{"train.steps": 2}), out_dir=tmp_path / "nl", resume=True)
    src.close()
    same = Trainer(run_config(**{"train.init_from": str(tmp_path / "nl")}), out_dir=tmp_path / "same")
    _assert_same_weights(src, same)
    # Another horizon and loss weight: the same dynamics MLP, so it is loaded too.
    longer = Trainer(run_config(**{"train.init_from": str(tmp_path / "nl"), "objective.horizon": 4,
                                   "objective.lambda_kl": 0.5}), out_dir=tmp_path / "longer")
    _assert_same_weights(src, longer)
    # Another MLP width: only the backbone fits; the objective starts as it would without init_from.
    other = Trainer(run_config(**{"train.init_from": str(tmp_path / "nl"), "objective.proj_factor": 4.0}),
                    out_dir=tmp_path / "other")
    for k, v in src.model.state_dict().items():
        assert torch.equal(v, other.model.state_dict()[k]), k
    fresh = Trainer(run_config(**{"objective.proj_factor": 4.0}), out_dir=tmp_path / "fresh")
    for k, v in fresh.objective.state_dict().items():
        assert torch.equal(v, other.objective.state_dict()[k]), k


def test_init_from_errors_name_the_bad_value(run_config, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Trainer(run_config(**{"train.init_from": str(tmp_path / "nowhere")}), out_dir=tmp_path / "a")
    Trainer(run_config(**{"train.steps": 1}), out_dir=tmp_path / "src").fit()
    with pytest.raises(CheckpointError, match="init_from.*model settings"):
        Trainer(run_config(**{"train.init_from": str(tmp_path / "src"), "model.d_model": 16}), out_dir=tmp_path / "b")
    with pytest.raises(ConfigError, match="freeze_backbone.*init_from"):
        run_config(**{"train.freeze_backbone": True})
    with pytest.raises(ConfigError, match="freeze_backbone.*next_token"):
        run_config(**{"train.freeze_backbone": True, "train.init_from": "x", "objective.name": "next_token"})


def test_two_trainers_never_share_a_run_folder(run_config, tmp_path):
    cfg = run_config(**{"train.steps": 2, "train.ckpt_every": 1})
    first = Trainer(cfg, out_dir=tmp_path)
    for resume in (True, False):  # the holder is named; --resume is not suggested while the folder is held
        with pytest.raises(ConfigError, match="being trained by another process") as refused:
            Trainer(cfg, out_dir=tmp_path, resume=resume)
        assert "--resume" not in str(refused.value)
    first.fit()  # unharmed by the refused second trainer; fit releases the folder when it ends
    again = Trainer(cfg, out_dir=tmp_path, resume=True)
    assert again.start_step == 2
    again.close()


def test_a_nan_loss_names_the_step_and_what_to_try(run_config, tmp_path):
    cfg = run_config(**{"train.lr": 1e9, "train.grad_clip": 0.0, "train.log_every": 100})
    with pytest.raises(FloatingPointError, match=r"loss became nan at step \d; try: lower train\.lr \(now 1e\+09\), "
                                                 r"set train\.grad_clip \(e\.g\. 1\.0\)"):
        Trainer(cfg, out_dir=tmp_path / "run").fit()
    assert not (tmp_path / "run").exists()  # it failed before writing anything: the folder it made is gone


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_run_clears_checkpoint_writes_of_stopped_processes(run_config, tmp_path):
    cfg = run_config(**{"train.steps": 2, "train.ckpt_every": 1})
    Trainer(cfg, out_dir=tmp_path).fit()
    ckpts = tmp_path / "checkpoints"
    dead, live = _dead_pid(), subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        torn = ckpts / f".step_0000003.tmp-{dead}"
        torn.mkdir()
        (torn / "model.safetensors").write_bytes(b"half")
        writing = ckpts / f".step_0000003.tmp-{live.pid}"
        writing.mkdir()
        moved = ckpts / f".step_0000001.old-{dead}"  # killed between moving the old folder aside and the rename
        (ckpts / "step_0000001").rename(moved)
        Trainer(cfg, out_dir=tmp_path, resume=True).fit()
        assert not torn.exists() and writing.is_dir() and not moved.exists()
        assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000001", "step_0000002"]
    finally:
        live.kill()
        live.wait()


def test_resume_drops_a_torn_last_metrics_line_and_names_a_bad_one(run_config, tmp_path, capsys):
    cfg = run_config(**{"train.steps": 2})
    Trainer(cfg, out_dir=tmp_path).fit()
    log = tmp_path / "metrics.jsonl"
    good = log.read_text()
    log.write_text(good + '{"step": 3, "kind": "train", "lo')  # a crash mid-append
    Trainer(run_config(**{"train.steps": 3}), out_dir=tmp_path, resume=True).fit()
    assert "dropped its torn last line" in capsys.readouterr().err
    assert [r["step"] for r in _records(tmp_path)][-1] == 3

    shutil.rmtree(tmp_path / "checkpoints")  # elsewhere a bad line is named, not skipped
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl, line 2: not a metrics record \('garbage'\)"):
        Trainer(cfg, out_dir=tmp_path, resume=True)
