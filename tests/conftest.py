"""Shared tiny-config fixtures. Everything here is small enough to run on one CPU thread."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from nextlat.config import Config, ModelConfig, with_settings
from nextlat.data import IGNORE, Batch
from nextlat.model import Transformer
from nextlat.registry import build_objective, config_from_dict, objective_config

# The test machine is shared: keep torch to one intra-op thread. It also makes a repeated CPU computation
# bit-identical within a process on one machine; another machine (another BLAS) may still round differently.
torch.set_num_threads(1)

VOCAB = 23
D_MODEL = 32

# A tiny Path-Star run: G(2, 4) over 20 node ids, 64 training graphs; 26-token sequences.
TINY_RUN: dict[str, Any] = {
    "run_name": "tiny",
    "model": {"n_layer": 2, "n_head": 2, "d_model": D_MODEL, "max_seq_len": 64},
    "objective": {"name": "next_latent", "horizon": 2, "lambda_h": 1.0, "lambda_kl": 1.0},
    "task": {"name": "pathstar", "degree": 2, "path_len": 4, "num_nodes": 20, "num_train": 64, "num_test": 16,
             "eval_examples": 8},
    "train": {"steps": 4, "batch_size": 16, "lr": 1e-3, "warmup_steps": 1, "log_every": 1, "progress": False,
              "device": "cpu", "precision": "fp32", "seed": 0},
}


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` where CUDA is not available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def run_config():
    """Factory: the tiny Path-Star run config, with dotted-key overrides, e.g. ``run_config(**{"train.steps": 6})``."""

    def make(overrides: dict[str, Any] | None = None, **kw: Any) -> Config:
        return config_from_dict(with_settings(TINY_RUN, {**(overrides or {}), **kw}))

    return make


@pytest.fixture
def vocab() -> int:
    """Vocabulary size of the tiny models built by ``make_model``."""
    return VOCAB


@pytest.fixture
def model_cfg():
    """Factory: a tiny backbone config (2 layers, d_model 32, 2 heads)."""

    def make(**kw: Any) -> ModelConfig:
        base = dict(vocab_size=VOCAB, n_layer=2, n_head=2, d_model=D_MODEL, max_seq_len=64)
        return ModelConfig(**{**base, **kw})

    return make


@pytest.fixture
def make_model(model_cfg):
    """Factory: a seeded tiny Transformer (init_std 0.1 so every loss term carries real signal)."""

    def make(seed: int = 0, **kw: Any) -> Transformer:
        torch.manual_seed(seed)
        return Transformer(model_cfg(**{"init_std": 0.1, **kw}))

    return make


@pytest.fixture
def make_objective():
    """Factory: build an objective for a model from ObjectiveConfig keyword arguments."""

    def make(model: Transformer, seed: int = 1, **kw: Any):
        torch.manual_seed(seed)
        return build_objective(objective_config(**kw), model)

    return make


@pytest.fixture
def packed_batch() -> Batch:
    """Two rows of 12 tokens exercising every mask.

    Row 0 packs two documents (positions 0-4 and 5-11); row 1 holds one 9-token document then
    3 padding positions (doc id -1). Prompt positions (targets IGNORE) open each document.
    """
    g = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    targets = torch.randint(0, VOCAB, (2, 12), generator=g)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [-1] * 3])
    targets[0, [0, 1, 5, 6]] = IGNORE  # prompts of both documents of row 0
    targets[1, [0, 1, 2]] = IGNORE  # prompt of row 1
    targets[1, 9:] = IGNORE  # padding
    return Batch(input_ids, targets, doc_ids)
