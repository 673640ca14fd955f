"""k-ahead linear probes and effective rank (nextlat.analysis.probes), on states built to have a known answer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nextlat.analysis.probes import (
    ProbeSettings,
    States,
    class_map,
    effective_rank,
    fit_probes,
    future_targets,
    parse_probe_settings,
)
from nextlat.config import ConfigError
from nextlat.data import IGNORE

E = 0  # the EOS id of the hand-made streams


def test_future_targets_stay_inside_the_document_and_the_stream():
    stream = torch.tensor([5, 6, E, 7, 8, 9, E, 1, 2], dtype=torch.uint16)
    y = future_targets(stream, torch.tensor([0, 4]), 4, (1, 2, 3), E)  # (2 windows, 4 positions, 3 offsets)
    X = IGNORE
    assert y[0].tolist() == [[6, E, X],   # x=5: its document's EOS is a target, the next document is not
                             [E, X, X],   # x=6
                             [X, X, X],   # x=EOS: nothing of its document lies ahead
                             [8, 9, E]]   # x=7: targets past the window's end come from the stream
    assert y[1].tolist() == [[9, E, X],   # window 2 starts at x=8
                             [E, X, X],
                             [X, X, X],   # x=EOS
                             [2, X, X]]   # x=1: x_{t+2} would be past the end of the stream


def _reference_targets(stream: list[int], starts: list[int], length: int, ks, eos_opens: bool, lead: int):
    """future_targets by the definition, one pair at a time: x is the stream behind ``lead`` EOS tokens; a pair
    (t, t + k) is kept when x_{t+k} exists and belongs to x_t's document."""
    x = [E] * lead + stream
    out = []
    for s in starts:
        rows = []
        for t in range(s, s + length):
            row = []
            for k in ks:
                between = x[t + 1 : t + k] if eos_opens else x[t : t + k]  # where a document boundary would lie
                row.append(x[t + k] if t + k < len(x) and E not in between else IGNORE)
            rows.append(row)
        out.append(rows)
    return out


@pytest.mark.parametrize("eos_opens, lead", [(True, 1), (True, 0), (False, 0)])
def test_future_targets_match_the_definition_under_both_eos_conventions(eos_opens, lead):
    gen = torch.Generator().manual_seed(3)
    stream = torch.randint(1, 5, (300,), generator=gen)
    stream[torch.rand(300, generator=gen) < 0.15] = E
    length, ks = 16, (1, 2, 3, 7)
    starts = list(range(0, 300 + lead - length, length))
    y = future_targets(stream.to(torch.uint16), torch.tensor(starts), length, ks, E, eos_opens=eos_opens, lead=lead)
    assert y.tolist() == _reference_targets(stream.tolist(), starts, length, ks, eos_opens, lead)


def test_future_targets_when_an_eos_opens_each_document():
    """eos_position: start, as PackedWindows cuts [EOS] + stream: the targets of position t are those of the model's
    training (every k = 1 target is scored, an EOS is the first token of its document)."""
    stream = torch.tensor([5, 6, E, 7, 8, 9, E, 1, 2], dtype=torch.uint16)  # x = [E, 5, 6, E, 7, 8, 9, E, 1, 2]
    y = future_targets(stream, torch.tensor([0, 4]), 4, (1, 2, 3), E, eos_opens=True, lead=1)
    X = IGNORE
    assert y[0].tolist() == [[5, 6, E],   # x=EOS (virtual): the first document and the next one's EOS
                             [6, E, X],   # x=5
                             [E, X, X],   # x=6: the next document's EOS is the last target
                             [7, 8, 9]]   # x=EOS opens the second document
    assert y[1].tolist() == [[8, 9, E],   # window 2 starts at x=7
                             [9, E, X],
                             [E, X, X],
                             [1, 2, X]]   # x=EOS: x_{t+3} would be past the end of the stream


def _one_hot_states(n: int, vocab: int, ks: tuple[int, ...], gen: torch.Generator, noise: float = 0.1) -> States:
    """States whose k-th block is the one-hot of the token k ahead (plus noise): every probe is a linear read-out."""
    y = torch.randint(vocab, (n, len(ks)), generator=gen)
    y[torch.rand(n, len(ks), generator=gen) < 0.1] = IGNORE  # some pairs cross a document end
    h = torch.cat([F.one_hot(y[:, j].clamp(min=0), vocab).float() for j in range(len(ks))], 1)  # (n, K * V)
    h = h + noise * torch.randn(h.shape, generator=gen)
    return States(h, y, ks)


def test_a_probe_reads_out_a_linearly_encoded_future_token():
    gen = torch.Generator().manual_seed(0)
    ks = (1, 2, 5)
    fit, held = _one_hot_states(4000, 16, ks, gen), _one_hot_states(2000, 16, ks, gen)
    res = fit_probes(fit, held, 16, ProbeSettings(ks=ks, steps=150, batch_size=256, lr=3e-2))
    assert res.ks == list(ks) and res.classes == 16
    assert min(res.acc) > 0.995, res.acc
    assert max(res.ce) < 0.05, res.ce
    assert all(abs(u - math.log(16)) < 0.05 for u in res.unigram_ce)  # uniform targets: ignoring h costs log V
    assert res.n_eval == [int((held.targets[:, j] != IGNORE).sum()) for j in range(3)]


def test_a_probe_on_noise_stays_at_chance():
    """Targets independent of the states: held-out hits are Binomial(n, 1/V) whatever the probe learned, so the
    accuracy lies within 4 standard deviations of 1/V, and the CE cannot beat log V by more than noise."""
    gen = torch.Generator().manual_seed(1)
    V, ks = 8, (1, 3)
    fit = States(torch.randn(3000, 32, generator=gen), torch.randint(V, (3000, 2), generator=gen), ks)
    held = States(torch.randn(3000, 32, generator=gen), torch.randint(V, (3000, 2), generator=gen), ks)
    res = fit_probes(fit, held, V, ProbeSettings(ks=ks, steps=150, batch_size=256, lr=3e-2))
    p = 1 / V
    for acc, n, ce in zip(res.acc, res.n_eval, res.ce):
        assert abs(acc - p) < 4 * math.sqrt(p * (1 - p) / n), (acc, n)
        assert ce > math.log(V) - 4 * math.sqrt(2 / n), ce


def test_probes_stepped_together_match_a_probe_fitted_alone():
    gen = torch.Generator().manual_seed(2)
    both = _one_hot_states(1000, 8, (1, 2), gen, noise=1.0)
    held = _one_hot_states(500, 8, (1, 2), gen, noise=1.0)
    settings = ProbeSettings(ks=(1, 2), steps=30, batch_size=128)
    together = fit_probes(both, held, 8, settings)
    alone = fit_probes(States(both.h, both.targets[:, 1:], (2,)), States(held.h, held.targets[:, 1:], (2,)), 8,
                       ProbeSettings(ks=(2,), steps=30, batch_size=128))
    assert together.ce[1] == pytest.approx(alone.ce[0], abs=1e-5)
    assert together.acc[1] == alone.acc[0]


def test_a_large_vocabulary_is_capped_to_its_most_frequent_targets():
    y = torch.tensor([[3], [3], [3], [7], [7], [1], [9], [IGNORE]])
    m = class_map(y, 10, 3)  # classes: 3 -> 0, 7 -> 1, everything else -> 2
    assert m[3] == 0 and m[7] == 1 and m[1] == m[9] == m[0] == 2
    assert class_map(y, 10, 10) is None  # the vocabulary fits: ids are the classes
    gen = torch.Generator().manual_seed(3)
    fit, held = _one_hot_states(500, 12, (1,), gen), _one_hot_states(200, 12, (1,), gen)
    res = fit_probes(fit, held, 12, ProbeSettings(ks=(1,), steps=5, batch_size=64, vocab_cap=4))
    assert res.classes == 4


def test_effective_rank_of_equal_singular_values_is_the_rank():
    gen = torch.Generator().manual_seed(4)
    for r in (1, 3, 7):
        u, _ = torch.linalg.qr(torch.randn(200, r, generator=gen, dtype=torch.float64))  # (200, r) orthonormal
        v, _ = torch.linalg.qr(torch.randn(48, r, generator=gen, dtype=torch.float64))
        assert effective_rank(2.5 * u @ v.T) == pytest.approx(r, abs=1e-9)
    s = torch.tensor([3.0, 1.0], dtype=torch.float64)  # unequal: exp(entropy of (3/4, 1/4))
    assert effective_rank(torch.diag(s)) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))


def test_probe_settings_parse_and_refuse_bad_values():
    s = parse_probe_settings(["steps=20", "ks=1,2,4", "lr=0.5", "probe.fit_tokens=512"])
    assert (s.steps, s.ks, s.lr, s.fit_tokens) == (20, (1, 2, 4), 0.5, 512)
    for bad, match in [("steps=0", "steps=0"), ("nope=1", "KEY one of"), ("ks=1,1", "distinct"),
                       ("lr=x", "not a valid lr")]:
        with pytest.raises(ConfigError, match=match):
            parse_probe_settings([bad])


# ----------------------------------------------------------------------------- a run folder


SEP = "\n---\n"


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A tiny text run (3 steps) whose final evaluation scores every validation window."""
    import random

    from nextlat.registry import config_from_dict
    from nextlat.training.loop import Trainer

    tmp = tmp_path_factory.mktemp("probes")
    rng = random.Random(0)
    words = "the cat sat on a mat and then it ran far away home".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(10, 40))) for _ in range(60)]
    (tmp / "corpus.txt").write_text(SEP.join(docs))
    cfg = config_from_dict({
        "run_name": "tiny-text", "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "max_seq_len": 32},
        "objective": {"name": "next_token"},
        "task": {"name": "text", "files": [str(tmp / "corpus.txt")], "doc_separator": SEP, "vocab_size": 300,
                 "seq_len": 32, "val_fraction": 0.2, "cache_dir": str(tmp / "cache"), "eval_tokens": 0},
        "train": {"steps": 3, "batch_size": 4, "lr": 1e-3, "log_every": 1, "progress": False, "device": "cpu",
                  "precision": "fp32"},
    })
    results = Trainer(cfg, out_dir=tmp / "run").fit()
    return tmp / "run", results


TINY = ProbeSettings(ks=(1, 2, 3), fit_tokens=512, eval_tokens=1 << 20, steps=5, batch_size=64, window_batch=4)


def test_probe_run_scores_the_pairs_the_task_evaluates(text_run):
    """At k = 1 the held-out pairs are exactly the targets ``evaluate`` scores (all windows here), so the model's own
    head on them reproduces the run's validation loss: document boundaries are handled as in training."""
    from nextlat.analysis.probes import probe_run

    run, results = text_run
    r = probe_run(run, TINY, device="cpu")
    assert r["head_ce"] == pytest.approx(results["eval"]["val_loss"], rel=1e-5)
    assert r["n_eval"][0] == results["eval"]["val_tokens"]
    assert r["n_eval"][0] > r["n_eval"][1] > r["n_eval"][2]  # longer offsets cross more document ends
    assert r["ks"] == [1, 2, 3] and r["classes"] == 300 and r["step"] == 3 and 1 <= r["eff_rank"] <= 32


def test_cli_probe_prints_a_row_per_offset(text_run, tmp_path, capsys):
    import json

    from nextlat.cli import main

    run, _ = text_run
    assert main(["probe", str(run), "--device", "cpu", "--probe", "ks=1,4", "--probe", "steps=3",
                 "--probe", "fit_tokens=256", "--probe", "eval_tokens=256", "--json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "   1  " in out and "   4  " in out and "effective rank" in out
    assert json.loads((tmp_path / "p.json").read_text())["ks"] == [1, 4]
    assert main(["probe", str(run), "--probe", "steps=0"]) == 2
