"""Self-describing checkpoint folders, written atomically and loaded strictly and safely.

Layout of ``<run>/checkpoints/step_0001000/``::

    model.safetensors      backbone weights (Llama-style names)
    objective.safetensors  the objective's own parameters (dynamics model, extra heads)
    config.yaml            the full resolved run configuration
    meta.json              format, version, step, metrics, the version of the objective's weights
    trainer.safetensors    optimizer moments and RNG states, for exact resume
    trainer.json           optimizer hyper-parameters and the Python RNG state
    (artifacts)            files the task needs to use the model, e.g. tokenizer.json of a text task

Nothing is unpickled: tensors go through safetensors, everything else is YAML or JSON. A folder
is written under a temporary name and renamed into place, so an interrupted save never leaves a
half-written checkpoint behind and never destroys the previous one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from nextlat import __version__
from nextlat.config import Config, ConfigError, read_yaml
from nextlat.registry import config_from_dict, objective_class, objective_settings

FORMAT = "nextlat-checkpoint"
FORMAT_VERSION = 1
_REQUIRED = ("meta.json", "config.yaml", "model.safetensors", "objective.safetensors")
_RESERVED = (*_REQUIRED, "trainer.safetensors", "trainer.json")


class CheckpointError(ValueError):
    """A checkpoint folder is missing, foreign, corrupt or does not match the model."""


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: readers see the old file or the new one, never a half-written one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _state(module: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # contiguous clones: safetensors refuses shared or strided storage
    state = module if isinstance(module, dict) else module.state_dict()
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


@dataclass
class OptimizerState:
    """An optimizer's state by parameter name: the hyper-parameters of each group and every parameter's moments."""

    groups: list[dict[str, Any]]
    params: dict[str, dict[str, torch.Tensor]]

    @classmethod
    def of(cls, opt: torch.optim.Optimizer, names: dict[int, str]) -> OptimizerState:
        """``opt``'s state; ``names`` maps id(param) -> name."""
        return cls([{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups],
                   {names[id(p)]: dict(opt.state[p]) for group in opt.param_groups for p in group["params"]
                    if opt.state.get(p)})

    def load_into(self, opt: torch.optim.Optimizer, names: dict[int, str]) -> None:
        sd = opt.state_dict()
        if len(self.groups) != len(sd["param_groups"]):
            raise CheckpointError(f"optimizer has {len(self.groups)} groups, expected {len(sd['param_groups'])}")
        params = [p for group in opt.param_groups for p in group["params"]]
        state = {i: self.params[names[id(p)]] for i, p in enumerate(params) if names[id(p)] in self.params}
        groups = [{**saved, "params": current["params"]} for saved, current in zip(self.groups, sd["param_groups"])]
        opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    path: str | Path,
    *,
    cfg: Config,
    model: nn.Module | dict[str, torch.Tensor],
    objective: nn.Module | dict[str, torch.Tensor],
    step: int,
    metrics: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | OptimizerState | None = None,
    param_names: dict[int, str] | None = None,
    artifacts: dict[str, bytes] | None = None,
) -> Path:
    """Write a checkpoint folder atomically. ``model`` and ``objective`` are modules or their state dicts;
    ``param_names`` maps id(param) -> name for the optimizer state (not needed for an :class:`OptimizerState`).

    ``model`` and ``objective`` are modules or their state dicts (contiguous CPU tensors, as stored).
    ``artifacts``: extra files (name -> content) the task needs to use the model, e.g. its tokenizer.
    """
    path = Path(path)
    artifacts = artifacts or {}
    for name in artifacts:
        if not name or name != Path(name).name or name.startswith(".") or name in _RESERVED:
            raise ValueError(f"checkpoint artifact name {name!r} must be a plain file name other than {_RESERVED}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, part in (("model", model), ("objective", objective)):
        save_file(_state(part) if isinstance(part, nn.Module) else part, tmp / f"{name}.safetensors")
    _fsync_write(tmp / "config.yaml", cfg.to_yaml())
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "nextlat_version": __version__,
        "step": step,
        "metrics": metrics or {},
        "objective": cfg.objective.name,
        "objective_version": objective_class(cfg.objective.name).state_version,
        "task": cfg.task.name,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "has_trainer_state": optimizer is not None,
        "artifacts": sorted(artifacts),
    }
    if optimizer is not None:
        if not isinstance(optimizer, OptimizerState):
            optimizer = OptimizerState.of(optimizer, param_names or {})
        tensors, info = _trainer_state(optimizer)
        save_file(tensors, tmp / "trainer.safetensors")
        _fsync_write(tmp / "trainer.json", json.dumps(info))
    for name, content in artifacts.items():
        with open(tmp / name, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
    _fsync_write(tmp / "meta.json", json.dumps(meta, indent=2))  # written last: marks the folder complete
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old)
    return path


def _trainer_state(opt: OptimizerState) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    for name, entry in opt.params.items():
        for key, value in entry.items():
            tensors[f"opt.{name}.{key}"] = value.detach().to("cpu").contiguous().clone()
    version, internal, gauss = random.getstate()
    info = {"param_groups": opt.groups, "python_rng": [version, list(internal), gauss]}
    return tensors, info


@dataclass
class Checkpoint:
    path: Path
    cfg: Config
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Validate a checkpoint folder and read its config and metadata (no tensors yet)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a folder")
    missing = [f for f in _REQUIRED if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} is missing {', '.join(missing)}: not a nextlat checkpoint")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / 'meta.json'}: corrupt metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / 'meta.json'}: format is {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                              f"expected {FORMAT!r}: not a nextlat checkpoint")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta.get('format_version')!r} is newer than this "
                              f"nextlat supports ({FORMAT_VERSION}); upgrade nextlat")
    try:
        cfg = read_run_config(path / "config.yaml")
    except ConfigError as e:
        raise CheckpointError(f"{path / 'config.yaml'}: {e}") from None
    return Checkpoint(path, cfg, meta)


# nextlat 0.1.0 had one flat objective section holding every objective's settings.
_FLAT_OBJECTIVE_KEYS = {"horizon", "lambda_h", "lambda_kl", "proj_factor", "lambda_future", "bst_pair_fraction"}


def upgrade_config(data: dict[str, Any]) -> dict[str, Any]:
    """A saved configuration in today's form: the flat objective section of nextlat 0.1.0 keeps only the
    settings its objective reads (the others never changed what was trained), and a text task saved before
    ``task.eos_position`` existed gets the convention it was trained with, ``end`` (the default is ``start``).

    A saved config lists every setting, so a missing key means a config written before the key existed."""
    task = data.get("task")
    if isinstance(task, dict) and task.get("name") == "text" and "eos_position" not in task:
        data = {**data, "task": {**task, "eos_position": "end"}}
    objective = data.get("objective")
    if isinstance(objective, dict) and isinstance(objective.get("name"), str):
        try:
            own = objective_settings(objective["name"])
        except KeyError:
            return data  # unknown objective: parsing reports it
        dropped = {k for k in objective if k in _FLAT_OBJECTIVE_KEYS and k not in own}
        data = {**data, "objective": {k: v for k, v in objective.items() if k not in dropped}}
    return data


def read_run_config(path: str | Path) -> Config:
    """A run's or checkpoint's saved ``config.yaml`` (0.1.0's form included, see :func:`upgrade_config`)."""
    return config_from_dict(upgrade_config(read_yaml(Path(path))))


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: corrupt or unreadable safetensors file ({e})") from None


def objective_version_error(ckpt: Checkpoint) -> str | None:
    """Why the checkpoint's objective weights cannot be used by this nextlat's objective of that name, or None.

    A checkpoint records the ``state_version`` of its objective (``meta.json``, ``objective_version``;
    absent before versions were recorded, which means 1). An objective whose weights changed meaning
    since (BST and JTP became the paper's own, version 2) cannot load them: the old parameters do not
    compute what the new ones do, so they are refused rather than converted.
    """
    cls = objective_class(ckpt.cfg.objective.name)
    found = ckpt.meta.get("objective_version", 1)
    if found == cls.state_version:
        return None
    return (f"{ckpt.path}: its {ckpt.cfg.objective.name} weights are of version {found!r}, this nextlat's "
            f"{ckpt.cfg.objective.name} is version {cls.state_version}: {cls.state_change or 'its weights changed'}. "
            f"They cannot be loaded; retrain (or use the nextlat that wrote the checkpoint)")


def objective_fits(ckpt: Checkpoint, objective: nn.Module) -> bool:
    """Whether the checkpoint's objective weights are of this objective's version and have exactly
    ``objective``'s parameter names and shapes."""
    if objective_version_error(ckpt) is not None:
        return False
    state = _load_tensors(ckpt.path / "objective.safetensors")
    expected = objective.state_dict()
    return state.keys() == expected.keys() and all(v.shape == expected[k].shape for k, v in state.items())


def load_weights(ckpt: Checkpoint, model: nn.Module, objective: nn.Module | None) -> None:
    """Load weights strictly: every key present, none extra, every shape equal. ``objective=None`` loads
    only the backbone. An objective's weights of another version are refused (:func:`objective_version_error`)."""
    if objective is not None and (why := objective_version_error(ckpt)) is not None:
        raise CheckpointError(why)
    for file, module in (("model.safetensors", model), ("objective.safetensors", objective)):
        if module is None:
            continue
        state = _load_tensors(ckpt.path / file)
        expected = module.state_dict()
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        if missing or extra:
            raise CheckpointError(f"{ckpt.path / file}: keys do not match the model "
                                  f"(missing {missing[:5]}, unexpected {extra[:5]})")
        for k, v in state.items():
            if v.shape != expected[k].shape:
                raise CheckpointError(f"{ckpt.path / file}: {k} has shape {tuple(v.shape)}, "
                                      f"the model expects {tuple(expected[k].shape)}")
        module.load_state_dict(state, strict=True)


def load_trainer_state(ckpt: Checkpoint, opt: torch.optim.Optimizer | None, names: dict[int, str]) -> OptimizerState:
    """Restore optimizer moments, hyper-parameters (into ``opt`` unless None) and RNG states for an exact resume;
    returns the optimizer state read."""
    if not ckpt.meta.get("has_trainer_state") or not (ckpt.path / "trainer.safetensors").is_file():
        raise CheckpointError(f"{ckpt.path}: holds no optimizer state (saved for inference only); cannot resume")
    tensors = _load_tensors(ckpt.path / "trainer.safetensors")
    try:
        info = json.loads((ckpt.path / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt.path / 'trainer.json'}: corrupt trainer state ({e})") from None
    params: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            name, _, field = key[len("opt."):].rpartition(".")
            params.setdefault(name, {})[field] = value
    state = OptimizerState(info["param_groups"], params)
    if opt is not None:
        try:
            state.load_into(opt, names)
        except CheckpointError as e:
            raise CheckpointError(f"{ckpt.path}: {e}") from None
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = info["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return state


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete step checkpoints of a run, oldest first."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.glob("step_*") if (p / "meta.json").is_file())


def _alive(pid: int) -> bool:
    if os.name != "posix":  # no safe probe: treat every writer as alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def remove_stale_saves(run_dir: str | Path) -> list[Path]:
    """Clear what checkpoint writes killed mid-save left in ``run_dir/checkpoints``: ``.step_*.tmp-<pid>`` folders
    are removed, and a ``.step_*.old-<pid>`` folder (a complete checkpoint moved aside for its replacement)
    is removed when the replacement is in place, else put back. Folders of a live writer are never touched.
    Returns the folders removed or put back."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    done = []
    for p in sorted(ckpt_dir.glob(".step_*.*-*")) if ckpt_dir.is_dir() else []:
        stem, _, pid = p.name.rpartition("-")
        name, _, kind = stem[1:].rpartition(".")
        if kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not (ckpt_dir / name).exists():
            p.rename(ckpt_dir / name)
        else:
            shutil.rmtree(p, ignore_errors=True)
        done.append(p)
    return done


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder or a run folder (then its newest checkpoint)."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    raise CheckpointError(f"{str(path)!r} is neither a checkpoint folder nor a run folder with checkpoints")
