"""How much faster than ``transformers`` greedy can any fp32 engine decode this model on this machine?

A batch-1 decode step must read every weight once: the q/k/v/o and gate/up/down projections of every layer
and the LM head. This script times that floor (the step's matrix-vector products alone, run back to back on
the model's own weight tensors, nothing else) beside our KV-cached decode step and ``transformers``' step on
the same weights, in one process, interleaved over repeats. A step's cost is measured as
(time to generate 1 + n tokens - time to generate 1 token) / n, so the prefill cancels.

theirs / floor is the largest speedup over ``transformers`` an engine computing the same fp32 products can
have; theirs / ours is what we have, eager and under ``torch.compile`` (compiled before the timed repeats).
A second floor with q/k/v and gate/up concatenated into one matrix each says what fusing the projections
could add.

    python scripts/bench_decode_floor.py runs/smollm2 --threads 2 --repeats 5 --json results/decode-floor-smollm2-cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from nextlat.bench import spread, write_json
from nextlat.bench.hf import _greedy_theirs, load_transformers
from nextlat.decoding.engine import decode
from nextlat.training.build import load_components


def weight_chains(model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The step's weights in execution order: as the model stores them, and with q/k/v and gate/up fused."""
    plain, fused = [], []
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        plain += [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight,
                  m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight]
        fused += [torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), a.o_proj.weight,
                  torch.cat([m.gate_proj.weight, m.up_proj.weight]), m.down_proj.weight]
    plain.append(model.lm_head.weight)
    fused.append(model.lm_head.weight)
    return plain, fused


def run_chain(weights: list[torch.Tensor], inputs: dict[int, torch.Tensor], steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        for w in weights:
            F.linear(inputs[w.shape[1]], w)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    comps, _ = load_components(args.checkpoint, "cpu")
    model = comps.model.eval()
    hf = load_transformers(args.checkpoint)
    prompt = comps.task.prompts(1, args.prompt_len, seed=0)[0]
    plain, fused = weight_chains(model)
    inputs = {n: torch.randn(1, n) for n in {w.shape[1] for w in plain + fused}}
    n = args.new_tokens

    def ours_step(compile: bool = False) -> float:
        t0 = time.perf_counter()
        decode(model, [prompt], 1, compile=compile)
        t1 = time.perf_counter()
        decode(model, [prompt], 1 + n, compile=compile)
        t2 = time.perf_counter()
        return ((t2 - t1) - (t1 - t0)) / n

    def theirs_step() -> float:
        t0 = time.perf_counter()
        _greedy_theirs(hf, prompt, 1)
        t1 = time.perf_counter()
        _greedy_theirs(hf, prompt, 1 + n)
        t2 = time.perf_counter()
        return ((t2 - t1) - (t1 - t0)) / n

    measures = {"floor": lambda: run_chain(plain, inputs, n), "floor_fused": lambda: run_chain(fused, inputs, n),
                "ours": ours_step, "ours_compiled": lambda: ours_step(compile=True), "theirs": theirs_step}
    times: dict[str, list[float]] = {k: [] for k in measures}
    with torch.no_grad():
        t0 = time.perf_counter()
        decode(model, [prompt], 3, compile=True)
        compile_s = time.perf_counter() - t0
        for fn in measures.values():  # warm-up
            fn()
        names = list(measures)
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
                times[name].append(measures[name]())
    ratio = {
        "theirs_over_floor": [t / f for t, f in zip(times["theirs"], times["floor"])],
        "theirs_over_floor_fused": [t / f for t, f in zip(times["theirs"], times["floor_fused"])],
        "theirs_over_ours": [t / o for t, o in zip(times["theirs"], times["ours"])],
        "theirs_over_ours_compiled": [t / o for t, o in zip(times["theirs"], times["ours_compiled"])],
        "ours_over_floor": [o / f for o, f in zip(times["ours"], times["floor"])],
    }
    weight_mb = sum(w.numel() * w.element_size() for w in plain) / 2**20
    report = {"checkpoint": args.checkpoint, "threads": torch.get_num_threads(), "repeats": args.repeats,
              "new_tokens": n, "prompt_len": args.prompt_len, "compile_s": compile_s, "weights_read_per_step_MiB": weight_mb,
              "step_ms": {k: dict(zip(("median", "min", "max"), (1e3 * x for x in spread(v)))) for k, v in times.items()},
              "ratios": {k: dict(zip(("median", "min", "max"), spread(v))) for k, v in ratio.items()},
              "floor_GiB_per_s": weight_mb / 1024 / statistics.median(times["floor"])}
    print(f"{args.checkpoint}: {weight_mb:.0f} MiB of weights per step, {report['threads']} threads, "
          f"{args.repeats} repeats; compilation {compile_s:.0f} s, not timed")
    for k, v in report["step_ms"].items():
        print(f"  {k:12s} {v['median']:7.2f} ms/step [{v['min']:.2f}, {v['max']:.2f}]")
    for k, v in report["ratios"].items():
        print(f"  {k:24s} {v['median']:.3f} [{v['min']:.3f}, {v['max']:.3f}]")
    print(f"  floor bandwidth {report['floor_GiB_per_s']:.1f} GiB/s")
    if args.json:
        write_json(report, args.json)


if __name__ == "__main__":
    main()
