"""Typed run configuration, YAML recipes with ``base:``, and dotted ``--set`` overrides.

A recipe is a serialised :class:`Config`. Loading is strict: unknown keys, wrong types and
impossible values raise :class:`ConfigError` naming the offending key and value. The objective and
task sections are polymorphic: their ``name`` selects the dataclass (a subclass of
:class:`ObjectiveConfig` or :class:`TaskConfig`, defined beside its component) that validates the rest
of the section. This module imports no component and no torch: the caller passes a
:data:`SectionResolver` that maps (section, name) to that dataclass; :mod:`nextlat.registry` binds
its own tables to the functions here (``registry.load_config``).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import json
import os
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml


class ConfigError(ValueError):
    """A recipe or override is malformed; the message names the bad key and value."""


@dataclass
class ModelConfig:
    """Decoder-only backbone (docs/architecture.md section 1: the Llama architecture)."""

    vocab_size: int = 0
    """Vocabulary size; 0 takes the size of the task's tokenizer."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention (query) heads per block; must divide d_model unless head_dim is set."""
    n_kv_head: int = 0
    """Key/value heads (grouped-query attention, arXiv 2305.13245); must divide n_head; 0 = n_head."""
    head_dim: int = 0
    """Width of one attention head; 0 = d_model // n_head."""
    d_model: int = 128
    """Residual stream width D."""
    mlp_hidden: int = 0
    """SwiGLU hidden width; 0 means 128 * round(8 D / 3 / 128)."""
    rope_base: float = 10000.0
    """RoPE frequency base (``rope_theta`` in Hugging Face configs)."""
    rope_dtype: str = "float64"
    """Precision in which the RoPE angles are computed before the tables are rounded to float32: float64 (nextlat's
    own models) or float32 (as ``transformers`` computes them; set by ``nextlat import-hf``)."""
    tie_embeddings: bool = False
    """Share one matrix between the input embedding and the LM head."""
    attention_bias: bool = False
    """Biases on the q, k, v and o projections (Llama's ``attention_bias``)."""
    max_seq_len: int = 1024
    """Longest sequence (and RoPE table) the model supports."""
    init_std: float = 0.02
    """Standard deviation of the normal init of every matrix and the embedding."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""

    @property
    def kv_heads(self) -> int:
        """Key/value heads, ``n_kv_head`` resolved."""
        return self.n_kv_head or self.n_head

    @property
    def head_width(self) -> int:
        """Width of one attention head, ``head_dim`` resolved."""
        return self.head_dim or self.d_model // max(self.n_head, 1)


@dataclass
class ObjectiveConfig:
    """Base of every objective's settings: ``name`` selects the objective, whose module defines the subclass
    holding its own fields (``objective.horizon``, ``objective.lambda_h``, ...) and their validation."""

    name: str = "next_token"
    """Objective name (``nextlat recipes`` and the registry list them)."""

    has_parameters: ClassVar[bool] = True
    """Whether the objective owns parameters besides the backbone's (``train.freeze_backbone`` needs some)."""


@dataclass
class TrainConfig:
    """Optimisation, logging, evaluation and checkpointing."""

    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 64
    """Sequences per optimizer step (split over grad_accum micro-batches)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; must divide batch_size."""
    lr: float = 5e-4
    """Peak learning rate."""
    schedule: str = "constant"
    """Learning-rate schedule: constant | cosine | wsd (warmup-stable-decay)."""
    warmup_steps: int = 0
    """Linear warmup steps from 0 to lr."""
    decay_frac: float = 0.2
    """wsd: fraction of the steps spent in the final linear decay."""
    min_lr_ratio: float = 0.0
    """cosine / wsd: final learning rate as a fraction of lr."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices and embeddings only."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    seed: int = 0
    """Seed for initialisation, data order and sampling."""
    device: str = "auto"
    """cpu | cuda | auto (cuda when available)."""
    precision: str = "auto"
    """fp32 | bf16 (autocast) | auto (bf16 on CUDA, fp32 on CPU)."""
    threads: int = 0
    """torch intra-op CPU threads; 0 keeps torch's default."""
    log_every: int = 10
    """Steps between metric log lines."""
    eval_every: int = 0
    """Steps between evaluations; 0 evaluates only at the end."""
    ckpt_every: int = 0
    """Steps between checkpoints; 0 saves only at the end."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep (the final one is always kept)."""
    progress: bool = True
    """Show a progress bar."""
    init_from: str = ""
    """Checkpoint or run folder whose backbone weights start this run (and its objective's weights when they
    fit: same objective, same parameter names and shapes); a text task keeps that checkpoint's tokenizer.
    Empty: random initialisation."""
    freeze_backbone: bool = False
    """Train only the objective's own parameters, e.g. fit a NextLat dynamics model or MTP heads post hoc to
    the trained backbone given by ``init_from``."""
    parallel: str = "none"
    """Data parallelism over the processes ``torchrun`` starts: none | ddp (DistributedDataParallel) | fsdp
    (FSDP2 ``fully_shard``). ``batch_size`` stays the global batch, split evenly over the processes."""
    dist_timeout: float = 1800.0
    """Seconds a process waits in a collective before the job fails (the other processes wait this long for
    rank 0's evaluations and checkpoints)."""
    compile: bool = False
    """``torch.compile`` the training step's forward and loss."""


@dataclass
class TaskConfig:
    """Base of every task's settings; ``name`` selects the task, whose module defines the subclass."""

    name: str = "pathstar"
    """Task name (see nextlat.registry)."""

    def with_absolute_paths(self) -> TaskConfig:
        """These settings with the file paths that start from the current folder made absolute, as a run saves
        them (so that the run can be evaluated from any folder); tasks that read no files return them as they are."""
        return self


SectionResolver = Callable[[str, Any, str], type]
"""(section, name, key) -> the dataclass of that section ("objective" or "task") for that name; raises
:class:`ConfigError` naming ``key`` for an unknown name."""

POLYMORPHIC = {ObjectiveConfig: "objective", TaskConfig: "task"}


@dataclass(kw_only=True)
class Config:
    """A complete, self-describing training run."""

    run_name: str = "run"
    """Name of the run; the default output folder is runs/<run_name>."""
    out_dir: str = ""
    """Output folder for checkpoints and logs; empty means runs/<run_name>."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone architecture."""
    objective: ObjectiveConfig
    """Training objective; ``objective.name`` selects it and the dataclass of the remaining keys."""
    task: TaskConfig
    """Task settings; ``task.name`` selects the task and the dataclass of the remaining keys."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and run management."""

    @property
    def output_dir(self) -> Path:
        return Path(self.out_dir or f"runs/{self.run_name}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass's fields (the string after each field in its source), those of
    its base classes included where the class does not document a field again."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):  # no source (e.g. defined in an interactive session)
            continue
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def commented_yaml(cfg: Config, width: int = 100) -> str:
    """``cfg`` as YAML (it loads back as a recipe), each key preceded by its docstring as a comment."""
    lines: list[str] = []

    def emit(obj: Any, indent: str) -> None:
        docs = field_docs(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if not indent and lines:
                lines.append("")
            lines.extend(f"{indent}# {line}" for line in textwrap.wrap(docs.get(f.name, ""), width - len(indent) - 2))
            if dataclasses.is_dataclass(value):
                lines.append(f"{indent}{f.name}:")
                emit(value, indent + "  ")
            elif isinstance(value, str) and not value.isprintable():  # e.g. "\n\n": a JSON string is YAML too
                lines.append(f"{indent}{f.name}: {json.dumps(value)}")
            elif isinstance(value, list):
                lines.append(f"{indent}{f.name}: {yaml.safe_dump(value, default_flow_style=True, width=1000).strip()}")
            else:
                lines.extend(indent + line for line in yaml.safe_dump({f.name: value}, width=1000).splitlines())

    emit(cfg, "")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- parsing


def _coerce(value: Any, tp: Any, key: str, resolve: SectionResolver) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, args[0], key, resolve)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]", resolve) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key, resolve)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '5e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - only the types above are used in configs
        raise TypeError(f"unsupported config type {tp} at {key}")
    raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")


def _from_dict(cls: type, data: Any, key: str, resolve: SectionResolver) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'recipe'}: expected a mapping, got {data!r}")
    if cls in POLYMORPHIC:
        cls = resolve(POLYMORPHIC[cls], data.get("name", cls.name), key)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{key}." if key else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]!s} (known under {key or 'the top level'}: {', '.join(names)})"
        )
    kwargs = {k: _coerce(v, hints[k], f"{key}.{k}" if key else k, resolve) for k, v in data.items()}
    for f in dataclasses.fields(cls):  # required sections (the polymorphic ones) default to their base's name
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs[f.name] = _coerce({}, hints[f.name], f"{key}.{f.name}" if key else f.name, resolve)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def parse_section(cls: type, data: Any, key: str, resolve: SectionResolver) -> Any:
    """One section (e.g. an objective's settings) parsed and validated like a recipe's."""
    return _from_dict(cls, data, key, resolve)


def config_from_dict(data: dict[str, Any], resolve: SectionResolver) -> Config:
    cfg = _from_dict(Config, data, "", resolve)
    validate_config(cfg)
    return cfg


def validate_config(cfg: Config) -> None:
    """Checks of the model and train sections; each objective and task section validates itself."""
    m, t = cfg.model, cfg.train
    checks = [
        (m.n_layer >= 1, "model.n_layer", m.n_layer, "must be >= 1"),
        (m.d_model >= 1, "model.d_model", m.d_model, "must be >= 1"),
        (m.d_model >= 1 and m.n_head >= 1 and (m.head_dim or m.d_model % m.n_head == 0), "model.n_head", m.n_head,
         f"must divide model.d_model={m.d_model} (or set model.head_dim)"),
        (m.n_kv_head >= 0 and m.n_head % max(m.kv_heads, 1) == 0, "model.n_kv_head", m.n_kv_head,
         f"must divide model.n_head={m.n_head} (0 = n_head)"),
        (m.head_dim >= 0 and m.head_width % 2 == 0, "model.head_dim" if m.head_dim else "model.d_model",
         m.head_dim or m.d_model, "head dim must be even for RoPE"),
        (m.rope_dtype in ("float64", "float32"), "model.rope_dtype", m.rope_dtype, "must be float64 or float32"),
        (m.rope_base > 0 and m.norm_eps > 0, "model.rope_base/norm_eps", (m.rope_base, m.norm_eps), "must be > 0"),
        (m.vocab_size >= 0, "model.vocab_size", m.vocab_size, "must be >= 0"),
        (t.steps >= 1, "train.steps", t.steps, "must be >= 1"),
        (t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1"),
        (t.grad_accum >= 1 and t.batch_size % t.grad_accum == 0, "train.grad_accum", t.grad_accum,
         f"must divide train.batch_size={t.batch_size}"),
        (t.lr > 0, "train.lr", t.lr, "must be > 0"),
        (t.schedule in ("constant", "cosine", "wsd"), "train.schedule", t.schedule, "must be constant, cosine or wsd"),
        (0 <= t.warmup_steps, "train.warmup_steps", t.warmup_steps, "must be >= 0"),
        (0 < t.decay_frac <= 1, "train.decay_frac", t.decay_frac, "must be in (0, 1]"),
        (0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]"),
        (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"), "train.device", t.device,
         "must be auto, cpu or cuda[:N]"),
        (t.precision in ("auto", "fp32", "bf16"), "train.precision", t.precision, "must be auto, fp32 or bf16"),
        (t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "must be >= 0"),
        (t.threads >= 0, "train.threads", t.threads, "must be >= 0 (0 keeps torch's default)"),
        (t.log_every >= 1, "train.log_every", t.log_every, "must be >= 1"),
        (t.eval_every >= 0 and t.ckpt_every >= 0, "train.eval_every/ckpt_every", (t.eval_every, t.ckpt_every),
         "must be >= 0"),
        (t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints, "must be >= 1"),
        (not t.freeze_backbone or t.init_from, "train.freeze_backbone", t.freeze_backbone,
         "needs train.init_from (a trained backbone to keep fixed)"),
        (t.parallel in ("none", "ddp", "fsdp"), "train.parallel", t.parallel, "must be none, ddp or fsdp"),
        (t.dist_timeout > 0, "train.dist_timeout", t.dist_timeout, "must be > 0"),
        (not t.freeze_backbone or cfg.objective.has_parameters, "train.freeze_backbone", t.freeze_backbone,
         f"objective {cfg.objective.name} has no parameters of its own to train"),
    ]
    for ok, key, value, why in checks:
        if not ok:
            raise ConfigError(f"{key}={value!r}: {why}")


def set_dotted(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``key.sub=value`` override to a raw recipe dict (value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form key=value")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from None
    set_value(data, key, value)


def set_value(data: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted ``key`` of a raw recipe dict to ``value``; a new objective or task name starts its
    section afresh."""
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    if len(parts) == 2 and parts[1] == "name" and node.get("name", value) != value:
        node.clear()  # another objective or task: its section starts afresh, as under a recipe base
    node[parts[-1]] = value


def _renames_first(keys: list[str]) -> list[int]:
    renames = [i for i, k in enumerate(keys) if k.strip() in ("objective.name", "task.name")]
    return renames + [i for i in range(len(keys)) if i not in renames]


def with_settings(data: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """A copy of a raw recipe dict with dotted-key ``settings`` (Python values) applied like overrides."""
    out = copy.deepcopy(data)
    keys = list(settings)
    for i in _renames_first(keys):
        set_value(out, keys[i], settings[keys[i]])
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> None:
    """Apply ``key=value`` overrides to a raw recipe dict. Those naming another objective or task
    (``objective.name=mtp``) come first and start that section afresh, so that the other keys given
    for it apply to the new one whatever their order on the command line."""
    for i in _renames_first([a.split("=", 1)[0] for a in overrides]):
        set_dotted(data, overrides[i])


def with_task_overrides(cfg: Config, overrides: list[str], resolve: SectionResolver) -> Config:
    """``cfg`` with ``task.KEY=VALUE`` overrides applied: how a trained run is evaluated (other A5
    lengths, more test examples, another street graph). Model, objective and training settings
    belong to the trained weights and cannot change, nor can the task itself (``task.name``)."""
    data = cfg.to_dict()
    for assignment in overrides:
        key = assignment.split("=", 1)[0].strip()
        if not key.startswith("task.") or key == "task.name":
            raise ConfigError(f"override {key!r}: a trained checkpoint takes only task settings "
                              f"(task.KEY=VALUE, not task.name)")
        set_dotted(data, assignment)
    try:
        return config_from_dict(data, resolve)
    except ConfigError as e:
        raise ConfigError(f"task overrides {overrides}: {e}") from None


RECIPE_DIR = Path(__file__).parent / "recipes"


def cache_home() -> Path:
    """nextlat's cache folder: ``$NEXTLAT_CACHE``, or ``~/.cache/nextlat`` when unset."""
    env = os.environ.get("NEXTLAT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nextlat"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def resolve_recipe(recipe: str) -> Path:
    """A recipe is a YAML path or the name of a shipped recipe."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file {str(path)!r} does not exist")
        return path
    shipped = RECIPE_DIR / f"{recipe}.yaml"
    if not shipped.is_file():
        raise ConfigError(f"unknown recipe {recipe!r} (shipped: {', '.join(recipe_names())})")
    return shipped


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"recipe file {str(path)!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping, got {type(data).__name__}")
    return data


def merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` laid over ``base``: sections merge key by key, any other value replaces.

    A section that names another ``name`` than the base's (another objective or task) replaces
    the base's section whole: the base's settings for the other kind would not apply.
    """
    out = dict(base)
    for key, value in child.items():
        below = out.get(key)
        sections = isinstance(value, dict) and isinstance(below, dict)
        if sections and value.get("name", below.get("name")) == below.get("name"):
            out[key] = merge(below, value)
        else:
            out[key] = value
    return out


def read_recipe(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe's settings with its ``base:`` (if any) laid underneath, recursively.

    ``base`` names a shipped recipe, or a YAML path relative to the recipe that names it; the
    recipe's own sections are laid over the base's (see :func:`merge`).
    """
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, path))
        raise ConfigError(f"recipe bases form a cycle: {cycle}")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base={base!r} must be a recipe name or a YAML path")
    if Path(base).suffix in (".yaml", ".yml"):
        base_path = path.parent / base
        if not base_path.is_file():
            raise ConfigError(f"{path}: base {base!r}: no such file {str(base_path)!r}")
    else:
        try:
            base_path = resolve_recipe(base)
        except ConfigError as e:
            raise ConfigError(f"{path}: base: {e}") from None
    return merge(read_recipe(base_path, (*_chain, path)), data)


def load_config(recipe: str | None, overrides: list[str] | None, resolve: SectionResolver) -> Config:
    """The configuration of ``recipe`` (a shipped name or a YAML path; None: the defaults) with ``overrides``."""
    data = read_recipe(resolve_recipe(recipe)) if recipe else {}
    apply_overrides(data, overrides or [])
    try:
        return config_from_dict(data, resolve)
    except ConfigError as e:
        raise ConfigError(f"{recipe or 'defaults'}: {e}") from None
