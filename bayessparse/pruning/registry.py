"""The registry of pruning methods: names to classes, as jaxpruner's ``ALGORITHMS``."""

from __future__ import annotations

from typing import Any

from bayessparse.pruning.base import PruningMethod

_METHODS: dict[str, type[PruningMethod]] = {}


def register(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: make ``cls`` available by ``cls.name``.

    Raises:
        ValueError: the name is empty or taken by another class.
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute `name`.")
    if _METHODS.get(cls.name, cls) is not cls:
        raise ValueError(f"Method name {cls.name!r} is taken by {_METHODS[cls.name].__name__}.")
    _METHODS[cls.name] = cls
    return cls


def methods() -> dict[str, type[PruningMethod]]:
    """Every registered method by name, sorted."""
    return dict(sorted(_METHODS.items()))


def get_method(name: str, **options: Any) -> PruningMethod:
    """An instance of the method registered as ``name``, with ``options``.

    Raises:
        ValueError: no method has that name (the message lists the names).
    """
    if name not in _METHODS:
        raise ValueError(f"Unknown pruning method {name!r}. Choose one of {sorted(_METHODS)}.")
    return _METHODS[name](**options)
