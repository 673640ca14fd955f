"""Backbone: Llama layout, hidden states vs logits, input validation, document masking."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from nextlat.data import attention_mask_from_doc_ids, doc_ids_from_eos, positions_from_doc_ids
from nextlat.model import RMSNorm, Transformer


def test_forward_returns_final_norm_hidden_states_and_embeddings(make_model, vocab):
    model = make_model()
    seen = {}
    model.layers[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("resid", o))
    model.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("norm_in", i[0]))
    ids = torch.randint(0, vocab, (2, 7))
    h, emb = model(ids)
    assert h.shape == emb.shape == (2, 7, model.cfg.d_model)
    # h is the final norm applied to the residual stream leaving the last block
    assert torch.equal(seen["norm_in"], seen["resid"])
    torch.testing.assert_close(h, model.norm(seen["resid"]), rtol=0, atol=0)
    # emb is the input embedding the trunk used
    assert torch.equal(emb, model.embed_tokens.weight[ids])
    # logits are a separate call: the LM head applied to h
    torch.testing.assert_close(model.logits(h), h @ model.lm_head.weight.T)
    assert model.logits(h).shape == (2, 7, vocab)


def test_rmsnorm_formula():
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)


@pytest.mark.parametrize("offset", [0, 7, None])
def test_out_of_vocabulary_ids_raise_value_error_naming_the_id(make_model, vocab, offset):
    model = make_model()
    bad = -1 if offset is None else vocab + offset
    ids = torch.tensor([[1, 2, bad, 3]])
    with pytest.raises(ValueError, match=rf"token id {bad}\b"):
        model(ids)


@pytest.mark.parametrize("shape", [(5,), (1, 2, 3)])
def test_wrong_input_rank_raises(make_model, shape):
    model = make_model()
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(shape, dtype=torch.long))


def test_other_input_errors(make_model):
    model = make_model()
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, model.cfg.max_seq_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="doc_ids shape"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))


def test_vocab_size_must_be_set(model_cfg):
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(model_cfg(vocab_size=0))


def test_llama_parameter_names_and_no_biases(make_model):
    model = make_model()
    names = {n for n, _ in model.named_parameters()}
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"]
    expected = {"embed_tokens.weight", "norm.weight", "lm_head.weight"}
    expected |= {f"layers.{i}.{p}.weight" for i in range(model.cfg.n_layer) for p in per_layer}
    assert names == expected
    assert not any(re.search(r"bias", n) for n in names)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))
    # untied embedding and head; rotary tables are not saved
    assert model.embed_tokens.weight.data_ptr() != model.lm_head.weight.data_ptr()
    assert set(model.state_dict()) == names


def test_shapes_and_init(make_model):
    model = make_model(init_std=0.02, d_model=64, n_head=4)
    d = 64
    hidden = 128 * round(8 * d / 3 / 128)
    layer = model.layers[0]
    assert layer.mlp.gate_proj.weight.shape == (hidden, d)
    assert layer.mlp.down_proj.weight.shape == (d, hidden)
    assert layer.self_attn.q_proj.weight.shape == (d, d)
    assert torch.equal(model.norm.weight, torch.ones(d))
    w = torch.cat([p.flatten() for n, p in model.named_parameters() if p.dim() == 2])
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002


def test_is_causal(make_model, vocab):
    model = make_model()
    ids = torch.randint(0, vocab, (1, 10))
    h1, _ = model(ids)
    ids2 = ids.clone()
    ids2[0, 6:] = (ids2[0, 6:] + 1) % vocab
    h2, _ = model(ids2)
    torch.testing.assert_close(h1[:, :6], h2[:, :6])
    assert not torch.allclose(h1[:, 6:], h2[:, 6:])


@pytest.mark.parametrize("eos_opens", [True, False])
def test_document_masking_equals_separate_documents(make_model, vocab, eos_opens):
    # float64: the packed row and the separate documents run matmuls of other shapes, which round float32
    # differently (by BLAS); in float64 the only difference left is ~1e-15.
    model = make_model().double()
    eos = vocab - 1
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, eos, (6,), generator=g), torch.randint(0, eos, (8,), generator=g)
    if eos_opens:  # the official convention: <eos> a.. <eos> b..; each EOS at its document's position 0
        doc_a, doc_b = torch.cat([torch.tensor([eos]), a]), torch.cat([torch.tensor([eos]), b])
    else:  # nextlat 0.1.0: a.. <eos> b..
        doc_a, doc_b = torch.cat([a, torch.tensor([eos])]), torch.cat([b, b[:1]])
    packed = torch.cat([doc_a, doc_b])[None]
    doc_ids = doc_ids_from_eos(packed, eos, eos_opens=eos_opens)
    assert doc_ids.tolist() == [[0] * 7 + [1] * 9]
    assert positions_from_doc_ids(doc_ids).tolist() == [list(range(7)) + list(range(9))]
    h, _ = model(packed, doc_ids)
    h_a, _ = model(doc_a[None])
    h_b, _ = model(doc_b[None])
    torch.testing.assert_close(h[:, :7], h_a, rtol=0, atol=1e-12)
    torch.testing.assert_close(h[:, 7:], h_b, rtol=0, atol=1e-12)
    # without document masking the second document would see the first (the test is sensitive)
    h_plain, _ = model(packed)
    assert not torch.allclose(h_plain[:, 7:], h_b, atol=1e-3)


def test_padding_does_not_affect_real_tokens(make_model, vocab):
    model = make_model().double()  # float64: the two calls have other shapes (see the test above)
    ids = torch.randint(0, vocab, (1, 8))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    doc_ids = torch.tensor([[0] * 8 + [-1] * 4])
    h_pad, _ = model(padded, doc_ids)
    h, _ = model(ids)
    assert torch.isfinite(h_pad).all()
    torch.testing.assert_close(h_pad[:, :8], h, rtol=0, atol=1e-12)


def test_doc_mask_helpers():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, -1, -1]])
    assert positions_from_doc_ids(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 0, 1]]
    mask = attention_mask_from_doc_ids(doc_ids)[0, 0]
    assert mask.shape == (10, 10)
    for q in range(10):
        for k in range(10):
            assert bool(mask[q, k]) == (k <= q and doc_ids[0, q] == doc_ids[0, k])
    eos = 9
    ids = torch.tensor([[1, 2, eos, 3, eos, eos, 4], [eos, 1, 2, eos, 3, 4, 5]])
    assert doc_ids_from_eos(ids, eos, eos_opens=False).tolist() == [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 2, 2, 2]]
    # an opening EOS starts its document; tokens before a row's first EOS continue an earlier document
    assert doc_ids_from_eos(ids, eos, eos_opens=True).tolist() == [[0, 0, 1, 1, 2, 3, 3], [0, 0, 0, 1, 1, 1, 1]]
