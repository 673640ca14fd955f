"""The command line: train, eval and generate end to end on a tiny run; user errors end in one line, exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import nextlat
from nextlat.cli import main
from nextlat.registry import load_config

SRC = Path(nextlat.__file__).parent.parent
PROMPT = "1 2 | 2 3 | / 1 3 ="


def _nextlat(*args: str, **kw) -> subprocess.Popen:
    """``python -m nextlat ARGS`` on this checkout's package."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "nextlat", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture
def tiny_run(run_config, tmp_path_factory):
    """A trained tiny Path-Star run (2 steps)."""
    run = tmp_path_factory.mktemp("cli") / "run"
    from nextlat.training.loop import Trainer

    Trainer(run_config(**{"train.steps": 2}), out_dir=run).fit()
    return run


def test_train_eval_generate(run_config, tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(run_config().to_yaml())
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--set", "train.steps=2", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    final, end = json.JSONDecoder().raw_decode(out, out.rindex("{\n"))
    assert "acc_greedy" in final
    assert json.loads((run / "results.json").read_text())["eval"] == final
    # then the line a person reads first, and where the run is
    summary, where = out[end:].strip().splitlines()
    assert summary.startswith("tiny after 2 steps: exact-path accuracy ") and "1/deg = 50%" in summary
    assert where == f"run folder {run}: results.json, metrics.jsonl, checkpoints/ (newest step_0000002)"

    # a second train into the finished run's folder is refused, saying how to train again; --resume is accepted
    assert main(["train", str(recipe), "--set", "train.steps=2", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "already holds a finished run" in err and "--out another folder or remove this one" in err
    assert main(["train", str(recipe), "--set", "train.steps=3", "--out", str(run), "--resume"]) == 0
    capsys.readouterr()

    assert main(["eval", str(run), "--examples", "4", "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["step"] == 3 and 0.0 <= res["acc_greedy"] <= 1.0

    assert main(["generate", str(run), "--prompt", "1 2 | 2 3 | / 1 3 =", "--max-new-tokens", "5",
                 "--device", "cpu"]) == 0
    text = capsys.readouterr().out.strip()
    assert 1 <= len(text.split()) <= 5

    assert main(["generate", str(run), "--prompt", "1 banana", "--device", "cpu"]) == 2
    assert "banana" in capsys.readouterr().err


def test_eval_of_missing_checkpoint_exits_2(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_recipes_lists_shipped_recipes(capsys):
    assert main(["recipes"]) == 0
    assert "pathstar-demo" in capsys.readouterr().out


def test_python_m_nextlat_and_version():
    proc = _nextlat("--version")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == f"nextlat {nextlat.__version__}" and not err


def test_a_closed_pipe_stops_quietly():
    """`nextlat recipes | head -1`: the reader leaves before the output is written; no traceback."""
    proc = _nextlat("recipes")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and err == ""


def _fails_in_one_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


def test_a_nan_loss_says_at_which_step_and_what_to_try(run_config, tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(run_config().to_yaml())
    line = _fails_in_one_line(capsys, ["train", str(recipe), "--out", str(tmp_path / "run"), "--set", "train.lr=1e9",
                                       "--set", "train.grad_clip=0", "--set", "train.warmup_steps=0"])
    assert line.startswith("nextlat train: error: loss became nan at step ")
    assert "lower train.lr (now 1e+09)" in line and "set train.grad_clip" in line and "train.warmup_steps" in line


@pytest.mark.parametrize("argv, message", [
    (["eval", "RUN", "--examples", "0"], "argument --examples: 0: must be >= 1"),
    (["eval", "RUN", "--examples", "-5"], "argument --examples: -5: must be >= 1"),
    (["generate", "RUN", "--prompt", PROMPT, "--temperature", "nan"],
     "argument --temperature: nan: must be a finite number in [0, inf)"),
    (["generate", "RUN", "--prompt", PROMPT, "--top-p", "0"], "argument --top-p: 0: must be a finite number in (0, 1]"),
    (["sweep", "pathstar-demo", "--jobs", "0"], "argument --jobs: 0: must be >= 1"),
    (["experiment", "pathstar", "--jobs", "0"], "argument --jobs: 0: must be >= 1"),
    (["experiment", "pathstar", "--seeds", "0"], "argument --seeds: 0: must be >= 1"),
])
def test_bad_arguments_are_refused_by_name(argv, message, tmp_path, capsys):
    assert main([str(tmp_path) if a == "RUN" else a for a in argv]) == 2
    assert capsys.readouterr().err.strip().endswith(message)


@pytest.mark.parametrize("settings, message", [
    (["train.threads=-4"], "train.threads=-4: must be >= 0"),
    (["model.d_model=0"], "model.d_model=0: must be >= 1"),
])
def test_bad_settings_are_refused_by_name(settings, message, run_config, tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(run_config().to_yaml())
    line = _fails_in_one_line(capsys, ["train", str(recipe), "--out", str(tmp_path / "run"),
                                       *sum((["--set", s] for s in settings), [])])
    assert message in line
    assert not (tmp_path / "run").exists()


def test_out_at_or_below_a_file_is_refused(run_config, tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(run_config().to_yaml())
    for out in (recipe, recipe / "run"):
        line = _fails_in_one_line(capsys, ["train", str(recipe), "--out", str(out)])
        assert line.endswith(f"{str(recipe)!r} is a file, not a folder; pass --out another path")


def test_a_run_failing_before_it_trains_leaves_no_folder(run_config, tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(run_config().to_yaml())
    out = tmp_path / "new" / "run"
    line = _fails_in_one_line(capsys, ["train", str(recipe), "--out", str(out), "--set",
                                       f"train.init_from={tmp_path / 'nowhere'}"])
    assert "nowhere" in line and not out.exists() and (tmp_path / "new").is_dir()


def test_generate_fits_its_default_length_and_names_what_to_lower(tiny_run, capsys):
    # 10 prompt tokens + 14 of draft room (gamma 6) leave 40 of the model's 64 positions; the default (32) fits
    assert main(["generate", str(tiny_run), "--prompt", PROMPT, "--speculative", "--gamma", "6", "--device", "cpu"]) == 0
    capsys.readouterr()
    line = _fails_in_one_line(capsys, ["generate", str(tiny_run), "--prompt", PROMPT, "--speculative", "--gamma", "6",
                                       "--max-new-tokens", "50", "--device", "cpu"])
    assert line.endswith("10 prompt tokens + 50 new tokens + 14 of draft room exceed model.max_seq_len=64 "
                         "(at most 40 new tokens fit); lower --max-new-tokens, --prompt or --gamma")


def test_config_prints_every_key_with_its_meaning(capsys):
    assert main(["config", "pathstar-demo", "--set", "train.lr=3e-4"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out) == load_config("pathstar-demo", ["train.lr=3e-4"]).to_dict()  # loads back as a recipe
    lines = out.splitlines()
    assert lines[0] == f"# pathstar-demo --set train.lr=3e-4, resolved by nextlat {nextlat.__version__}."
    assert lines[lines.index("  lr: 0.0003") - 1] == "  # Peak learning rate."
    assert "  # Number of arms leaving the source (deg)." in lines  # the task's own settings
    assert "  # Rollout horizon d: p_psi is rolled out d steps with teacher forcing." in lines  # the objective's


def test_train_help_says_where_the_keys_are(capsys):
    assert main(["train", "--help"]) == 0
    assert "nextlat config RECIPE" in " ".join(capsys.readouterr().out.split())
