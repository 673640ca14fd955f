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
from nextlat.objectives.bst import BeliefState
from nextlat.objectives.jtp import JointTokenPrediction
from nextlat.objectives.mtp import MultiTokenPrediction
from nextlat.registry import OBJECTIVES, objective_class, objective_settings
from nextlat.training.build import build, load_components
from nextlat.training.checkpoint import save_checkpoint
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


@pytest.mark.parametrize("name", ["mtp", "jtp"])
def test_zero_lambda_equals_next_token_exactly(make_model, make_objective, packed_batch, name):
    model = make_model()
    nt = make_objective(model, name="next_token")
    obj = make_objective(model, name=name, horizon=3, lambda_future=0.0)
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


def test_jtp_matches_loop_reference(make_model, make_objective, packed_batch):
    """The fetch module written out per position: LayerNorm, per-head attention with a relative bias, residual, norm."""
    model = make_model().double()  # float64: see the module docstring
    d, lam = 3, 0.6
    obj = make_objective(model, name="jtp", horizon=d, lambda_future=lam).double()
    fetch = obj.fetch
    with torch.no_grad():  # non-trivial values for every fetch parameter
        fetch.gamma.fill_(0.3)
        fetch.rel_bias.normal_()
        fetch.ln.weight.uniform_(0.5, 1.5)
        fetch.ln.bias.normal_(0, 0.1)
        fetch.norm.weight.uniform_(0.5, 1.5)
    out = obj(model, packed_batch)
    H, D = model.cfg.n_head, model.cfg.d_model
    Dh = D // H
    W = model.lm_head.weight
    sums, counts = [0.0] * (d + 1), [0] * (d + 1)
    for row, a, e in _segments(packed_batch):
        h, emb = model(packed_batch.input_ids[row : row + 1, a:e])
        h, emb = h[0], emb[0]
        for t in range(e - a):
            y = int(packed_batch.targets[row, a + t])
            if y != IGNORE:
                sums[0] = sums[0] + _ce(h[t] @ W.T, y)
                counts[0] += 1
            L = min(d, e - a - 1 - t) + 1  # only the tokens of this document
            v = emb[t : t + L] + fetch.gamma * h[t]
            z = (v - v.mean(-1, keepdim=True)) / torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + 1e-5)
            z = z * fetch.ln.weight + fetch.ln.bias
            q, k, val = z @ fetch.q_proj.weight.T, z @ fetch.k_proj.weight.T, z @ fetch.v_proj.weight.T
            heads = []
            for hd in range(H):
                sl = slice(hd * Dh, (hd + 1) * Dh)
                scores = q[:, sl] @ k[:, sl].T / math.sqrt(Dh)
                for i in range(L):
                    for j in range(L):
                        scores[i, j] = scores[i, j] + fetch.rel_bias[hd, i - j] if j <= i else float("-inf")
                heads.append(torch.softmax(scores, -1) @ val[:, sl])
            o = _rms(h[t] + torch.cat(heads, -1) @ fetch.o_proj.weight.T, fetch.norm.weight)
            for j in range(1, L):
                y = int(packed_batch.targets[row, a + t + j])
                if y != IGNORE:
                    sums[j] = sums[j] + _ce(o[j] @ W.T, y)
                    counts[j] += 1
    names = ["ce"] + [f"jtp@{j}" for j in range(1, d + 1)]
    assert set(out.terms) == set(names)
    assert {k: int(v) for k, v in obj.counts(packed_batch).items()} == dict(zip(names, counts))
    tol = dict(rtol=1e-10, atol=1e-12)
    for j, name in enumerate(names):
        assert int(out.terms[name].count) == counts[j], name
        torch.testing.assert_close(_mean(out.terms[name]), sums[j] / counts[j], **tol)
    expected = sums[0] / counts[0] + lam / d * sum(s / c for s, c in zip(sums[1:], counts[1:]))
    torch.testing.assert_close(out.loss(), expected, **tol)


def test_jtp_fetch_parameters(make_model, make_objective, packed_batch):
    model = make_model()
    obj = make_objective(model, name="jtp", horizon=2)
    assert isinstance(obj, JointTokenPrediction)
    f = obj.fetch
    assert f.gamma.shape == () and f.gamma.item() == pytest.approx(0.1)
    assert f.rel_bias.shape == (model.cfg.n_head, 3) and not f.rel_bias.any()
    assert isinstance(f.ln, torch.nn.LayerNorm)
    loss = sum(t.sum for name, t in obj(model, packed_batch).terms.items() if name != "ce")
    loss.backward()
    for name in ("gamma", "rel_bias", "q_proj.weight", "o_proj.weight", "ln.weight"):
        assert dict(f.named_parameters())[name].grad.abs().sum() > 0, name
    # Gradients reach h_t (the backbone) and the embedding of the teacher-forced tokens.
    assert model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.embed_tokens.weight.grad.abs().sum() > 0


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
    """(row, t, s): prefix x_0..x_t and suffix x_s.. of one document, gap x_{t+1}..x_{s-1} non-empty
    (s may be one past the document's end: empty suffix), and x_{t+1} or x_{s-1} scored."""
    out = []
    for row in range(batch.input_ids.shape[0]):
        _, docs = _full_sequence(batch, row)
        for t in range(len(docs)):
            if docs[t] < 0:
                continue
            end = max(i for i in range(len(docs)) if docs[i] == docs[t])
            for s in range(t + 2, end + 2):
                nxt, prev = int(batch.targets[row, t]), int(batch.targets[row, s - 2])
                if nxt != IGNORE or prev != IGNORE:
                    out.append((row, t, s))
    return out


def _pair_list(p) -> list[tuple[int, int, int]]:
    return [(int(r), int(t), int(j) + 2) for r, t, j in zip(p.row, p.prefix, p.last)]


def test_bst_pairs_cover_every_valid_pair_once(make_model, make_objective, lm_batch):
    model = make_model()
    obj = make_objective(model, name="bst")
    got = _pair_list(obj.pairs(lm_batch))
    ref = reference_bst_pairs(lm_batch)
    assert len(got) == len(set(got)) and sorted(got) == sorted(ref)
    # Spot checks: no pair crosses row 0's document boundary (x_4 | x_5) and none reaches row 1's padding.
    assert all(not (r == 0 and t <= 4 < s - 1) for r, t, s in got)
    assert all(s - 1 <= 8 for r, t, s in got if r == 1)
    # Suffixes at each document's end are empty: doc 0 of row 0 ends at x_4, so s = 5 uses the empty state.
    p = obj.pairs(lm_batch)
    T = lm_batch.input_ids.shape[1]
    for r, t, j, k in zip(p.row, p.prefix, p.last, p.suffix):
        empty = (r == 0 and j + 2 == 5) or j + 2 == T + 1 or (r == 1 and j + 2 == 9)
        assert (int(k) == T - 1) == bool(empty), (int(r), int(t), int(j))


def test_bst_matches_loop_reference(make_model, make_objective, lm_batch):
    """Forward states per document, backward states by reading each suffix right to left, heads per pair."""
    model = make_model().double()  # float64: see the module docstring
    obj = make_objective(model, name="bst").double()
    out = obj(model, lm_batch)
    sums, counts = {"ce": 0.0, "prev": 0.0}, {"ce": 0, "prev": 0}
    cache: dict[tuple[int, int], torch.Tensor] = {}
    for row, t, s in reference_bst_pairs(lm_batch):
        tokens, docs = _full_sequence(lm_batch, row)
        start = min(i for i in range(len(docs)) if docs[i] == docs[t])
        end = max(i for i in range(len(docs)) if docs[i] == docs[t])
        f = model(torch.tensor([tokens[start : t + 1]]))[0][0, -1]  # prefix x_start..x_t
        if (row, s) not in cache:
            suffix = tokens[s : end + 1][::-1]
            cache[row, s] = obj.backward_encoder(torch.tensor([suffix]))[0][0, -1] if suffix else obj.empty_suffix
        z = torch.cat([f, cache[row, s]])  # the heads are MLPs on [f_t, b_s]
        for name, head, label in (("ce", obj.next_head, lm_batch.targets[row, t]),
                                  ("prev", obj.prev_head, lm_batch.targets[row, s - 2])):
            if int(label) != IGNORE:
                w1 = torch.cat([head.prefix_proj.weight, head.suffix_proj.weight], dim=1)  # (D, 2D)
                sums[name] = sums[name] + _ce(F.gelu(z @ w1.T) @ head.out.weight.T, int(label))
                counts[name] += 1
    assert {k: int(t.count) for k, t in out.terms.items()} == counts
    assert {k: int(v) for k, v in obj.counts(lm_batch).items()} == counts
    for name in ("ce", "prev"):
        torch.testing.assert_close(_mean(out.terms[name]), sums[name] / counts[name], rtol=1e-10, atol=1e-12)
        assert out.terms[name].weight == 1.0


def test_bst_pair_subsampling(make_model, make_objective, vocab):
    model = make_model()
    seq = torch.randint(0, vocab, (16, 21), generator=torch.Generator().manual_seed(0))
    batch = Batch(seq[:, :-1], seq[:, 1:])  # one document per row, every token scored
    full = make_objective(model, name="bst")
    valid = set(_pair_list(full.pairs(batch)))
    n_row = 20 * 21 // 2  # pairs t <= j over 20 positions
    assert len(valid) == 16 * n_row
    for frac in (0.5, 0.1):
        obj = make_objective(model, name="bst", bst_pair_fraction=frac)
        got = _pair_list(obj.pairs(batch))
        assert len(got) == len(set(got)) and set(got) <= valid
        per_row = torch.bincount(torch.tensor([r for r, _, _ in got]), minlength=16)
        assert (per_row == math.floor(frac * n_row + 0.5)).all()
        assert _pair_list(obj.pairs(batch)) == got  # deterministic given the batch
        out = obj(model, batch)
        assert {k: int(t.count) for k, t in out.terms.items()} == {k: int(v) for k, v in obj.counts(batch).items()}
        # Rows draw different pairs, and another batch draws another sample.
        rows = [sorted((t, s) for r, t, s in got if r == i) for i in range(2)]
        assert rows[0] != rows[1]
        other = Batch(batch.input_ids.roll(1, 0), batch.targets.roll(1, 0))
        assert _pair_list(obj.pairs(other)) != got
    # Each pair is drawn with about the right probability across many batches.
    obj = make_objective(model, name="bst", bst_pair_fraction=0.3)
    hits = torch.zeros(20, 20)
    for i in range(40):
        seq = torch.randint(0, vocab, (4, 21), generator=torch.Generator().manual_seed(100 + i))
        p = obj.pairs(Batch(seq[:, :-1], seq[:, 1:]))
        hits.index_put_((p.prefix, p.last), torch.ones(len(p.row)), accumulate=True)
    share = hits[torch.ones(20, 20, dtype=torch.bool).triu()] / 160
    assert share.mean().item() == pytest.approx(math.floor(0.3 * n_row + 0.5) / n_row, abs=1e-6)
    assert share.min().item() > 0.1 and share.max().item() < 0.5


def test_bst_only_scores_answer_tokens(make_model, make_objective, lm_batch):
    """Masking every target leaves nothing to score; prompt tokens are never labels of either head."""
    model = make_model()
    obj = make_objective(model, name="bst")
    masked = Batch(lm_batch.input_ids, torch.full_like(lm_batch.targets, IGNORE), lm_batch.doc_ids)
    out = obj(model, masked)
    assert all(int(t.count) == 0 and t.sum.item() == 0.0 for t in out.terms.values())
    p = obj.pairs(lm_batch)
    nxt, prev = lm_batch.targets[p.row, p.prefix], lm_batch.targets[p.row, p.last]
    assert ((nxt != IGNORE) | (prev != IGNORE)).all()  # every pair scores at least one answer token
    assert (nxt == IGNORE).any()  # prefixes ending inside a prompt still teach the previous-token head


def test_bst_needs_next_token_targets(make_model, make_objective, packed_batch):
    model = make_model()
    obj = make_objective(model, name="bst")
    with pytest.raises(ValueError, match="next-token targets"):
        obj(model, packed_batch)


def test_bst_decoding_matches_training_states(make_model, make_objective, vocab):
    model = make_model().double()  # float64: see the module docstring (greedy argmaxes of a random model)
    obj = make_objective(model, name="bst").double()
    assert isinstance(obj, BeliefState) and "lm_head.weight" not in dict(obj.backward_encoder.named_parameters())
    seq = torch.randint(0, vocab, (3, 9))
    batch = Batch(seq[:, :-1], seq[:, 1:])
    states = obj.suffix_states(batch)  # (B, T, D): index j reads x_{j+2}..x_T
    for j in (0, 3, 6):
        torch.testing.assert_close(obj.suffix_state(seq[:, j + 2 :], 3), states[:, j], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(states[:, -1], obj.empty_suffix.expand(3, -1))
    # Greedy goal-conditioned decoding through BST's head takes the next-token head's argmax at every step.
    prompt, suffix = seq[:, :4], seq[:, 7:]
    out = generate(model, prompt, 3, head=obj.decoding_head(model, suffix))
    assert out.shape == (3, 7) and torch.equal(out[:, :4], prompt)
    for t in range(4, 7):
        assert torch.equal(out[:, t], obj.next_logits(model, out[:, :t], suffix)[:, -1].argmax(-1))
    sampled, head = Sampling(temperature=1.0), obj.decoding_head(model)
    a = generate(model, prompt, 3, sampling=sampled, generator=torch.Generator().manual_seed(3), head=head)
    b = generate(model, prompt, 3, sampling=sampled, generator=torch.Generator().manual_seed(3), head=head)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="rows"):
        generate(model, prompt[:2], 1, head=obj.decoding_head(model, suffix))


def _bst_private_loop(obj, model, prompt, n, suffix=None, sampling=GREEDY, generator=None):
    """BeliefState.generate as it was before decoding went through nextlat.decoding (kept here as the reference)."""
    b = obj.suffix_state(suffix, prompt.shape[0])
    seq = prompt
    for _ in range(n):
        f, _ = model(seq)
        logits = obj.next_head(f[:, -1], b.to(f.dtype))
        seq = torch.cat([seq, sampling.choose(logits, generator)[:, None]], dim=1)
    return seq


@torch.no_grad()
def test_bst_decodes_through_the_engine_like_its_old_private_loop(make_model, make_objective, vocab):
    """Reference generation with BST's head is the old loop bit for bit; the KV-cached engine (float64, so kernel
    shapes cannot decide a near tie) gives the same tokens, greedy and sampled."""
    torch.manual_seed(0)
    model = make_model(init_std=0.3).double().eval()  # a larger init: less repetitive outputs
    obj = make_objective(model, name="bst").double().eval()
    prompt, suffix = torch.randint(0, vocab, (4, 5)), torch.randint(0, vocab, (4, 3))
    for suf in (None, suffix):
        head = obj.decoding_head(model, suf)
        old = _bst_private_loop(obj, model, prompt, 8, suf)
        assert torch.equal(generate(model, prompt, 8, head=head), old)
        assert decode(model, prompt, 8, head=head).tokens == old[:, 5:].tolist()
        assert decode(model, prompt, 8, head=head, use_cache=False).tokens == old[:, 5:].tolist()
    sampled = Sampling(temperature=1.0, top_k=5)
    old = _bst_private_loop(obj, model, prompt[:1], 8, sampling=sampled, generator=torch.Generator().manual_seed(1))
    new = generate(model, prompt[:1], 8, sampling=sampled, generator=torch.Generator().manual_seed(1),
                   head=obj.decoding_head(model))
    assert torch.equal(new, old)
    got = decode(model, prompt[:1], 8, sampling=sampled, generator=torch.Generator().manual_seed(1),
                 head=obj.decoding_head(model))
    assert got.tokens == old[:, 5:].tolist()


def test_pathstar_evaluates_bst_with_goal_conditioned_decoding(run_config):
    comps = build(run_config(**{"objective.name": "bst"}))
    out = comps.task.evaluate(comps.model, comps.objective, seed=0)
    L = comps.cfg.task.path_len
    assert set(out) == {"acc_greedy", "acc_sampled", *(f"pos_acc_{k}" for k in range(1, L + 1)),
                        *(f"back_acc_{k}" for k in range(1, L))}
    assert out[f"pos_acc_{L}"] == 1.0  # the goal comes from the suffix
    # back_acc_k: the previous-token head's argmax for answer node k, after the prompt, before node k+1..EOS.
    data = comps.task.test_data()
    n, P = comps.cfg.task.eval_examples, data.prompt_len
    seqs = data.seqs[:n]
    for k in range(1, L):
        with torch.no_grad():
            f, _ = comps.model(seqs[:, :P])
            b = comps.objective.suffix_state(seqs[:, P + k : P + L + 1], n)  # node k+1 .. goal, EOS
            pred = comps.objective.prev_head(f[:, -1], b).argmax(-1)
        assert out[f"back_acc_{k}"] == pytest.approx((pred == seqs[:, P + k - 1]).float().mean().item())
    assert comps.task.evaluate(comps.model, comps.objective, seed=0) == out


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
