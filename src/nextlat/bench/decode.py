"""Decoding-speed benchmark: speculative against ordinary decoding of one checkpoint, side by side."""

from __future__ import annotations

import statistics
import time

import torch

from nextlat.bench import spread, sync, write_json
from nextlat.decoding.stats import DecodeStats


def _time(fn, device: torch.device, *args, **kwargs):
    sync(device)
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    sync(device)
    return time.perf_counter() - t0, result


def bench_decode(checkpoint: str, *, n_prompts: int = 8, prompt_len: int = 64, max_new_tokens: int | None = None,
                 gammas: list[int] = (2, 3, 4, 5, 6, 8, 10), adaptive: list[float] = (0.5,), max_gamma: int = 10,
                 batch_size: int = 1, repeats: int = 3, paper_protocol: bool = True, temperature: float = 0.0,
                 stop_at_eos: bool = True, device: str = "auto", drafter: str | None = None,
                 json_out: str | None = None) -> dict:
    """Speculative vs ordinary decoding of one checkpoint, side by side in one process.

    For each protocol (KV-cached; and the paper's recompute-everything protocol) and each repeat,
    the baseline and every drafting setting decode the same prompts in interleaved order; the
    speedup of a setting is the median over repeats of baseline time / its time in the same
    repeat. Greedy outputs are checked token for token against the baseline. ``drafter`` names a
    registered drafter (default: the objective's own) or a folder made by ``nextlat fit-drafter``.
    ``max_new_tokens`` None: 64, or fewer where the
    model's context holds no more beside the prompts and the longest draft.
    """
    from nextlat.decoding.budget import draft_room, new_token_budget
    from nextlat.decoding.engine import decode, speculative_decode
    from nextlat.decoding.reference import objective_head
    from nextlat.decoding.sampling import Sampling
    from nextlat.training.build import load_components, resolve_device
    from nextlat.training.drafter import resolve_drafter

    dev = resolve_device(device)
    comps, meta = load_components(checkpoint, dev)
    model, objective = comps.model.eval(), comps.objective.eval()
    drafter_name = drafter
    drafter = resolve_drafter(drafter_name, model, objective)
    head = objective_head(model, objective)  # the target's next-token head (JTP: its fetch module)
    prompts = comps.task.prompts(n_prompts, prompt_len, seed=0)
    room = draft_room(max([*gammas, *([max_gamma] if adaptive else [])], default=0))
    max_new_tokens = new_token_budget(max_new_tokens, max(len(p) for p in prompts), room, model.cfg.max_seq_len,
                                      default=64, lower=["--prompt-len (where the task allows)", "--gammas", "--max-gamma"])
    eos = comps.task.tokenizer.eos_id if stop_at_eos else None
    sampling = Sampling(temperature=temperature)
    settings = [("baseline", None, None)] + [(f"gamma={g}", g, None) for g in gammas] + \
               [(f"adaptive<{a}", max_gamma, a) for a in adaptive]
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]

    def run(setting, use_cache: bool, seed: int):
        _, gamma, threshold = setting
        g = torch.Generator(device=dev).manual_seed(seed)
        outs, stats = [], []
        for rows in batches:
            if gamma is None:
                res = decode(model, rows, max_new_tokens, sampling=sampling, generator=g, stop_id=eos,
                             use_cache=use_cache, head=head)
            else:
                res = speculative_decode(model, drafter, rows, max_new_tokens, gamma=gamma, adaptive=threshold,
                                         sampling=sampling, generator=g, stop_id=eos, use_cache=use_cache, head=head)
            outs += res.tokens
            stats.append(res.stats)
        return outs, stats

    protocols = [("kv-cache", True)] + ([("paper (no cache)", False)] if paper_protocol else [])
    report = {"checkpoint": str(checkpoint), "step": meta["step"], "device": str(dev),
              "drafter": drafter_name or objective.default_drafter,
              "threads": torch.get_num_threads(), "prompts": len(prompts), "prompt_len": [len(p) for p in prompts],
              "max_new_tokens": max_new_tokens, "batch_size": batch_size, "repeats": repeats,
              "temperature": temperature, "stop_at_eos": stop_at_eos, "protocols": {}}
    with torch.no_grad():
        run(settings[0], True, 0)  # warm-up
        for pname, use_cache in protocols:
            times = {s[0]: [] for s in settings}
            outputs, all_stats = {}, {}
            for r in range(repeats):
                for setting in settings:
                    t, (outs, stats) = _time(run, dev, setting, use_cache, seed=r)
                    times[setting[0]].append(t)
                    outputs[setting[0]], all_stats[setting[0]] = outs, stats
            rows = []
            base_tokens = sum(len(o) for o in outputs["baseline"])
            for name, _, _ in settings:
                speedups = [tb / ts for tb, ts in zip(times["baseline"], times[name])]
                st = all_stats[name]
                total = DecodeStats.total(st)
                rounds, accepted = total.rounds, total.accepted
                speedup_median, speedup_min, speedup_max = spread(speedups)
                rows.append({
                    "setting": name,
                    "time_s_median": statistics.median(times[name]),
                    "tokens_per_s": sum(len(o) for o in outputs[name]) / statistics.median(times[name]),
                    "speedup_median": speedup_median,
                    "speedup_min": speedup_min,
                    "speedup_max": speedup_max,
                    "accepted_per_round": accepted / rounds if rounds else None,
                    "tokens_per_pass": (accepted + rounds) / rounds if rounds else 1.0,
                    "acceptance_by_position": [a / t if t else None
                                               for a, t in zip(total.position_accepts, total.position_tries)],
                    "draft_time_s": total.draft_time_s,
                    "verify_time_s": total.verify_time_s,
                    "identical_to_baseline": outputs[name] == outputs["baseline"] if temperature == 0 else None,
                    "new_tokens": sum(len(o) for o in outputs[name]),
                })
            report["protocols"][pname] = rows
            print(f"\n{pname}: {len(prompts)} prompts, batch {batch_size}, {base_tokens} new tokens, "
                  f"{repeats} repeats, device {dev}, threads {torch.get_num_threads()}")
            print(f"{'setting':14s} {'tok/s':>8s} {'speedup [min, max]':>24s} {'accepted/round':>15s} "
                  f"{'tok/pass':>9s} {'draft s':>8s} {'verify s':>9s} {'identical':>9s}")
            for row in rows:
                acc = f"{row['accepted_per_round']:.2f}" if row["accepted_per_round"] is not None else "-"
                ident = {True: "yes", False: "NO", None: "n/a"}[row["identical_to_baseline"]]
                print(f"{row['setting']:14s} {row['tokens_per_s']:8.1f} {row['speedup_median']:8.2f}x "
                      f"[{row['speedup_min']:.2f}, {row['speedup_max']:.2f}] {acc:>15s} {row['tokens_per_pass']:9.2f} "
                      f"{row['draft_time_s']:8.3f} {row['verify_time_s']:9.3f} {ident:>9s}")
    if json_out:
        write_json(report, json_out)
    return report
