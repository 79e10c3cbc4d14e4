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
# Up to 20 methods get distinct colours and markers; Bayesian lines solid, pruning dashed.
_MARKERS = "osD^v<>pPX*hH8d"


def seed_means(rows: list[dict[str, Any]], column: str) -> dict[str, list[tuple[float, float]]]:
    """``{method: [(mean compression, mean column), ...]}``: one point per target
    sparsity, in the order of ``rows`` (grid order: increasing sparsity), averaged over
    seeds. Rows without a finite compression or value, and the dense rows, are left out."""
    groups: dict[tuple[str, float], list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        x, y = row["compression"], row[column]
        if row["method"] != DENSE and x is not None and y is not None and math.isfinite(x):
            groups[row["method"], row["sparsity"]].append((x, y))
    curves: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (method, _), points in groups.items():  # rows come in grid order
        xs, ys = zip(*points, strict=True)
        curves[method].append((sum(xs) / len(xs), sum(ys) / len(ys)))
    return dict(curves)


def plot_results(rows: list[dict[str, Any]], directory: Path) -> list[Path]:
    """Write ``error.png`` and ``ece.png`` into ``directory``: each column against
    compression (log axis), a line with markers per method (means over seeds; solid for
    the Bayesian families, dashed for pruning methods), the dense reference's mean as a
    horizontal line. Needs matplotlib.

    Returns:
        The paths written.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    from matplotlib import pyplot as plt

    colors = plt.get_cmap("tab20")
    bayesian = {row["method"] for row in rows if row["family"] == "bayesian"}
    written = []
    for column, name in PLOTS.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for i, (method, points) in enumerate(seed_means(rows, column).items()):
            xs, ys = zip(*points, strict=True)
            ax.plot(
                xs,
                ys,
                color=colors(2 * i % 20 + i // 10 % 2),  # the dark shades first
                marker=_MARKERS[i % len(_MARKERS)],
                linestyle="-" if method in bayesian else "--",
                label=method,
            )
        dense = [row[column] for row in rows if row["method"] == DENSE]
        if dense:
            ax.axhline(sum(dense) / len(dense), color="black", linestyle="--", label=DENSE)
        ax.set_xscale("log")
        if column == "error":  # from about 1 % to chance (90 %): a log axis shows both ends
            ax.set_yscale("log")
        ax.set_xlabel("compression (weights / non-zero weights)")
        ax.set_ylabel(_LABELS[column])
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        atomic_write(directory / name, buffer.getvalue())
        written.append(directory / name)
    return written
