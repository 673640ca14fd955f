"""Reference decoding: greedy and sampled generation; Sampling's logit processing."""

from __future__ import annotations

import pytest
import torch

from nextlat.decoding.reference import generate
from nextlat.decoding.sampling import GREEDY, Sampling


def test_greedy_generate_appends_argmax_tokens(make_model, vocab):
    model = make_model()
    prompt = torch.randint(0, vocab, (3, 4))
    out = generate(model, prompt, 5)
    assert out.shape == (3, 9) and torch.equal(out[:, :4], prompt)
    for t in range(4, 9):
        h, _ = model(out[:, :t])
        assert torch.equal(out[:, t], model.logits(h[:, -1]).argmax(-1))


def test_sampling_is_reproducible_with_a_generator(make_model, vocab):
    model = make_model()
    prompt = torch.randint(0, vocab, (4, 3))
    a = generate(model, prompt, 6, sampling=Sampling(temperature=1.0), generator=torch.Generator().manual_seed(7))
    b = generate(model, prompt, 6, sampling=Sampling(temperature=1.0), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_stop_id_pads_finished_rows(make_model, vocab):
    model = make_model()
    prompt = torch.randint(0, vocab, (2, 3))
    greedy = generate(model, prompt, 4)
    stop = int(greedy[0, 3])  # the first token row 0 emits
    out = generate(model, prompt, 4, stop_id=stop)
    assert (out[0, 3:] == stop).all()


def test_generate_input_errors(make_model):
    model = make_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, torch.zeros(1, 60, dtype=torch.long), 10)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        generate(model, torch.zeros(5, dtype=torch.long), 1)


def test_sampling_probs():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    torch.testing.assert_close(Sampling(1.0).probs(logits), torch.softmax(logits, -1))
    torch.testing.assert_close(Sampling(temperature=2.0).probs(logits), torch.softmax(logits / 2, -1))
    top2 = Sampling(1.0, top_k=2).probs(logits)
    assert (top2[0, 2:] == 0).all()
    torch.testing.assert_close(top2[0, :2], torch.softmax(logits[0, :2], -1))
    p = torch.softmax(logits, -1)[0]
    nucleus = Sampling(1.0, top_p=float(p[0]) + 1e-3).probs(logits)  # needs the top two tokens to reach top_p
    assert (nucleus[0, :2] > 0).all() and (nucleus[0, 2:] == 0).all()
    assert Sampling(1.0, top_p=0.01).probs(logits)[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="temperature"):
        GREEDY.probs(logits)
    assert GREEDY.choose(logits).tolist() == [0]
    for bad in ({"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}):
        with pytest.raises(ValueError):
            Sampling(**bad)
