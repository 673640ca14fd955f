"""Language modelling with k-ahead probes: how far ahead each objective's hidden states see (arXiv 2511.05963).

Arms: GPT, NextLat d=1, NextLat d=8, MTP d=8, on one corpus (``--corpus``: Python's standard library by default,
the shared TinyStories sample, or any text). After training, every run's frozen model gets the probes of
:mod:`nextlat.analysis.probes` (one linear probe per k = 1..20 predicting x_{t+k} from h_t, fitted on the
training split, scored on the held-out split), whose results are cached in the run folder (``probes.json``),
and the effective rank of its held-out states. The table: validation perplexity, probe CE at k = 1, 2, 5,
10, 20 and effective rank, every seed and mean ± std. The figure: each arm's probe CE minus GPT's probe CE
of the same seed, against k (a difference in nats, not a ratio), beside the absolute curves.

``--reference RUN`` adds a pretrained model (e.g. an ``nextlat import-hf`` run) probed by the same function on
the same documents, in its own tokenizer: its CE is over another vocabulary (pooled to ``vocab_cap``
classes), so only the shape of its curve compares.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path
from typing import Any

from nextlat.config import ConfigError
from nextlat.experiments.base import Arm, Experiment, Metric, objective_arms
from nextlat.experiments.sweep import finished_runs

STORIES = "../shared/data/text/tinystories_valid_sample.txt"
"""The TinyStories sample of the shared data folder, relative to the folder the experiment runs from (the
repository root), as in the text-tinystories recipes. Not part of the package: ``--corpus stories`` needs it."""
CORPORA = ("pystdlib", "stories")
TABLE_KS = (1, 2, 5, 10, 20)
PROBES_FILE = "probes.json"


def arms(scale: str) -> list[Arm]:
    return objective_arms("lm", scale, {"next_token": [], "next_latent": [1, 8], "mtp": [8]})


def corpus_overrides(corpus: str) -> tuple[list[str], str]:
    """(``--set`` overrides for every run, folder tag) of ``--corpus``: ``pystdlib`` (the recipes' own corpus,
    no overrides), ``stories`` (the shared TinyStories sample, a document per paragraph) or a path: a file is
    split into documents at blank lines, a folder or glob pattern gives one document per file."""
    if corpus == "pystdlib":
        return [], ""
    pattern = False
    if corpus == "stories":
        path, tag = Path(STORIES), "stories"
        if not path.is_file():
            raise ConfigError(f"--corpus stories: the TinyStories sample {STORIES} is not there (relative to "
                              f"{Path.cwd()}); run from the repository root next to the shared data folder, or "
                              "pass the file as --corpus FILE")
        sep = "\n\n"
    else:
        path = Path(corpus).expanduser()
        pattern = any(c in corpus for c in "*?[")
        # the folder tag: the file's or folder's name (a pattern's last plain folder), in safe characters
        name = next((p for p in reversed(path.parts) if not any(c in p for c in "*?[")), "") if pattern else path.stem
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).stem).strip("_.") or "corpus"
        if pattern:
            sep = ""
        elif path.is_file():
            sep = "\n\n"
        elif path.is_dir():
            sep = ""
        else:
            raise ConfigError(f"--corpus {corpus!r}: not one of {', '.join(CORPORA)} and no such file or folder")
    entry = os.path.abspath(path) if pattern else str(path.resolve())
    return [f"task.files=[{json.dumps(entry)}]", f"task.doc_separator={json.dumps(sep)}"], tag


def probe_settings(probe: list[str] | tuple[str, ...] = ()):
    from nextlat.analysis.probes import parse_probe_settings

    return parse_probe_settings(list(probe))


def check_options(reference: str | None = None, probe: list[str] | tuple[str, ...] = ()) -> None:
    """Refuse bad options before anything trains: probe settings, and a reference that is no run or checkpoint."""
    from nextlat.training.checkpoint import resolve_checkpoint

    probe_settings(probe)
    if reference:
        resolve_checkpoint(reference)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_probes(run: Path, settings) -> dict[str, Any] | None:
    """The probes of a finished run (cached in ``probes.json`` for these settings and the run's final step);
    None for a run whose checkpoints are gone."""
    from nextlat.analysis.probes import probe_run
    from nextlat.training.checkpoint import CheckpointError, atomic_write_text, resolve_checkpoint

    step = json.loads((run / "results.json").read_text())["step"]
    cached = _read(run / PROBES_FILE)
    if cached is not None and cached.get("settings") == settings.to_dict() and cached.get("step") == step:
        return cached
    try:
        resolve_checkpoint(run)
    except CheckpointError:
        print(f"[experiment] {run}: no checkpoint, no probes", flush=True)
        return None
    print(f"[experiment] probing {run}", flush=True)
    result = probe_run(run, settings)
    atomic_write_text(run / PROBES_FILE, json.dumps(result, indent=1) + "\n")
    return result


def run_metrics(run: Path, *, reference: str | None = None, probe: list[str] | tuple[str, ...] = ()) -> dict[str, float]:
    from nextlat.analysis.probes import probe_metrics

    result = run_probes(run, probe_settings(probe))
    return {} if result is None else probe_metrics(result, TABLE_KS)


def corpus_task_overrides(run: Path) -> list[str]:
    """``task.KEY=VALUE`` that make another model's text task read the documents of ``run``, split the same way
    (the split depends on the documents, ``val_fraction`` and ``split_seed``, never on the tokenizer)."""
    from nextlat.training.checkpoint import read_run_config

    t = read_run_config(run / "config.yaml").task
    return [f"task.files={json.dumps(list(t.files))}", f"task.doc_separator={json.dumps(t.doc_separator)}",
            f"task.max_bytes={t.max_bytes}", f"task.val_fraction={t.val_fraction}", f"task.split_seed={t.split_seed}",
            f"task.seq_len={t.seq_len}"]


def reference_probes(out: Path, reference: str, like: Path, settings) -> dict[str, Any]:
    """Probes of the reference model on the documents of run ``like``, cached in the experiment folder."""
    from nextlat.analysis.probes import probe_run
    from nextlat.training.checkpoint import atomic_write_text

    overrides = corpus_task_overrides(like)
    where = str(Path(reference).resolve())
    cache = out / f"reference-{Path(where).name}.json"
    cached = _read(cache)
    if (cached is not None and cached.get("settings") == settings.to_dict()
            and cached.get("task_overrides") == overrides and cached.get("reference") == where):
        return cached
    print(f"[experiment] probing the reference {where}", flush=True)
    result = {"reference": where, **probe_run(where, settings, task_overrides=overrides)}
    atomic_write_text(cache, json.dumps(result, indent=1) + "\n")
    return result


def _mean_std(rows: list[list[float]]) -> tuple[list[float], list[float]]:
    cols = list(zip(*rows))
    return ([statistics.fmean(c) for c in cols],
            [statistics.stdev(c) if len(c) > 1 else 0.0 for c in cols])


def probe_curves(per_arm: dict[str, dict[int, dict[str, Any]]], baseline: str = "GPT") -> dict[str, Any]:
    """Curves over k from probe results (arm label -> seed -> :func:`probe_run` result): ``absolute`` (probe CE,
    mean and std over seeds) and ``relative`` (CE_arm(k) - CE_baseline(k) of the same seed, mean and std over
    the seeds both have)."""
    absolute, relative = {}, {}
    base = per_arm.get(baseline, {})
    for label, runs in per_arm.items():
        if not runs:
            continue
        ks = runs[min(runs)]["ks"]
        mean, std = _mean_std([r["ce"] for r in runs.values()])
        absolute[label] = {"x": ks, "mean": mean, "std": std, "n": len(runs), "seeds": sorted(runs)}
        paired = sorted(s for s in runs if s in base and base[s]["ks"] == ks)
        if label != baseline and paired:
            diffs = [[a - b for a, b in zip(runs[s]["ce"], base[s]["ce"])] for s in paired]
            mean, std = _mean_std(diffs)
            relative[label] = {"x": ks, "mean": mean, "std": std, "n": len(paired), "seeds": paired}
    return {"absolute": absolute, "relative": relative}


def _fmt(v: float) -> str:
    return "–" if v is None or v != v else f"{v:+.3f}"


def curve_notes(curves: dict[str, Any], settings, reference: dict[str, Any] | None = None) -> list[str]:
    """Lines for results.md: how the probes were fitted, the CE differences to GPT at the table's k, the
    reference."""
    s = settings
    lines = [f"Probes (nextlat.analysis.probes): one linear probe per k = {min(s.ks)}..{max(s.ks)} predicts "
             f"x_(t+k) from the frozen model's final hidden state h_t; fitted on {s.fit_tokens} states of the "
             f"training split ({s.steps} AdamW steps x {s.batch_size}, lr {s.lr:g} cosine, seed {s.seed}, the same "
             f"for every run), scored on {s.eval_tokens} states of the held-out split; pairs whose t + k leaves "
             "the document are left out. Probe CE in nats. Effective rank: exp of the entropy of the normalised "
             "singular values of the held-out states (N x D).", "",
             "Probe CE minus GPT's probe CE of the same seed (nats; negative: h_t predicts token t + k better "
             "than GPT's), mean ± std over seeds; figure lm_probes.png:", ""]
    ks = [k for k in TABLE_KS if k in s.ks]
    head = ["objective", "seeds", *[f"ΔCE k={k}" for k in ks]]
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for label, c in curves["relative"].items():
        cells = [label, str(c["n"])]
        for k in ks:
            j = c["x"].index(k)
            cells.append(f"{_fmt(c['mean'][j])} ± {c['std'][j]:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    if reference is not None:
        r = reference
        ce = ", ".join(f"k={k} {r['ce'][r['ks'].index(k)]:.3f}" for k in ks)
        lines += ["", f"Reference {r['reference']} (vocabulary {r['vocab_size']}, width {r['d_model']}), the same "
                      f"probes on the same documents in its own tokenizer, over {r['classes']} classes"
                      + (f" (its {r['classes'] - 1} most frequent fitting targets and one pooled class)"
                         if r["classes"] < r["vocab_size"] else "")
                      + f": probe CE {ce}; its own head's CE at k=1 {r['head_ce']:.3f}, effective rank "
                        f"{r['eff_rank']:.1f}. Another label space: only the shape over k compares."]
    return lines


def figures(out: Path, arms: list[Arm], seeds: list[int], *, reference: str | None = None,
            probe: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """lm_probes.png: probe CE relative to GPT's (same seed) against k, and the absolute probe CE per arm."""
    from nextlat.experiments.plots import plot_curve_panels

    settings = probe_settings(probe)
    per_arm: dict[str, dict[int, dict[str, Any]]] = {}
    for arm in arms:
        for run in finished_runs(out / arm.slug, seeds):
            result = run_probes(run, settings)
            if result is not None:
                per_arm.setdefault(arm.label, {})[int(run.name.removeprefix("seed_"))] = result
    if not per_arm:
        return {}
    curves = probe_curves(per_arm)
    colours = {arm.label: "k" if i == 0 else f"C{i - 1}" for i, arm in enumerate(arms)}  # GPT black, as its zero line
    for group in curves.values():
        for label, c in group.items():
            c["color"] = colours.get(label)
    ref = None
    if reference:
        like = next(run for arm in arms for run in finished_runs(out / arm.slug, seeds))
        ref = reference_probes(out, reference, like, settings)
    first = next(iter(next(iter(per_arm.values())).values()))
    absolute = dict(curves["absolute"])
    absolute["unigram (ignores h_t)"] = {"x": first["ks"], "mean": first["unigram_ce"], "style": ":", "color": "0.5"}
    if ref is not None:
        absolute[f"reference {Path(ref['reference']).name} (own tokenizer, right axis)"] = {
            "x": ref["ks"], "mean": ref["ce"], "style": "--", "right": True, "color": "C5"}
    panels = [{"curves": curves["relative"], "xlabel": "k (probe predicts token t + k from h_t)",
               "ylabel": "probe CE - GPT's probe CE (nats)", "hline": (0.0, "GPT"),
               "title": "relative to GPT, same seed (mean ± std over seeds)"},
              {"curves": absolute, "xlabel": "k", "ylabel": "held-out probe CE (nats)",
               "right_label": "reference probe CE (nats, other vocabulary)", "title": "probe cross-entropy"}]
    plot_curve_panels(panels, out / "lm_probes.png", title="k-ahead linear probes of the final hidden state")
    result: dict[str, Any] = {"probe_settings": settings.to_dict(), "probe_curves": curves,
                              "notes": curve_notes(curves, settings, ref)}
    if ref is not None:
        result["reference"] = {k: ref[k] for k in ("reference", "vocab_size", "d_model", "classes", "ks", "ce",
                                                   "acc", "head_ce", "eff_rank", "unigram_ce")}
    return result


EXPERIMENT = Experiment(
    "lm", arms,
    [Metric("val_ppl", "val perplexity", percent=False),
     *[Metric(f"probe_ce_{k}", f"probe CE k={k}", percent=False) for k in TABLE_KS],
     Metric("eff_rank", "effective rank", percent=False)],
    paper_note="Paper: 8x768 models on TinyStories, 100k steps x 256 sequences, NextLat at d = 1 and 8; its probe "
               "figure has NextLat at GPT's level for k = 1 and below it for larger k (no table). This CPU scale: "
               "4 x 128 models, 400 steps x 16 x 256 tokens, on the corpus of --corpus (default: the .py files "
               "of Python's standard library).",
    figures=figures,
    scales=("cpu",),
    run_metrics=run_metrics,
    options=("reference", "probe"),
)
