"""Plots of a bench: test error and ECE against compression, a panel per family."""

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
_MARKERS = "osD^v<>pPX*hH8d"
REFERENCE = "sparse_vd"  # drawn in every panel, where the bench has it


def seed_means(rows: list[dict[str, Any]], column: str) -> dict[str, list[tuple[float, float]]]:
    """``{method: [(mean compression, mean column), ...]}``: one point per target
    sparsity, averaged over seeds, in increasing compression. Rows without a finite
    compression or value, and the dense rows, are left out."""
    groups: dict[tuple[str, float], list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        x, y = row["compression"], row[column]
        if row["method"] != DENSE and x is not None and y is not None and math.isfinite(x):
            groups[row["method"], row["sparsity"]].append((x, y))
    curves: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (method, _), points in groups.items():
        xs, ys = zip(*points, strict=True)
        curves[method].append((sum(xs) / len(xs), sum(ys) / len(ys)))
    # A Bayesian family's own-threshold point falls anywhere along its curve.
    return {method: sorted(points) for method, points in curves.items()}


def plot_results(rows: list[dict[str, Any]], directory: Path) -> list[Path]:
    """Write ``error.png`` and ``ece.png`` into ``directory``: each column against
    compression (log axes), one panel per family so that its methods stay readable, a
    line with markers per method (means over seeds), the dense reference's mean as a
    dashed black line and, where the bench has it, sparse VD as a grey line in every
    other panel: the Bayesian reference each method is compared with. Needs matplotlib.

    Returns:
        The paths written.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    from matplotlib import pyplot as plt

    families = _families(rows)
    columns = min(4, len(families)) or 1
    shape = (math.ceil(len(families) / columns) or 1, columns)
    written = []
    for column, name in PLOTS.items():
        curves = seed_means(rows, column)
        dense = [row[column] for row in rows if row["method"] == DENSE]
        fig, axes = plt.subplots(
            *shape, figsize=(3.6 * shape[1], 3.0 * shape[0]), sharex=True, sharey=True,
            squeeze=False,
        )  # fmt: skip
        for ax, (family, methods) in zip(axes.flat, families.items(), strict=False):
            for i, method in enumerate(methods):
                xs, ys = zip(*curves.get(method, [(math.nan, math.nan)]), strict=True)
                ax.plot(xs, ys, marker=_MARKERS[i % len(_MARKERS)], label=method)
            if REFERENCE in curves and REFERENCE not in methods:
                xs, ys = zip(*curves[REFERENCE], strict=True)
                ax.plot(xs, ys, color="grey", linewidth=3, alpha=0.5, label=REFERENCE)
            if dense:
                ax.axhline(sum(dense) / len(dense), color="black", linestyle="--", label=DENSE)
            ax.set_title(family, fontsize="medium")
            ax.set_xscale("log")
            if column == "error":  # from about 1 % to chance (90 %): a log axis shows both
                ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize="x-small")
        for ax in axes.flat[len(families) :]:
            ax.set_visible(False)
        fig.supxlabel("compression (weights / stored weights)")
        fig.supylabel(_LABELS[column])
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write(directory / name, buffer.getvalue())
        written.append(directory / name)
    return written


def _families(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """``{family: [method, ...]}`` of the non-dense rows, the Bayesian family first, then
    in order of first appearance (grid order)."""
    families: dict[str, list[str]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: r["family"] != "bayesian"):
        if row["method"] != DENSE and row["method"] not in families[row["family"]]:
            families[row["family"]].append(row["method"])
    return dict(families)
