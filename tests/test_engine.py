"""KV cache, cached decoding and speculative decoding: the equivalences the engine relies on.

The models here are random and run in float64. Greedy identity compares argmaxes of logits computed by
different kernel shapes (cached vs uncached, k-token verify vs 1-token steps); random models have top-2
logit gaps down to ~1e-5, which float32 rounding (1e-6..1e-5, BLAS dependent) could flip on another CPU.
In float64 the paths agree to ~1e-14, so every comparison below is decided by the code, not the BLAS.
"""

from __future__ import annotations

import itertools
import math
import shutil

import pytest
import torch

from nextlat.config import ModelConfig
from nextlat.decoding import engine
from nextlat.decoding.drafters import MTPDrafter, NextLatDrafter
from nextlat.decoding.engine import CachedTarget, RecomputeTarget, Stepper, decode, speculative_decode
from nextlat.decoding.reference import generate
from nextlat.decoding.sampling import Sampling
from nextlat.model import Transformer
from nextlat.registry import build_objective, objective_config


def tiny(seed: int, vocab: int = 40, std: float = 0.02, layers: int = 2) -> tuple[Transformer, NextLatDrafter]:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=vocab, n_layer=layers, n_head=2, d_model=32, max_seq_len=160,
                                    init_std=std)).eval().double()
    objective = build_objective(objective_config("next_latent"), model).eval().double()
    return model, NextLatDrafter(model, objective)


def tiny_mtp(seed: int, vocab: int = 40, std: float = 0.3, layers: int = 2, horizon: int = 3):
    """A random model with MTP heads 1..horizon and their drafter."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=vocab, n_layer=layers, n_head=2, d_model=32, max_seq_len=160,
                                    init_std=std)).eval().double()
    objective = build_objective(objective_config("mtp", horizon=horizon), model).eval().double()
    return model, MTPDrafter(model, objective)


def random_prompts(n: int, vocab: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(1, 15, (1,), generator=g)),), generator=g) for _ in range(n)]


def reference(model: Transformer, prompts, n: int, stop_id=None) -> list[list[int]]:
    out = []
    for p in prompts:
        new = generate(model, p[None], n)[0, len(p):].tolist()
        if stop_id is not None and stop_id in new:
            new = new[: new.index(stop_id) + 1]
        out.append(new)
    return out


def test_cached_logits_equal_uncached():
    model, _ = tiny(0)
    x = torch.randint(0, 40, (3, 24))
    full = model.logits(model(x)[0])
    cache = model.new_cache(3, 30)
    pieces = [model.logits(model(x[:, :10], cache=cache)[0])]
    for t in range(10, 24, 3):  # chunks of 3, then 2
        pieces.append(model.logits(model(x[:, t : t + 3], cache=cache)[0]))
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-12, rtol=1e-12)
    assert cache.lengths.tolist() == [24, 24, 24]


def test_uniform_and_ragged_caches_compute_the_same_states():
    """Rows of equal length write keys by slicing and a one-token step runs without a mask; rows of different
    lengths scatter by row and mask. Forcing the ragged path on equal rows must not change a state."""
    model, _ = tiny(5)
    x = torch.randint(0, 40, (3, 14))
    states = []
    for uniform in (True, False):
        cache = model.new_cache(3, 20)
        out = [model(x[:, :6], cache=cache)[0]]
        for t in range(6, 14):  # one token per step, as decoding does
            cache.uniform = uniform
            out.append(model(x[:, t : t + 1], cache=cache)[0])
        states.append(torch.cat(out, 1))
    torch.testing.assert_close(states[0], states[1], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(states[0], model(x)[0], atol=1e-12, rtol=1e-12)


def test_the_cache_knows_on_the_host_whether_its_rows_are_level():
    model, _ = tiny(6)
    target = CachedTarget(model, [torch.randint(0, 40, (n,)) for n in (4, 4)], 30)
    assert target.cache.uniform
    target.run(torch.randint(0, 40, (2, 3)))
    target.keep(torch.tensor([1, 3]), [1, 3])
    assert not target.cache.uniform
    target.run(torch.randint(0, 40, (2, 2)))
    target.keep(torch.tensor([2, 0]), [2, 0])  # lengths 4+1+2 and 4+3+0: level again
    assert target.cache.uniform and target.cache.end == 7
    assert not CachedTarget(model, [torch.randint(0, 40, (n,)) for n in (3, 5)], 30).cache.uniform
    cache = model.new_cache(2, 30)
    model(torch.randint(0, 40, (2, 6)), cache=cache)
    cache.rollback(torch.tensor([4, 4]))  # lengths read back: level
    assert cache.uniform
    cache.rollback(torch.tensor([2, 4]))
    assert not cache.uniform


@pytest.mark.parametrize("target_cls", [CachedTarget, RecomputeTarget])
def test_targets_with_prompts_of_different_lengths(target_cls):
    model, _ = tiny(1)
    prompts = [torch.randint(0, 40, (n,)) for n in (3, 11, 7)]
    target = target_cls(model, prompts, 24)
    new = torch.randint(0, 40, (3, 4))
    h_new = target.run(new)
    target.keep(torch.tensor([1, 4, 0]), [1, 4, 0])  # row 0 keeps one token, row 1 all, row 2 none
    more = torch.randint(0, 40, (3, 2))
    h_more = target.run(more)
    for b, p in enumerate(prompts):
        h, _ = model(p[None])
        torch.testing.assert_close(target.h_last[b], h[0, -1], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(h_new[b], model(torch.cat([p, new[b]])[None])[0][0, len(p):], atol=1e-12, rtol=1e-12)
        kept = torch.cat([p, new[b, : [1, 4, 0][b]], more[b]])
        torch.testing.assert_close(h_more[b], model(kept[None])[0][0, -2:], atol=1e-12, rtol=1e-12)


def test_rollback_forgets_rejected_tokens():
    model, _ = tiny(2)
    a, rejected, c = torch.randint(0, 40, (2, 8)), torch.randint(0, 40, (2, 5)), torch.randint(0, 40, (2, 4))
    cache = model.new_cache(2, 32)
    model(a, cache=cache)
    model(rejected, cache=cache)
    cache.rollback(torch.tensor([8, 8]))
    h_after, _ = model(c, cache=cache)
    h_clean, _ = model(torch.cat([a, c], 1))
    torch.testing.assert_close(h_after, h_clean[:, 8:], atol=1e-12, rtol=1e-12)
    # per-row rollback: row 1 keeps two of the rejected tokens
    cache = model.new_cache(2, 32)
    model(torch.cat([a, rejected], 1), cache=cache)
    cache.rollback(torch.tensor([8, 10]))
    h_after, _ = model(c, cache=cache)
    torch.testing.assert_close(h_after[0], model(torch.cat([a, c], 1))[0][0, 8:], atol=1e-12, rtol=1e-12)
    row1 = torch.cat([a[1], rejected[1, :2], c[1]])[None]
    torch.testing.assert_close(h_after[1], model(row1)[0][0, 10:], atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="cannot extend"):
        cache.rollback(torch.tensor([40, 40]))


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_decoding_equals_reference_generation(use_cache):
    model, _ = tiny(3)
    prompts = random_prompts(6, 40, seed=3)
    assert decode(model, prompts, 25, use_cache=use_cache).tokens == reference(model, prompts, 25)
    assert decode(model, prompts[:1], 25, use_cache=use_cache).tokens == reference(model, prompts[:1], 25)


def test_speculative_without_cache_is_identical_too():
    model, drafter = tiny(4, std=0.3)
    prompts = random_prompts(4, 40, seed=4)
    ref = reference(model, prompts, 20)
    for gamma in (1, 3, 8):
        assert speculative_decode(model, drafter, prompts, 20, gamma=gamma, use_cache=False).tokens == ref


@pytest.mark.parametrize("seed", range(4))
def test_speculative_greedy_is_token_identical_on_random_models(seed):
    model, drafter = tiny(seed, std=0.3 if seed % 2 else 0.02)  # larger init: less repetitive outputs
    prompts = random_prompts(5, 40, seed=100 + seed)
    stop = 5 if seed == 3 else None
    ref = reference(model, prompts, 30, stop_id=stop)
    for gamma, adaptive in [(1, None), (2, None), (4, None), (9, None), (6, 0.5), (6, 0.0)]:
        got = speculative_decode(model, drafter, prompts, 30, gamma=gamma, adaptive=adaptive, stop_id=stop)
        assert got.tokens == ref, (gamma, adaptive)
        single = speculative_decode(model, drafter, prompts[:1], 30, gamma=gamma, adaptive=adaptive, stop_id=stop)
        assert single.tokens == ref[:1], (gamma, adaptive)


@pytest.mark.parametrize("use_cache", [True, False])
def test_mtp_drafter_speculative_greedy_is_token_identical(use_cache):
    """MTP heads draft at most d tokens per round (a larger gamma is capped); the output is plain greedy's."""
    for seed in range(3):
        model, drafter = tiny_mtp(seed, std=0.3 if seed else 0.02)
        prompts = random_prompts(5, 40, seed=200 + seed)
        stop = 5 if seed == 2 else None
        ref = reference(model, prompts, 30, stop_id=stop)
        for gamma, adaptive in [(1, None), (3, None), (8, None), (3, 0.5)]:
            got = speculative_decode(model, drafter, prompts, 30, gamma=gamma, adaptive=adaptive, stop_id=stop,
                                     use_cache=use_cache)
            assert got.tokens == ref, (seed, gamma, adaptive)
            assert len(got.stats.position_tries) == min(gamma, 3)
            single = speculative_decode(model, drafter, prompts[:1], 30, gamma=gamma, stop_id=stop, use_cache=use_cache)
            assert single.tokens == ref[:1]


def test_mtp_drafter_drafts_are_all_accepted_when_heads_agree_with_the_target():
    """Zeroed final norms make every logit 0 under the backbone and under every head (argmax: token 0), so
    each round accepts all d drafts and emits d + 1 tokens per verify pass."""
    model, drafter = tiny_mtp(3, horizon=2)
    with torch.no_grad():
        for norm in [model.norm, *drafter.mtp.norms]:
            norm.weight.zero_()
    got = speculative_decode(model, drafter, [torch.tensor([1, 2, 3])], 21, gamma=5)
    assert got.tokens == [[0] * 21]
    assert got.stats.accepted_per_round == 2.0 and got.stats.forward_passes == 7


def test_speculative_greedy_on_a_trained_nextlat_model(tmp_path):
    from nextlat.registry import load_config
    from nextlat.training.loop import Trainer

    cfg = load_config("pathstar-demo", [
        "model.n_layer=2", "model.d_model=32", "model.n_head=2", "task.num_train=256", "task.num_test=16",
        "task.eval_examples=16", "train.steps=40", "train.batch_size=32", "train.lr=3e-3", "train.progress=false",
        "train.log_every=20", "train.eval_every=0",
    ])
    trainer = Trainer(cfg, out_dir=tmp_path / "run")
    trainer.fit()
    model, obj = trainer.model.eval().double(), trainer.objective.eval().double()  # float64: see the module docstring
    drafter = NextLatDrafter(model, obj)
    data = trainer.task.test_data()
    prompts = list(data.seqs[:8, : data.prompt_len])
    ref = reference(model, prompts, 12)
    for gamma in (2, 5):
        got = speculative_decode(model, drafter, prompts, 12, gamma=gamma)
        assert got.tokens == ref
        assert got.stats.accepted > 0  # a trained drafter gets some drafts accepted


def test_stepper_is_the_loop_of_decode():
    model, _ = tiny(9, std=0.3)
    prompts = torch.randint(0, 40, (3, 6))
    for use_cache in (True, False):
        stepper, chosen = Stepper(model, use_cache=use_cache), []
        logits = stepper.start(prompts, 20)
        for _ in range(5):
            chosen.append(logits.argmax(-1))
            logits = stepper.step(chosen[-1])
        assert torch.stack(chosen, 1).tolist() == decode(model, prompts, 5).tokens


def test_drafters_come_from_the_registry():
    from nextlat.registry import DRAFTERS, UnknownName, build_drafter

    model, _ = tiny(0)
    settings = {"next_latent": {"horizon": 2}, "mtp": {"horizon": 2}, "next_token": {}, "bst": {}}
    objectives = {name: build_objective(objective_config(name, **kw), model) for name, kw in settings.items()}
    assert sorted(DRAFTERS) == ["mtp", "next_latent"]
    assert isinstance(build_drafter(None, model, objectives["next_latent"]), NextLatDrafter)
    assert isinstance(build_drafter(None, model, objectives["mtp"]), MTPDrafter)
    assert build_drafter(None, model, objectives["mtp"]).max_draft == 2
    with pytest.raises(UnknownName, match=r"unknown drafter 'medusa' \(known: mtp, next_latent\)"):
        build_drafter("medusa", model, objectives["next_latent"])
    for name in ("next_token", "bst"):
        with pytest.raises(ValueError, match="no drafter of its own"):
            build_drafter(None, model, objectives[name])
    with pytest.raises(ValueError, match=r"objective\.dynamics"):
        build_drafter("next_latent", model, objectives["mtp"])
    with pytest.raises(ValueError, match=r"objective\.heads"):
        build_drafter("mtp", model, objectives["next_latent"])


def count_host_reads(monkeypatch) -> list[str]:
    """Patch the Tensor methods that read a value back to the host (each one waits for the device); record calls."""
    calls: list[str] = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, _name=name, _original=original, **kw):
            calls.append(_name)
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


def test_decoding_steps_do_not_read_back_from_the_device(monkeypatch):
    """Reads back are a fixed number per call (prefill checks, the final tokens), one per step only for stop_id,
    and one per speculative round; none grows with the model's layers or the batch."""
    model, drafter = tiny(10, std=0.3)
    prompts = random_prompts(3, 40, seed=10)
    calls = count_host_reads(monkeypatch)
    counts = {}
    for n in (5, 25):
        calls.clear()
        decode(model, prompts, n)
        counts["plain", n] = len(calls)
        calls.clear()
        decode(model, prompts, n, stop_id=41)  # never emitted: every step checks
        counts["stop", n] = len(calls)
        calls.clear()
        got = speculative_decode(model, drafter, prompts, n, gamma=3)
        counts["spec", n] = len(calls) - got.stats.forward_passes  # one per round
    assert counts["plain", 5] == counts["plain", 25] <= 4
    assert counts["stop", 25] - counts["stop", 5] == 20
    assert counts["spec", 5] == counts["spec", 25] <= 4


def test_stats_are_consistent():
    model, drafter = tiny(5, std=0.3)
    prompts = random_prompts(3, 40, seed=5)
    g = speculative_decode(model, drafter, prompts, 20, gamma=4)
    s = g.stats
    assert s.new_tokens == sum(len(t) for t in g.tokens) == 60
    assert s.accepted <= s.drafted <= 4 * s.rounds
    assert s.tokens_per_pass == pytest.approx(1 + s.accepted_per_round)
    assert s.position_tries[0] == s.rounds
    assert all(a <= t for a, t in zip(s.position_accepts, s.position_tries))
    assert sum(s.position_accepts) == s.accepted


def test_bad_arguments():
    model, drafter = tiny(6)
    with pytest.raises(ValueError, match="gamma"):
        speculative_decode(model, drafter, [torch.tensor([1, 2])], 5, gamma=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        decode(model, [torch.tensor([1, 2])], 500)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        decode(model, [torch.tensor([1, 99])], 5)
    with pytest.raises(ValueError, match="1-D"):
        decode(model, [torch.tensor([[1, 2]])], 5)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1.0)


# ----------------------------------------------------------------------------- sampling is lossless


@torch.no_grad()
def exact_distribution(model: Transformer, prompt: torch.Tensor, n: int, sampling: Sampling) -> dict[tuple, float]:
    """Probability of every n-token continuation under plain sampling (chain rule over the processed p)."""
    V = model.cfg.vocab_size
    seqs = torch.tensor(list(itertools.product(range(V), repeat=n)))  # (V^n, n)
    full = torch.cat([prompt.expand(len(seqs), -1), seqs], 1)
    logits = model.logits(model(full[:, :-1])[0])[:, len(prompt) - 1 :]  # (V^n, n, V)
    probs = sampling.probs(logits).gather(-1, seqs[..., None]).squeeze(-1).prod(-1)
    return {tuple(s.tolist()): float(p) for s, p in zip(seqs, probs)}


def chi_square(samples: list[list[int]], expected: dict[tuple, float]) -> tuple[float, int]:
    counts: dict[tuple, int] = {}
    for s in samples:
        counts[tuple(s)] = counts.get(tuple(s), 0) + 1
    n = len(samples)
    stat, cells = 0.0, 0
    for seq, p in expected.items():
        if p * n >= 5:  # pool rare outcomes (standard chi-square validity rule)
            stat += (counts.get(seq, 0) - p * n) ** 2 / (p * n)
            cells += 1
    rare_p = sum(p for p in expected.values() if p * n < 5)
    rare_obs = sum(c for seq, c in counts.items() if expected.get(seq, 0) * n < 5)
    if rare_p > 0:
        stat += (rare_obs - rare_p * n) ** 2 / (rare_p * n)
        cells += 1
    return stat, cells - 1


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square(df), Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def sampled_runs(model, drafter, prompt, n, sampling, total, batch=2000, **kw) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    out: list[list[int]] = []
    while len(out) < total:
        out += speculative_decode(model, drafter, [prompt] * batch, n, sampling=sampling, generator=g, **kw).tokens
    return out[:total]


@pytest.mark.parametrize("sampling", [Sampling(temperature=1.0), Sampling(temperature=0.8, top_k=3, top_p=0.9)])
def test_speculative_sampling_matches_plain_sampling(sampling):
    model, drafter = tiny(7, vocab=5, std=0.5, layers=1)
    prompt = torch.tensor([1, 3, 0])
    expected = exact_distribution(model, prompt, 3, sampling)
    samples = sampled_runs(model, drafter, prompt, 3, sampling, total=16000, gamma=3)
    stat, df = chi_square(samples, expected)
    assert stat < chi2_critical(df), (stat, df)
    # plain cached sampling passes the same test
    g = torch.Generator().manual_seed(99)
    plain = []
    while len(plain) < 16000:
        plain += decode(model, [prompt] * 2000, 3, sampling=sampling, generator=g).tokens
    stat_plain, df_plain = chi_square(plain, expected)
    assert stat_plain < chi2_critical(df_plain), (stat_plain, df_plain)


def test_mtp_speculative_sampling_matches_plain_sampling():
    """Drafts from heads that never see the pending token still give the plain sampling distribution."""
    model, drafter = tiny_mtp(8, vocab=5, std=0.5, layers=2, horizon=2)
    prompt, sampling = torch.tensor([1, 3, 0]), Sampling(temperature=1.0)
    expected = exact_distribution(model, prompt, 3, sampling)
    samples = sampled_runs(model, drafter, prompt, 3, sampling, total=16000, gamma=2)
    stat, df = chi_square(samples, expected)
    assert stat < chi2_critical(df), (stat, df)


def test_broken_acceptance_rule_is_detected(monkeypatch):
    """Accepting every draft (u = 0) samples the drafter's distribution: the test above must catch it."""
    model, drafter = tiny(7, vocab=5, std=0.5, layers=1)
    prompt, sampling = torch.tensor([1, 3, 0]), Sampling(temperature=1.0)
    expected = exact_distribution(model, prompt, 3, sampling)
    monkeypatch.setattr(engine.torch, "rand", lambda shape, generator=None, device=None: torch.zeros(shape))
    samples = sampled_runs(model, drafter, prompt, 3, sampling, total=16000, gamma=3)
    stat, df = chi_square(samples, expected)
    assert stat > chi2_critical(df), (stat, df)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_decoding_computes_what_eager_decoding_does():
    """``compile=True`` runs the decode steps as one graph with dynamic shapes: in float64 its logits equal eager
    decoding's at every step, its tokens are the same, and a growing cache does not recompile the graph."""
    from torch._dynamo.utils import counters

    model, _ = tiny(7, std=0.3)
    prompts = random_prompts(1, 40, seed=7)
    eager, compiled = Stepper(model), Stepper(model, compile=True)
    with torch.no_grad():
        a, b = eager.start(prompts), compiled.start(prompts)
        graphs = None
        for t in range(20):
            torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-12)
            tok = a.argmax(-1)
            a, b = eager.step(tok), compiled.step(tok)
            if t == 3:
                graphs = counters["stats"]["unique_graphs"]  # compiled by now, for the first and later lengths
        assert counters["stats"]["unique_graphs"] == graphs  # 16 more steps, each one key longer: no new graph
    assert decode(model, prompts, 12, compile=True).tokens == decode(model, prompts, 12).tokens
    # The module guards are skipped; a dtype change is still caught (by the KV cache's guards) and recompiled.
    model.float()
    eager, compiled = Stepper(model), Stepper(model, compile=True)
    with torch.no_grad():
        a, b = eager.start(prompts), compiled.start(prompts)
        for _ in range(3):
            assert b.dtype == torch.float32
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
            tok = a.argmax(-1)
            a, b = eager.step(tok), compiled.step(tok)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_decoding_keeps_each_models_graphs_apart():
    """Two models whose KV caches have the same layout (layers, KV heads, head width) but whose weights differ in
    shape: each compiled model runs its own graph. The module guards are skipped, so a graph shared between
    models would be run on the second model's weights with the first model's shapes."""
    prompts = random_prompts(2, 40, seed=3)
    for vocab, width, heads in ((40, 32, 2), (50, 64, 4)):
        torch.manual_seed(vocab)
        model = Transformer(ModelConfig(vocab_size=vocab, n_layer=2, n_head=heads, n_kv_head=2, head_dim=16,
                                        d_model=width, max_seq_len=64, init_std=0.3)).eval().double()
        assert decode(model, prompts, 6, compile=True).tokens == decode(model, prompts, 6).tokens


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_speculative_decoding_is_token_identical():
    """``speculative_decode(compile=True)`` runs the verify passes (gamma + 1 tokens, one graph for every length
    above 1) compiled; greedy output is still plain greedy's, for static and adaptive drafting (float64)."""
    model, drafter = tiny(8, std=0.3)
    prompts = random_prompts(3, 40, seed=8)
    ref = reference(model, prompts, 24)
    for gamma, adaptive in [(3, None), (5, 0.5)]:
        assert speculative_decode(model, drafter, prompts, 24, gamma=gamma, adaptive=adaptive, compile=True).tokens == ref
        single = speculative_decode(model, drafter, prompts[:1], 24, gamma=gamma, adaptive=adaptive, compile=True)
        assert single.tokens == ref[:1]
