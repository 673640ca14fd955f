"""Figures for experiments (matplotlib, drawn off-screen to PNG files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def plot_bars(rows: list[dict[str, Any]], key: str, label: str, path: Path, *, title: str = "",
              percent: bool = True) -> Path:
    """One bar per experiment row: the mean of ``key`` over seeds, its std as an error bar, each seed as a dot."""
    plt = _pyplot()
    scale = 100.0 if percent else 1.0
    rows = [r for r in rows if key in r["metrics"]]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(rows) + 1.5), 3.5))
    for i, r in enumerate(rows):
        s = r["metrics"][key]
        ax.bar(i, scale * s["mean"], yerr=scale * s["std"], color="C0" if "NextLat" not in r["label"] else "C3",
               alpha=0.7, capsize=3)
        ax.scatter([i] * len(s["per_seed"]), [scale * v for v in s["per_seed"]], color="k", s=10, zorder=3)
    ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel(label)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(curves: dict[str, dict[str, list[float]]], path: Path, *, xlabel: str, ylabel: str,
                title: str = "") -> Path:
    """Lines of ``{"x", "mean", "std"}`` per label, with a band of one standard deviation over seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for i, (label, c) in enumerate(curves.items()):
        x, m, s = c["x"], c["mean"], c["std"]
        ax.plot(x, m, label=label, color=f"C{i}")
        ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=f"C{i}", alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curve_panels(panels: list[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """Side-by-side panels of :func:`plot_curves`-style lines. Each panel: ``curves`` (label -> ``{"x", "mean",
    "std"}``, optionally ``"style"``: a matplotlib line style, ``"color"``, ``"right": True`` for a second y axis),
    ``xlabel``, ``ylabel``, optional ``title``, ``right_label`` and ``hline`` (a labelled horizontal line:
    ``(y, label)``). A label keeps its colour across panels."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.0), squeeze=False)
    colours: dict[str, str] = {}
    for ax, panel in zip(axes[0], panels):
        twin = None
        handles = []
        if panel.get("hline") is not None:
            y, label = panel["hline"]
            handles.append(ax.axhline(y, color="k", lw=0.8, ls=":", label=label))
        for label, c in panel["curves"].items():
            colour = colours.setdefault(label, c.get("color") or f"C{len(colours)}")
            target = ax
            if c.get("right"):
                twin = twin or ax.twinx()
                target = twin
            x, m, s = c["x"], c["mean"], c.get("std") or [0.0] * len(c["x"])
            (line,) = target.plot(x, m, label=label, color=colour, ls=c.get("style", "-"), marker=".", ms=4)
            target.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=colour,
                                alpha=0.15)
            handles.append(line)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel(panel["ylabel"])
        if twin is not None:
            twin.set_ylabel(panel.get("right_label", ""))
        ax.set_title(panel.get("title", ""), fontsize=10)
        ax.legend(handles=handles, fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
