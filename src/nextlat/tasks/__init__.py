"""Tasks (experiments), selectable by name (``task.name`` in a recipe)."""

from __future__ import annotations

from nextlat.config import TaskConfig
from nextlat.tasks.base import Task
from nextlat.tasks.pathstar import PathStarTask

TASKS: dict[str, type[Task]] = {
    "pathstar": PathStarTask,
}


def build_task(cfg: TaskConfig) -> Task:
    return TASKS[cfg.name](cfg)


__all__ = ["TASKS", "Task", "build_task"]
