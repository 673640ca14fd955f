"""Batch format, document helpers and the stateless sampler."""

from __future__ import annotations

import pytest
import torch

from nextlat.data import IGNORE, Batch, StatelessSampler, positions_from_doc_ids, transition_mask


def test_sampler_is_a_pure_function_of_the_step():
    a = StatelessSampler(50, 8, seed=3)
    expected = {s: a.indices(s).tolist() for s in range(20)}
    b = StatelessSampler(50, 8, seed=3)
    for s in [17, 0, 5, 19, 5, 2, 11, 0]:  # arbitrary call history
        assert b.indices(s).tolist() == expected[s]
    assert StatelessSampler(50, 8, seed=4).indices(0).tolist() != expected[0]


@pytest.mark.parametrize("n,bs", [(12, 4), (10, 4), (7, 3), (5, 8)])
def test_sampler_covers_each_example_once_per_epoch(n, bs):
    sampler = StatelessSampler(n, bs, seed=0)
    epochs = 3
    steps = -(-epochs * n // bs)
    stream = torch.cat([sampler.indices(s) for s in range(steps)]).tolist()
    assert all(len(sampler.indices(s)) == bs for s in range(steps))
    for e in range(epochs):
        assert sorted(stream[e * n : (e + 1) * n]) == list(range(n))
    # epochs are shuffled differently
    assert stream[:n] != stream[n : 2 * n] or n < 3


def test_sampler_rejects_empty():
    with pytest.raises(ValueError, match="empty"):
        StatelessSampler(0, 4, seed=0)


def test_positions_restart_at_each_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2], [0, 0, 0, 0, 0, -1, -1, -1]])
    assert positions_from_doc_ids(doc_ids).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 0, 1, 2]]


def test_transition_mask():
    doc_ids = torch.tensor([[0, 0, 1, 1, -1]])
    assert transition_mask(doc_ids, (1, 5), 1, torch.device("cpu")).tolist() == [[True, False, True, False]]
    assert transition_mask(doc_ids, (1, 5), 2, torch.device("cpu")).tolist() == [[False, False, False]]
    assert transition_mask(None, (2, 5), 3, torch.device("cpu")).all()


def test_batch_validation_and_split():
    x = torch.arange(24).view(4, 6)
    y = torch.full_like(x, IGNORE)
    with pytest.raises(ValueError, match="targets shape"):
        Batch(x, y[:, :5])
    with pytest.raises(ValueError, match="doc_ids shape"):
        Batch(x, y, torch.zeros(4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        Batch(x.flatten(), y.flatten())
    parts = Batch(x, y, torch.zeros_like(x)).split(2)
    assert [p.input_ids.tolist() for p in parts] == [x[:2].tolist(), x[2:].tolist()]
    assert all(p.doc_ids is not None and p.doc_ids.shape == (2, 6) for p in parts)
    assert all(p.doc_ids is None for p in Batch(x, y).split(4))
    assert Batch(x, y).num_tokens == 24
