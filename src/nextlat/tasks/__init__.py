"""Tasks (experiments), selectable by name (``task.name`` in a recipe)."""

from __future__ import annotations

from pathlib import Path

from nextlat.config import TaskConfig
from nextlat.tasks.a5 import A5Task
from nextlat.tasks.base import Task
from nextlat.tasks.countdown import CountdownTask
from nextlat.tasks.manhattan.task import ManhattanTask
from nextlat.tasks.pathstar import PathStarTask
from nextlat.tasks.text import TextTask

TASKS: dict[str, type[Task]] = {
    "a5": A5Task,
    "countdown": CountdownTask,
    "manhattan": ManhattanTask,
    "pathstar": PathStarTask,
    "text": TextTask,
}


def build_task(cfg: TaskConfig, ckpt_dir: str | Path | None = None) -> Task:
    """The task of ``cfg``; with ``ckpt_dir``, the task of that checkpoint (see :meth:`Task.from_checkpoint`)."""
    cls = TASKS[cfg.name]
    return cls(cfg) if ckpt_dir is None else cls.from_checkpoint(cfg, ckpt_dir)


__all__ = ["TASKS", "Task", "build_task"]
