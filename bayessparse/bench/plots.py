"""Plots of a bench: test error and ECE against compression, one line per method."""

from __future__ import annotations

import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from bayessparse.recipes import DENSE
from bayessparse.training import atomic_write

PLOTS = {"error": "error.png", "ece": "ece.png"}
_LABELS = {"error": "test error", "ece": "ECE (15 bins)"}


def seed_means(rows: list[dict[str, Any]], column: str) -> dict[str, list[tuple[float, float]]]:
    """``{method: [(mean compression, mean column), ...]}``, one point per target
    sparsity in increasing order, averaged over seeds (rows without a finite compression
    or value left out); the dense rows are left out too."""
    groups: dict[tuple[str, float], list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        x, y = row["compression"], row[column]
        if row["method"] != DENSE and x is not None and y is not None and math.isfinite(x):
            groups[row["method"], row["sparsity"]].append((x, y))
    curves: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (method, _), points in sorted(groups.items()):
        xs, ys = zip(*points, strict=True)
        curves[method].append((sum(xs) / len(xs), sum(ys) / len(ys)))
    return dict(curves)


def plot_results(rows: list[dict[str, Any]], directory: Path) -> list[Path]:
    """Write ``error.png`` and ``ece.png`` into ``directory``: each column against
    compression (log axis), a line with markers per method (means over seeds), the
    dense reference's mean as a horizontal line. Needs matplotlib.

    Returns:
        The paths written.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    from matplotlib import pyplot as plt

    written = []
    for column, name in PLOTS.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for method, points in seed_means(rows, column).items():
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=method)
        dense = [row[column] for row in rows if row["method"] == DENSE]
        if dense:
            ax.axhline(sum(dense) / len(dense), color="black", linestyle="--", label=DENSE)
        ax.set_xscale("log")
        ax.set_xlabel("compression (weights / non-zero weights)")
        ax.set_ylabel(_LABELS[column])
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        atomic_write(directory / name, buffer.getvalue())
        written.append(directory / name)
    return written
