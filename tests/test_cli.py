"""The command line: train, eval and generate end to end on a tiny run; errors exit with code 2."""

from __future__ import annotations

import json

from nextlat.cli import main


def test_train_eval_generate(run_config, tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(run_config().to_yaml())
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--set", "train.steps=2", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    final = json.loads(out[out.rindex("{\n"):])
    assert "acc_greedy" in final
    assert json.loads((run / "results.json").read_text())["eval"] == final

    # a second train into the same folder is refused, --resume is accepted
    assert main(["train", str(recipe), "--set", "train.steps=2", "--out", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
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
