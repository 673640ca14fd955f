"""Drafters fitted to a frozen model (nextlat.training.drafter): the draft vocabulary keeps decoding lossless, fitting
on cached hidden states is fitting through the backbone, the cache resumes, folders load only beside their model,
and the commands work end to end on a tiny imported model. Random models in float64, as in test_engine.py."""

from __future__ import annotations

import json

import pytest
import torch
from test_engine import chi2_critical, chi_square, exact_distribution, random_prompts, reference, tiny
from test_interop import llama_config, write_folder

from nextlat.cli import main
from nextlat.data import IGNORE
from nextlat.decoding.drafters import NextLatDrafter
from nextlat.decoding.engine import speculative_decode
from nextlat.decoding.sampling import Sampling
from nextlat.objectives.base import LossOutput
from nextlat.registry import build_objective, objective_config
from nextlat.training.drafter import (
    HiddenCache,
    draft_vocabulary,
    fit_drafter,
    fit_dynamics,
    latent_loss,
    load_drafter,
    window_batch,
    windows,
)

# ----------------------------------------------------------------------------- the draft vocabulary is lossless


@pytest.mark.parametrize("seed", [0, 1])
def test_slice_head_keeps_greedy_output_identical(seed):
    model, full = tiny(seed, vocab=40, std=0.3)
    vocab = torch.arange(0, 40, 3)  # a third of the tokens: many target choices are never drafted
    drafter = NextLatDrafter(model, _owner(full), vocab)
    prompts = random_prompts(6, 40, seed)
    res = speculative_decode(model, drafter, prompts, 20, gamma=3)
    assert res.tokens == reference(model, prompts, 20)
    logits, _ = drafter.propose(model(prompts[0][None])[0][:, -1], prompts[0][-1:])
    outside = torch.ones(40, dtype=torch.bool)
    outside[vocab] = False
    assert torch.isinf(logits[0, outside]).all() and torch.isfinite(logits[0, vocab]).all()


def _owner(drafter: NextLatDrafter):
    """Something holding the random p_psi of test_engine's drafter, as an objective does."""
    return type("Owner", (), {"dynamics": drafter.dynamics})()


def test_slice_head_sampling_matches_plain_sampling():
    """q is zero outside the slice; the Leviathan rule still gives the target's distribution (chi-square, as in
    test_engine.py), with a slice that leaves out tokens the target samples often."""
    model, full = tiny(7, vocab=5, std=0.5, layers=1)
    prompt, sampling = torch.tensor([1, 3, 0]), Sampling(temperature=1.0)
    expected = exact_distribution(model, prompt, 3, sampling)
    first = {s[0]: 0.0 for s in expected}
    for s, p in expected.items():
        first[s[0]] += p
    vocab = torch.tensor(sorted(first, key=first.get)[:3])  # the three least likely first tokens
    assert sum(first[int(v)] for v in vocab) < 0.6
    drafter = NextLatDrafter(model, _owner(full), vocab)
    g, samples = torch.Generator().manual_seed(1234), []
    while len(samples) < 16000:
        samples += speculative_decode(model, drafter, [prompt] * 2000, 3, sampling=sampling, generator=g,
                                      gamma=3).tokens
    stat, df = chi_square(samples, expected)
    assert stat < chi2_critical(df), (stat, df)


# ----------------------------------------------------------------------------- fitting on cached states


def _docs(n: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(3, 50, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_fitting_on_cached_states_equals_fitting_through_the_backbone(tmp_path):
    model, _ = tiny(3, vocab=40, std=0.3)
    model.requires_grad_(False)
    tokens = windows(_docs(12, 40, 0), 16)
    cache, _ = HiddenCache.build(tmp_path / "cache", model, tokens, dtype="float64", batch_size=5, progress=False)

    def through_backbone(step):
        batch, _ = cache.sample(step, 4, seed=0)
        return batch, model(batch.input_ids, batch.doc_ids)[0]

    fitted = {}
    for name, sample in [("cache", lambda s: cache.sample(s, 4, seed=0)), ("backbone", through_backbone)]:
        torch.manual_seed(0)
        objective = build_objective(objective_config("next_latent", horizon=3), model).double()
        losses = fit_dynamics(objective, model, sample, model.lm_head.weight, steps=6, lr=1e-2, warmup=2,
                              progress=False)
        fitted[name] = (losses, objective.dynamics.state_dict())
    assert fitted["cache"][0] == pytest.approx(fitted["backbone"][0], rel=1e-12, abs=0)
    for k, v in fitted["cache"][1].items():
        torch.testing.assert_close(v, fitted["backbone"][1][k], rtol=1e-10, atol=1e-12)
    assert fitted["cache"][1]["fc1.weight"].ne(objective.dynamics.fc1.weight.new_zeros(1)).any()

    # the loss is the objective's own latent terms (its forward, minus the token loss)
    torch.manual_seed(0)
    objective = build_objective(objective_config("next_latent", horizon=3), model).double()
    batch, h = cache.sample(0, 4, seed=0)
    ours = latent_loss(objective, model, batch, h, model.lm_head.weight).loss()
    terms = objective(model, batch).terms
    theirs = LossOutput({k: t for k, t in terms.items() if k != "ce"}).loss()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)
    assert fitted["cache"][0][0] == pytest.approx(ours.item(), rel=1e-12)


def test_cache_resumes_where_it_stopped(tmp_path):
    model, _ = tiny(4, vocab=40)
    tokens = windows(_docs(10, 40, 1), 16)
    full, report = HiddenCache.build(tmp_path / "a", model, tokens, dtype="float32", batch_size=3, progress=False)
    assert report["cache_tokens"] == int((tokens >= 0).sum())
    half = tmp_path / "b"
    cache, _ = HiddenCache.build(half, model, tokens, dtype="float32", batch_size=3, progress=False)
    cache._states[6:] = 0  # as if killed after two batches
    cache._states.flush()
    (half / "done").write_text("6")
    resumed, report = HiddenCache.build(half, model, tokens, dtype="float32", batch_size=3, progress=False)
    assert report["cache_tokens"] == int((tokens[6:] >= 0).sum())
    idx = torch.arange(len(tokens))
    assert torch.equal(resumed.states(idx), full.states(idx))
    # another model (or other windows) starts the cache over
    other, _ = tiny(5, vocab=40)
    _, report = HiddenCache.build(half, other, tokens, dtype="float32", batch_size=3, progress=False)
    assert report["cache_tokens"] == int((tokens >= 0).sum())


def test_windows_vocabulary_and_bfloat16_cache(tmp_path):
    tokens = windows([[1, 2, 3, 4, 5], [7], [2, 2]], 3)
    assert tokens.tolist() == [[1, 2, 3], [4, 5, -1], [2, 2, -1]]
    batch = window_batch(tokens)
    assert batch.doc_ids.tolist()[1] == [0, 0, -1] and batch.targets[1, 2] == IGNORE
    vocab = draft_vocabulary(tokens, 2)
    assert len(vocab) == 2 and 2 in vocab.tolist() and vocab.tolist() == sorted(vocab.tolist())
    assert len(draft_vocabulary(tokens, 100)) == 5  # no more than the tokens seen
    model, _ = tiny(6, vocab=40)
    model = model.float()
    cache, _ = HiddenCache.build(tmp_path / "c", model, windows(_docs(4, 40, 2), 16), dtype="bfloat16",
                                 progress=False)
    first = window_batch(cache.tokens[:1])
    h = model(first.input_ids, first.doc_ids)[0]
    got = cache.states(torch.tensor([0]))
    assert got.dtype == torch.bfloat16
    valid = cache.tokens[0] >= 0
    torch.testing.assert_close(got[0, valid].float(), h[0, valid].bfloat16().float())


# ----------------------------------------------------------------------------- folders and commands


def test_drafter_folder_round_trip_and_refusal(tmp_path):
    model, _ = tiny(8, vocab=40, std=0.3)
    report = fit_drafter(model, _docs(10, 40, 3), tmp_path / "d", cache_dir=tmp_path / "cache", window=16, steps=3,
                         batch_size=2, draft_vocab=12, progress=False)
    assert report["draft_vocab"] == 12 and 0 < report["draft_vocab_coverage"] <= 1
    info = json.loads((tmp_path / "d" / "drafter.json").read_text())
    assert info["format"] == "nextlat-drafter" and info["objective"]["horizon"] == 4
    drafter = load_drafter(tmp_path / "d", model)
    assert drafter.vocab.dtype == torch.long and len(drafter.vocab) == 12
    prompts = random_prompts(3, 40, 0)
    assert speculative_decode(model, drafter, prompts, 12, gamma=4).tokens == reference(model, prompts, 12)
    other, _ = tiny(9, vocab=40)
    with pytest.raises(ValueError, match="another model"):
        load_drafter(tmp_path / "d", other)


def test_fit_drafter_generate_and_bench_commands(tmp_path, capsys):
    hf = write_folder(tmp_path / "hf", llama_config(max_position_embeddings=256))
    text = tmp_path / "a.txt"
    text.write_text(" ".join(f"t{i % 50 + 2}" for i in range(400)))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"t5 t6 t7"\n"t8 t9"\n')
    out = tmp_path / "drafter"
    assert main(["fit-drafter", str(hf), "--text", str(text), "--self-distill", "2", "--prompt-file", str(prompts),
                 "--distill-tokens", "8", "--out", str(out), "--steps", "3", "--window", "32", "--draft-vocab", "20",
                 "--cache", str(tmp_path / "cache")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["draft_vocab"] == 20 and report["fitting_tokens"] > 400
    assert json.loads((out / "drafter.json").read_text())["fit"]["self_distill"] == 2
    assert main(["generate", str(hf), "--prompt", "t5 t6 t7", "--max-new-tokens", "6"]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", str(hf), "--prompt", "t5 t6 t7", "--max-new-tokens", "6", "--drafter", str(out)]) == 0
    assert capsys.readouterr().out == plain
    assert main(["generate", str(hf), "--prompt", "t5", "--drafter", str(tmp_path)]) == 2
    assert "not a drafter" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_with_a_fitted_drafter_against_transformers(tmp_path, capsys):
    pytest.importorskip("transformers")
    hf = write_folder(tmp_path / "hf", llama_config(max_position_embeddings=256))
    text = tmp_path / "a.txt"
    text.write_text(" ".join(f"t{i % 50 + 2}" for i in range(400)))
    out = tmp_path / "drafter"
    assert main(["fit-drafter", str(hf), "--text", str(text), "--out", str(out), "--steps", "3", "--window", "32",
                 "--cache", str(tmp_path / "cache")]) == 0
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"t5 t6 t7"\n"t8 t9"\n')
    assert main(["bench-decode", str(hf), "--drafter", str(out), "--prompt-file", str(prompts), "--max-new-tokens",
                 "8", "--repeats", "1", "--temperatures", "0", "0.7", "--json", str(tmp_path / "b.json")]) == 0
    greedy = json.loads((tmp_path / "b-T0.json").read_text())
    assert greedy["identical_to_nextlat_greedy"] is True
    assert set(greedy["speedup"]) == {"nextlat", "transformers", "transformers_lookup"}
    assert (tmp_path / "b-T0.7.json").is_file()
