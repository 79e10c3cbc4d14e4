"""The files of a bench folder: one file per finished row, the merged CSV, the settings.

A row is written atomically as ``rows/<model>-<method>-<sparsity>-<seed>.json`` when it
finishes, so a bench killed at any moment keeps every finished row and a restarted one
skips them. ``results.csv`` is rebuilt from the row files, in grid order, by every
process when it ends and by ``python -m bayessparse bench --merge DIR``.
``bench.json`` records the settings that change results; a bench with other settings
is refused the folder, so that its rows never mix with these.

The columns of a row (:data:`COLUMNS`):

- ``model``, ``method``, ``sparsity`` (the target), ``seed``, ``budget`` (epochs);
- ``family`` (``dense``, ``bayesian`` or the pruning method's family) and ``stage``
  (``none`` for dense; ``during_training`` for the Bayesian families, whose sparsity
  is learnt while training; the pruning method's stage otherwise);
- ``error``, ``nll``, ``ece`` (15 bins), ``brier``: the final net on the test set;
- ``weights`` (of the Linear and Conv layers; biases not counted), ``nonzero``,
  ``achieved_sparsity`` and ``compression`` (``weights / nonzero``);
- ``flops_dense``, ``flops_nonzero``: multiply-accumulates per example;
- ``architecture``: kept units in the papers' notation (output channels of each
  convolution, then input units of each linear layer with a non-zero weight);
- ``params``, ``compact_params``: all parameters of the dense net and of the compacted
  pruned net (:func:`~bayessparse.compaction.compact_pruned`);
- ``speedup``: CPU forward time of the dense net over the compacted one, batch 100;
- ``storage_bytes``, ``storage_compression``: for compression beyond pruning
  (:mod:`~bayessparse.bench.compress`), the bytes the result stores and the dense
  float32 net's bytes over them; empty for the other rows;
- ``train_seconds``: all training of the row, cached phases included (pretraining,
  the Bayesian net's SVI).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import filelock

from bayessparse.bench.grid import OWN, Item, order
from bayessparse.recipes import DENSE
from bayessparse.training import atomic_write, to_strict_json

ROWS = "rows"
RESULTS = "results.csv"
SUMMARY = "summary.md"
SETTINGS = "bench.json"

COLUMNS = (
    "model",
    "method",
    "sparsity",
    "seed",
    "budget",
    "family",
    "stage",
    "error",
    "nll",
    "ece",
    "brier",
    "weights",
    "nonzero",
    "achieved_sparsity",
    "compression",
    "flops_dense",
    "flops_nonzero",
    "architecture",
    "params",
    "compact_params",
    "speedup",
    "storage_bytes",
    "storage_compression",
    "train_seconds",
)
# Columns that measure time: they differ from run to run; the rest are reproducible.
TIMING = ("speedup", "train_seconds")


class SettingsMismatch(ValueError):
    """The bench folder holds results computed with other settings."""


def row_path(directory: Path, item: Item) -> Path:
    """Where the row of ``item`` is stored."""
    return directory / ROWS / f"{item.name}.json"


def write_row(directory: Path, item: Item, row: dict[str, Any]) -> None:
    """Store a finished row atomically (strict JSON: a non-finite number becomes null)."""
    path = row_path(directory, item)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, to_strict_json(row).encode())


def read_rows(directory: Path) -> list[dict[str, Any]]:
    """Every stored row of the folder, in grid order."""
    rows = [json.loads(path.read_text()) for path in (directory / ROWS).glob("[!.]*.json")]
    return sorted(rows, key=lambda r: order(r["model"], r["method"], r["sparsity"], r["seed"]))


def to_csv(rows: list[dict[str, Any]]) -> str:
    """``rows`` as CSV text with a header of :data:`COLUMNS` (null: an empty cell)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """A table per model: one line per method, one column per target sparsity, each cell
    the mean over seeds of ``error % / ECE`` and the seed count; the first column,
    "dense / own", holds the dense reference and each Bayesian family at its own
    threshold (sparsity 0 in the rows; its achieved sparsity is in the CSV)."""
    cells: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault((row["model"], row["method"], row["sparsity"]), []).append(row)
    lines = []
    for model in dict.fromkeys(row["model"] for row in rows):
        sparsities = sorted({s for m, _, s in cells if m == model and s > 0})
        header = " | ".join(f"{s:.1%}" for s in sparsities)
        lines += [f"**{model}**: test error % / ECE, mean over seeds (n = seeds)", ""]
        lines += [
            f"| method | family | dense / own | {header} |",
            "|---" * (len(sparsities) + 3) + "|",
        ]
        for method in dict.fromkeys(m for mm, m, _ in cells if mm == model):
            own = _cell(cells.get((model, method, OWN)), achieved=method != DENSE)
            line = [own, *(_cell(cells.get((model, method, s))) for s in sparsities)]
            family = next(r["family"] for (mm, m, _), rs in cells.items() for r in rs
                          if mm == model and m == method)  # fmt: skip
            lines.append(f"| {method} | {family} | " + " | ".join(line) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(rows: list[dict[str, Any]] | None, achieved: bool = False) -> str:
    """``error % / ECE (n = seeds)``, means over the rows; with ``achieved``, the mean
    achieved sparsity too (an own-threshold row, whose sparsity is not its target)."""
    if not rows:
        return ""
    errors = [r["error"] for r in rows if r["error"] is not None]
    eces = [r["ece"] for r in rows if r["ece"] is not None]
    if not errors:
        return "n/a"
    ece = f"{sum(eces) / len(eces):.4f}" if eces else "n/a"
    at = ""
    if achieved:
        at = f" at {100 * sum(r['achieved_sparsity'] for r in rows) / len(rows):.1f}%"
    return f"{100 * sum(errors) / len(errors):.2f} / {ece}{at} (n = {len(errors)})"


def merge(directory: Path) -> list[dict[str, Any]]:
    """Rebuild ``results.csv`` and ``summary.md`` atomically from the row files; returns
    the rows."""
    rows = read_rows(directory)
    atomic_write(directory / RESULTS, to_csv(rows).encode())
    atomic_write(directory / SUMMARY, to_markdown(rows).encode())
    return rows


def claim(directory: Path, settings: dict[str, Any]) -> None:
    """Record ``settings`` in ``bench.json``, or check them against those recorded.

    Raises:
        SettingsMismatch: the folder's bench has other settings (names each difference).
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / SETTINGS
    with filelock.FileLock(directory / f".{SETTINGS}.lock"):
        if not path.exists():
            atomic_write(path, to_strict_json(settings).encode())
            return
        recorded = json.loads(path.read_text())
    different = [
        f"{key} {_show(recorded.get(key))} there, {_show(settings.get(key))} here"
        for key in sorted(set(recorded) | set(settings))
        if recorded.get(key) != settings.get(key)
    ]
    if different:
        raise SettingsMismatch(
            f"{path} records a bench with other settings ({'; '.join(different)}). Rows "
            "with different settings do not compare: use another --out, or the same settings."
        )


def _show(value: Any) -> str:
    # Fingerprints are long; their first digits tell them apart.
    return f"{value[:12]}..." if isinstance(value, str) and len(value) == 64 else repr(value)
