"""Experiments: all arms x seeds trained as resumable subprocess runs, tabulated with every seed's value."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys

import pytest
import torch
import yaml

from nextlat import registry
from nextlat.cli import main
from nextlat.config import ConfigError
from nextlat.experiments.base import SCALES, Arm, Experiment, Metric
from nextlat.experiments.runner import get_experiment, plan, report, run_experiment
from nextlat.experiments.sweep import Job, run_jobs


def register(monkeypatch, exp: Experiment) -> None:
    """Name ``exp`` in the registry under ``exp.name`` for this test, as an attribute of this module."""
    attr = f"EXPERIMENT_{exp.name}"
    monkeypatch.setattr(sys.modules[__name__], attr, exp, raising=False)
    monkeypatch.setitem(registry.EXPERIMENTS, exp.name, f"{__name__}:{attr}")


@pytest.fixture
def tiny_experiment(run_config, tmp_path, monkeypatch):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(run_config(**{"train.steps": 2, "train.log_every": 1}).to_yaml())

    def arms(scale):
        return [Arm("GPT", "gpt", str(recipe), ("objective.name=next_token",)),
                Arm("NextLat d=2", "nl", str(recipe), ("objective.horizon=2",))]

    exp = Experiment("tiny", arms, [Metric("acc_greedy", "greedy %"), Metric("pos_acc_1", "source", percent=False),
                                    Metric("acc_sampled", "sampled %", optional=True),  # reported: shown
                                    Metric("acc_never", "never reported", optional=True)],  # left out
                     paper={"GPT": {"G(2,10)": 49.4}})
    register(monkeypatch, exp)
    return exp


def test_plan_is_seed_major_and_checks_recipes(tiny_experiment, tmp_path):
    jobs = plan("tiny", "cpu", [0, 1], tmp_path / "exp")
    assert [(j.run_dir.parent.name, j.seed) for j in jobs] == [("gpt", 0), ("nl", 0), ("gpt", 1), ("nl", 1)]
    with pytest.raises(ConfigError, match="objective.nope"):
        plan("tiny", "cpu", [0], tmp_path / "exp", ["objective.nope=1"])
    with pytest.raises(ConfigError, match="huge"):
        plan("tiny", "huge", [0], tmp_path / "exp")
    with pytest.raises(ConfigError, match="mystery"):
        plan("mystery", "cpu", [0], tmp_path / "exp")


def test_plan_trains_the_named_arms_in_the_given_order(tiny_experiment, tmp_path):
    jobs = plan("tiny", "cpu", [0, 1], tmp_path / "exp", arms=["nl", "gpt"])
    assert [(j.run_dir.parent.name, j.seed) for j in jobs] == [("nl", 0), ("gpt", 0), ("nl", 1), ("gpt", 1)]
    assert [j.run_dir.parent.name for j in plan("tiny", "cpu", [0], tmp_path / "exp", arms=["nl"])] == ["nl"]
    with pytest.raises(ConfigError, match=r"'bst': not an arm of this experiment; choose from gpt, nl"):
        plan("tiny", "cpu", [0], tmp_path / "exp", arms=["bst"])
    with pytest.raises(ConfigError, match="named twice"):
        plan("tiny", "cpu", [0], tmp_path / "exp", arms=["nl", "nl"])


def test_run_experiment_tabulates_every_seed_and_skips_finished_runs(tiny_experiment, tmp_path):
    out = tmp_path / "exp"
    result = run_experiment("tiny", seeds=[0, 1], parallel=2, out=out)
    rows = {r["label"]: r for r in result["rows"]}
    for label, slug in [("GPT", "gpt"), ("NextLat d=2", "nl")]:
        finals = [json.loads((out / slug / f"seed_{s}" / "results.json").read_text())["eval"] for s in (0, 1)]
        m = rows[label]["metrics"]["acc_greedy"]
        assert m["per_seed"] == [f["acc_greedy"] for f in finals]
        assert m["n"] == 2 and m["min"] <= m["mean"] <= m["max"]
    assert rows["GPT"]["paper"] == {"G(2,10)": 49.4}
    # each arm's settings and each seed reach the runs
    import yaml

    gpt = yaml.safe_load((out / "gpt" / "seed_1" / "config.yaml").read_text())
    nl = yaml.safe_load((out / "nl" / "seed_1" / "config.yaml").read_text())
    assert gpt["objective"]["name"] == "next_token" and nl["objective"]["horizon"] == 2
    assert gpt["train"]["seed"] == nl["train"]["seed"] == 1
    table = (out / "results.md").read_text()
    assert "| GPT | 2 |" in table and "paper G(2,10)" in table and "49.4" in table
    assert "| sampled % |" in table and "never reported" not in table  # optional columns only when reported
    assert table.endswith("\nSteps trained, from the runs: 2 (every run).\n")
    assert json.loads((out / "results.json").read_text())["rows"][1]["label"] == "NextLat d=2"
    assert (out / "tiny.png").stat().st_size > 0

    # A rerun trains nothing: finished runs are skipped (their results are not rewritten).
    stamp = (out / "gpt" / "seed_0" / "results.json").stat().st_mtime_ns
    run_experiment("tiny", seeds=[0, 1], parallel=1, out=out)
    assert (out / "gpt" / "seed_0" / "results.json").stat().st_mtime_ns == stamp
    # A new seed trains only the new runs; the report covers what has finished.
    (out / "nl" / "seed_0" / "results.json").unlink()
    res = report("tiny", "cpu", [0, 1], out)
    assert {r["label"]: r["metrics"]["acc_greedy"]["n"] for r in res["rows"]} == {"GPT": 2, "NextLat d=2": 1}
    # Finished runs trained with other settings (another learning rate here) are refused, not counted.
    with pytest.raises(ConfigError, match="gpt/seed_0 holds a finished run with other settings"):
        run_experiment("tiny", seeds=[0], parallel=1, out=out, overrides=["train.lr=0.5"])


def test_posthoc_arm_fits_its_objective_on_the_source_arms_frozen_backbone(tiny_experiment, tmp_path, monkeypatch):
    """An arm with ``backbone_of`` waits for that arm's run of the same seed, starts from it and keeps its backbone."""
    from nextlat.training.build import load_components

    gpt, nl = tiny_experiment.arms("cpu")
    post = Arm("GPT + dynamics", "post", nl.recipe, ("objective.horizon=1",), backbone_of="gpt")
    # listed first and two at a time: it must still wait for its source
    register(monkeypatch, dataclasses.replace(tiny_experiment, arms=lambda s: [post, gpt]))
    out = tmp_path / "exp"
    jobs = plan("tiny", "cpu", [0], out)
    assert jobs[0].after == out / "gpt" / "seed_0" and jobs[1].after is None
    assert f"train.init_from={out / 'gpt' / 'seed_0'}" in jobs[0].overrides
    with pytest.raises(ConfigError, match="--arms post: starts from arm 'gpt', whose seed 0 has not finished"):
        plan("tiny", "cpu", [0], out, arms=["post"])

    result = run_experiment("tiny", seeds=[0], parallel=2, out=out)
    assert [r["seeds"] for r in result["rows"]] == [[0], [0]]
    fitted, _ = load_components(out / "post" / "seed_0")
    source, _ = load_components(out / "gpt" / "seed_0")
    assert fitted.cfg.train.freeze_backbone and fitted.cfg.objective.name == "next_latent"
    for (name, a), b in zip(fitted.model.state_dict().items(), source.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert plan("tiny", "cpu", [0], out, arms=["post"])[0].done  # the source has finished: planning alone is fine


def test_a_run_whose_source_fails_never_starts(tmp_path):
    src = Job(tmp_path / "src", str(tmp_path / "missing.yaml"), 0)
    dep = Job(tmp_path / "dep", str(tmp_path / "missing.yaml"), 0, after=src.run_dir)
    assert run_jobs([dep, src], parallel=2) == [src, dep]
    assert not dep.run_dir.exists()


def test_cli_experiment_trains_only_the_named_arms(tiny_experiment, tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["experiment", "tiny", "--seeds", "1", "--arms", "nl", "--out", str(out), "--set", "train.threads=1"]) == 0
    assert (out / "nl" / "seed_0" / "results.json").is_file() and not (out / "gpt").exists()
    # the user's thread count wins over the experiment's default share of the cores
    assert yaml.safe_load((out / "nl" / "seed_0" / "config.yaml").read_text())["train"]["threads"] == 1
    assert main(["experiment", "tiny", "--arms", "bst", "--out", str(out)]) == 2
    assert "choose from gpt, nl" in capsys.readouterr().err


def test_cli_experiment_errors_exit_2(capsys):
    assert main(["experiment", "mystery"]) == 2
    assert "unknown experiment 'mystery' (known: a5, countdown, lm, manhattan, pathstar)" in capsys.readouterr().err
    assert main(["experiment", "pathstar", "--seeds", "0"]) == 2


@pytest.mark.parametrize("name", sorted(registry.EXPERIMENTS))
def test_shipped_experiments_plan_from_shipped_recipes(name, tmp_path):
    scales = {"pathstar": ["cpu", "paper"], "countdown": ["cpu", "paper"], "a5": ["cpu", "gpu", "paper"],
              "manhattan": ["cpu", "gpu", "paper"], "lm": ["cpu"]}[name]
    for scale in SCALES:
        if scale in scales:
            jobs = plan(name, scale, [0], tmp_path)
            assert jobs and len({j.run_dir for j in jobs}) == len(jobs)
        else:  # refused before any recipe is looked up, naming the scales there are
            with pytest.raises(ConfigError, match=f"--scale '{scale}'.*{', '.join(scales)}"):
                plan(name, scale, [0], tmp_path)


@pytest.mark.parametrize("name", sorted(registry.EXPERIMENTS))
def test_every_registered_experiment_declares_arms_at_each_of_its_scales(name):
    """Built without training: each scale's arms have distinct folders and labels, a post-hoc arm names one of them
    as its source, and every row of the paper's numbers is the label of an arm."""
    exp = get_experiment(name)
    assert exp.name == name and exp.metrics and exp.scales and set(exp.scales) <= set(SCALES)
    labels = set()
    for scale in exp.scales:
        arms = exp.arms(scale)
        slugs = [a.slug for a in arms]
        assert arms and len(set(slugs)) == len(arms) and len({a.label for a in arms}) == len(arms)
        assert all(a.backbone_of in slugs for a in arms if a.backbone_of is not None)
        labels |= {a.label for a in arms}
    assert set(exp.paper) <= labels


def test_a5_report_draws_accuracy_by_position(tmp_path, monkeypatch, capsys):
    """The A5 figure: per-position accuracy of each arm on the longest test words, plus the NextLat RNN curve."""
    from nextlat.registry import config_from_dict

    recipe = tmp_path / "a5.yaml"
    recipe.write_text(config_from_dict({
        "run_name": "a5-tiny", "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "max_seq_len": 16},
        "objective": {"name": "next_latent", "horizon": 1, "lambda_h": 1.0, "lambda_kl": 0.0},
        "task": {"name": "a5", "train_len": 4, "eval_lengths": [4, 10], "num_train": 64, "num_test": 8,
                 "eval_examples": 8},
        "train": {"steps": 2, "batch_size": 8, "progress": False, "device": "cpu", "precision": "fp32"},
    }).to_yaml())
    base = get_experiment("a5")
    arms = lambda scale: [Arm("GPT", "gpt", str(recipe), ("objective.name=next_token",)),  # noqa: E731
                          Arm("NextLat d=1", "nl", str(recipe)),
                          Arm("GPT + dynamics", "post", str(recipe), backbone_of="gpt")]
    register(monkeypatch, Experiment("a5", arms, base.metrics, figures=base.figures))
    out = tmp_path / "exp"
    result = run_experiment("a5", seeds=[0, 1], out=out)
    curves = result["curves"]
    # the post-hoc arm's transformer is GPT's, frozen: only its RNN gets a curve
    assert set(curves) == {"GPT", "NextLat d=1", "NextLat d=1, dynamics as RNN", "GPT + dynamics (RNN)"}
    for c in curves.values():
        assert c["x"] == list(range(1, 11)) and c["n"] == 2 and all(0 <= v <= 1 for v in c["mean"])
    final = json.loads((out / "nl" / "seed_0" / "results.json").read_text())["eval"]
    rnn = [json.loads((out / "nl" / f"seed_{s}" / "results.json").read_text())["eval"]["rnn_acc@10"] for s in (0, 1)]
    assert abs(sum(curves["NextLat d=1, dynamics as RNN"]["mean"]) / 10 - sum(rnn) / 2) < 1e-5
    assert "rnn_acc@10" in final and (out / "a5_accuracy_vs_length.png").stat().st_size > 0

    # Results copied from another machine without their checkpoints: the table keeps every seed, the figure
    # draws the runs it can load, and says which it left out.
    shutil.rmtree(out / "nl" / "seed_1" / "checkpoints")
    again = report("a5", "cpu", [0, 1], out)
    assert [r["seeds"] for r in again["rows"]] == [[0, 1], [0, 1], [0, 1]]
    assert again["curves"]["NextLat d=1, dynamics as RNN"]["n"] == 1 and again["curves"]["GPT"]["n"] == 2
    assert "seed_1: no checkpoint" in capsys.readouterr().out


def test_manhattan_experiment_on_a_given_graph_draws_maps(tmp_path, monkeypatch, capsys):
    """`nextlat experiment manhattan --graph FILE`: every run trains on that graph; each arm gets a map figure."""
    from nextlat.registry import config_from_dict
    from nextlat.tasks.manhattan.graph import procedural_city

    graph = procedural_city(5, 4, seed=2).save(tmp_path / "town.json")
    recipe = tmp_path / "mh.yaml"
    recipe.write_text(config_from_dict({
        "run_name": "mh-tiny", "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "max_seq_len": 64},
        "objective": {"name": "next_latent", "horizon": 2, "lambda_h": 1.0, "lambda_kl": 0.1},
        "task": {"name": "manhattan", "num_train_walks": 100, "seq_len": 32, "eval_next_token": 10, "eval_valid": 5,
                 "eval_compression": 2, "compression_suffixes": 3, "eval_rank_seqs": 2, "rank_tokens": 32,
                 "eval_detour": 5, "max_len": 30},
        "train": {"steps": 2, "batch_size": 4, "progress": False, "device": "cpu", "precision": "fp32"},
    }).to_yaml())
    base = get_experiment("manhattan")
    arms = lambda scale: [Arm("GPT", "gpt", str(recipe), ("objective.name=next_token",)),  # noqa: E731
                          Arm("NextLat d=8", "nl", str(recipe))]
    register(monkeypatch, Experiment("manhattan", arms, base.metrics, base.paper, figures=base.figures))
    out = tmp_path / "exp"
    assert main(["experiment", "manhattan", "--seeds", "1", "--graph", str(graph), "--out", str(out)]) == 0
    import yaml

    assert yaml.safe_load((out / "gpt" / "seed_0" / "config.yaml").read_text())["task"]["graph"] == str(graph.resolve())
    result = json.loads((out / "results.json").read_text())
    assert set(result["maps"]) == {"GPT", "NextLat d=8"}
    assert (out / "map_gpt.png").stat().st_size > 0 and (out / "map_nl.png").stat().st_size > 0
    assert "| NextLat d=8 | 1 |" in (out / "results.md").read_text()
    # Without --out, runs on a given graph get their own folder, apart from the procedural city's runs.
    monkeypatch.chdir(tmp_path)
    assert main(["experiment", "manhattan", "--seeds", "1", "--graph", str(graph), "--report"]) == 2
    assert "runs/experiments/manhattan-cpu-town" in capsys.readouterr().err
    assert main(["experiment", "a5", "--graph", str(graph)]) == 2
    assert main(["experiment", "manhattan", "--graph", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_interrupted_experiment_resumes_runs_exactly(tiny_experiment, tmp_path):
    """A run stopped after a checkpoint continues from it when the experiment is started again, and ends where an
    uninterrupted run ends.

    Exact across processes on one machine: every run is a subprocess with one torch thread (train.threads=1), so
    each step runs the same kernels in the same order whichever process runs it."""
    out, ref = tmp_path / "exp", tmp_path / "ref"
    run_experiment("tiny", seeds=[0], out=out, overrides=["train.steps=2", "train.ckpt_every=2", "train.threads=1"])
    for slug in ("gpt", "nl"):
        (out / slug / "seed_0" / "results.json").unlink()  # as if killed after the step-2 checkpoint
    run_experiment("tiny", seeds=[0], out=out, overrides=["train.steps=4", "train.ckpt_every=2", "train.threads=1"])
    run_experiment("tiny", seeds=[0], out=ref, overrides=["train.steps=4", "train.ckpt_every=2", "train.threads=1"])
    for slug in ("gpt", "nl"):
        log = (out / slug / "seed_0" / "train.log").read_text()
        assert "steps 2->4" in log
        steps = [json.loads(line)["step"] for line in (out / slug / "seed_0" / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "train"]
        assert steps == [1, 2, 3, 4]
        got, want = (json.loads((d / slug / "seed_0" / "results.json").read_text()) for d in (out, ref))
        assert got["eval"] == want["eval"]


def test_run_jobs_puts_one_job_on_each_device(tmp_path, monkeypatch):
    """--devices: as many jobs at once as devices, each started with its own CUDA_VISIBLE_DEVICES."""
    import subprocess
    from pathlib import Path

    from nextlat.experiments import sweep

    started: list[str] = []

    class Done:
        returncode = 0

        def __init__(self, cmd, env=None, **kw):
            started.append(env["CUDA_VISIBLE_DEVICES"])
            (Path(cmd[cmd.index("--out") + 1]) / "results.json").write_text("{}")

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Done)
    monkeypatch.setattr(sweep.time, "sleep", lambda s: None)
    jobs = [Job(tmp_path / f"r{i}", "pathstar-demo", i) for i in range(3)]
    assert sweep.run_jobs(jobs, devices=["2", "5"]) == []
    assert started == ["2", "5", "2"]


def test_lm_report_tabulates_probes_of_every_seed_and_draws_them_relative_to_gpt(tmp_path, capsys):
    """The lm experiment's table and figure from fake finished runs whose probes are cached (nothing is loaded or
    fitted): every seed's value, mean ± std, and each arm's probe CE minus GPT's of the same seed."""
    from nextlat.analysis.probes import ProbeSettings
    from nextlat.experiments.lm import PROBES_FILE, corpus_task_overrides

    settings = ProbeSettings()
    ks = list(settings.ks)
    out = tmp_path / "exp"
    gain = {"next-token": 0.0, "next-latent-d1": 0.0, "next-latent-d8": 0.1, "mtp-d8": 0.05}
    config = registry.load_config("lm-cpu-next-token").to_yaml()
    for slug, g in gain.items():
        for s in (0, 1):
            run = out / slug / f"seed_{s}"
            run.mkdir(parents=True)
            (run / "config.yaml").write_text(config)
            (run / "results.json").write_text(json.dumps({"step": 400, "eval": {"val_ppl": 40.0 + s + g}}))
            ce = [3.0 + 0.1 * k + 0.01 * s - g * k / 20 for k in ks]  # the gain grows with k
            (run / PROBES_FILE).write_text(json.dumps({
                "settings": settings.to_dict(), "step": 400, "ks": ks, "ce": ce, "acc": [0.1] * len(ks),
                "unigram_ce": [6.0] * len(ks), "eff_rank": 50.0 + s, "head_ce": 2.9}))
    ref = tmp_path / "smollm2"
    (out / "reference-smollm2.json").write_text(json.dumps({
        "reference": str(ref.resolve()), "settings": settings.to_dict(),
        "task_overrides": corpus_task_overrides(out / "next-token" / "seed_0"), "vocab_size": 49152, "d_model": 576,
        "classes": 1024, "ks": ks, "ce": [2.0 + 0.05 * k for k in ks], "acc": [0.3] * len(ks),
        "head_ce": 1.9, "eff_rank": 80.0, "unigram_ce": [6.5] * len(ks)}))

    result = report("lm", "cpu", [0, 1], out, {"reference": str(ref), "probe": []})
    rows = {r["label"]: r for r in result["rows"]}
    assert list(rows) == ["GPT", "NextLat d=1", "NextLat d=8", "MTP d=8"]
    nl8 = rows["NextLat d=8"]["metrics"]
    assert nl8["probe_ce_20"]["per_seed"] == pytest.approx([5.0 - 0.1, 5.01 - 0.1])
    assert nl8["probe_ce_20"]["mean"] == pytest.approx(4.905) and nl8["eff_rank"]["per_seed"] == [50.0, 51.0]
    assert nl8["val_ppl"]["per_seed"] == pytest.approx([40.1, 41.1])
    rel = result["probe_curves"]["relative"]
    assert set(rel) == {"NextLat d=1", "NextLat d=8", "MTP d=8"}  # GPT is the zero line
    assert rel["NextLat d=8"]["mean"][ks.index(20)] == pytest.approx(-0.1)
    assert rel["MTP d=8"]["mean"][ks.index(10)] == pytest.approx(-0.025) and rel["MTP d=8"]["n"] == 2
    assert result["reference"]["ce"][0] == pytest.approx(2.05)
    assert (out / "lm_probes.png").stat().st_size > 0 and (out / "lm.png").stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "| NextLat d=8 | 2 | 40.600 ± 0.707 [40.100, 41.100] |" in md
    assert "| NextLat d=8 | 2 | -0.005 ± 0.000 | -0.010 ± 0.000 | -0.025 ± 0.000 | -0.050 ± 0.000 | -0.100 ± 0.000 |" in md
    assert "Reference" in md and "only the shape over k compares" in md
    with pytest.raises(ConfigError, match="takes no option graph"):
        report("lm", "cpu", [0, 1], out, {"graph": "x"})


def test_lm_corpus_option_sets_files_and_folder(tmp_path, monkeypatch):
    from nextlat.experiments.lm import corpus_overrides

    assert corpus_overrides("pystdlib") == ([], "")
    text = tmp_path / "tales.txt"
    text.write_text("one\n\ntwo\n")
    sets, tag = corpus_overrides(str(text))
    cfg = registry.load_config("lm-cpu-next-token", sets)
    assert cfg.task.files == [str(text.resolve())] and cfg.task.doc_separator == "\n\n" and tag == "tales"
    sets, _ = corpus_overrides(str(tmp_path))  # a folder: one document per file
    assert registry.load_config("lm-cpu-next-token", sets).task.doc_separator == ""
    sets, tag = corpus_overrides(str(tmp_path / "books" / "*.txt"))  # a pattern: one document per file
    assert tag == "books" and registry.load_config("lm-cpu-next-token", sets).task.files == [
        str(tmp_path / "books" / "*.txt")]
    monkeypatch.chdir(tmp_path)  # no shared data folder next to it
    with pytest.raises(ConfigError, match="TinyStories sample"):
        corpus_overrides("stories")
    with pytest.raises(ConfigError, match="no such file"):
        corpus_overrides("nothing-here.txt")
    assert main(["experiment", "countdown", "--corpus", "stories"]) == 2
