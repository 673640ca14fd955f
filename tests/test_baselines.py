"""Baseline objectives (MTP, JTP, BST) against independent loop references, plus training, masks and checkpoints.

Tests that compare two computations of other shapes (an objective vs its loop reference, cached vs whole-sequence
heads, micro-batches vs the whole batch) or take argmaxes of random models run in float64 with tight tolerances:
float32 rounds such paths differently by 1e-6..1e-5 depending on the BLAS, which could also flip a near-tied argmax.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from nextlat.config import ConfigError
from nextlat.data import IGNORE, Batch
from nextlat.decoding.drafters import MTPDrafter
from nextlat.decoding.engine import CachedTarget, decode
from nextlat.decoding.reference import generate
from nextlat.decoding.sampling import GREEDY, Sampling
from nextlat.model import Transformer
from nextlat.objectives.bst import BeliefState
from nextlat.objectives.jtp import JointTokenPrediction
from nextlat.objectives.mtp import MultiTokenPrediction
from nextlat.registry import OBJECTIVES, objective_class, objective_settings
from nextlat.training.build import build, load_components
from nextlat.training.checkpoint import CheckpointError, objective_fits, read_checkpoint, save_checkpoint
from nextlat.training.loop import Trainer

# ----------------------------------------------------------------------------- helpers


def _segments(batch: Batch) -> list[tuple[int, int, int]]:
    """(row, start, end) of every real document of the batch (end exclusive), over the input positions."""
    B, T = batch.input_ids.shape
    docs = batch.doc_ids if batch.doc_ids is not None else torch.zeros(B, T, dtype=torch.long)
    out = []
    for b in range(B):
        start = 0
        for t in range(1, T + 1):
            if t == T or docs[b, t] != docs[b, start]:
                if docs[b, start] >= 0:
                    out.append((b, start, t))
                start = t
    return out


def _mean(term) -> torch.Tensor:
    return term.sum / term.count


def _ce(logits: torch.Tensor, target: int) -> torch.Tensor:
    return -torch.log_softmax(logits, -1)[target]


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@pytest.fixture
def lm_batch(vocab) -> Batch:
    """Like ``packed_batch`` but with next-token targets (what BST needs): two packed documents in row 0,
    one document and 3 padding positions in row 1, prompt targets masked at the start of each document."""
    g = torch.Generator().manual_seed(4321)
    seq = torch.randint(0, vocab, (2, 13), generator=g)
    input_ids, targets = seq[:, :-1], seq[:, 1:].clone()
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [-1] * 3])
    targets[0, [0, 1, 5, 6]] = IGNORE
    targets[1, [0, 1, 2]] = IGNORE
    targets[1, 9:] = IGNORE
    return Batch(input_ids, targets, doc_ids)


# ----------------------------------------------------------------------------- MTP / JTP: exactness


def test_zero_lambda_equals_next_token_exactly(make_model, make_objective, packed_batch):
    """MTP with lambda 0 is next-token training exactly (JTP with lambda 0 still predicts through its fetch module)."""
    model = make_model()
    nt = make_objective(model, name="next_token")
    obj = make_objective(model, name="mtp", horizon=3, lambda_future=0.0)
    out_nt, out = nt(model, packed_batch), obj(model, packed_batch)
    assert set(out.terms) == {"ce"} and set(obj.counts(packed_batch)) == {"ce"}
    assert torch.equal(out_nt.loss(), out.loss())
    params = list(model.parameters())
    g_nt = torch.autograd.grad(out_nt.loss(), params)
    g = torch.autograd.grad(out.loss(), params)
    assert all(torch.equal(a, b) for a, b in zip(g_nt, g))


def test_mtp_matches_loop_reference(make_model, make_objective, packed_batch):
    """Each document run on its own, heads applied by hand, every (t, k) scored in a loop."""
    model = make_model(n_layer=3).double()  # float64: see the module docstring
    d, lam = 3, 0.7
    obj = make_objective(model, name="mtp", horizon=d, lambda_future=lam).double()
    out = obj(model, packed_batch)
    n = model.cfg.n_layer
    sums, counts = [0.0] * (d + 1), [0] * (d + 1)
    for row, a, e in _segments(packed_batch):
        ids = packed_batch.input_ids[row : row + 1, a:e]
        x, _, ctx = model.forward_layers(ids, n_layers=n - 1)
        states = [model.norm(model.layers[n - 1](x, ctx, n - 1))[0]]
        states += [norm(head(x, ctx))[0] for head, norm in zip(obj.heads, obj.norms)]
        for t in range(e - a):
            for k in range(d + 1):
                u = a + t + k
                if u < e and int(packed_batch.targets[row, u]) != IGNORE:
                    sums[k] = sums[k] + _ce(states[k][t] @ model.lm_head.weight.T, int(packed_batch.targets[row, u]))
                    counts[k] += 1
    names = ["ce"] + [f"mtp@{k}" for k in range(1, d + 1)]
    assert set(out.terms) == set(names)
    assert {k: int(v) for k, v in obj.counts(packed_batch).items()} == dict(zip(names, counts))
    tol = dict(rtol=1e-10, atol=1e-12)
    for k, name in enumerate(names):
        assert int(out.terms[name].count) == counts[k], name
        torch.testing.assert_close(_mean(out.terms[name]), sums[k] / counts[k], **tol)
        assert out.terms[name].weight == pytest.approx(1.0 if k == 0 else lam / d)
    expected = sums[0] / counts[0] + lam / d * sum(s / c for s, c in zip(sums[1:], counts[1:]))
    torch.testing.assert_close(out.loss(), expected, **tol)


def test_mtp_head_zero_is_the_backbone_and_heads_share_lm_head(make_model, make_objective, packed_batch):
    model = make_model()
    obj = make_objective(model, name="mtp", horizon=2)
    assert isinstance(obj, MultiTokenPrediction) and len(obj.heads) == len(obj.norms) == 2
    assert not any(p is model.lm_head.weight for p in obj.parameters())
    out_nt = make_objective(model, name="next_token")(model, packed_batch)
    assert torch.equal(obj(model, packed_batch).terms["ce"].sum, out_nt.terms["ce"].sum)
    # Every head sends gradient into the shared LM head; the future terms alone reach the trunk but not the last block.
    loss = sum(t.sum for name, t in obj(model, packed_batch).terms.items() if name != "ce")
    loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0 and model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    assert model.layers[-1].mlp.up_proj.weight.grad is None


def test_mtp_drafter_reads_the_heads_through_its_own_cache(make_model, make_objective, vocab):
    """The drafter's cached head logits, run incrementally like a decoder, equal the heads run on whole sequences."""
    model = make_model().double()  # float64: see the module docstring
    obj = make_objective(model, name="mtp", horizon=2).double()
    drafter = MTPDrafter(model, obj)
    assert drafter.max_draft == 2 and drafter.trunk_layers == model.cfg.n_layer - 1
    ids = torch.randint(0, vocab, (3, 9))
    target = CachedTarget(model, list(ids[:, :5]), 16, drafter)
    steps = [target.run(ids[:, 5:7]), target.run(ids[:, 7:9])]  # two runs: positions 5-6, then 7-8
    target.keep(torch.tensor([2, 1, 0]), [2, 1, 0])  # rows keep different numbers of the second run's tokens
    x, _, ctx = model.forward_layers(ids, n_layers=model.cfg.n_layer - 1)
    for k in (1, 2):
        full = model.logits(obj.head_state(model, x, ctx, k))  # (B, T, V)
        torch.testing.assert_close(drafter.logits[:, :, k - 1], full[:, 7:9], atol=1e-12, rtol=1e-12)
        state = drafter.begin(None, torch.tensor([1, 0, 1]))  # positions 8, 7, 8 of the last run
        for _ in range(k):
            logits, state = drafter.propose(state, None)
        torch.testing.assert_close(logits, full[torch.arange(3), torch.tensor([8, 7, 8])], atol=1e-12, rtol=1e-12)
    h, _ = model(ids)
    torch.testing.assert_close(steps[1], h[:, 7:9], atol=1e-12, rtol=1e-12)  # head 0 is the backbone itself
    assert target.cache.lengths.tolist() == [9, 8, 7] and target.cache.end == 9  # the heads' cache follows these


def _fetch_by_hand(fetch, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """The fetch module written out for one position: h (D,), e (L, D) -> (L, D). LayerNorm of e + gamma h,
    per-head causal attention with the learned (query slot, key slot) bias, output projection, (+ h with
    fetch_residual) RMSNorm."""
    L, D = e.shape
    H = fetch.n_head
    Dh = D // H
    v = e + fetch.gamma * h
    z = (v - v.mean(-1, keepdim=True)) / torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + 1e-5)
    z = z * fetch.ln.weight + fetch.ln.bias
    q, k, val = z @ fetch.q_proj.weight.T, z @ fetch.k_proj.weight.T, z @ fetch.v_proj.weight.T
    heads = []
    for hd in range(H):
        sl = slice(hd * Dh, (hd + 1) * Dh)
        scores = q[:, sl] @ k[:, sl].T / math.sqrt(Dh)
        for i in range(L):
            for j in range(L):
                scores[i, j] = scores[i, j] + fetch.rel_bias[hd, i, j] if j <= i else float("-inf")
        heads.append(torch.softmax(scores, -1) @ val[:, sl])
    y = torch.cat(heads, -1) @ fetch.o_proj.weight.T
    return _rms(y + h if fetch.residual else y, fetch.norm.weight)


def _jtp(make_model, make_objective, n_head: int = 2, **kw):
    """A float64 JTP with non-trivial values for every fetch parameter."""
    model = make_model(n_head=n_head).double()  # float64: see the module docstring
    obj = make_objective(model, name="jtp", **{"horizon": 2, **kw}).double()
    f = obj.fetch
    with torch.no_grad():
        f.gamma.fill_(0.3)
        f.rel_bias.normal_()
        f.ln.weight.uniform_(0.5, 1.5)
        f.ln.bias.normal_(0, 0.1)
        f.norm.weight.uniform_(0.5, 1.5)
    return model, obj


@pytest.mark.parametrize("n_head, d, lam, residual", [(2, 3, 0.6, False), (8, 2, 1.0, False), (2, 3, 0.0, False),
                                                      (2, 3, 0.6, True)])
def test_jtp_matches_loop_reference(make_model, make_objective, packed_batch, n_head, d, lam, residual):
    """Every slot of every position through the fetch module by hand, per document: slot 0 is the ``ce`` term."""
    model, obj = _jtp(make_model, make_objective, n_head, horizon=d, lambda_future=lam, fetch_residual=residual)
    assert obj.fetch.residual == residual
    fetch = obj.fetch
    assert fetch.n_head == min(4, n_head)
    out = obj(model, packed_batch)
    W = model.lm_head.weight
    n_slots = d + 1 if lam > 0 else 1
    sums, counts = [0.0] * n_slots, [0] * n_slots
    for row, a, e in _segments(packed_batch):
        h, emb = model(packed_batch.input_ids[row : row + 1, a:e])
        h, emb = h[0], emb[0]
        for t in range(e - a):
            L = min(n_slots - 1, e - a - 1 - t) + 1  # slot j reads x_{t+j}: only this document's tokens
            o = _fetch_by_hand(fetch, h[t], emb[t : t + L])
            for j in range(L):
                y = int(packed_batch.targets[row, a + t + j])
                if y != IGNORE:
                    sums[j] = sums[j] + _ce(o[j] @ W.T, y)
                    counts[j] += 1
    names = ["ce"] + [f"jtp@{j}" for j in range(1, n_slots)]
    assert set(out.terms) == set(names)
    assert {k: int(v) for k, v in obj.counts(packed_batch).items()} == dict(zip(names, counts))
    tol = dict(rtol=1e-10, atol=1e-12)
    for j, name in enumerate(names):
        assert int(out.terms[name].count) == counts[j], name
        torch.testing.assert_close(_mean(out.terms[name]), sums[j] / counts[j], **tol)
    expected = sums[0] / counts[0] + lam / d * sum(s / c for s, c in zip(sums[1:], counts[1:]))
    torch.testing.assert_close(out.loss(), expected, **tol)
    # The next-token loss is the fetch module's, not the LM head on h_t (that would be GPT's).
    gpt = make_objective(model, name="next_token")(model, packed_batch).terms["ce"]
    assert not torch.allclose(_mean(out.terms["ce"]), _mean(gpt))


def test_jtp_fetch_parameters(make_model, make_objective, packed_batch):
    model = make_model()
    obj = make_objective(model, name="jtp", horizon=2)
    assert isinstance(obj, JointTokenPrediction)
    f = obj.fetch
    assert f.gamma.shape == () and f.gamma.item() == pytest.approx(0.1)
    assert f.rel_bias.shape == (2, 3, 3) and not f.rel_bias.any()  # (heads, d + 1, d + 1), zero at the start
    assert isinstance(f.ln, torch.nn.LayerNorm)
    assert make_objective(make_model(n_head=8), name="jtp", horizon=3).fetch.rel_bias.shape == (4, 4, 4)  # <= 4 heads
    D = model.cfg.d_model
    assert sum(p.numel() for p in obj.parameters()) == 1 + 2 * D + 4 * D * D + 2 * 3 * 3 + D
    obj(model, packed_batch).loss().backward()
    for name in ("gamma", "rel_bias", "q_proj.weight", "o_proj.weight", "ln.weight", "norm.weight"):
        assert dict(f.named_parameters())[name].grad.abs().sum() > 0, name
    # Gradients reach h_t (the backbone), the embedding of the teacher-forced tokens and the shared LM head.
    assert model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.embed_tokens.weight.grad.abs().sum() > 0 and model.lm_head.weight.grad.abs().sum() > 0


def test_jtp_slot_zero_is_the_decoding_head(make_model, make_objective, vocab):
    """decoding_head(h_t, x_t) is slot 0 by hand at every position, and its cross-entropy is the training ``ce``."""
    model, obj = _jtp(make_model, make_objective, n_head=8)
    ids = torch.randint(0, vocab, (3, 9), generator=torch.Generator().manual_seed(5))
    targets = torch.randint(0, vocab, (3, 9), generator=torch.Generator().manual_seed(6))
    targets[:, :2] = IGNORE
    h, emb = model(ids)
    got = obj.decoding_head(model)(h, ids)  # (3, 9, V)
    for b in range(3):
        for t in range(9):
            ref = _fetch_by_hand(obj.fetch, h[b, t], emb[b, t : t + 1])[0] @ model.lm_head.weight.T
            torch.testing.assert_close(got[b, t], ref, rtol=1e-12, atol=1e-12)
    ce = obj(model, Batch(ids, targets)).terms["ce"]
    keep = targets != IGNORE
    torch.testing.assert_close(ce.sum, F.cross_entropy(got[keep], targets[keep], reduction="sum"),
                               rtol=1e-12, atol=1e-12)
    # Slot 0 at t sees only h_t and x_t: changing later tokens changes neither.
    later = ids.clone()
    later[:, 5:] = (later[:, 5:] + 1) % vocab
    h2, _ = model(later)
    torch.testing.assert_close(obj.decoding_head(model)(h2, later)[:, :5], got[:, :5], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="ids of shape"):
        obj.decoding_head(model)(h, ids[:, :-1])


@torch.no_grad()
def test_jtp_decodes_through_slot_zero(make_model, make_objective, vocab):
    """Reference generation, the KV-cached engine and the no-cache engine pick slot 0's argmax at every step."""
    model, obj = _jtp(make_model, make_objective)
    model.eval()
    head = obj.decoding_head(model)
    prompt = torch.randint(0, vocab, (4, 5), generator=torch.Generator().manual_seed(2))
    seq = prompt
    for _ in range(8):  # the loop reference: slot 0 on the last state and the last token
        h, emb = model(seq)
        logits = torch.stack([_fetch_by_hand(obj.fetch, h[b, -1], emb[b, -1:])[0] for b in range(len(seq))])
        seq = torch.cat([seq, (logits @ model.lm_head.weight.T).argmax(-1)[:, None]], 1)
    assert torch.equal(generate(model, prompt, 8, head=head), seq)
    assert decode(model, prompt, 8, head=head).tokens == seq[:, 5:].tolist()
    assert decode(model, prompt, 8, head=head, use_cache=False).tokens == seq[:, 5:].tolist()
    assert not torch.equal(generate(model, prompt, 8), seq)  # the LM head on h_t decodes something else
    sampled = Sampling(temperature=1.0)
    a = generate(model, prompt, 8, sampling=sampled, generator=torch.Generator().manual_seed(3), head=head)
    b = decode(model, prompt, 8, sampling=sampled, generator=torch.Generator().manual_seed(3), head=head)
    assert b.tokens == a[:, 5:].tolist()


class _Spy:
    """Wraps an objective's decoding_head and records the (h, ids) shapes of every call."""

    def __init__(self, objective, model):
        self.calls: list[tuple[tuple, tuple]] = []
        self.real = objective.decoding_head(model)

    def __call__(self, h, ids):
        self.calls.append((tuple(h.shape), tuple(ids.shape)))
        return self.real(h, ids)


def test_pathstar_evaluates_jtp_through_slot_zero(run_config, monkeypatch):
    comps = build(run_config(**{"objective.name": "jtp"}))
    model, obj, task = comps.model, comps.objective, comps.task
    spy = _Spy(obj, model)
    monkeypatch.setattr(obj, "decoding_head", lambda m: spy)
    out = task.evaluate(model, obj, seed=0)
    assert spy.calls and all(hs[:-1] == ids for hs, ids in spy.calls)
    data, n, L = task.test_data(), comps.cfg.task.eval_examples, comps.cfg.task.path_len
    P, seqs = data.prompt_len, data.seqs[: comps.cfg.task.eval_examples]
    head = obj.__class__.decoding_head(obj, model)
    with torch.no_grad():
        greedy = generate(model, seqs[:, :P], L, head=head)[:, P:]
        h, _ = model(seqs[:, : P + L - 1])
        teacher = head(h[:, P - 1 :], seqs[:, P - 1 : P + L - 1]).argmax(-1)
        lm = model.logits(h[:, P - 1 :]).argmax(-1)
    assert not torch.equal(teacher, lm)  # slot 0 and the LM head on h_t disagree here, so the check below decides
    answer = seqs[:, P : P + L]
    assert out["acc_greedy"] == pytest.approx((greedy == answer).all(-1).float().mean().item())
    for k in range(L):
        assert out[f"pos_acc_{k + 1}"] == pytest.approx((teacher[:, k] == answer[:, k]).float().mean().item())
    assert len(seqs) == n



@pytest.mark.parametrize("name", ["mtp", "jtp"])
def test_future_terms_at_sequence_edges(make_model, make_objective, vocab, name):
    """Horizons longer than the sequence: only heads with a target in range exist, each scoring T - k positions."""
    model = make_model()
    obj = make_objective(model, name=name, horizon=4)
    x = torch.randint(0, vocab, (2, 3))
    batch = Batch(x, torch.randint(0, vocab, (2, 3)))
    out = obj(model, batch)
    assert set(out.terms) == {"ce", f"{name}@1", f"{name}@2"}
    assert {k: int(t.count) for k, t in out.terms.items()} == {"ce": 6, f"{name}@1": 4, f"{name}@2": 2}
    assert {k: int(v) for k, v in obj.counts(batch).items()} == {k: int(t.count) for k, t in out.terms.items()}
    assert all(t.weight == pytest.approx(1 / 4) for k, t in out.terms.items() if k != "ce")
    one = Batch(x[:, :1], x[:, :1])
    assert set(obj(model, one).terms) == set(obj.counts(one)) == {"ce"}


# ----------------------------------------------------------------------------- BST


def _full_sequence(batch: Batch, row: int) -> tuple[list[int], list[int]]:
    """Tokens x_0..x_T of a row (input_ids then the last target) and each token's document (-1: padding)."""
    T = batch.input_ids.shape[1]
    docs = batch.doc_ids[row].tolist() if batch.doc_ids is not None else [0] * T
    last = int(batch.targets[row, -1])
    return batch.input_ids[row].tolist() + [max(last, 0)], docs + [docs[-1] if last != IGNORE else -1]


def reference_bst_pairs(batch: Batch) -> list[tuple[int, int, int]]:
    """(row, t, s): prefix x_0..x_t and suffix x_s..x_e of one document (x_e its last token), gap x_{t+1}..x_{s-1}
    non-empty, suffix non-empty, and both labels x_{t+1} (``targets[t]``) and x_{s-1} (``targets[s-2]``) scored."""
    out = []
    for row in range(batch.input_ids.shape[0]):
        _, docs = _full_sequence(batch, row)
        for t in range(len(docs) - 1):
            if docs[t] < 0:
                continue
            end = max(i for i in range(len(docs)) if docs[i] == docs[t])
            for s in range(t + 2, end + 1):
                if int(batch.targets[row, t]) != IGNORE and int(batch.targets[row, s - 2]) != IGNORE:
                    out.append((row, t, s))
    return out


def _pair_list(p) -> list[tuple[int, int, int]]:
    return [(int(r), int(t), int(j) + 2) for r, t, j in zip(p.row, p.prefix, p.last)]


def _doc_end(batch: Batch, row: int, t: int) -> int:
    _, docs = _full_sequence(batch, row)
    return max(i for i in range(len(docs)) if docs[i] == docs[t])


def test_bst_pairs_cover_every_valid_pair_once(make_model, make_objective, lm_batch):
    model = make_model()
    obj = make_objective(model, name="bst")
    got = _pair_list(obj.pairs(lm_batch))
    ref = reference_bst_pairs(lm_batch)
    assert len(got) == len(set(got)) and sorted(got) == sorted(ref)
    # By hand: row 0's first document x_0..x_4 scores x_3, x_4 (one pair, (2, 4)); its second, x_5..x_12,
    # scores x_8..x_12 (prefixes 7..10); row 1's document x_0..x_8 scores x_3..x_8 (prefixes 3..6).
    assert len(got) == 1 + 10 + 10
    assert sorted(t for r, t, s in got if r == 0 and t < 5) == [2]
    assert sorted({t for r, t, s in got if r == 0 and t >= 5}) == [7, 8, 9, 10]
    assert sorted({t for r, t, s in got if r == 1}) == [3, 4, 5, 6] and max(s for r, t, s in got if r == 1) == 8
    # No prefix stops inside a prompt and no suffix is empty.
    assert all(int(lm_batch.targets[r, t]) != IGNORE and s <= _doc_end(lm_batch, r, t) for r, t, s in got)
    _, at_end = obj.valid_pairs(lm_batch)
    p = obj.pairs(lm_batch)
    ends = [s == _doc_end(lm_batch, r, t) for r, t, s in got]
    assert at_end[p.row, p.prefix, p.last].tolist() == ends and sum(ends) == 1 + 4 + 4


def _text_head_by_hand(head, f: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[f; b] + SwiGLU([f; b]), then RMSNorm over the 2D features."""
    z = torch.cat([f, b])
    mlp = (F.silu(z @ head.gate_proj.weight.T) * (z @ head.up_proj.weight.T)) @ head.down_proj.weight.T
    return _rms(z + mlp, head.norm.weight)


def _backward_by_hand(model, obj):
    """A plain Transformer with the backward encoder's blocks and final norm and the backbone's embedding."""
    ref = Transformer(model.cfg).double()
    state = {**obj.backward_encoder.state_dict(), "embed_tokens.weight": model.embed_tokens.weight,
             "lm_head.weight": model.lm_head.weight}
    ref.load_state_dict(state, strict=True)
    return ref


def _bst(make_model, make_objective, **kw):
    model = make_model().double()  # float64: see the module docstring
    obj = make_objective(model, name="bst", **kw).double()
    with torch.no_grad():
        obj.text_head.norm.weight.uniform_(0.5, 1.5)
    return model, obj


def test_bst_matches_loop_reference(make_model, make_objective, lm_batch):
    """Forward states per document, backward states by reading each suffix right to left with the backbone's
    embedding, the text head and the shared LM head per pair; loss = mean over pairs of (CE_next + CE_prev) / 2."""
    model, obj = _bst(make_model, make_objective)
    backward = _backward_by_hand(model, obj)
    out = obj(model, lm_batch)
    D, W = model.cfg.d_model, model.lm_head.weight
    sums, pairs = {"ce": 0.0, "prev": 0.0}, reference_bst_pairs(lm_batch)
    for row, t, s in pairs:
        tokens, docs = _full_sequence(lm_batch, row)
        start, end = min(i for i in range(len(docs)) if docs[i] == docs[t]), _doc_end(lm_batch, row, t)
        f = model(torch.tensor([tokens[start : t + 1]]))[0][0, -1]  # prefix x_start..x_t
        b = backward(torch.tensor([tokens[s : end + 1][::-1]]))[0][0, -1]  # suffix x_s..x_end, read right to left
        z = _text_head_by_hand(obj.text_head, f, b)
        sums["ce"] = sums["ce"] + _ce(z[:D] @ W.T, int(lm_batch.targets[row, t]))
        sums["prev"] = sums["prev"] + _ce(z[D:] @ W.T, int(lm_batch.targets[row, s - 2]))
    n = len(pairs)
    assert {k: int(t.count) for k, t in out.terms.items()} == {"ce": n, "prev": n}
    assert {k: int(v) for k, v in obj.counts(lm_batch).items()} == {"ce": n, "prev": n}
    tol = dict(rtol=1e-10, atol=1e-12)
    for name in ("ce", "prev"):
        torch.testing.assert_close(_mean(out.terms[name]), sums[name] / n, **tol)
        assert out.terms[name].weight == 0.5
    torch.testing.assert_close(out.loss(), (sums["ce"] + sums["prev"]) / (2 * n), **tol)


def test_bst_text_head_pairs_equal_the_head_on_each_pair(make_model, make_objective):
    """The per-state split of the first layer gives what the head computes on each concatenated pair."""
    model, obj = _bst(make_model, make_objective)
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 6, 32, generator=g, dtype=torch.float64)
    b = torch.randn(2, 5, 32, generator=g, dtype=torch.float64)
    row, prefix = torch.tensor([0, 0, 1, 1, 1, 0]), torch.tensor([0, 0, 3, 5, 3, 2])
    suffix = torch.tensor([1, 4, 0, 4, 2, 1])  # pairs share states: each is projected once
    got = obj.text_head.pairs(f, b, row, prefix, suffix)
    for p in range(len(row)):
        ref = _text_head_by_hand(obj.text_head, f[row[p], prefix[p]], b[row[p], suffix[p]])
        torch.testing.assert_close(got[p], ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(obj.text_head(f[row[p], prefix[p]], b[row[p], suffix[p]]), ref,
                                   rtol=1e-12, atol=1e-12)


def test_bst_shares_the_embedding_and_the_lm_head(make_model, make_objective, lm_batch):
    model = make_model()
    obj = make_objective(model, name="bst")
    assert isinstance(obj, BeliefState)
    names = dict(obj.named_parameters())
    assert not any(k.startswith(("backward_encoder.embed_tokens", "backward_encoder.lm_head")) for k in names)
    assert not {id(p) for p in obj.parameters()} & {id(p) for p in model.parameters()}  # no parameter twice
    D = model.cfg.d_model
    H = 128 * max(1, round(16 * D / 3 / 128))  # the SwiGLU width of a 2D-wide block
    head = obj.text_head
    assert (head.gate_proj.weight.shape, head.up_proj.weight.shape, head.down_proj.weight.shape,
            head.norm.weight.shape) == ((H, 2 * D), (H, 2 * D), (2 * D, H), (2 * D,))
    blocks = sum(p.numel() for p in model.layers.parameters()) + D  # the backward encoder: blocks and final norm
    assert sum(p.numel() for p in obj.parameters()) == blocks + 3 * 2 * D * H + 2 * D
    # Both encoders read the backbone's embedding, and both heads train the backbone's LM head.
    loss = obj(model, lm_batch).terms["prev"].sum
    loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0 and model.embed_tokens.weight.grad.abs().sum() > 0
    before = obj.suffix_states(model, lm_batch).detach()
    with torch.no_grad():
        model.embed_tokens.weight.mul_(2)
    assert not torch.allclose(obj.suffix_states(model, lm_batch), before)


def test_bst_pair_subsampling(make_model, make_objective, vocab):
    model = make_model()
    seq = torch.randint(0, vocab, (16, 21), generator=torch.Generator().manual_seed(0))
    batch = Batch(seq[:, :-1], seq[:, 1:])  # one document x_0..x_20 per row, every token scored
    full = make_objective(model, name="bst")
    valid = set(_pair_list(full.pairs(batch)))
    n_row = 19 * 20 // 2  # t = 0..18, s = t + 2..20
    assert len(valid) == 16 * n_row and valid == set(reference_bst_pairs(batch))
    at_end = {(r, t, s) for r, t, s in valid if s == 20}  # the suffix [x_20]: one pair per prefix
    assert len(at_end) == 16 * 19
    for frac in (0.5, 0.1):
        obj = make_objective(model, name="bst", bst_pair_fraction=frac)
        got = _pair_list(obj.pairs(batch))
        assert len(got) == len(set(got)) and set(got) <= valid
        assert at_end <= set(got)  # the pairs decoding uses are always scored
        others = [r for r, t, s in got if s != 20]
        per_row = torch.bincount(torch.tensor(others), minlength=16)
        assert (per_row == math.floor(frac * (n_row - 19) + 0.5)).all()
        assert _pair_list(obj.pairs(batch)) == got  # deterministic given the batch
        out = obj(model, batch)
        assert {k: int(t.count) for k, t in out.terms.items()} == {k: int(v) for k, v in obj.counts(batch).items()}
        # Rows draw different pairs, and another batch draws another sample.
        rows = [sorted((t, s) for r, t, s in got if r == i) for i in range(2)]
        assert rows[0] != rows[1]
        other = Batch(batch.input_ids.roll(1, 0), batch.targets.roll(1, 0))
        assert _pair_list(obj.pairs(other)) != got
    # Each other pair is drawn with about the right probability across many batches.
    obj = make_objective(model, name="bst", bst_pair_fraction=0.3)
    hits = torch.zeros(19, 19)  # (t, j = s - 2)
    for i in range(40):
        seq = torch.randint(0, vocab, (4, 21), generator=torch.Generator().manual_seed(100 + i))
        p = obj.pairs(Batch(seq[:, :-1], seq[:, 1:]))
        hits.index_put_((p.prefix, p.last), torch.ones(len(p.row)), accumulate=True)
    assert (hits[:, 18] == 160).all()  # s = 20: every time
    share = hits[:, :18][torch.ones(19, 18, dtype=torch.bool).triu()] / 160
    assert share.mean().item() == pytest.approx(math.floor(0.3 * (n_row - 19) + 0.5) / (n_row - 19), abs=1e-6)
    assert share.min().item() > 0.1 and share.max().item() < 0.5


def test_bst_only_scores_answer_tokens(make_model, make_objective, lm_batch):
    """Masking every target leaves nothing to score; every pair's labels are scored targets."""
    model = make_model()
    obj = make_objective(model, name="bst")
    masked = Batch(lm_batch.input_ids, torch.full_like(lm_batch.targets, IGNORE), lm_batch.doc_ids)
    out = obj(model, masked)
    assert all(int(t.count) == 0 and t.sum.item() == 0.0 for t in out.terms.values())
    p = obj.pairs(lm_batch)
    assert (lm_batch.targets[p.row, p.prefix] != IGNORE).all() and (lm_batch.targets[p.row, p.last] != IGNORE).all()


def test_bst_needs_next_token_targets(make_model, make_objective, packed_batch):
    model = make_model()
    obj = make_objective(model, name="bst")
    with pytest.raises(ValueError, match="next-token targets"):
        obj(model, packed_batch)


def test_bst_decoding_matches_training_states(make_model, make_objective, vocab):
    model, obj = _bst(make_model, make_objective)  # float64: greedy argmaxes of a random model
    seq = torch.randint(0, vocab, (3, 9))
    batch = Batch(seq[:, :-1], seq[:, 1:])
    states = obj.suffix_states(model, batch)  # (B, T - 1, D): index j reads x_{j+2}..x_T
    assert states.shape == (3, 7, model.cfg.d_model)
    for j in (0, 3, 6):
        torch.testing.assert_close(obj.suffix_state(model, seq[:, j + 2 :], 3), states[:, j], rtol=1e-10, atol=1e-12)
    # Greedy goal-conditioned decoding through BST's head takes the next-token head's argmax at every step.
    prompt, suffix = seq[:, :4], seq[:, 7:]
    out = generate(model, prompt, 3, head=obj.decoding_head(model, suffix))
    assert out.shape == (3, 7) and torch.equal(out[:, :4], prompt)
    for t in range(4, 7):
        assert torch.equal(out[:, t], obj.next_logits(model, out[:, :t], suffix)[:, -1].argmax(-1))
    sampled, head = Sampling(temperature=1.0), obj.decoding_head(model, seq[:, -1:])
    a = generate(model, prompt, 3, sampling=sampled, generator=torch.Generator().manual_seed(3), head=head)
    b = generate(model, prompt, 3, sampling=sampled, generator=torch.Generator().manual_seed(3), head=head)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="rows"):
        generate(model, prompt[:2], 1, head=obj.decoding_head(model, suffix))
    for bad in (None, seq[:, :0]):  # there is no empty suffix: without a goal, BST decodes towards [EOS]
        with pytest.raises(ValueError, match=r"S >= 1"):
            obj.decoding_head(model, bad)


def _bst_loop(obj, model, prompt, n, suffix, sampling=GREEDY, generator=None):
    """Decoding by hand: the whole prefix each step, the text head on (f_last, b(suffix)), the next half, the LM head."""
    b = _backward_by_hand(model, obj)(suffix.flip(1))[0][:, -1]
    seq, D = prompt, model.cfg.d_model
    for _ in range(n):
        f, _ = model(seq)
        z = torch.stack([_text_head_by_hand(obj.text_head, f[i, -1], b[i]) for i in range(len(seq))])
        seq = torch.cat([seq, sampling.choose(z[:, :D] @ model.lm_head.weight.T, generator)[:, None]], dim=1)
    return seq


@torch.no_grad()
def test_bst_decodes_through_the_engine_like_a_loop(make_model, make_objective, vocab):
    """Reference generation with BST's head is the loop by hand; the KV-cached engine (float64, so kernel shapes
    cannot decide a near tie) gives the same tokens, greedy and sampled."""
    torch.manual_seed(0)
    model = make_model(init_std=0.3).double().eval()  # a larger init: less repetitive outputs
    obj = make_objective(model, name="bst").double().eval()
    prompt, suffix = torch.randint(0, vocab, (4, 5)), torch.randint(0, vocab, (4, 3))
    for suf in (suffix[:, -1:], suffix):
        head = obj.decoding_head(model, suf)
        old = _bst_loop(obj, model, prompt, 8, suf)
        assert torch.equal(generate(model, prompt, 8, head=head), old)
        assert decode(model, prompt, 8, head=head).tokens == old[:, 5:].tolist()
        assert decode(model, prompt, 8, head=head, use_cache=False).tokens == old[:, 5:].tolist()
    sampled = Sampling(temperature=1.0, top_k=5)
    old = _bst_loop(obj, model, prompt[:1], 8, suffix[:1], sampling=sampled, generator=torch.Generator().manual_seed(1))
    new = generate(model, prompt[:1], 8, sampling=sampled, generator=torch.Generator().manual_seed(1),
                   head=obj.decoding_head(model, suffix[:1]))
    assert torch.equal(new, old)
    got = decode(model, prompt[:1], 8, sampling=sampled, generator=torch.Generator().manual_seed(1),
                 head=obj.decoding_head(model, suffix[:1]))
    assert got.tokens == old[:, 5:].tolist()


def test_pathstar_evaluates_bst_with_goal_conditioned_decoding(run_config):
    comps = build(run_config(**{"objective.name": "bst"}))
    out = comps.task.evaluate(comps.model, comps.objective, seed=0)
    L = comps.cfg.task.path_len
    assert set(out) == {"acc_greedy", "acc_sampled", *(f"pos_acc_{k}" for k in range(1, L + 1)),
                        *(f"back_acc_{k}" for k in range(1, L))}
    assert out[f"pos_acc_{L}"] == 1.0  # the goal comes from the suffix
    # back_acc_k: the previous-token half's argmax for answer node k, after the prompt, before node k+1..EOS.
    data = comps.task.test_data()
    n, P, D = comps.cfg.task.eval_examples, data.prompt_len, comps.cfg.model.d_model
    seqs = data.seqs[:n]
    for k in range(1, L):
        with torch.no_grad():
            f, _ = comps.model(seqs[:, :P])
            b = comps.objective.suffix_state(comps.model, seqs[:, P + k : P + L + 1], n)  # node k+1 .. goal, EOS
            pred = comps.model.logits(comps.objective.text_head(f[:, -1], b)[:, D:]).argmax(-1)
        assert out[f"back_acc_{k}"] == pytest.approx((pred == seqs[:, P + k - 1]).float().mean().item())
    assert comps.task.evaluate(comps.model, comps.objective, seed=0) == out


def test_pathstar_bst_pairs_start_at_the_answer(run_config):
    """On G(2, 4) (answer of 4 nodes, then EOS): prefixes end at '=' or later, 4 + 3 + 2 + 1 pairs per row, 4 of them
    with the suffix [EOS]."""
    comps = build(run_config(**{"objective.name": "bst"}))
    batch = comps.task.train_data().get(torch.arange(3))
    P = comps.task.train_data().prompt_len
    eq = comps.task.tokenizer.encode("=")[0]
    assert (batch.input_ids[:, P - 1] == eq).all()
    p = comps.objective.pairs(batch)
    assert len(p.row) == 3 * 10 and int(p.prefix.min()) == P - 1
    T = batch.input_ids.shape[1]
    assert int((p.last == T - 2).sum()) == 3 * 4 and (batch.targets[:, -1] == comps.task.tokenizer.eos_id).all()



# ----------------------------------------------------------------------------- shared: accumulation, training, checkpoints


@pytest.mark.parametrize("name", ["mtp", "jtp", "bst"])
def test_micro_batches_with_global_counts_are_exact(make_model, make_objective, lm_batch, name):
    model = make_model().double()  # float64: see the module docstring
    obj = make_objective(model, name=name, **({} if name == "bst" else {"horizon": 2})).double()
    whole = obj(model, lm_batch).loss()
    micro = lm_batch.split(2)
    counts = obj.total_counts(micro)
    torch.testing.assert_close(sum(obj(model, mb).loss(counts) for mb in micro), whole, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["mtp", "jtp", "bst"])
def test_trains_on_pathstar_and_lowers_the_loss(run_config, tmp_path, name):
    cfg = run_config(**{"objective.name": name, "train.steps": 10, "train.lr": 3e-3, "train.log_every": 1})
    results = Trainer(cfg, out_dir=tmp_path).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < sum(losses[:3])
    assert results["objective"] == name and "acc_greedy" in results["eval"]


@pytest.mark.parametrize("name", ["mtp", "jtp", "bst"])
def test_checkpoint_round_trip(run_config, tmp_path, name):
    comps = build(run_config(**{"objective.name": name}))
    with torch.no_grad():
        for p in list(comps.model.parameters()) + list(comps.objective.parameters()):
            p.add_(torch.randn_like(p) * 0.01)
    path = save_checkpoint(tmp_path / "checkpoints" / "step_0000001", cfg=comps.cfg, model=comps.model,
                           objective=comps.objective, step=1)
    loaded, meta = load_components(path)
    assert meta["step"] == 1 and loaded.cfg == comps.cfg and isinstance(loaded.objective, objective_class(name))
    for a, b in ((comps.model, loaded.model), (comps.objective, loaded.objective)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    batch = comps.task.train_data().get(torch.arange(4))
    assert torch.equal(comps.objective(comps.model, batch).loss(), loaded.objective(loaded.model, batch).loss())


@pytest.mark.parametrize("name", ["jtp", "bst"])
def test_checkpoints_of_the_earlier_bst_and_jtp_are_refused(run_config, tmp_path, name, capsys):
    """BST and JTP weights changed meaning (version 2): a checkpoint without a recorded objective version (version 1)
    is refused with the reason; as ``train.init_from`` it gives only its backbone. Other objectives are unaffected."""
    comps = build(run_config(**{"objective.name": name}))
    path = save_checkpoint(tmp_path / "old" / "checkpoints" / "step_0000001", cfg=comps.cfg, model=comps.model,
                           objective=comps.objective, step=1)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["objective_version"] == 2
    del meta["objective_version"]  # as nextlat wrote it before the objective's version was recorded
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"its {name} weights are of version 1, .* is version 2: "
                                              rf"{name.upper()} now follows the paper's code"):
        load_components(path)
    assert not objective_fits(read_checkpoint(path), comps.objective)
    cfg = run_config(**{"objective.name": name, "train.init_from": str(path), "train.steps": 1, "train.eval_every": 0})
    Trainer(cfg, out_dir=tmp_path / "new").fit()
    assert "(backbone)" in capsys.readouterr().out
    nt = build(run_config(**{"objective.name": "next_latent"}))
    path = save_checkpoint(tmp_path / "nl" / "checkpoints" / "step_0000001", cfg=nt.cfg, model=nt.model,
                           objective=nt.objective, step=1)
    meta = json.loads((path / "meta.json").read_text())
    del meta["objective_version"]
    (path / "meta.json").write_text(json.dumps(meta))
    load_components(path)  # version 1, as before


@pytest.mark.parametrize("name, key, value, pattern", [
    ("mtp", "lambda_future", -1.0, r"objective\.lambda_future=-1\.0: must be >= 0"),
    ("jtp", "horizon", 0, r"objective\.horizon=0: must be >= 1"),
    ("bst", "bst_pair_fraction", 0.0, r"objective\.bst_pair_fraction=0\.0: must be in \(0, 1\]"),
    ("bst", "bst_pair_fraction", 1.5, r"objective\.bst_pair_fraction=1\.5"),
    # each objective takes only its own settings
    ("bst", "horizon", 2, r"unknown key objective\.horizon \(known under objective: name, bst_pair_fraction\)"),
    ("next_latent", "lambda_future", 1.0, r"unknown key objective\.lambda_future"),
])
def test_bad_objective_settings_are_named(run_config, name, key, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        run_config(**{"objective.name": name, f"objective.{key}": value})


def test_only_horizon_free_objectives_skip_the_horizon_sweep():
    assert {name for name in OBJECTIVES if "horizon" not in objective_settings(name)} == {"next_token", "bst"}
