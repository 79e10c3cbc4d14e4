"""The benchmark harness: every method, Bayesian or classical, under one training budget.

``python -m bayessparse bench`` runs a grid of (method, target sparsity, seed) rows
(:mod:`~bayessparse.bench.grid`), each trained, pruned and evaluated by one protocol
(:mod:`~bayessparse.bench.runner`; compression beyond pruning, whose results store
codes, factors, hashes or a smaller student, by :mod:`~bayessparse.bench.compress`;
measured by :mod:`~bayessparse.bench.measure`), and
stores each finished row in its own file, merged into ``results.csv``
(:mod:`~bayessparse.bench.store`) and plotted (:mod:`~bayessparse.bench.plots`).

This is where the Bayesian side of the package and :mod:`bayessparse.pruning` meet; the
pruning package never imports the harness.
"""

from bayessparse.bench.grid import (
    Item,
    expand,
    grid,
    method_names,
    parse_shard,
    presets,
    shard,
)
from bayessparse.bench.runner import Bench, check_budget, min_budget, run_grid
from bayessparse.bench.store import COLUMNS, TIMING, SettingsMismatch, claim, merge, read_rows

__all__ = [
    "COLUMNS",
    "TIMING",
    "Bench",
    "Item",
    "SettingsMismatch",
    "check_budget",
    "claim",
    "expand",
    "grid",
    "merge",
    "method_names",
    "min_budget",
    "parse_shard",
    "presets",
    "read_rows",
    "run_grid",
    "shard",
]
