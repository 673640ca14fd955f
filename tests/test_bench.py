"""The benchmark commands run end to end on tiny models and report consistent tables (no timing asserts)."""

from __future__ import annotations

import json

import pytest
import torch

from nextlat.cli import main
from nextlat.decoding.budget import draft_room, new_token_budget


def test_bench_train_reports_every_variant_against_next_token(run_config, tmp_path, capsys, monkeypatch):
    from nextlat.tasks.pathstar import PathStarTask

    made = []  # the training data is made once and shared by every variant
    make = PathStarTask.train_data
    monkeypatch.setattr(PathStarTask, "train_data", lambda self: made.append(1) or make(self))
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(run_config().to_yaml())
    out = tmp_path / "bench.json"
    assert main(["bench-train", str(recipe), "--objectives", "next_token", "next_latent", "--horizons", "1", "2",
                 "--repeats", "2", "--steps", "1", "--warmup", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["objective"], r["horizon"]) for r in rows] == [("next_token", None), ("next_latent", 1), ("next_latent", 2)]
    assert rows[0]["ratio_median"] == 1.0
    assert all(r["step_s_median"] > 0 and r["ratio_min"] <= r["ratio_median"] <= r["ratio_max"] for r in rows)
    assert rows[1]["params_objective"] > 0 and rows[0]["params_objective"] == 0
    assert "x next-token" in capsys.readouterr().out
    assert len(made) == 1


def test_bench_decode_and_speculative_generate(run_config, tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(run_config(**{"train.steps": 30, "train.lr": 3e-3, "train.log_every": 10}).to_yaml())
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run)]) == 0
    capsys.readouterr()

    # Decode the checkpoint in float64: the identity checks below compare greedy argmaxes of other kernel
    # shapes (cached vs uncached, k-token verify vs 1-token steps), which float32 rounds differently by BLAS;
    # a near-tied logit of this barely trained model could then differ on another machine.
    from nextlat.training import build

    load, loaded = build.load_components, []

    def load_float64(*args, **kwargs):
        comps, meta = load(*args, **kwargs)
        comps.model.double(), comps.objective.double()
        loaded.append(comps.model.lm_head.weight.dtype)
        return comps, meta

    monkeypatch.setattr(build, "load_components", load_float64)

    out = tmp_path / "decode.json"
    assert main(["bench-decode", str(run), "--prompts", "3", "--max-new-tokens", "6", "--gammas", "2", "3",
                 "--adaptive", "0.5", "--repeats", "2", "--device", "cpu", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["protocols"]) == {"kv-cache", "paper (no cache)"}
    for rows in report["protocols"].values():
        assert [r["setting"] for r in rows] == ["baseline", "gamma=2", "gamma=3", "adaptive<0.5"]
        assert all(r["identical_to_baseline"] for r in rows)  # greedy speculative decoding is lossless
        assert all(r["new_tokens"] == rows[0]["new_tokens"] for r in rows)
        assert all(1.0 <= r["tokens_per_pass"] <= 4.0 for r in rows[1:3])
    assert "speedup" in capsys.readouterr().out

    prompt = "1 2 | 2 3 | 1 4 | 4 5 | / 1 3 ="
    assert main(["generate", str(run), "--prompt", prompt, "--max-new-tokens", "5", "--device", "cpu"]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", str(run), "--prompt", prompt, "--max-new-tokens", "5", "--device", "cpu",
                 "--speculative", "--gamma", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain
    assert "accepted/round" in captured.err
    assert loaded == [torch.float64] * 3  # bench-decode and both generate calls decoded in float64
    # --drafter names any registered drafter; one the objective cannot build, or an unknown name, is a clear error
    assert main(["generate", str(run), "--prompt", prompt, "--max-new-tokens", "5", "--device", "cpu",
                 "--drafter", "next_latent"]) == 0
    assert capsys.readouterr().out == plain
    assert main(["generate", str(run), "--prompt", prompt, "--device", "cpu", "--drafter", "mtp"]) == 2
    assert "objective.heads" in capsys.readouterr().err
    assert main(["bench-decode", str(run), "--device", "cpu", "--drafter", "medusa"]) == 2
    assert "unknown drafter 'medusa'" in capsys.readouterr().err


def test_bench_decode_needs_a_drafter(run_config, tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(run_config(**{"objective.name": "next_token", "train.steps": 1}).to_yaml())
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["bench-decode", str(run), "--device", "cpu"]) == 2
    assert "no drafter" in capsys.readouterr().err
    assert main(["generate", str(run), "--prompt", "1 2 | 2 3 | / 1 3 =", "--device", "cpu", "--speculative"]) == 2
    assert "no drafter" in capsys.readouterr().err


def test_new_token_budget_cuts_the_default_to_fit_and_names_what_to_lower():
    assert new_token_budget(None, 22, draft_room(10), 64, default=64, lower=["--gammas"]) == 20
    assert new_token_budget(None, 22, 0, 64, default=32, lower=["--prompt"]) == 32
    assert new_token_budget(42, 22, 0, 64, default=32, lower=["--prompt"]) == 42
    with pytest.raises(ValueError, match=r"^22 prompt tokens \+ 43 new tokens exceed model\.max_seq_len=64 \(at most 42 "
                                         r"new tokens fit\); lower --max-new-tokens or --prompt$"):
        new_token_budget(43, 22, 0, 64, default=32, lower=["--prompt"])
    with pytest.raises(ValueError, match=r"^60 prompt tokens \+ 22 of draft room leave no room for new tokens in "
                                         r"model\.max_seq_len=64; lower --prompt-len or --gammas$"):
        new_token_budget(None, 60, 22, 64, default=64, lower=["--prompt-len", "--gammas"])
