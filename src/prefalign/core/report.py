"""Reports: `summary.json`, `report.md` tables and matplotlib plots, shared by every demo and `prefalign eval`."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def fmt(value, digits: int = 3) -> str:
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, (int, float)) for v in value)
    ):
        mean, std = value
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str], digits: int = 3) -> str:
    """A markdown table; a cell holding (mean, std) prints as `mean ± std`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, ""), digits) for c in columns) + " |")
    return "\n".join(lines)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "item") and callable(obj.item):  # 0-d torch tensor
        return obj.item()
    return obj


def write_summary(out_dir: str | Path, summary: dict) -> Path:
    path = Path(out_dir) / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
    return path


def write_report(out_dir: str | Path, title: str, sections: Sequence[str]) -> Path:
    path = Path(out_dir) / "report.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\n" + "\n\n".join(s.strip() for s in sections) + "\n")
    return path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (servers and CI have no display)."""
    import matplotlib  # lazy: only reports draw plots, and the backend must be chosen first

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Lay out, write the PNG (creating its folder) and free the figure."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def plot_lines(
    path: str | Path,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    bands: dict[str, Sequence[float]] | None = None,
    markers: bool = False,
) -> Path:
    """One line per series name -> (x, y); optional +-band per series (e.g. seed std)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o" if markers else None, ms=3, label=name)
        if bands and name in bands:
            y_arr, b_arr = np.asarray(y, float), np.asarray(bands[name], float)
            ax.fill_between(x, y_arr - b_arr, y_arr + b_arr, alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_bars(path: str | Path, values: dict[str, tuple[float, float]], ylabel: str, title: str = "") -> Path:
    """Bar chart of name -> (mean, std)."""
    plt = pyplot()
    names = list(values)
    means = [values[n][0] for n in names]
    stds = [values[n][1] for n in names]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 1.5), 3.8))
    ax.bar(names, means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The lines of `metrics.jsonl` of a run directory."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
