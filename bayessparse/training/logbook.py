"""A run's logbook beside its checkpoint: one CSV row per epoch, and plots of the run."""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bayessparse.convert import sparse_modules
from bayessparse.masks import sparsity_report
from bayessparse.training.loop import Callback, History
from bayessparse.training.storage import atomic_write

EPOCHS_CSV = "epochs.csv"
LOSS_PLOT = "loss.png"
SPARSITY_PLOT = "sparsity.png"
LOGBOOK_FILES = (EPOCHS_CSV, LOSS_PLOT, SPARSITY_PLOT)
_FIRST_COLUMNS = ("epoch", "data_term", "kl", "kl_weight", "lr")
_LAYER = "sparsity_"  # a record's per-layer sparsity: "sparsity_<layer name>"


class Logbook(Callback):
    """Writes ``epochs.csv`` (and ``loss.png``, ``sparsity.png``) into ``folder``.

    Each epoch's record gains the sparsity of the whole net (``sparsity``) and of each
    sparse layer (``sparsity_<layer>``) under ``selection`` (the run's mask rule, keyword
    arguments of :func:`bayessparse.masks`), so the checkpoint keeps them. After each
    checkpoint the CSV is rewritten whole, atomically, from the run's history: a resumed
    run's CSV holds every epoch once, whenever the last session was stopped.

    Args:
        folder: the run folder (the checkpoint's).
        epochs: the run's length; the plots are drawn at its last epoch.
        selection: ``{}`` (each layer's own rule), ``{"threshold": t}`` or
            ``{"sparsity": s, "scope": ...}``.
        plots: draw the plots (needs matplotlib).
        plot_every: also redraw them at the end of an epoch when this many seconds have
            passed since the last drawing, so a long run's plots are current.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        epochs: int,
        selection: dict[str, Any] | None = None,
        plots: bool = True,
        plot_every: float = 60.0,
    ) -> None:
        self.folder, self.epochs = Path(folder), epochs
        self.selection = dict(selection or {})
        self.plots, self.plot_every = plots, plot_every
        self.history = History()
        self.last_plot = time.monotonic()

    def on_start(self, history: History) -> None:
        self.history = history
        if history.epochs:  # restored: the files may lack the epochs saved after them
            atomic_write(self.folder / EPOCHS_CSV, epochs_csv(history.epochs).encode())
            if self.plots:
                plot_logbook(history.epochs, self.folder)
        else:  # a new run: nothing of an older one stays
            for name in LOGBOOK_FILES:
                (self.folder / name).unlink(missing_ok=True)

    def on_epoch_end(self, net: nn.Module, record: dict[str, float]) -> None:
        if not any(True for _ in sparse_modules(net)):  # a plain network: nothing to count
            return
        with torch.no_grad():
            report = sparsity_report(net, **self.selection)
        record["sparsity"] = report["sparsity"]
        for name, layer in report["layers"].items():
            record[_LAYER + name] = layer["sparsity"]

    def on_epoch_saved(self, record: dict[str, float]) -> None:
        atomic_write(self.folder / EPOCHS_CSV, epochs_csv(self.history.epochs).encode())
        last = record["epoch"] >= self.epochs
        if self.plots and (last or time.monotonic() - self.last_plot >= self.plot_every):
            plot_logbook(self.history.epochs, self.folder)
            self.last_plot = time.monotonic()


def epochs_csv(records: list[dict[str, float]]) -> str:
    """CSV text of the epoch records: a column per key (the first ones in a fixed order),
    a row per record, an empty cell where a record lacks a key."""
    columns = [c for c in _FIRST_COLUMNS if any(c in r for r in records)]
    for record in records:
        columns += [key for key in record if key not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return out.getvalue()


def plot_logbook(records: list[dict[str, float]], folder: Path) -> list[Path]:
    """Write ``loss.png`` (the data term and the KL against the epoch) and, for a sparse
    network, ``sparsity.png`` (each layer's sparsity and the total's) into ``folder``.
    Needs matplotlib. Returns the paths written."""
    from matplotlib.figure import Figure  # no pyplot: no backend, no global state
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in records]
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    for ax, key, label in zip(
        fig.subplots(1, 2, sharex=True),
        ("data_term", "kl"),
        ("data term (N x mean NLL)", "KL (or penalty), unweighted"),
        strict=True,
    ):
        values = [r[key] for r in records]
        ax.plot(epochs, values, marker="." if len(records) < 50 else None)
        if all(v > 0 and math.isfinite(v) for v in values) and max(values) > 10 * min(values):
            ax.set_yscale("log")  # both ends of a KL that falls by orders of magnitude
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
    written = [_save(fig, folder / LOSS_PLOT)]
    layers = [key for key in records[-1] if key.startswith(_LAYER)]
    if not layers:
        return written
    fig = Figure(figsize=(6.4, 4), layout="constrained")
    ax = fig.subplots()
    for key in layers:
        ax.plot(epochs, [100 * r.get(key, math.nan) for r in records], label=key[len(_LAYER) :])
    total = [100 * r.get("sparsity", math.nan) for r in records]
    ax.plot(epochs, total, color="black", linestyle="--", label="all layers")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("pruned weights (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(title="layer", fontsize="small")
    written.append(_save(fig, folder / SPARSITY_PLOT))
    return written


def _save(fig: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write(path, buffer.getvalue())
    return path
