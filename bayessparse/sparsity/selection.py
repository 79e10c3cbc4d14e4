"""One selector from scores to boolean keep masks, by threshold or to a target sparsity.

This module needs only torch. It must not import Pyro or :mod:`bayessparse.nn`, so that
classical importance-based pruning can share it with the Bayesian layers, which score
their weights by ``keep_prob()`` (:mod:`bayessparse.masks`).

A score stands for the weights it broadcasts over: one weight (sparse VD, L0 weight gates)
or a whole unit (an input unit's column, an output channel), and pruning a score prunes
all of them. Scores are higher-is-kept. There are two ways to select:

* **Threshold.** Keep what scores above a cut, ``score > threshold``: one cut for every
  tensor, one per tensor (a dict), or each tensor's :attr:`Scores.default_threshold`.
* **Target sparsity** ``s`` in [0, 1), over all tensors together (``scope="global"``) or
  in each tensor (``scope="layer"``). Let N be the number of weights in scope and F the
  number already pruned for good (:attr:`Scores.fixed`). The target is T = round(s·N)
  pruned weights. Scores are sorted ascending, ties broken by position (tensors in the
  mapping's order, then the row-major index of the score), and the prefix of that order
  whose weights not yet pruned come closest to T − F is pruned (nothing if F ≥ T; of two
  equally close, the longer). With one score per weight this prunes exactly T weights,
  ties or not, so the achieved sparsity is within 1/(2N) of ``s``. With one score per
  unit, whole units are pruned, at most half a unit's weights from T. Biases are not
  counted.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

SCOPES = ("global", "layer")


@dataclass(frozen=True)
class Scores:
    """The scores of one prunable weight tensor; higher keeps.

    Attributes:
        values: one score per weight, or per unit: a shape that broadcasts to ``shape``,
            such as ``(1, in_features)`` for the input units of a linear layer or
            ``(out_channels, 1, 1, 1)`` for the output channels of a convolution.
        shape: the shape of the weight tensor.
        fixed: boolean mask of shape ``shape``, false where a weight is pruned for good
            whatever its score, or ``None``.
        default_threshold: the cut used when no threshold is given for this tensor, or
            ``None`` if it has none (a threshold or a sparsity must then be given).

    Raises:
        ValueError: if ``values`` does not broadcast to ``shape`` or ``fixed`` is not a
            boolean mask of that shape.
    """

    values: Tensor
    shape: tuple[int, ...]
    fixed: Tensor | None = None
    default_threshold: float | None = None

    def __post_init__(self) -> None:
        small, shape = tuple(self.values.shape), tuple(self.shape)
        if len(small) > len(shape) or any(
            a not in (1, b) for a, b in zip(reversed(small), reversed(shape), strict=False)
        ):
            raise ValueError(
                f"Expected scores that broadcast to the weight shape {shape}, got shape "
                f"{small}. Give one score per weight or per unit (size 1 elsewhere)."
            )
        fixed = self.fixed
        if fixed is not None and (fixed.dtype != torch.bool or tuple(fixed.shape) != shape):
            raise ValueError(
                f"Expected fixed to be a boolean mask of shape {shape}, got {fixed.dtype} of "
                f"shape {tuple(fixed.shape)}. Pass the weights pruned for good as False."
            )

    @property
    def unit_shape(self) -> tuple[int, ...]:
        """The shape of ``values`` with leading ones up to the weight's dimensions."""
        ones = (1,) * (len(self.shape) - self.values.dim())
        return ones + tuple(self.values.shape)

    def alive(self) -> Tensor:
        """Per score (``unit_shape``), the number of its weights not pruned for good."""
        unit = self.unit_shape
        dims = [d for d, size in enumerate(self.shape) if unit[d] == 1 and size != 1]
        device = self.values.device
        if self.fixed is None:
            per_score = math.prod(self.shape[d] for d in dims)
            return torch.full(unit, per_score, dtype=torch.int64, device=device)
        alive = self.fixed.to(device=device, dtype=torch.int64)
        # An empty dim list would make sum() reduce every dimension.
        return alive.sum(dims, keepdim=True) if dims else alive


def check_threshold(
    threshold: float, name: str = "threshold", bounds: tuple[float, float] = (0.0, 1.0)
) -> float:
    """Return ``threshold`` as a float after checking it is a number within ``bounds``.

    Raises:
        TypeError: if it is not a real number.
        ValueError: if it is NaN or outside ``bounds``.
    """
    low, high = bounds
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(
            f"Expected {name} to be a float in [{low}, {high}], got {threshold!r} of type "
            f"{type(threshold).__name__}. Pass a cut such as 0.05, a dict of them by layer, "
            "or None for each layer's default."
        )
    value = float(threshold)
    if not low <= value <= high:  # also refuses NaN
        raise ValueError(
            f"Expected {name} in [{low}, {high}], got {threshold!r}. Thresholds are on the "
            "scores (keep_prob() for Bayesian layers, not log_alpha): weights scoring above "
            "the threshold are kept."
        )
    return value


def check_sparsity(sparsity: float) -> float:
    """Return ``sparsity`` as a float after checking it is in [0, 1).

    Raises:
        TypeError: if it is not a real number.
        ValueError: if it is NaN or outside [0, 1).
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(
            f"Expected sparsity to be a float in [0, 1), got {sparsity!r} of type "
            f"{type(sparsity).__name__}. Pass the fraction of weights to prune, such as 0.9."
        )
    value = float(sparsity)
    if not 0.0 <= value < 1.0:  # also refuses NaN
        raise ValueError(
            f"Expected sparsity in [0, 1), got {sparsity!r}. It is the fraction of weights to "
            "prune: 0.9 prunes 90% of them (1 would prune everything)."
        )
    return value


def check_selection(
    threshold: float | Mapping[str, float] | None, sparsity: float | None, scope: str
) -> None:
    """Check the selection mode: at most one of ``threshold`` and ``sparsity``, a known
    ``scope``, and a valid ``sparsity``. Thresholds are checked by :func:`select`.

    Raises:
        ValueError: for both a threshold and a sparsity, an unknown scope or a sparsity
            outside [0, 1).
        TypeError: for a sparsity that is not a number.
    """
    if not isinstance(scope, str) or scope not in SCOPES:
        raise ValueError(
            f"Expected scope to be one of {SCOPES}, got {scope!r}. 'global' ranks the weights "
            "of all layers together; 'layer' prunes the fraction in each layer."
        )
    if threshold is not None and sparsity is not None:
        raise ValueError(
            f"Expected either threshold= or sparsity=, got both (threshold={threshold!r}, "
            f"sparsity={sparsity!r}). A threshold cuts the scores; a sparsity ranks them to "
            "prune a fraction of the weights. Pass one of them."
        )
    if sparsity is not None:
        check_sparsity(sparsity)


def select(
    scores: Mapping[str, Scores],
    threshold: float | Mapping[str, float] | None = None,
    sparsity: float | None = None,
    scope: str = "global",
    *,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> dict[str, Tensor]:
    """Boolean keep masks, one per entry of ``scores``, in the shape of its ``values``.

    The rules are in the module docstring. Weights pruned for good (:attr:`Scores.fixed`)
    are not in the result: :func:`weight_mask` adds them.

    Args:
        scores: the tensors to select from, by name, in tie-breaking order.
        threshold: keep ``values > threshold``: one number, or ``{name: number}`` (names
            left out use their default). ``None``: each tensor's default threshold.
        sparsity: instead of a threshold, the fraction of weights to prune, in [0, 1).
        scope: with ``sparsity``, ``"global"`` (all tensors together) or ``"layer"``
            (each tensor).
        bounds: the range thresholds must lie in ([0, 1] for keep-probabilities).

    Raises:
        ValueError: for a bad selection (see :func:`check_selection`), a threshold out of
            ``bounds`` or NaN, a dict naming unknown tensors, a tensor with no default
            threshold and none given, or NaN scores under a target sparsity.
        TypeError: for a threshold or sparsity that is not a number (or dict of them).
    """
    check_selection(threshold, sparsity, scope)
    if sparsity is None:
        cuts = _cuts(scores, threshold, bounds)
        return {name: s.values.detach() > cuts[name] for name, s in scores.items()}
    target = check_sparsity(sparsity)
    for name, s in scores.items():
        if torch.isnan(s.values).any():
            raise ValueError(
                f"Expected scores without NaN to rank, got NaN in {name!r}. Scores are NaN "
                "when training diverged; retrain or select with a threshold."
            )
    if scope == "layer":
        return {name: _prune_lowest({name: s}, target)[name] for name, s in scores.items()}
    return _prune_lowest(scores, target)


def weight_mask(scores: Scores, kept: Tensor) -> Tensor:
    """The weight-shaped mask of ``kept`` (from :func:`select`), with the fixed pruning."""
    mask = kept.reshape(scores.unit_shape).expand(scores.shape)
    if scores.fixed is not None:
        return mask & scores.fixed.to(mask.device)
    # A fresh tensor: an expanded view would alias one value across a whole unit.
    return mask.clone(memory_format=torch.contiguous_format)


def _cuts(
    scores: Mapping[str, Scores],
    threshold: float | Mapping[str, float] | None,
    bounds: tuple[float, float],
) -> dict[str, float]:
    """The cut of each tensor: the threshold, its entry in the dict, or its default."""
    if threshold is not None and not isinstance(threshold, Mapping):
        cut = check_threshold(threshold, bounds=bounds)
        return dict.fromkeys(scores, cut)
    given = dict(threshold or {})
    unknown = [name for name in given if name not in scores]
    if unknown:
        raise ValueError(
            f"Expected threshold keys among {list(scores)}, got unknown {unknown}. Name the "
            "tensors to cut; the others use their default."
        )
    cuts = {}
    for name, s in scores.items():
        if name in given:
            cuts[name] = check_threshold(given[name], f"threshold[{name!r}]", bounds)
        elif s.default_threshold is not None:
            cuts[name] = s.default_threshold
        else:
            raise ValueError(
                f"Expected a threshold for {name!r}, which has no default, got none. Pass "
                "threshold= (a number, or a dict naming it) or sparsity=."
            )
    return cuts


def _prune_lowest(scores: Mapping[str, Scores], sparsity: float) -> dict[str, Tensor]:
    """Keep masks that prune the lowest scores of ``scores`` together to ``sparsity``."""
    if not scores:
        return {}
    names = list(scores)
    device = scores[names[0]].values.device  # one device to rank on
    values = torch.cat([scores[n].values.detach().reshape(-1).to(device) for n in names])
    alive = torch.cat([scores[n].alive().reshape(-1).to(device) for n in names])
    total = sum(math.prod(scores[n].shape) for n in names)
    need = round(sparsity * total) - (total - int(alive.sum()))
    kept = torch.ones(values.shape, dtype=torch.bool, device=device)
    if need > 0:
        # A stable sort breaks ties by position: the first of equal scores goes first.
        order = values.sort(stable=True).indices
        reached = alive[order].cumsum(0)
        stop = int(torch.searchsorted(reached, reached.new_tensor([need]))[0]) + 1
        # Units prune many weights at once: stop at the unit boundary nearest the target
        # (at most half a unit away; per-weight scores hit it exactly).
        over = int(reached[stop - 1]) - need
        under = need - (int(reached[stop - 2]) if stop >= 2 else 0)
        if under < over:
            stop -= 1
        kept[order[:stop]] = False
    parts = kept.split([scores[n].values.numel() for n in names])
    return {
        n: part.reshape(scores[n].values.shape).to(scores[n].values.device)
        for n, part in zip(names, parts, strict=True)
    }
