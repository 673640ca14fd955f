"""nextlat against ``transformers`` on the same weights: logits, greedy outputs and decoding speed (needs ``[hf]``).

The ``transformers`` model is the checkpoint exported by :func:`nextlat.interop.hf.export_hf` and loaded
with ``LlamaForCausalLM.from_pretrained``, so the comparison also checks the export.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from nextlat.bench import spread, write_json
from nextlat.decoding.stats import DecodeStats
from nextlat.training.checkpoint import resolve_checkpoint


def from_hf(checkpoint: str | Path) -> bool:
    """Whether the checkpoint came from ``nextlat import-hf`` (it carries the original config.json)."""
    return (resolve_checkpoint(checkpoint) / "hf_config.json").is_file()


def load_transformers(checkpoint: str | Path, dtype: torch.dtype = torch.float32):
    """The checkpoint's backbone as a ``transformers`` LlamaForCausalLM (exported to a temporary folder), with no
    stop token."""
    from transformers import LlamaForCausalLM

    from nextlat.interop.hf import export_hf

    with tempfile.TemporaryDirectory() as tmp:
        export_hf(checkpoint, tmp)
        hf = LlamaForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None  # both sides emit every requested token (generate would fill it in)
    return hf


@torch.no_grad()
def max_logit_difference(model, hf, ids: torch.Tensor) -> float:
    """max |ours - theirs| over the (T, V) logits of one sequence ids (T,)."""
    ours = model.logits(model(ids[None])[0])[0]
    theirs = hf(ids[None]).logits[0]
    return (ours.double() - theirs.double()).abs().max().item()


def _greedy_theirs(hf, prompt: torch.Tensor, n: int) -> list[int]:
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = hf.generate(prompt[None], attention_mask=torch.ones_like(prompt[None]), generation_config=gen)
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def margin_at(model, ids: list[int], position: int) -> float:
    """Top-1 minus top-2 logit of our model predicting token ``position`` of ``ids`` (how close the call was)."""
    logits = model.logits(model(torch.tensor(ids[:position])[None])[0])[0, -1]
    top = logits.double().topk(2).values
    return (top[0] - top[1]).item()


def greedy_comparison(model, prompt: torch.Tensor, ours: list[int], theirs: list[int]) -> dict:
    """Where our greedy continuation first differs from theirs, with our logit margin there."""
    n = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if n is None:
        return {"identical": ours == theirs, "first_difference": None, "margin": None}
    return {"identical": False, "first_difference": n, "margin": margin_at(model, prompt.tolist() + ours, len(prompt) + n)}


def agreement(checkpoint: str | Path, *, n_prompts: int = 16, prompt_len: int = 32, max_new_tokens: int = 32,
              logit_tokens: int = 256) -> dict:
    """Our model against ``transformers`` in float32: the largest logit difference over one held-out sequence of
    ``logit_tokens`` tokens, and greedy continuations of ``n_prompts`` held-out prompts compared token by token."""
    from nextlat.decoding.engine import decode
    from nextlat.training.build import load_components

    comps, _ = load_components(checkpoint, "cpu")
    model, hf = comps.model.eval(), load_transformers(checkpoint)
    ids = comps.task.prompts(1, logit_tokens, seed=1)[0]
    prompts = comps.task.prompts(n_prompts, prompt_len, seed=0)
    with torch.no_grad():
        diff = max_logit_difference(model, hf, ids)
        compared = [greedy_comparison(model, p, decode(model, [p], max_new_tokens).tokens[0],
                                      _greedy_theirs(hf, p, max_new_tokens)) for p in prompts]
    return {"logit_tokens": len(ids), "max_logit_difference": diff, "prompts": len(prompts),
            "max_new_tokens": max_new_tokens, "identical": sum(c["identical"] for c in compared), "outputs": compared}


def bench_vs_transformers(checkpoint: str, *, n_prompts: int = 8, prompt_len: int = 64, max_new_tokens: int = 64,
                          repeats: int = 3, threads: int = 0, compile: bool = False, json_out: str | None = None) -> dict:
    """Our KV-cached greedy decoding against ``transformers`` ``generate`` (greedy, batch 1, KV cache), in one
    process on the same threads, weights and prompts, interleaved: each repeat decodes every prompt with every
    side, rotating which goes first. Every side emits ``max_new_tokens`` (no stop token). A side's ratio in a
    repeat is their time / its time; outputs are compared token by token with theirs (first difference and our
    margin there). ``compile`` adds our decoding under ``torch.compile`` as a third side (its compilation is
    timed once, before the repeats, and reported apart)."""
    from nextlat.decoding.engine import decode
    from nextlat.training.build import load_components

    if threads > 0:
        torch.set_num_threads(threads)
    comps, meta = load_components(checkpoint, "cpu")
    model = comps.model.eval()
    hf = load_transformers(checkpoint)
    prompts = comps.task.prompts(n_prompts, prompt_len, seed=0)
    sides = {"nextlat": lambda p: decode(model, [p], max_new_tokens).tokens[0],
             "transformers": lambda p: _greedy_theirs(hf, p, max_new_tokens)}
    compile_s = None
    with torch.no_grad():
        if compile:
            t0 = time.perf_counter()
            decode(model, [prompts[0]], 3, compile=True)  # compiles the step graph (and its dynamic-shape version)
            compile_s = time.perf_counter() - t0
            sides["nextlat_compiled"] = lambda p: decode(model, [p], max_new_tokens, compile=True).tokens[0]
        for side in sides.values():  # warm-up
            side(prompts[0])
        names = list(sides)
        seconds = {name: [] for name in names}
        outputs: dict[str, list[list[int]]] = {name: [] for name in names}
        for r in range(repeats):
            total = dict.fromkeys(names, 0.0)
            for i, p in enumerate(prompts):
                k = (r + i) % len(names)
                for name in names[k:] + names[:k]:
                    t0 = time.perf_counter()
                    out = sides[name](p)
                    total[name] += time.perf_counter() - t0
                    if r == 0:
                        outputs[name].append(out)
            for name in names:
                seconds[name].append(total[name])
        compared = {name: [greedy_comparison(model, p, a, b) for p, a, b in
                           zip(prompts, outputs[name], outputs["transformers"])]
                    for name in names if name != "transformers"}
    tokens = len(prompts) * max_new_tokens
    report = {
        "checkpoint": str(checkpoint), "step": meta["step"], "threads": torch.get_num_threads(), "batch_size": 1,
        "prompts": len(prompts), "prompt_len": prompt_len, "max_new_tokens": max_new_tokens, "repeats": repeats,
        "tokens_per_s": {name: tokens / statistics.median(v) for name, v in seconds.items()},
        "compile_s": compile_s, "sides": {},
    }
    for name, comp in compared.items():
        ratios = [b / a for a, b in zip(seconds[name], seconds["transformers"])]
        report["sides"][name] = {**dict(zip(("ratio_median", "ratio_min", "ratio_max"), spread(ratios))),
                                 "identical_share": sum(c["identical"] for c in comp) / len(comp), "outputs": comp}
    print(f"greedy decoding, batch 1, {len(prompts)} prompts x {max_new_tokens} new tokens, {repeats} repeats, "
          f"{report['threads']} threads" + (f"; compilation {compile_s:.0f} s, not timed below" if compile else ""))
    for name, tps in report["tokens_per_s"].items():
        line = f"{name:17s} {tps:8.1f} tok/s"
        if name in report["sides"]:
            side = report["sides"][name]
            line += (f"   x{side['ratio_median']:.2f} [{side['ratio_min']:.2f}, {side['ratio_max']:.2f}] of transformers, "
                     f"identical outputs {side['identical_share']:.0%}")
        print(line)
    for name, comp in compared.items():
        for i, c in enumerate(comp):
            if not c["identical"]:
                print(f"  {name} prompt {i}: first difference at new token {c['first_difference']}, "
                      f"our margin {c['margin']:.3g}")
    if json_out:
        write_json(report, json_out)
    return report


def _sample_theirs(hf, prompt: torch.Tensor, n: int, temperature: float, lookup: int, generator_seed: int) -> list[int]:
    """``transformers`` generate: greedy (temperature 0) or plain sampling (no top-k / top-p), optionally with prompt
    lookup decoding (``prompt_lookup_num_tokens``)."""
    from transformers import GenerationConfig

    sampled = temperature > 0
    # Prompt lookup needs a stop token: one past the vocabulary, never generated.
    gen = GenerationConfig(max_new_tokens=n, do_sample=sampled, eos_token_id=hf.config.vocab_size if lookup else None,
                           pad_token_id=0,
                           **({"temperature": temperature, "top_k": 0, "top_p": 1.0} if sampled else {}),
                           **({"prompt_lookup_num_tokens": lookup} if lookup else {}))
    if sampled:
        torch.manual_seed(generator_seed)
    out = hf.generate(prompt[None], attention_mask=torch.ones_like(prompt[None]), generation_config=gen)
    return out[0, len(prompt):].tolist()


def bench_drafter_vs_transformers(checkpoint: str, drafter_dir: str, prompts: list[torch.Tensor], *,
                                  max_new_tokens: int = 128, temperature: float = 0.0, gamma: int = 4,
                                  adaptive: float | None = None, repeats: int = 3, lookup: int = 10,
                                  compile: bool = False, label: str = "", json_out: str | None = None) -> dict:
    """Our speculative decoding with a fitted drafter (``nextlat fit-drafter``) against ``transformers`` generate
    (plain, and with prompt lookup decoding), and against our own plain decoding, batch 1, in one process on the
    same threads and prompts. Each repeat decodes every prompt with every method, in an order rotated per prompt;
    a method's ratio in a repeat is its time / speculative time. All emit ``max_new_tokens`` (no stop token).
    ``compile``: both of our methods run the target under ``torch.compile`` (compiled in the warm-up)."""

    from nextlat.decoding.engine import decode, speculative_decode
    from nextlat.decoding.sampling import Sampling
    from nextlat.training.build import load_components
    from nextlat.training.drafter import load_drafter

    comps, meta = load_components(checkpoint, "cpu")
    model = comps.model.eval()
    drafter = load_drafter(drafter_dir, model)
    hf = load_transformers(checkpoint)
    sampling = Sampling(temperature)
    spec_stats = []

    def ours_spec(p, seed):
        res = speculative_decode(model, drafter, [p], max_new_tokens, gamma=gamma, adaptive=adaptive, sampling=sampling,
                                 generator=torch.Generator().manual_seed(seed), compile=compile)
        spec_stats.append(res.stats)
        return res.tokens[0]

    methods = {
        "speculative": ours_spec,
        "nextlat": lambda p, seed: decode(model, [p], max_new_tokens, sampling=sampling, compile=compile,
                                          generator=torch.Generator().manual_seed(seed)).tokens[0],
        "transformers": lambda p, seed: _sample_theirs(hf, p, max_new_tokens, temperature, 0, seed),
        "transformers_lookup": lambda p, seed: _sample_theirs(hf, p, max_new_tokens, temperature, lookup, seed),
    }
    names = list(methods)
    with torch.no_grad():
        for name in names:  # warm-up
            methods[name](prompts[0], 0)
        spec_stats.clear()
        times = {n: [] for n in names}
        outputs = {n: [] for n in names}
        for r in range(repeats):
            spent = dict.fromkeys(names, 0.0)
            for i, p in enumerate(prompts):
                k = (r + i) % len(names)
                for name in names[k:] + names[:k]:
                    t0 = time.perf_counter()
                    out = methods[name](p, 1000 * r + i)
                    spent[name] += time.perf_counter() - t0
                    if r == 0:
                        outputs[name].append(out)
            for name in names:
                times[name].append(spent[name])
    total = DecodeStats.total(spec_stats)
    rounds, tries, accs, drafted = total.rounds, total.position_tries, total.position_accepts, total.drafted
    draft_s, verify_s = total.draft_time_s, total.verify_time_s
    tokens = len(prompts) * max_new_tokens
    plain_step_s = statistics.median(times["nextlat"]) / tokens  # our plain decoding: one target pass per token
    report = {
        "label": label, "checkpoint": str(checkpoint), "drafter": str(drafter_dir), "step": meta["step"],
        "threads": torch.get_num_threads(), "batch_size": 1, "prompts": len(prompts),
        "prompt_len": [len(p) for p in prompts], "max_new_tokens": max_new_tokens, "repeats": repeats,
        "temperature": temperature, "gamma": gamma, "adaptive": adaptive, "prompt_lookup_num_tokens": lookup,
        "compile": compile,
        "tokens_per_s": {n: tokens / statistics.median(times[n]) for n in names},
        "speedup": {n: dict(zip(("median", "min", "max"), spread(b / a for a, b in zip(times["speculative"], times[n]))))
                    for n in names[1:]},
        "accepted_per_round": total.accepted / rounds,
        "acceptance_by_slot": [a / t if t else None for a, t in zip(accs, tries)],
        "draft_time_s": draft_s / repeats, "verify_time_s": verify_s / repeats,
        "draft_step_ms": 1e3 * draft_s / drafted, "verify_pass_ms": 1e3 * verify_s / rounds,
        "plain_step_ms": 1e3 * plain_step_s, "draft_step_over_target_step": draft_s / drafted / plain_step_s,
    }
    if temperature == 0:
        report["identical_to_nextlat_greedy"] = outputs["speculative"] == outputs["nextlat"]
        report["identical_to_transformers_greedy"] = sum(a == b for a, b in zip(outputs["speculative"],
                                                                              outputs["transformers"])) / len(prompts)
    sp = report["speedup"]
    print(f"{label}: {len(prompts)} prompts x {max_new_tokens} tokens, T={temperature}, gamma={gamma}, adaptive="
          f"{adaptive}, {repeats} repeats, {report['threads']} threads" + (", ours compiled" if compile else ""))
    print("  speculative over " + ", ".join(f"{n} {v['median']:.2f}x [{v['min']:.2f}, {v['max']:.2f}]"
                                            for n, v in sp.items()))
    print(f"  accepted/round {report['accepted_per_round']:.2f}, by slot "
          f"{[round(a, 2) if a is not None else None for a in report['acceptance_by_slot']]}, draft step "
          f"{report['draft_step_ms']:.2f} ms ({report['draft_step_over_target_step']:.3f} of a target step), verify "
          f"pass {report['verify_pass_ms']:.1f} ms; identical {report.get('identical_to_nextlat_greedy', 'n/a')}")
    if json_out:
        write_json(report, json_out)
    return report
