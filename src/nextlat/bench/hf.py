"""nextlat against ``transformers`` on the same weights: logits, greedy outputs and decoding speed (needs ``[hf]``).

The ``transformers`` model is the checkpoint exported by :func:`nextlat.interop.hf.export_hf` and loaded
with ``LlamaForCausalLM.from_pretrained``, so the comparison also checks the export.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

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
                          repeats: int = 3, threads: int = 0, json_out: str | None = None) -> dict:
    """Our KV-cached greedy decoding against ``transformers`` ``generate`` (greedy, batch 1, KV cache), in one
    process on the same threads, weights and prompts, interleaved: each repeat decodes every prompt with both,
    alternating which goes first. Both always emit ``max_new_tokens`` (no stop token). The ratio of a repeat is
    their time / ours; outputs are compared token by token (first difference and our margin there)."""
    from nextlat.decoding.engine import decode
    from nextlat.training.build import load_components

    if threads > 0:
        torch.set_num_threads(threads)
    comps, meta = load_components(checkpoint, "cpu")
    model = comps.model.eval()
    hf = load_transformers(checkpoint)
    prompts = comps.task.prompts(n_prompts, prompt_len, seed=0)
    with torch.no_grad():
        decode(model, [prompts[0]], 2)  # warm-up, both sides
        _greedy_theirs(hf, prompts[0], 2)
        ours_t, theirs_t, outs_ours, outs_theirs = [], [], [], []
        for r in range(repeats):
            t_ours = t_theirs = 0.0
            for i, p in enumerate(prompts):
                for side in ((0, 1) if (r + i) % 2 == 0 else (1, 0)):
                    t0 = time.perf_counter()
                    if side == 0:
                        ours = decode(model, [p], max_new_tokens).tokens[0]
                        t_ours += time.perf_counter() - t0
                    else:
                        theirs = _greedy_theirs(hf, p, max_new_tokens)
                        t_theirs += time.perf_counter() - t0
                if r == 0:
                    outs_ours.append(ours)
                    outs_theirs.append(theirs)
            ours_t.append(t_ours)
            theirs_t.append(t_theirs)
        compared = [greedy_comparison(model, p, a, b) for p, a, b in zip(prompts, outs_ours, outs_theirs)]
    tokens = len(prompts) * max_new_tokens
    ratios = [b / a for a, b in zip(ours_t, theirs_t)]
    report = {
        "checkpoint": str(checkpoint), "step": meta["step"], "threads": torch.get_num_threads(), "batch_size": 1,
        "prompts": len(prompts), "prompt_len": prompt_len, "max_new_tokens": max_new_tokens, "repeats": repeats,
        "ours_tokens_per_s": tokens / statistics.median(ours_t), "theirs_tokens_per_s": tokens / statistics.median(theirs_t),
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "identical_share": sum(c["identical"] for c in compared) / len(compared), "outputs": compared,
    }
    print(f"greedy decoding, batch 1, {len(prompts)} prompts x {max_new_tokens} new tokens, {repeats} repeats, "
          f"{report['threads']} threads")
    print(f"nextlat      {report['ours_tokens_per_s']:8.1f} tok/s")
    print(f"transformers {report['theirs_tokens_per_s']:8.1f} tok/s")
    print(f"ratio (ours / theirs tokens per s) {report['ratio_median']:.2f} [{report['ratio_min']:.2f}, "
          f"{report['ratio_max']:.2f}]; identical outputs {report['identical_share']:.0%}")
    for i, c in enumerate(compared):
        if not c["identical"]:
            print(f"  prompt {i}: first difference at new token {c['first_difference']}, our margin {c['margin']:.3g}")
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(report, indent=2))
    return report
