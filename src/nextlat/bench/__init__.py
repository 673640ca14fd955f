"""Benchmarks: training-step cost and decoding speed, measured side by side."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spread(values) -> tuple[float, float, float]:
    """(median, min, max) of repeated measurements, e.g. the per-repeat ratios of two interleaved variants."""
    values = list(values)
    return statistics.median(values), min(values), max(values)


def write_json(data: Any, path: str | Path) -> None:
    """Write a benchmark report as indented JSON, creating the folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2))
