"""Why does the A5 dynamics model, run as an RNN, drift past the training length? Two probes of a
trained NextLat (or post-hoc dynamics) run, printed per run:

1. one-step error: p_psi applied to the transformer's own state h_t and the next input, at the
   training positions 2..train_len, against the transformer's h_{t+1} (relative L2 error), and how
   often the LM head decodes the prediction to the right running product;
2. the RNN with each predicted state projected back onto the image of the final RMSNorm
   ({g * u : rms(u) = 1}, g its learned scale), the set every transformer state lies in, beside the
   plain RNN, at the run's evaluation lengths; and how much of u sits where g is near zero, the
   coordinates the projection is most sensitive to.

Usage: python scripts/a5_rnn_diagnostics.py RUN [RUN ...]   (run or checkpoint folders of A5 runs)
"""

from __future__ import annotations

import sys

import torch

from nextlat.tasks.a5 import accuracy_by_position, rnn_states
from nextlat.training.build import load_components


def one_step(model, dynamics, h: torch.Tensor, emb: torch.Tensor, targets: torch.Tensor):
    """p_psi on the transformer's states ``h`` (B, T, D) and input embeddings ``emb``: the relative L2
    error of its predictions of h_2..h_T, per position (T-1,), and how often they decode to ``targets``."""
    pred = dynamics(h[:, :-1], emb[:, 1:])
    rel = ((pred - h[:, 1:]).norm(dim=-1) / h[:, 1:].norm(dim=-1)).mean(0)
    acc = (model.logits(pred).argmax(-1) == targets[:, 1:h.shape[1]]).float().mean()
    return rel, acc


def small_scale_share(norm, x: torch.Tensor, below: float = 0.05) -> tuple[int, float, float]:
    """Entries of the final norm's scale g with |g| < ``below``: how many, the smallest |g|, and the
    mean share of rms(u)^2 their normalised coordinates u carry, for the norm's inputs ``x`` (u: x
    divided by its rms, so that the state is g * u)."""
    u = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    g = norm.weight.detach().abs()
    small = g < below
    share = (u[..., small].pow(2).sum(-1) / u.pow(2).sum(-1)).mean().item()
    return int(small.sum()), g.min().item(), share


def projected(dynamics, norm):
    """``dynamics`` followed by the projection of its output onto the image of ``norm`` (RMSNorm):
    g * u / rms(u) with u = output / g, which is ``norm(output / g)``."""
    g = norm.weight.detach()
    return lambda h, e: norm(dynamics(h, e) / g)


@torch.no_grad()
def diagnose(run: str) -> None:
    comps, meta = load_components(run)
    model, objective, task = comps.model.eval(), comps.objective.eval(), comps.task
    dynamics = getattr(objective, "dynamics", None)
    if dynamics is None:
        print(f"{run}: objective {comps.cfg.objective.name!r} has no dynamics model; skipped")
        return
    T, n = task.cfg.train_len, min(task.cfg.num_test, task.cfg.eval_examples)
    batch = task.test_data(max(task.cfg.eval_lengths)).get(torch.arange(n))
    seen = {}  # the final norm's input, caught on the same forward pass (the hook returns None: output kept)
    hook = model.norm.register_forward_hook(lambda mod, args, out: seen.update(x=args[0]))
    h, emb = model(batch.input_ids[:, :T])
    hook.remove()
    rel, acc = one_step(model, dynamics, h, emb, batch.targets)
    print(f"{run} (step {meta['step']}): one-step relative error at positions 2..{T}: "
          + " ".join(f"{x:.3f}" for x in rel.tolist()) + f"; decoded right {100 * acc:.1f}%")
    count, smallest, share = small_scale_share(model.norm, seen["x"])
    print(f"  final norm: {count} entries of |g| < 0.05 (smallest {smallest:.4f}), "
          f"{100 * share:.0f}% of rms(u)^2 at the trained positions")
    for L in task.cfg.eval_lengths:
        b = task.test_data(L).get(torch.arange(n))
        for name, dyn in (("RNN", dynamics), ("RNN, projected", projected(dynamics, model.norm))):
            a = accuracy_by_position(model, rnn_states(model, dyn, b.input_ids), b.targets)
            print(f"  length {L:3d}  {name:15s} {100 * a.mean():5.1f}% (last position {100 * a[-1]:5.1f}%)")


def main(runs: list[str]) -> None:
    torch.set_num_threads(1)
    for run in runs:
        diagnose(run)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
