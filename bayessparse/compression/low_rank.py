"""Low-rank factorisation: a layer as two thinner layers, by truncated SVD.

A weight ``W = U S Vᵀ`` (``out × in``) truncated to its ``r`` largest singular values is
the best rank-``r`` approximation in the Frobenius and spectral norms (Eckart–Young):
``‖W − W_r‖_F² = Σ_{i>r} s_i²``. A Linear layer becomes ``Linear(in, r)`` with weight
``√S_r V_rᵀ`` followed by ``Linear(r, out)`` with weight ``U_r √S_r`` and the bias, so
``out·in`` weights become ``r·(in + out)``; Denton et al. compress fully connected layers
this way. A convolution's kernel flattened to ``out × (in·k…)`` factorises the same way
into ``r`` filters of the original size, stride, padding and dilation followed by a 1×1
convolution from ``r`` channels to ``out``: the channel decomposition of Zhang et al.
(its closed form, from the weights alone, without their reconstruction of the responses
on data). Both are exact at full rank.

References:
    Denton, Zaremba, Bruna, LeCun, Fergus. Exploiting linear structure within
    convolutional networks for efficient evaluation. NeurIPS 2014 (SVD of weight
    matrices).
    Zhang, Zou, He, Sun. Accelerating very deep convolutional networks for
    classification and detection. TPAMI 2016 (a d×k×k convolution with r filters, then
    a 1×1 one).
    Eckart, Young. The approximation of one matrix by another of lower rank.
    Psychometrika 1936.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Factorised:
    """A layer factorised by :func:`factorise`.

    Attributes:
        module: the two layers in an ``nn.Sequential``.
        rank: ``r``.
        params_before: the original layer's parameters (weights and bias).
        params_after: the two layers' parameters.
        singular_values: all singular values of the flattened weight, descending.
    """

    module: nn.Sequential
    rank: int
    params_before: int
    params_after: int
    singular_values: Tensor


def choose_rank(singular_values: Tensor, energy: float) -> int:
    """The smallest ``r`` with ``Σ_{i≤r} s_i² ≥ energy · Σ_i s_i²`` (at least 1).

    Raises:
        ValueError: ``energy`` outside (0, 1].
    """
    if not 0 < energy <= 1:
        raise ValueError(f"Expected an energy fraction in (0, 1], got {energy!r}.")
    squares = singular_values.double() ** 2
    kept = squares.cumsum(0) / squares.sum().clamp(min=torch.finfo(torch.float64).tiny)
    # The last fraction is 1 up to rounding: never search past it.
    return min(int((kept < energy).sum()) + 1, singular_values.numel())


def factorise(
    layer: nn.Module, *, rank: int | None = None, energy: float | None = None
) -> Factorised:
    """A Linear or Conv layer as two layers of rank ``r`` by truncated SVD.

    Args:
        layer: ``nn.Linear`` or ``nn.Conv1d/2d/3d`` with ``groups=1``; a layer pruned in
            :mod:`torch.nn.utils.prune` format is factorised as pruned.
        rank: ``r``, at most ``min(out, in·k…)``.
        energy: instead of ``rank``, the fraction of ``Σ s_i²`` to keep (:func:`choose_rank`).

    Returns:
        A :class:`Factorised`; its module computes ``W_r x + b``.

    Raises:
        ValueError: not exactly one of ``rank`` and ``energy``, a rank out of range, or
            a grouped convolution.
        TypeError: a layer of another type.
    """
    if not isinstance(layer, (nn.Linear, *CONV)):
        raise TypeError(f"Expected nn.Linear or nn.Conv1d/2d/3d, got {type(layer).__name__}.")
    if isinstance(layer, CONV) and layer.groups != 1:
        raise ValueError(
            f"Expected a convolution with groups=1, got groups={layer.groups}. Factorise "
            "each group's kernel on its own."
        )
    if (rank is None) == (energy is None):
        raise ValueError(f"Expected exactly one of rank and energy, got {rank=} and {energy=}.")
    weight = layer.weight.detach()
    matrix = weight.reshape(weight.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    if rank is None:
        assert energy is not None
        rank = choose_rank(s, energy)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= s.numel():
        raise ValueError(f"Expected a rank in 1..{s.numel()}, got {rank!r}.")
    root = s[:rank].sqrt()
    first_weight = (root[:, None] * vh[:rank]).reshape(rank, *weight.shape[1:])
    second_weight = u[:, :rank] * root
    first, second = _pair(layer, rank)
    with torch.no_grad():
        first.weight.copy_(first_weight)
        second.weight.copy_(second_weight.reshape(second.weight.shape))
        if layer.bias is not None:
            second.bias.copy_(layer.bias.detach())
    module = nn.Sequential(first, second)
    return Factorised(module, rank, _count(layer), _count(module), s)


def factorise_(
    net: nn.Module, *, rank: int | None = None, energy: float | None = None
) -> dict[str, Factorised]:
    """Replace, in place, every Linear and ungrouped Conv layer of ``net`` by its
    :func:`factorise` form where that has fewer parameters.

    A ``rank`` larger than a layer's smallest dimension is capped at it.

    Returns:
        ``{layer name: Factorised}`` of the replaced layers.
    """
    replaced = {}
    layers = [
        (name, m)
        for name, m in net.named_modules()
        if isinstance(m, nn.Linear) or (isinstance(m, CONV) and m.groups == 1)
    ]
    for name, layer in layers:
        weight = layer.weight
        assert isinstance(weight, Tensor)
        full = min(weight.shape[0], weight[0].numel())
        result = factorise(layer, rank=None if rank is None else min(rank, full), energy=energy)
        if result.params_after < result.params_before and name:
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, result.module)
            replaced[name] = result
    return replaced


def _pair(layer: nn.Module, rank: int) -> tuple[Any, Any]:
    """Empty layers ``in → r`` (no bias) and ``r → out`` like ``layer``."""
    weight, bias = layer.weight, layer.bias
    assert isinstance(weight, Tensor)
    like: dict[str, Any] = {"device": weight.device, "dtype": weight.dtype}
    if isinstance(layer, nn.Linear):
        return (
            nn.Linear(layer.in_features, rank, bias=False, **like),
            nn.Linear(rank, layer.out_features, bias=bias is not None, **like),
        )
    conv: Any = type(layer)
    geometry = {
        name: getattr(layer, name) for name in ("stride", "padding", "dilation", "padding_mode")
    }
    first = conv(layer.in_channels, rank, layer.kernel_size, bias=False, **geometry, **like)
    return first, conv(rank, layer.out_channels, 1, bias=bias is not None, **like)


def _count(module: nn.Module) -> int:
    """Parameters of ``module`` (a pruned layer's ``weight_orig`` counts in full)."""
    return sum(p.numel() for p in module.parameters())
