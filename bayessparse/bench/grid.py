"""The benchmark grid: which (model, method, sparsity, seed) rows a bench runs, in what order.

Every method, Bayesian or classical, is one name: ``"dense"`` (the reference), a Bayesian
family of :data:`bayessparse.recipes.TRAINABLE`, or a registered pruning method of
:func:`bayessparse.pruning.methods`. The grid is sorted in one order (model, method,
sparsity, seed) that the row files, the shards and the merged CSV share, so that shards
split it the same way in every process.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from bayessparse.bench.compress import PROTOCOLS
from bayessparse.pruning import methods as pruning_methods
from bayessparse.pruning import paganini_forde_grid
from bayessparse.recipes import DENSE, TRAINABLE

BAYESIAN = tuple(name for name in TRAINABLE if name != DENSE)
COMPRESSION = tuple(sorted(PROTOCOLS))
KINDS = ("dense", "bayesian", "pruning", "compression")
OWN = 0.0  # the target of the dense rows, and of each Bayesian family's own-threshold row


class Item(NamedTuple):
    """One row of the grid: a method at one target sparsity and seed."""

    model: str
    method: str
    sparsity: float
    seed: int

    @property
    def name(self) -> str:
        """The row's file stem, e.g. ``lenet300-magnitude-0.9-0`` (``repr`` of the
        sparsity: unique and exact)."""
        return f"{self.model}-{self.method}-{self.sparsity!r}-{self.seed}"


def method_names() -> list[str]:
    """Every name a bench accepts, in grid order: dense, the Bayesian families, pruning,
    compression beyond pruning."""
    return [DENSE, *BAYESIAN, *pruning_methods(), *COMPRESSION]


def presets() -> dict[str, list[str]]:
    """Named groups of methods that ``--methods`` accepts beside the names: ``all``,
    ``bayesian``, ``pruning``, ``compression``, and ``paganini_forde`` (the grid of
    :func:`~bayessparse.pruning.paganini_forde_grid`)."""
    return {
        "all": method_names(),
        "bayesian": list(BAYESIAN),
        "pruning": list(pruning_methods()),
        "compression": list(COMPRESSION),
        "paganini_forde": paganini_forde_grid(),
    }


def expand(names: Iterable[str]) -> list[str]:
    """``names`` with each preset replaced by its methods, in order, without repeats.

    Raises:
        ValueError: a name that is neither a method nor a preset (the message lists both).
    """
    groups = presets()
    methods: dict[str, None] = {}
    for name in names:
        if name in groups:
            methods.update(dict.fromkeys(groups[name]))
            continue
        try:
            kind(name)
        except ValueError:
            raise ValueError(
                f"Unknown method {name!r}. Choose from {', '.join(method_names())}, or a "
                f"group: {', '.join(groups)}."
            ) from None
        methods[name] = None
    return list(methods)


def kind(method: str) -> str:
    """``"dense"``, ``"bayesian"``, ``"pruning"`` or ``"compression"``.

    Raises:
        ValueError: an unknown method (the message lists the names).
    """
    if method == DENSE:
        return "dense"
    if method in BAYESIAN:
        return "bayesian"
    if method in pruning_methods():
        return "pruning"
    if method in PROTOCOLS:
        return "compression"
    raise ValueError(f"Unknown method {method!r}. Choose from {', '.join(method_names())}.")


def order(model: str, method: str, sparsity: float, seed: int) -> tuple:
    """The sort key of a row: by model, then dense, Bayesian, pruning, compression
    methods (each by name), then sparsity and seed."""
    group = KINDS.index(kind(method))
    return (model, group, method, sparsity, seed)


def grid(
    model: str, methods: Iterable[str], sparsities: Iterable[float], seeds: Iterable[int]
) -> list[Item]:
    """The rows of a bench, sorted by :func:`order`, without repeats.

    The dense reference has one row per seed (sparsity 0); every other method has one
    per (sparsity, seed), and each Bayesian family one more at sparsity 0 (:data:`OWN`):
    its net masked by its own threshold, the sparsity its prior chose.

    Raises:
        ValueError: an unknown method.
    """
    items: set[Item] = set()
    for method in methods:
        levels = [float(s) for s in sparsities]
        if kind(method) == "dense":
            levels = [OWN]
        elif kind(method) == "bayesian":
            levels = [OWN, *levels]
        items.update(Item(model, method, s, int(seed)) for s in levels for seed in seeds)
    return sorted(items, key=lambda item: order(*item))


def shard(items: Sequence[Item], index: int, count: int) -> list[Item]:
    """The rows of shard ``index`` of ``count``: those whose grid index is ``index`` mod
    ``count``."""
    return list(items[index::count])


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` as ``(i, n)``.

    Raises:
        ValueError: not two integers with ``0 <= i < n``.
    """
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not sep or not 0 <= i < n:
        raise ValueError(
            f"Expected a shard i/n with integers 0 <= i < n, got {text!r}. E.g. --shard 0/2 "
            "and --shard 1/2 split the grid in two."
        )
    return i, n
