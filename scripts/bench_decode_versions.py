"""KV-cached greedy decoding speed of two source trees of nextlat, side by side.

    python scripts/bench_decode_versions.py SRC_A SRC_B [--repeats N] [--json FILE]

A random 4 x 256 model (vocabulary 1000, seed 0) is saved once to a temporary safetensors file, so
both versions load the same weights. Each repeat runs one subprocess per version, with
``PYTHONPATH=SRC``, the order alternating between repeats (A B, B A, ...). A run decodes 8 prompts
of 32 tokens, one at a time (batch 1), 128 new tokens each, on 2 threads, after one warm-up
prompt. It prints tokens/s per version (median and min-max over repeats), the ratio B/A of the
medians, and how many values each version reads back from the device per decoded token (calls
of Tensor.item / tolist / __bool__ / __int__ / __float__, counted on one prompt); on a GPU each
such read waits for the queued work. Works with the API before the decoding package
(``nextlat.engine.decode``) and after it (``nextlat.decoding.engine.decode``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPE = {"vocab_size": 1000, "n_layer": 4, "n_head": 4, "d_model": 256, "max_seq_len": 256}
PROMPTS, PROMPT_LEN, NEW_TOKENS, THREADS = 8, 32, 128, 2


def _model(weights: str | None = None):
    import torch

    from nextlat.config import ModelConfig
    from nextlat.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SHAPE)).eval()
    if weights is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(weights))
    return model


def _decode_fn():
    try:
        from nextlat.decoding.engine import decode  # after the restructuring
    except ImportError:
        from nextlat.engine import decode  # before it
    return decode


def _count_reads(fn) -> int:
    import torch

    calls = [0]
    saved = {}
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        saved[name] = original = getattr(torch.Tensor, name)

        def wrapper(self, *a, _original=original, **kw):
            calls[0] += 1
            return _original(self, *a, **kw)

        setattr(torch.Tensor, name, wrapper)
    try:
        fn()
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)
    return calls[0]


def child(weights: str) -> None:
    import time

    import torch

    torch.set_num_threads(THREADS)
    model, decode = _model(weights), _decode_fn()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, SHAPE["vocab_size"], (PROMPT_LEN,), generator=g) for _ in range(PROMPTS)]
    with torch.no_grad():
        decode(model, [prompts[0]], NEW_TOKENS)  # warm-up
        t0 = time.perf_counter()
        tokens = sum(len(decode(model, [p], NEW_TOKENS).tokens[0]) for p in prompts)
        seconds = time.perf_counter() - t0
        reads = _count_reads(lambda: decode(model, [prompts[0]], NEW_TOKENS))
    print(json.dumps({"tokens_per_s": tokens / seconds, "reads_per_token": reads / NEW_TOKENS}))


def _run(src: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()), "OMP_NUM_THREADS": str(THREADS)}
    out = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"run with PYTHONPATH={src} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src_a")
    p.add_argument("src_b")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="also write every run's numbers to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--make", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.make:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in _model().state_dict().items()}, args.make)
        return
    if args.child:
        child(args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        weights = str(Path(tmp) / "model.safetensors")
        _run(args.src_a, args.src_a, args.src_b, "--make", weights)
        results: dict[str, list[dict]] = {"A": [], "B": []}
        for r in range(args.repeats):
            for name in ("AB" if r % 2 == 0 else "BA"):
                src = args.src_a if name == "A" else args.src_b
                results[name].append(_run(src, args.src_a, args.src_b, "--child", weights))
    print(f"model {SHAPE['n_layer']}x{SHAPE['d_model']}, vocab {SHAPE['vocab_size']}; KV-cached greedy, batch 1, "
          f"{PROMPTS} prompts x {PROMPT_LEN} tokens, {NEW_TOKENS} new tokens, {THREADS} threads, "
          f"{args.repeats} repeats (order alternating)")
    medians = {}
    for name, src in (("A", args.src_a), ("B", args.src_b)):
        tps = [x["tokens_per_s"] for x in results[name]]
        medians[name] = statistics.median(tps)
        print(f"{name} {src}: {medians[name]:8.1f} tokens/s (min {min(tps):.1f}, max {max(tps):.1f}); "
              f"{results[name][0]['reads_per_token']:.2f} host reads per token")
    paired = sorted(b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(results["A"], results["B"]))
    print(f"ratio B/A (medians): {medians['B'] / medians['A']:.3f}; per repeat (A and B side by side): "
          f"median {statistics.median(paired):.3f}, min {paired[0]:.3f}, max {paired[-1]:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": SHAPE, "prompts": PROMPTS, "prompt_len": PROMPT_LEN,
                                               "new_tokens": NEW_TOKENS, "threads": THREADS, "src": [args.src_a, args.src_b],
                                               "runs": results, "paired_ratios": paired}, indent=1))


if __name__ == "__main__":
    main()
