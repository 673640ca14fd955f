"""CUDA checks (``make test-gpu``): cached decoding and a bf16 autocast training step on the GPU.

Skipped where CUDA is not available (see conftest).
"""

from __future__ import annotations

import math

import pytest
import torch

from nextlat.config import ModelConfig
from nextlat.decoding.engine import decode
from nextlat.decoding.reference import generate
from nextlat.model import Transformer
from nextlat.training.loop import Trainer

pytestmark = pytest.mark.gpu


def test_cached_greedy_decode_equals_reference_generate_on_cuda():
    # float64: cached and uncached passes run other kernel shapes; in float32 (or TF32) their rounding could
    # flip a near-tied argmax of this random model, in float64 the code decides.
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=40, n_layer=2, n_head=2, d_model=32, max_seq_len=64,
                                    init_std=0.3)).eval().double().cuda()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 40, (n,), generator=g).cuda() for n in (3, 7, 12)]
    got = decode(model, prompts, 20, use_cache=True).tokens
    ref = [generate(model, p[None], 20)[0, len(p):].tolist() for p in prompts]
    assert got == ref


def test_bf16_autocast_training_step_on_cuda(run_config, tmp_path):
    trainer = Trainer(run_config(**{"train.device": "cuda", "train.precision": "bf16"}), out_dir=tmp_path)
    assert trainer.model.lm_head.weight.is_cuda
    before = trainer.model.lm_head.weight.detach().clone()
    metrics = trainer.train_step(0)
    trainer.close()
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
    assert trainer.model.lm_head.weight.dtype == torch.float32  # autocast keeps the weights in fp32
    assert not torch.equal(trainer.model.lm_head.weight.detach(), before)  # the step updated them
