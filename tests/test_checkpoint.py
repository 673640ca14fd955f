"""Checkpoints: self-describing folders, atomic saves, strict and safe loading with clear errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from nextlat.training.build import build, load_components
from nextlat.training.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_weights,
    read_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)


@pytest.fixture
def saved(run_config, tmp_path):
    """A checkpoint of a freshly built tiny NextLat run (weights perturbed so they are not the init)."""
    comps = build(run_config())
    with torch.no_grad():
        for p in list(comps.model.parameters()) + list(comps.objective.parameters()):
            p.add_(torch.randn_like(p))
    path = save_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000005", cfg=comps.cfg, model=comps.model,
                           objective=comps.objective, step=5, metrics={"loss": 1.5})
    return path, comps


def test_round_trip_is_exact(saved):
    path, comps = saved
    assert sorted(os.listdir(path)) == ["config.yaml", "meta.json", "model.safetensors", "objective.safetensors"]
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format"] == "nextlat-checkpoint" and meta["step"] == 5 and meta["metrics"] == {"loss": 1.5}
    for where in (path, path.parent.parent):  # a checkpoint folder, or a run folder (newest checkpoint)
        loaded, meta = load_components(where)
        assert meta["step"] == 5
        assert loaded.cfg == comps.cfg
        for a, b in ((comps.model, loaded.model), (comps.objective, loaded.objective)):
            sa, sb = a.state_dict(), b.state_dict()
            assert sa.keys() == sb.keys()
            assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_second_save_replaces_atomically(saved, run_config):
    path, comps = saved
    with torch.no_grad():
        comps.model.lm_head.weight.zero_()
    save_checkpoint(path, cfg=comps.cfg, model=comps.model, objective=comps.objective, step=7)
    assert os.listdir(path.parent) == [path.name]  # no leftover .tmp / .old folders
    ckpt = read_checkpoint(path)
    assert ckpt.step == 7
    loaded, _ = load_components(path)
    assert not loaded.model.lm_head.weight.any()


def test_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError, match="nope"):
        load_components(missing)
    with pytest.raises(CheckpointError, match="nope"):
        read_checkpoint(missing)


def test_folder_without_meta(saved):
    path, _ = saved
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing meta\.json"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match=path.name):
        load_components(path)


def test_foreign_format(saved):
    path, _ = saved
    (path / "meta.json").write_text(json.dumps({"format": "some-other-tool", "step": 1}))
    with pytest.raises(CheckpointError, match=r"meta\.json.*some-other-tool"):
        read_checkpoint(path)
    (path / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"meta\.json: corrupt"):
        read_checkpoint(path)
    (path / "meta.json").write_text(json.dumps({"format": "nextlat-checkpoint", "format_version": 99, "step": 1}))
    with pytest.raises(CheckpointError, match="format_version 99"):
        read_checkpoint(path)


def test_corrupt_config(saved):
    path, _ = saved
    (path / "config.yaml").write_text("train: {lrr: 1}\n")
    with pytest.raises(CheckpointError, match=r"config\.yaml.*train\.lrr"):
        read_checkpoint(path)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors(saved, damage):
    path, _ = saved
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"garbage": os.urandom(300), "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_components(path)


def test_wrong_shapes_for_config(run_config, tmp_path):
    small = build(run_config())
    big = build(run_config(**{"model.d_model": 64}))
    path = save_checkpoint(tmp_path / "ckpt", cfg=small.cfg, model=big.model, objective=big.objective, step=1)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*shape"):
        load_components(path)


def test_missing_and_extra_keys(run_config, tmp_path):
    nl = build(run_config())
    nt = build(run_config(**{"objective.name": "next_token"}))
    # a next_latent config whose objective file holds no dynamics weights
    path = save_checkpoint(tmp_path / "ckpt", cfg=nl.cfg, model=nl.model, objective=nt.objective, step=1)
    with pytest.raises(CheckpointError, match=r"objective\.safetensors.*missing"):
        load_weights(read_checkpoint(path), nl.model, nl.objective)


def test_resolve_checkpoint_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint folder nor a run folder"):
        resolve_checkpoint(tmp_path / "empty")
    assert list_checkpoints(tmp_path / "empty") == []


def test_checkpoint_folder_ignores_incomplete_saves(saved):
    """A folder without meta.json (an interrupted save) is never picked as the newest checkpoint."""
    path, _ = saved
    partial = path.parent / "step_0000009"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"partial")
    assert list_checkpoints(path.parent.parent) == [path]
    assert resolve_checkpoint(path.parent.parent) == path


def test_trainer_checkpoints_hold_resume_state(run_config, tmp_path):
    from nextlat.training.loop import Trainer

    Trainer(run_config(**{"train.steps": 1}), out_dir=tmp_path).fit()
    (ckpt,) = list_checkpoints(tmp_path)
    names = set(os.listdir(ckpt))
    assert {"trainer.safetensors", "trainer.json"} <= names
    assert json.loads((ckpt / "meta.json").read_text())["has_trainer_state"] is True
    # nothing in a checkpoint is a pickle
    assert not any(n.endswith((".pt", ".pth", ".pkl", ".bin")) for n in names)
