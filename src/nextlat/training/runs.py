"""A run folder: its lock, its metrics log, and which settings a resumed run may change."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # Windows: no advisory file locks
    fcntl = None

from nextlat.config import Config, ConfigError
from nextlat.training.checkpoint import CheckpointError, atomic_write_text, list_checkpoints

# Settings that may change when a run is resumed (they do not affect the trained weights).
# parallel and compile change only the rounding of sums, not what is computed.
RESUMABLE_CHANGES = {"steps", "progress", "log_every", "eval_every", "ckpt_every", "keep_checkpoints", "threads",
                     "parallel", "dist_timeout", "compile"}


class MetricsLog:
    """Append-only JSONL log of metrics."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (they belong to an interrupted stretch that will be re-run), and a torn last
        line (a crash while it was appended); a bad line elsewhere raises CheckpointError naming it."""
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        numbered = [(i, line) for i, line in enumerate(lines, start=1) if line.strip()]
        keep = []
        for i, line in numbered:
            try:
                record = json.loads(line)
                past = record["step"] > step
            except (json.JSONDecodeError, TypeError, KeyError):
                if i == numbered[-1][0]:
                    print(f"[nextlat] {self.path}: dropped its torn last line {i} (written when a run stopped)",
                          file=sys.stderr)
                    continue
                raise CheckpointError(f"{self.path}, line {i}: not a metrics record ({line[:60]!r}); "
                                      "fix or delete that line to resume") from None
            if not past:
                keep.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))


def holds_run(out: Path) -> bool:
    """Whether a run has trained into ``out`` (it has written metrics or a checkpoint)."""
    return (out / "metrics.jsonl").exists() or bool(list_checkpoints(out))


def lock_run_folder(out: Path) -> IO[str] | None:
    """Hold an exclusive advisory lock on ``out/.lock`` so that two processes never train into one folder.

    The operating system drops the lock when the process ends, however it ends, so a crashed run never
    leaves a stale lock behind. Without ``fcntl`` (Windows) no lock is taken."""
    if fcntl is None:
        return None
    handle = open(out / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise ConfigError(f"run folder {str(out)!r} is being trained by another process (pid {owner}); "
                          "wait for it to finish, or pass --out another folder (nothing was touched)") from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def check_compatible(saved: Config, new: Config) -> None:
    """Raise CheckpointError if ``new`` changes anything of ``saved`` that a resumed run must keep (everything but
    the run's name and the train settings in RESUMABLE_CHANGES). Task file paths compare as absolute paths."""
    a, b = (dataclasses.replace(c, task=c.task.with_absolute_paths()).to_dict() for c in (saved, new))
    a.pop("run_name", None)
    b.pop("run_name", None)
    b["model"]["vocab_size"] = a["model"]["vocab_size"] if b["model"]["vocab_size"] == 0 else b["model"]["vocab_size"]
    for section in a:
        if section == "train":
            for k in a[section]:
                if k not in RESUMABLE_CHANGES and a[section][k] != b[section][k]:
                    raise CheckpointError(f"train.{k} changed from {a[section][k]!r} to {b[section][k]!r}")
        elif a[section] != b[section]:
            raise CheckpointError(f"'{section}' differs from the checkpoint's configuration "
                                  f"({a[section]!r} vs {b[section]!r})")


