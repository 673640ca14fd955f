"""The table of results/drafter-smollm2.md from the JSON files scripts/bench_drafter_smollm2.sh writes.

    python scripts/drafter_table.py results/drafter-smollm2-*-T*.json
"""

from __future__ import annotations

import json
import sys


def cell(s: dict) -> str:
    return f"{s['median']:.2f}x [{s['min']:.2f}, {s['max']:.2f}]"


def main(paths: list[str]) -> None:
    print("| domain | T | over transformers | over transformers lookup | over nextlat plain | spec tok/s | "
          "accepted/round | acceptance by slot | draft step ms (/ target step) | verify pass ms (/ target step) | "
          "identical |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for p in paths:
        r = json.load(open(p))
        sp = r["speedup"]
        slots = ", ".join(f"{a:.2f}" for a in r["acceptance_by_slot"] if a is not None)
        ident = r.get("identical_to_nextlat_greedy", "n/a")
        print(f"| {r['label']} | {r['temperature']:g} | {cell(sp['transformers'])} | {cell(sp['transformers_lookup'])} | "
              f"{cell(sp['nextlat'])} | {r['tokens_per_s']['speculative']:.1f} | {r['accepted_per_round']:.2f} | {slots} | "
              f"{r['draft_step_ms']:.2f} ({r['draft_step_over_target_step']:.3f}) | {r['verify_pass_ms']:.1f} "
              f"({r['verify_pass_ms'] / r['plain_step_ms']:.2f}) | {ident} |")


if __name__ == "__main__":
    main(sys.argv[1:])
