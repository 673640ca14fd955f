"""Names to components: the objectives, tasks, drafters and experiments a recipe or a command can name.

Each table maps a name to ``"module:attribute"``. A component is imported only when its name is
looked up, so reading a recipe imports only the objective and task it names, and no component
module imports this one: the import graph runs config <- components <- registry <- training,
experiments, benchmarks and the command line. Adding a component is one line here.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from nextlat import config
from nextlat.config import Config, ObjectiveConfig, TaskConfig

OBJECTIVES: dict[str, str] = {
    "next_token": "nextlat.objectives.next_token:NextToken",
    "next_latent": "nextlat.objectives.next_latent:NextLatent",
    "mtp": "nextlat.objectives.mtp:MultiTokenPrediction",
    "jtp": "nextlat.objectives.jtp:JointTokenPrediction",
    "bst": "nextlat.objectives.bst:BeliefState",
}

TASKS: dict[str, str] = {
    "a5": "nextlat.tasks.a5:A5Task",
    "countdown": "nextlat.tasks.countdown:CountdownTask",
    "manhattan": "nextlat.tasks.manhattan.task:ManhattanTask",
    "pathstar": "nextlat.tasks.pathstar:PathStarTask",
    "text": "nextlat.tasks.text:TextTask",
}

DRAFTERS: dict[str, str] = {
    "next_latent": "nextlat.decoding.drafters:NextLatDrafter",
    "mtp": "nextlat.decoding.drafters:MTPDrafter",
}

# Looked up by nextlat.experiments.runner: an experiment's module sits above the registry and may use it.
EXPERIMENTS: dict[str, str] = {
    "pathstar": "nextlat.experiments.pathstar:EXPERIMENT",
    "countdown": "nextlat.experiments.countdown:EXPERIMENT",
    "a5": "nextlat.experiments.a5:EXPERIMENT",
    "manhattan": "nextlat.experiments.manhattan:EXPERIMENT",
    "lm": "nextlat.experiments.lm:EXPERIMENT",
}


class UnknownName(KeyError):
    """A name that no table of the registry holds; the message lists the known names."""

    def __str__(self) -> str:
        return str(self.args[0])


def lookup(table: dict[str, str], name: Any, kind: str) -> Any:
    """The component that ``table`` names ``name`` (imported on first use)."""
    if not isinstance(name, str) or name not in table:
        raise UnknownName(f"unknown {kind} {name!r} (known: {', '.join(sorted(table))})")
    module, _, attr = table[name].partition(":")
    return getattr(importlib.import_module(module), attr)


# ----------------------------------------------------------------------------- configurations


def section_class(section: str, name: Any, key: str) -> type:
    """The settings dataclass of the objective or task called ``name`` (a :data:`config.SectionResolver`)."""
    table = OBJECTIVES if section == "objective" else TASKS
    try:
        return lookup(table, name, section).config_class
    except UnknownName as e:
        raise config.ConfigError(f"{key}.name: {e}") from None


def load_config(recipe: str | None = None, overrides: list[str] | None = None) -> Config:
    """The configuration of a recipe (a shipped name or a YAML path; None: the defaults) with ``--set`` overrides."""
    return config.load_config(recipe, overrides, section_class)


def config_from_dict(data: dict[str, Any]) -> Config:
    """A configuration from its dictionary form (a recipe's settings, or ``Config.to_dict()``)."""
    return config.config_from_dict(data, section_class)


def with_task_overrides(cfg: Config, overrides: list[str]) -> Config:
    """``cfg`` with ``task.KEY=VALUE`` overrides (see :func:`nextlat.config.with_task_overrides`)."""
    return config.with_task_overrides(cfg, overrides, section_class)


def objective_config(name: str = "next_token", **settings: Any) -> ObjectiveConfig:
    """The validated settings of objective ``name``, e.g. ``objective_config("mtp", horizon=2)``."""
    return config.parse_section(ObjectiveConfig, {"name": name, **settings}, "objective", section_class)


# ----------------------------------------------------------------------------- components


def objective_class(name: str) -> type:
    return lookup(OBJECTIVES, name, "objective")


def task_class(name: str) -> type:
    return lookup(TASKS, name, "task")


def objective_settings(name: str) -> set[str]:
    """The ``objective.*`` keys objective ``name`` takes (``name`` included)."""
    return {f.name for f in dataclasses.fields(objective_class(name).config_class)}


def build_objective(cfg: ObjectiveConfig, model):
    """The objective of ``cfg`` for ``model`` (its extra parameters initialised from the current torch seed)."""
    return objective_class(cfg.name)(cfg, model)


def build_task(cfg: TaskConfig, ckpt_dir=None):
    """The task of ``cfg``; with ``ckpt_dir``, the task of that checkpoint (see ``Task.from_checkpoint``)."""
    cls = task_class(cfg.name)
    return cls(cfg) if ckpt_dir is None else cls.from_checkpoint(cfg, ckpt_dir)


def build_drafter(name: str | None, model: Any, objective: Any) -> Any:
    """The drafter ``name`` built from a model and its objective; None: the objective's own (``default_drafter``)."""
    if name is None:
        name = getattr(objective, "default_drafter", None)
        if name is None:
            raise ValueError(f"objective {type(objective).__name__} has no drafter of its own: name one "
                             f"(known: {', '.join(sorted(DRAFTERS))})")
    return lookup(DRAFTERS, name, "drafter")(model, objective)
