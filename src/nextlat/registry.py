"""Names to components: the objectives, tasks, drafters and experiments a recipe or a command can name.

Each table maps a name to ``"module:attribute"``. A component is imported only when its name is
looked up, so reading a recipe imports only the objective and task it names, and no component
module imports this one: the import graph runs config <- components <- registry <- training,
experiments, benchmarks and the command line. Adding a component is one line here.
"""

from __future__ import annotations

import importlib
from typing import Any

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


def build_drafter(name: str | None, model: Any, objective: Any) -> Any:
    """The drafter ``name`` built from a model and its objective; None: the objective's own (``default_drafter``)."""
    if name is None:
        name = getattr(objective, "default_drafter", None)
        if name is None:
            raise ValueError(f"objective {type(objective).__name__} has no drafter of its own: name one "
                             f"(known: {', '.join(sorted(DRAFTERS))})")
    return lookup(DRAFTERS, name, "drafter")(model, objective)

EXPERIMENTS: dict[str, str] = {}


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
