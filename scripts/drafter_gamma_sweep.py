"""Draft length and adaptive threshold of a fitted drafter, measured: speculative decoding only (greedy, batch 1),
a few prompts per domain, every setting interleaved per prompt; prints tokens/s, accepted/round and acceptance
by slot, and writes JSON.

    python scripts/drafter_gamma_sweep.py RUN DRAFTER OUT.json PROMPTS.jsonl[:chat] ... [--prompts 4 --tokens 128]
        [--compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from nextlat.cli import _prompt_ids, _read_prompts
from nextlat.decoding.engine import decode, speculative_decode
from nextlat.interop.hf import run_folder
from nextlat.training.build import load_components
from nextlat.training.drafter import load_drafter

SETTINGS = [("plain", None, None)] + [(f"gamma={g}", g, None) for g in (2, 3, 4, 5, 6, 8)] + \
           [(f"adaptive<{a}", 10, a) for a in (0.3, 0.5, 0.7)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("drafter")
    p.add_argument("out")
    p.add_argument("files", nargs="+")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="the target under torch.compile (plain and verify passes)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run = run_folder(args.run)
    comps, _ = load_components(run)
    model, tok = comps.model.eval(), comps.task.tokenizer
    drafter = load_drafter(args.drafter, model)
    report = {}
    with torch.no_grad():
        warm = [torch.tensor([1, 2, 3])]
        decode(model, warm, 4, compile=args.compile)  # compiles, with --compile, before anything is timed
        speculative_decode(model, drafter, warm, 8, gamma=3, compile=args.compile)
        for spec in args.files:
            path, _, chat = spec.partition(":")
            prompts = [torch.tensor(i) for i in _prompt_ids(run, tok, _read_prompts(path), chat == "chat")][: args.prompts]
            times = {name: 0.0 for name, _, _ in SETTINGS}
            stats = {name: [] for name, _, _ in SETTINGS}
            for i, prompt in enumerate(prompts):
                order = SETTINGS[i % len(SETTINGS):] + SETTINGS[: i % len(SETTINGS)]
                for name, gamma, threshold in order:
                    t0 = time.perf_counter()
                    if gamma is None:
                        decode(model, [prompt], args.tokens, compile=args.compile)
                    else:
                        stats[name].append(speculative_decode(model, drafter, [prompt], args.tokens, gamma=gamma,
                                                              adaptive=threshold, compile=args.compile).stats)
                    times[name] += time.perf_counter() - t0
            rows = {}
            for name, _, _ in SETTINGS:
                st = stats[name]
                row = {"tokens_per_s": len(prompts) * args.tokens / times[name],
                       "speedup_over_plain": times["plain"] / times[name]}
                if st:
                    tries = [sum(s.position_tries[j] for s in st) for j in range(len(st[0].position_tries))]
                    accs = [sum(s.position_accepts[j] for s in st) for j in range(len(tries))]
                    row.update(accepted_per_round=sum(s.accepted for s in st) / sum(s.rounds for s in st),
                               acceptance_by_slot=[round(a / t, 3) if t else None for a, t in zip(accs, tries)],
                               draft_ms_per_step=1e3 * sum(s.draft_time_s for s in st) / sum(s.drafted for s in st),
                               verify_ms_per_pass=1e3 * sum(s.verify_time_s for s in st) / sum(s.rounds for s in st))
                rows[name] = row
                print(f"{path:40s} {name:14s} {row['tokens_per_s']:7.1f} tok/s {row['speedup_over_plain']:5.2f}x "
                      f"acc/round {row.get('accepted_per_round', 0):.2f} by slot {row.get('acceptance_by_slot')}")
            report[path] = rows
    summary = {name: statistics.geometric_mean([report[f][name]["speedup_over_plain"] for f in report])
               for name, _, _ in SETTINGS}
    print("geometric mean speedup over plain:", {k: round(v, 2) for k, v in summary.items()})
    with open(args.out, "w") as f:
        json.dump({"prompts": args.prompts, "tokens": args.tokens, "threads": args.threads, "compile": args.compile,
                   "domains": report,
                   "geomean_speedup": summary}, f, indent=2)


if __name__ == "__main__":
    main()
