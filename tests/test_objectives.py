"""NextLat objective: exact semantics of docs/architecture.md section 1 against an independent loop reference.

Tests that compare two computations of other shapes (the vectorised objective vs the loop reference, a packed
row vs its documents, micro-batches vs the whole batch) run in float64 with tight tolerances: float32 rounds
them differently by 1e-6..1e-5 depending on the BLAS, so float32 tolerances would be decided by the machine.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nextlat.data import IGNORE, Batch
from nextlat.decoding.drafters import NextLatDrafter
from nextlat.model import RMSNorm
from nextlat.objectives.base import LossOutput
from nextlat.objectives.next_latent import LatentDynamics, NextLatent
from nextlat.objectives.next_token import NextToken
from nextlat.registry import build_drafter

# ----------------------------------------------------------------------------- reference


def _valid(batch: Batch, b: int, t: int, u: int) -> bool:
    """Transition t -> u of row b stays inside one real document."""
    if batch.doc_ids is None:
        return True
    return bool(batch.doc_ids[b, t] == batch.doc_ids[b, u]) and bool(batch.doc_ids[b, u] >= 0)


def reference_losses(model, dynamics, batch: Batch, d: int, *, detach_targets: bool = True):
    """Plain step-by-step NextLat losses with explicit loops over (batch, t, i).

    Returns per-step means (lists of length d) for next-h and KL, the CE mean and the counts.
    ``detach_targets=False`` is a deliberately wrong variant used to show the stop-gradient matters.
    """
    h, emb = model(batch.input_ids, batch.doc_ids)
    W = model.lm_head.weight
    B, T, D = h.shape
    nh_sum, nh_n = [0.0] * d, [0] * d
    kl_sum, kl_n = [0.0] * d, [0] * d
    ce_sum, ce_n = 0.0, 0
    for b in range(B):
        for t in range(T):
            y = int(batch.targets[b, t])
            if y != IGNORE:
                logp = torch.log_softmax(h[b, t] @ W.T, dim=-1)
                ce_sum = ce_sum - logp[y]
                ce_n += 1
            state = h[b, t]  # h^_t = h_t
            for i in range(1, d + 1):
                u = t + i
                if u >= T:
                    break
                state = dynamics(state, emb[b, u])  # teacher forcing with the true token x_{t+i}
                if not _valid(batch, b, t, u):
                    continue
                target = h[b, u].detach() if detach_targets else h[b, u]
                diff = state - target
                a = diff.abs()
                nh_sum[i - 1] = nh_sum[i - 1] + torch.where(a < 1, 0.5 * diff**2, a - 0.5).sum()
                nh_n[i - 1] += D
                if int(batch.targets[b, u]) != IGNORE:
                    teacher = target @ (W.detach() if detach_targets else W).T
                    logp = torch.log_softmax(teacher, -1)
                    logq = torch.log_softmax(state @ W.detach().T, -1)
                    kl_sum[i - 1] = kl_sum[i - 1] + (logp.exp() * (logp - logq)).sum()
                    kl_n[i - 1] += 1
    return {
        "ce": ce_sum / ce_n,
        "next_h": [s / n for s, n in zip(nh_sum, nh_n)],
        "kl": [s / n for s, n in zip(kl_sum, kl_n)],
        "counts": {"ce": ce_n, **{f"next_h@{i + 1}": n for i, n in enumerate(nh_n)},
                   **{f"kl@{i + 1}": n for i, n in enumerate(kl_n)}},
    }


def reference_total(ref, lam_h: float, lam_kl: float, d: int):
    return ref["ce"] + lam_h / d * sum(ref["next_h"]) + lam_kl / d * sum(ref["kl"])


def aux_loss(out: LossOutput) -> torch.Tensor:
    """Weighted means of every term except the token loss."""
    return sum(term.weight * term.sum / term.count.clamp(min=1) for name, term in out.terms.items() if name != "ce")


def _mean(term) -> torch.Tensor:
    return term.sum / term.count


# ----------------------------------------------------------------------------- tests


def test_zero_aux_weights_equal_next_token_exactly(make_model, make_objective, packed_batch):
    model = make_model()
    nt = make_objective(model, name="next_token")
    nl = make_objective(model, name="next_latent", horizon=3, lambda_h=0.0, lambda_kl=0.0)
    out_nt, out_nl = nt(model, packed_batch), nl(model, packed_batch)
    assert set(out_nl.terms) == {"ce"}
    assert torch.equal(out_nt.loss(), out_nl.loss())
    assert torch.equal(out_nt.terms["ce"].count, out_nl.terms["ce"].count)
    # The gradients are the same too.
    g_nt = torch.autograd.grad(out_nt.loss(), list(model.parameters()))
    g_nl = torch.autograd.grad(out_nl.loss(), list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(g_nt, g_nl))


@pytest.mark.parametrize("d,lam_h,lam_kl", [(3, 0.7, 1.3), (1, 1.0, 1.0)])
def test_rollout_matches_loop_reference(make_model, make_objective, packed_batch, d, lam_h, lam_kl):
    model = make_model().double()  # float64: see the module docstring
    obj = make_objective(model, name="next_latent", horizon=d, lambda_h=lam_h, lambda_kl=lam_kl).double()
    out = obj(model, packed_batch)
    ref = reference_losses(model, obj.dynamics, packed_batch, d)

    assert set(out.terms) == {"ce", *(f"next_h@{i}" for i in range(1, d + 1)), *(f"kl@{i}" for i in range(1, d + 1))}
    tol = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_mean(out.terms["ce"]), ref["ce"], **tol)
    for i in range(1, d + 1):
        torch.testing.assert_close(_mean(out.terms[f"next_h@{i}"]), ref["next_h"][i - 1], **tol)
        torch.testing.assert_close(_mean(out.terms[f"kl@{i}"]), ref["kl"][i - 1], **tol)
        assert out.terms[f"next_h@{i}"].weight == pytest.approx(lam_h / d)
        assert out.terms[f"kl@{i}"].weight == pytest.approx(lam_kl / d)
    for name, n in ref["counts"].items():
        assert int(out.terms[name].count) == n, name
    torch.testing.assert_close(out.loss(), reference_total(ref, lam_h, lam_kl, d), **tol)
    # Logged parts average the rollout steps: (1/d) sum_i of per-step means.
    parts = out.parts()
    assert parts["next_h"] == pytest.approx(float(sum(ref["next_h"]).detach()) / d, rel=1e-10)
    assert parts["kl"] == pytest.approx(float(sum(ref["kl"]).detach()) / d, rel=1e-10)
    # Sanity: the reference really exercises both Smooth-L1 branches and a non-trivial KL.
    assert all(v > 0 for v in ref["kl"])


def test_smooth_l1_is_a_mean_over_features(make_model, make_objective, packed_batch):
    """The next-h term is a per-element mean, not summed over features (so it cannot swamp the CE)."""
    model = make_model()
    obj = make_objective(model, name="next_latent", horizon=1, lambda_kl=0.0)
    out = obj(model, packed_batch)
    term = out.terms["next_h@1"]
    n_transitions = 4 + 6 + 8  # row 0: two documents of 5 and 7 tokens; row 1: 9 real tokens
    assert int(term.count) == n_transitions * model.cfg.d_model
    assert "kl@1" not in out.terms


def test_latent_dynamics_formula(make_model):
    """h^ = h + fc3(gelu(fc2(gelu(fc1(RMSNorm([E(x), h])))))), exact GELU, embedding first, no biases."""
    torch.manual_seed(0)
    dyn = LatentDynamics(d_model=32, proj_factor=1.0, init_std=0.1).double()  # float64: matmul vs F.linear
    assert dyn.fc1.out_features == dyn.fc2.out_features == 128  # max(128, 128 * round(2D / 128))
    assert (dyn.fc1.in_features, dyn.fc3.out_features) == (64, 32)
    assert all(m.bias is None for m in (dyn.fc1, dyn.fc2, dyn.fc3))
    assert isinstance(dyn.norm, RMSNorm) and dyn.norm.eps == 1e-5
    with torch.no_grad():
        dyn.norm.weight.uniform_(0.5, 1.5)  # a non-trivial learnable scale
    h, e = torch.randn(3, 5, 32, dtype=torch.float64), torch.randn(3, 5, 32, dtype=torch.float64)
    z = torch.cat([e, h], -1)
    z = z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + 1e-5) * dyn.norm.weight
    gelu = lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))  # noqa: E731 - exact (erf) GELU
    expected = h + gelu(gelu(z @ dyn.fc1.weight.T) @ dyn.fc2.weight.T) @ dyn.fc3.weight.T
    torch.testing.assert_close(dyn(h, e), expected, rtol=1e-10, atol=1e-12)
    # Swapping the arguments changes the result: the order [embedding, state] matters.
    assert not torch.allclose(dyn(e, h), expected)


def test_dynamics_width_follows_proj_factor():
    assert LatentDynamics(192, proj_factor=1.0).fc1.out_features == 384  # 128 * round(384 / 128)
    assert LatentDynamics(192, proj_factor=2.0).fc2.out_features == 768
    assert LatentDynamics(16, proj_factor=1.0).fc1.out_features == 128  # at least 128


# ----------------------------------------------------------------------------- gradients


def test_aux_terms_train_trunk_embedding_and_dynamics_not_head(make_model, make_objective, packed_batch):
    model = make_model()
    obj = make_objective(model, name="next_latent", horizon=2)
    aux_loss(obj(model, packed_batch)).backward()
    head = model.lm_head.weight.grad
    assert head is None or not head.any()
    for name, p in [("layers.0.self_attn.q_proj.weight", model.layers[0].self_attn.q_proj.weight),
                    ("layers.0.mlp.gate_proj.weight", model.layers[0].mlp.gate_proj.weight),
                    ("embed_tokens.weight", model.embed_tokens.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in obj.dynamics.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"dynamics.{name}"


def test_kl_alone_does_not_train_the_head(make_model, make_objective, packed_batch):
    model = make_model()
    obj = make_objective(model, name="next_latent", horizon=2, lambda_h=0.0)
    out = obj(model, packed_batch)
    kl = sum(t.weight * t.sum / t.count for n, t in out.terms.items() if n.startswith("kl@"))
    kl.backward()
    assert model.lm_head.weight.grad is None or not model.lm_head.weight.grad.any()
    assert model.layers[0].self_attn.v_proj.weight.grad.abs().sum() > 0


def test_targets_are_stop_gradient(make_model, make_objective, packed_batch):
    """Aux gradients equal those of the reference with detached targets, and differ without the detach."""
    model = make_model().double()  # float64: see the module docstring
    d, lam_h, lam_kl = 2, 1.0, 1.0
    obj = make_objective(model, name="next_latent", horizon=d, lambda_h=lam_h, lambda_kl=lam_kl).double()
    params = list(model.parameters()) + list(obj.dynamics.parameters())

    def grads(loss):
        return torch.autograd.grad(loss, params, allow_unused=True)

    def ref_aux(detach):
        ref = reference_losses(model, obj.dynamics, packed_batch, d, detach_targets=detach)
        return lam_h / d * sum(ref["next_h"]) + lam_kl / d * sum(ref["kl"])

    g_obj = grads(aux_loss(obj(model, packed_batch)))
    g_ref = grads(ref_aux(True))
    g_bad = grads(ref_aux(False))
    zero = lambda g, p: torch.zeros_like(p) if g is None else g  # noqa: E731
    for a, b, p in zip(g_obj, g_ref, params):
        torch.testing.assert_close(zero(a, p), zero(b, p), rtol=1e-10, atol=1e-12)
    differs = [not torch.allclose(zero(a, p), zero(b, p), rtol=1e-4, atol=1e-6) for a, b, p in zip(g_obj, g_bad, params)]
    assert any(differs), "the non-detached variant should give different gradients"


def test_rollout_is_not_detached_between_steps(make_model, make_objective, packed_batch):
    """The step-2 term alone reaches h_t and the step-1 token embedding through step 1's output."""
    model = make_model()
    obj = make_objective(model, name="next_latent", horizon=2, lambda_kl=0.0)
    captured = {}
    model.norm.register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
    model.embed_tokens.register_forward_hook(lambda m, i, o: captured.__setitem__("emb", o))
    out = obj(model, packed_batch)
    h, emb = captured["h"], captured["emb"]
    step2 = out.terms["next_h@2"].sum
    g_h, g_emb = torch.autograd.grad(step2, [h, emb])
    # h_0 only enters step 2 as the rollout's start (its own target role is at t = 0, never scored).
    assert g_h[:, 0].abs().sum() > 0
    # x_1 feeds step 1 of the rollout from t = 0; step 2 reads x_{t+2} with t >= 0, never x_1 directly.
    assert g_emb[:, 1].abs().sum() > 0
    # and the step-2 term sends gradient into every dynamics parameter
    g_dyn = torch.autograd.grad(obj(model, packed_batch).terms["next_h@2"].sum, list(obj.dynamics.parameters()))
    assert all(g.abs().sum() > 0 for g in g_dyn)


# ----------------------------------------------------------------------------- masks


def _expected_counts(batch: Batch, d: int, D: int) -> dict[str, int]:
    B, T = batch.input_ids.shape
    out = {"ce": int((batch.targets != IGNORE).sum())}
    for i in range(1, d + 1):
        pairs = [(b, t) for b in range(B) for t in range(T - i) if _valid(batch, b, t, t + i)]
        out[f"next_h@{i}"] = D * len(pairs)
        out[f"kl@{i}"] = sum(int(batch.targets[b, t + i]) != IGNORE for b, t in pairs)
    return out


def test_masks_and_counts(make_model, make_objective, packed_batch):
    model = make_model()
    d = 3
    obj = make_objective(model, name="next_latent", horizon=d)
    out = obj(model, packed_batch)
    expected = _expected_counts(packed_batch, d, model.cfg.d_model)
    got = {k: int(t.count) for k, t in out.terms.items()}
    assert got == expected
    # counts() (no model) agrees with the forward's own counts, key for key.
    assert {k: int(v) for k, v in obj.counts(packed_batch).items()} == got
    # Transitions into prompt positions are scored by next_h but not by kl (steps 1 and 2 have some).
    for i in (1, 2):
        assert got[f"next_h@{i}"] // model.cfg.d_model > got[f"kl@{i}"]
    # Hand count for step 1: row 0 has 4 + 6 in-document transitions, row 1 has 8 (none into padding).
    assert got["next_h@1"] == 18 * model.cfg.d_model
    # destinations with a target: row 0 -> positions 2,3,4 and 7..11 (8); row 1 -> 3..8 (6)
    assert got["kl@1"] == 14
    assert got["ce"] == 24 - 4 - 3 - 3


def test_packed_documents_score_like_separate_documents(make_model, make_objective, packed_batch):
    """Boundary and padding transitions are excluded: a packed row scores exactly as its documents apart."""
    model = make_model().double()  # float64: see the module docstring
    obj = make_objective(model, name="next_latent", horizon=3).double()
    packed = obj(model, packed_batch)
    x, y = packed_batch.input_ids, packed_batch.targets
    pieces = [(0, slice(0, 5)), (0, slice(5, 12)), (1, slice(0, 9))]
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for row, sl in pieces:
        out = obj(model, Batch(x[row : row + 1, sl], y[row : row + 1, sl]))
        for k, t in out.terms.items():
            sums[k] = sums.get(k, 0) + t.sum
            counts[k] = counts.get(k, 0) + int(t.count)
    assert set(sums) == set(packed.terms)
    for k, t in packed.terms.items():
        assert int(t.count) == counts[k], k
        torch.testing.assert_close(t.sum, sums[k], rtol=1e-10, atol=1e-12)


def test_prompt_targets_do_not_change_ce_or_kl_but_next_h_sees_prompts(make_model, make_objective, packed_batch):
    model = make_model()
    obj = make_objective(model, name="next_latent", horizon=2)
    base = obj(model, packed_batch)
    # Masking every target leaves next_h untouched (it scores prompts too) and zeroes ce / kl.
    all_masked = Batch(packed_batch.input_ids, torch.full_like(packed_batch.targets, IGNORE), packed_batch.doc_ids)
    out = obj(model, all_masked)
    for i in (1, 2):
        assert torch.equal(out.terms[f"next_h@{i}"].sum, base.terms[f"next_h@{i}"].sum)
        assert torch.equal(out.terms[f"next_h@{i}"].count, base.terms[f"next_h@{i}"].count)
        assert int(out.terms[f"kl@{i}"].count) == 0 and out.terms[f"kl@{i}"].sum.item() == 0.0
    expected = sum(t.weight * t.sum / t.count for n, t in base.terms.items() if n.startswith("next_h@"))
    assert int(out.terms["ce"].count) == 0
    torch.testing.assert_close(out.loss(), expected)


def test_loss_with_global_counts_is_exact_over_micro_batches(make_model, make_objective, packed_batch):
    """sum over micro-batches of loss(global counts) == loss of the whole batch (exact accumulation)."""
    model = make_model().double()  # float64: see the module docstring
    obj = make_objective(model, name="next_latent", horizon=2).double()
    whole = obj(model, packed_batch).loss()
    micro = packed_batch.split(2)
    counts = obj.total_counts(micro)
    accumulated = sum(obj(model, mb).loss(counts) for mb in micro)
    torch.testing.assert_close(accumulated, whole, rtol=1e-10, atol=1e-12)
    # while averaging per-micro-batch means would not be exact here (the rows have different counts)
    naive = sum(obj(model, mb).loss() for mb in micro) / 2
    assert not torch.allclose(naive, whole, rtol=1e-5, atol=1e-6)


def test_next_token_objective_is_plain_cross_entropy(make_model, make_objective, packed_batch):
    model = make_model()
    obj = make_objective(model, name="next_token")
    assert isinstance(obj, NextToken) and not list(obj.parameters())
    out = obj(model, packed_batch)
    h, _ = model(packed_batch.input_ids, packed_batch.doc_ids)
    expected = F.cross_entropy(model.logits(h).flatten(0, 1), packed_batch.targets.flatten(), ignore_index=IGNORE)
    torch.testing.assert_close(out.loss(), expected)
    assert out.n_tokens == int((packed_batch.targets != IGNORE).sum())


def test_next_latent_owns_its_dynamics(make_model, make_objective):
    model = make_model()
    obj = make_objective(model, name="next_latent", proj_factor=1.0)
    assert isinstance(obj, NextLatent)
    names = {n for n, _ in obj.named_parameters()}
    assert names == {"dynamics.norm.weight", "dynamics.fc1.weight", "dynamics.fc2.weight", "dynamics.fc3.weight"}
    drafter = build_drafter(obj.default_drafter, model, obj)
    assert isinstance(drafter, NextLatDrafter) and drafter.dynamics is obj.dynamics and drafter.model is model
