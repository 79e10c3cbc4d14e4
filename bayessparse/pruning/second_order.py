"""Second-order pruning: the loss increase of removing weights, from its curvature.

Near a trained minimum the loss grows by about ½ δθᵀ H δθ when the weights move by δθ;
pruning sets some weights to zero, and the methods here estimate that growth with
approximations of H of increasing structure:

* :class:`OBD` — the diagonal of H (the empirical Fisher, or the exact Hessian for small
  nets): score ½ θ_q² H_qq, no compensation.
* :class:`LayerwiseOBS` — per layer, the exact Hessian of the layer's output
  reconstruction error, H = (1/n) Σ x xᵀ: OBS scores and the compensating update of the
  surviving weights.
* :class:`KronOBD`, :class:`KronOBS` — whole output units, with the Kronecker-factored
  (K-FAC) Fisher F ≈ S ⊗ A of each layer.
* :func:`eigendamage` — whole eigen-directions of S and A: each layer is rewritten in
  the eigenbasis of its factors (:func:`kfe_reparameterise`), where the K-FAC Fisher is
  diagonal, pruned there by :class:`EigenDamage`'s unit scores in the mask currency, and
  compacted into a bottleneck of three smaller layers. It changes the architecture, so
  it is a function returning a new network, not a registered method.

All of them score the weights the layer computes with (``module.weight``, masked when
pruned before), in the network's evaluation mode (no dropout, BatchNorm's running
statistics), and restore the training flags afterwards.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap

from bayessparse.compaction.pruned import compact_pruned
from bayessparse.pruning.base import (
    Data,
    PruningMethod,
    check_option,
    device_batches,
    param_key,
    prunable_layers,
    prune,
    require_data,
    trained_weight,
    unit_layers,
)
from bayessparse.pruning.registry import register

CURVATURES = ("fisher", "hessian")
FISHERS = ("true", "empirical")
ALLOCATIONS = ("magnitude", "saliency")

# Elements of the padded systems solved at once by _solve_principal (128 MiB in float64).
_SOLVE_ELEMENTS = 2**24


# ---------------------------------------------------------------------------------------
# Shared helpers: options, evaluation mode, data, layer inputs and outputs.


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Expected {name} to be one of {choices}, got {value!r}.")


def _check_damping(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(
            f"Expected damping to be a number >= 0, got {value!r}. It is the fraction of the "
            "mean curvature added to the diagonal, e.g. 1e-4."
        )


@contextmanager
def _evaluation(net: nn.Module) -> Iterator[None]:
    """Evaluation mode inside the block; each module's own training flag restored after."""
    modes = [m.training for m in net.modules()]
    net.eval()
    try:
        yield
    finally:
        for module, mode in zip(net.modules(), modes, strict=True):
            module.training = mode


@contextmanager
def _recording(layers: dict[str, nn.Module]) -> Iterator[dict[str, list[tuple[Tensor, Tensor]]]]:
    """Inside the block, each forward pass appends ``(input, output)`` of every call of a
    layer to ``calls[name]`` (a layer called twice, e.g. shared, records both)."""
    calls: dict[str, list[tuple[Tensor, Tensor]]] = {}

    def record(name: str, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        calls.setdefault(name, []).append((args[0], output))

    handles = [m.register_forward_hook(partial(record, name)) for name, m in layers.items()]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _input_rows(module: nn.Module, inputs: Tensor) -> Tensor:
    """The vectors the layer's weight matrix multiplies, one per row: the input features
    of a Linear, the im2col patches of a Conv2d (channel, then kernel position: the order
    of ``weight.reshape(out, -1)``).

    Raises:
        ValueError: for other layers, grouped convolutions or padding other than zeros.
    """
    if isinstance(module, nn.Linear):
        return inputs.reshape(-1, module.in_features)
    padding = (0, 0) if module.padding == "valid" else module.padding
    if (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and isinstance(padding, tuple)
    ):
        images = inputs if inputs.dim() == 4 else inputs.unsqueeze(0)
        patches = F.unfold(images, module.kernel_size, module.dilation, padding, module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    raise ValueError(
        f"Expected a Linear or a Conv2d with groups=1 and zero padding given as numbers, got "
        f"{module!r}. Second-order methods need the layer's input patches; convert other "
        "layers or prune them with another method."
    )


def _output_rows(module: nn.Module, outputs: Tensor) -> Tensor:
    """The layer's outputs (or their gradients), one row per example and position."""
    channels_last = outputs if isinstance(module, nn.Linear) else outputs.movedim(-3, -1)
    return channels_last.reshape(-1, channels_last.shape[-1])


def _accumulate(sums: dict[str, Tensor], name: str, value: Tensor) -> None:
    sums[name] = sums[name] + value if name in sums else value


def _matrix(module: nn.Module) -> Tensor:
    """The effective weight as a matrix, one row per output unit."""
    weight = trained_weight(module)
    return weight.detach().reshape(weight.shape[0], -1)


def _with_bias(module: nn.Module) -> Tensor:
    """W̃ = [W, b]: the effective weight matrix with the bias as a last column (if any)."""
    matrix = _matrix(module)
    bias = getattr(module, "bias", None)
    if not isinstance(bias, Tensor):
        return matrix
    return torch.cat([matrix, bias.detach().reshape(-1, 1)], dim=1)


def _write_(module: nn.Module, param: str, value: Tensor) -> None:
    """Write ``value`` into the stored parameter: ``{param}_orig`` when pruned, and then
    refresh the masked ``param`` (torch's prune hook recomputes it only at the next
    forward pass)."""
    orig = getattr(module, f"{param}_orig", None)
    target = getattr(module, param) if orig is None else orig
    with torch.no_grad():
        target.copy_(value.reshape(target.shape).to(target.dtype))
        if orig is not None:
            setattr(module, param, orig * getattr(module, f"{param}_mask"))


def _damped(matrix: Tensor, damping: float) -> Tensor:
    """``matrix + damping · mean(diag) · I``: relative, so independent of the data's scale."""
    shift = damping * matrix.diagonal().mean()
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    return matrix + shift * eye


def _inverse(matrix: Tensor) -> Tensor:
    """Inverse of a symmetric positive definite matrix, computed in float64 (the damped
    curvature's condition number reaches 1/damping, too much for float32's 7 digits).

    Raises:
        ValueError: the matrix is not positive definite.
    """
    factor, info = torch.linalg.cholesky_ex(matrix.double())
    if int(info) != 0:
        raise ValueError(
            f"Expected a positive definite curvature matrix, got a singular one (size "
            f"{matrix.shape[0]}): dead inputs or units, or fewer examples than its size. "
            "Pass a damping > 0 (e.g. 1e-4) or more data."
        )
    return torch.cholesky_inverse(factor).to(matrix.dtype)


def _kept_curvatures(matrix: Tensor) -> Tensor:
    """1 / [M⁻¹]_qq for every q: the curvature left along coordinate q when the others
    move to compensate (OBS's denominator). Zero for a zero matrix: a layer the loss does
    not depend on (e.g. behind a fully pruned layer) costs nothing to prune."""
    if not bool(matrix.any()):
        return torch.zeros_like(matrix.diagonal())
    return 1 / _inverse(matrix).diagonal()


def _solve_principal(matrix: Tensor, sets: Tensor, rhs: Tensor) -> Tensor:
    """Per row r, x_S = matrix[S, S]⁻¹ rhs[r, S] on its set S = sets[r], zero elsewhere.

    Rows have sets of different sizes, so each system is padded to the largest with the
    identity (and a zero right-hand side) and all are solved in one batched Cholesky;
    the loop is only over chunks of rows, to bound the memory of the padded systems.

    Args:
        matrix: a symmetric positive definite (d, d) matrix (its principal submatrices
            are too).
        sets: boolean (rows, d).
        rhs: (rows, d), of the matrix's dtype; entries outside each row's set are
            ignored.
    """
    result = torch.zeros_like(rhs)
    counts = sets.sum(1)
    size = int(counts.max()) if counts.numel() else 0
    if size == 0:
        return result
    # Members of each row's set first (a stable sort keeps them in index order).
    order = torch.argsort((~sets).to(torch.int8), dim=1, stable=True)[:, :size]
    valid = torch.arange(size, device=sets.device) < counts[:, None]
    eye = torch.eye(size, dtype=matrix.dtype, device=matrix.device)
    step = max(1, _SOLVE_ELEMENTS // size**2)
    for start in range(0, sets.shape[0], step):
        idx, ok = order[start : start + step], valid[start : start + step]
        pairs = ok[:, :, None] & ok[:, None, :]
        sub = torch.where(pairs, matrix[idx[:, :, None], idx[:, None, :]], eye)
        b = rhs[start : start + step].gather(1, idx) * ok
        x = torch.cholesky_solve(b.unsqueeze(-1), torch.linalg.cholesky(sub)).squeeze(-1)
        result[start : start + step].scatter_(1, idx, x * ok)
    return result


# ---------------------------------------------------------------------------------------
# Optimal Brain Damage: the diagonal of the curvature.


def _weight_parameters(net: nn.Module) -> dict[str, tuple[str, Tensor]]:
    """Per weight key (``"0.weight"``), the name of the parameter that stores it
    (``"0.weight_orig"`` when pruned) and its detached value."""
    stored = dict(net.named_parameters())
    found = {}
    for layer, module in prunable_layers(net).items():
        name = param_key(layer, "weight_orig" if hasattr(module, "weight_orig") else "weight")
        found[param_key(layer)] = (name, stored[name].detach())
    return found


def fisher_diagonal(
    net: nn.Module, data: Data, batch_size: int = 128, num_batches: int | None = None
) -> dict[str, Tensor]:
    """The diagonal of the empirical Fisher of the mean cross-entropy, per prunable weight.

    F_qq = (1/N) Σ_n (∂ℓ_n/∂θ_q)², with ℓ_n the cross-entropy of example n at its label.
    Per-example gradients come from ``torch.func`` (``vmap`` of ``grad`` of a
    ``functional_call``), one batch at a time. For weights pruned before, the gradient is
    taken through the mask, so their entries are zero.

    Args:
        net: the network, returning logits.
        data: ``(inputs, labels)``.
        batch_size: examples per vectorised batch (memory grows with it times the number
            of weights).
        num_batches: use only the first ``num_batches`` batches (None: all).

    Returns:
        One tensor of the weight's shape per ``state_dict`` weight key.
    """
    weights = _weight_parameters(net)
    stored = {name: value for name, value in weights.values()}

    def example_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(net, params, (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))
    sums = {name: torch.zeros_like(value) for name, value in stored.items()}
    count = 0
    with _evaluation(net):
        for x, y in device_batches(net, data, batch_size, num_batches):
            grads = per_example(stored, x, y)
            for name in sums:
                sums[name] += grads[name].square().sum(0)
            count += x.shape[0]
    return {key: sums[name] / count for key, (name, _) in weights.items()}


def hessian_diagonal(
    net: nn.Module,
    data: Data,
    batch_size: int = 128,
    num_batches: int | None = None,
    chunk_size: int = 256,
) -> dict[str, Tensor]:
    """The exact diagonal of the Hessian of the mean cross-entropy, per prunable weight.

    H_qq = e_qᵀ H e_q: Hessian-vector products (``vjp`` of ``grad``) against the basis
    vectors of each layer's weight, ``chunk_size`` of them at once with ``vmap``; the
    batches' Hessians are weighted by their share of the examples. It costs
    one Hessian-vector product per weight: for small nets only.

    Args:
        net: the network, returning logits.
        data: ``(inputs, labels)``.
        batch_size: examples per batch.
        num_batches: use only the first ``num_batches`` batches (None: all).
        chunk_size: basis vectors per vectorised product.

    Returns:
        One tensor of the weight's shape per ``state_dict`` weight key.
    """
    batches = list(device_batches(net, data, batch_size, num_batches))
    total = sum(x.shape[0] for x, _ in batches)
    diagonals = {}
    with _evaluation(net):
        for key, (name, weight) in _weight_parameters(net).items():

            def batch_loss(w: Tensor, x: Tensor, y: Tensor, name: str = name) -> Tensor:
                return F.cross_entropy(functional_call(net, {name: w}, (x,)), y)

            diagonal = torch.zeros_like(weight)
            for x, y in batches:
                gradient = partial(grad(batch_loss), x=x, y=y)
                share = x.shape[0] / total
                diagonal += share * _diagonal_by_products(gradient, weight, chunk_size)
            diagonals[key] = diagonal
    return diagonals


def _diagonal_by_products(gradient: Any, weight: Tensor, chunk_size: int) -> Tensor:
    """diag(H) of the Jacobian H of ``gradient`` at ``weight``, one basis vector at a time.

    Reverse over reverse: H is symmetric, so the vector-Jacobian product of the gradient
    is H v (forward mode, jvp, would do too, but loads TorchScript decompositions that
    warn as deprecated).
    """
    hessian_times = vjp(gradient, weight)[1]
    size = weight.numel()
    diagonal = torch.empty(size, dtype=weight.dtype, device=weight.device)
    for start in range(0, size, chunk_size):
        index = torch.arange(start, min(start + chunk_size, size), device=weight.device)
        basis = F.one_hot(index, size).to(weight.dtype).reshape(-1, *weight.shape)
        (products,) = vmap(hessian_times)(basis)
        diagonal[index] = products.reshape(len(index), size).gather(1, index[:, None])[:, 0]
    return diagonal.reshape(weight.shape)


@register
class OBD(PruningMethod):
    """Optimal Brain Damage: prune the weights whose removal raises the loss least,
    by a diagonal approximation of the Hessian.

    With a diagonal H, setting θ_q to zero raises the loss (at a minimum) by

        s_q = ½ θ_q² H_qq.

    H_qq is the diagonal of the empirical Fisher (``curvature="fisher"``: the mean of the
    squared per-example gradients at the data's labels, one vectorised backward pass; the
    usual cheap stand-in for the curvature, where the paper used the Gauss-Newton
    diagonal) or of the exact Hessian (``"hessian"``: one Hessian-vector product per
    weight, for small nets). The loss is the mean cross-entropy on ``data``.

    Args:
        curvature: ``"fisher"`` (default) or ``"hessian"``.
        batch_size: examples per vectorised batch.
        num_batches: use only the first ``num_batches`` batches of ``data`` (None: all).
        hessian_limit: the most prunable weights ``curvature="hessian"`` accepts.

    Raises:
        ValueError: for an unknown curvature or a non-positive batch option; from
            :meth:`scores`, for ``"hessian"`` on a net above ``hessian_limit``.

    References:
        LeCun, Denker, Solla. "Optimal Brain Damage". NeurIPS 1990.
    """

    name = "obd"
    family = "second_order"
    needs_data = True

    def __init__(
        self,
        curvature: str = "fisher",
        batch_size: int = 128,
        num_batches: int | None = None,
        hessian_limit: int = 10_000,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        _check_choice("curvature", curvature, CURVATURES)
        check_option("batch_size", batch_size, integer=True)
        check_option("num_batches", num_batches, integer=True, optional=True)
        check_option("hessian_limit", hessian_limit, integer=True)
        self.curvature = curvature
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.hessian_limit = hessian_limit

    def scores(self, net: nn.Module, data: Data | None) -> dict[str, Tensor]:
        data = require_data(self, data)
        if self.curvature == "fisher":
            curvature = fisher_diagonal(net, data, self.batch_size, self.num_batches)
        else:
            size = sum(trained_weight(m).numel() for m in prunable_layers(net).values())
            if size > self.hessian_limit:
                raise ValueError(
                    f"Expected at most hessian_limit={self.hessian_limit} prunable weights "
                    f"for curvature='hessian' (one Hessian-vector product each), got {size}. "
                    "Use curvature='fisher', or raise hessian_limit for a slow exact run."
                )
            curvature = hessian_diagonal(net, data, self.batch_size, self.num_batches)
        scores = {}
        for layer, module in prunable_layers(net).items():
            key = param_key(layer)
            scores[key] = 0.5 * trained_weight(module).detach().square() * curvature[key]
        return scores


# ---------------------------------------------------------------------------------------
# Layer-wise Optimal Brain Surgeon.


def input_hessians(
    net: nn.Module, data: Data, batch_size: int = 128, num_batches: int | None = None
) -> dict[str, Tensor]:
    """Per prunable layer reached by the forward pass, H = (1/n) Σ x xᵀ over its n input
    rows (features of a Linear; im2col patches of a Conv2d, one per output position):
    the Hessian of the layer's mean squared output error ½ (1/n) Σ ‖(W − W*) x‖² in each
    output row.

    Returns:
        A (d, d) matrix per layer name, d the layer's fan-in.
    """
    layers = prunable_layers(net)
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    with _evaluation(net), torch.no_grad(), _recording(layers) as calls:
        for x, _ in device_batches(net, data, batch_size, num_batches):
            calls.clear()
            net(x)
            for name, seen in calls.items():
                rows = torch.cat([_input_rows(layers[name], inputs) for inputs, _ in seen])
                _accumulate(sums, name, rows.T @ rows)
                counts[name] = counts.get(name, 0) + rows.shape[0]
    return {name: sums[name] / counts[name] for name in sums}


def obs_update(weight: Tensor, keep: Tensor, hessian: Tensor) -> Tensor:
    """The optimal surviving weights of each row once the weights ``~keep`` are removed.

    Per row w (rows share H), with pruned set Q and kept set K, the minimum of
    ½ δᵀ H δ subject to (w + δ)_Q = 0 is

        w_K ← w_K + H_KK⁻¹ H_KQ w_Q  =  w_K − [H⁻¹]_KQ ([H⁻¹]_QQ)⁻¹ w_Q.

    Both forms are exact; each row uses the one with the smaller system (|K| or |Q|).
    Computed in float64 (see :func:`_inverse`), returned in the weight's dtype.

    Args:
        weight: (rows, d) current weights (entries pruned before are zero and in ~keep).
        keep: boolean (rows, d), true for the survivors.
        hessian: (d, d) symmetric positive definite.

    Returns:
        The new (rows, d) weights, zero on ``~keep``.

    Raises:
        ValueError: ``hessian`` is singular (but not zero: a zero H, a layer the loss does
            not depend on, leaves the survivors as they are).
    """
    if not bool(hessian.any()):
        return weight * keep
    inverse, hessian, old = _inverse(hessian.double()), hessian.double(), weight.double()
    pruned = ~keep
    few_kept = keep.sum(1) <= pruned.sum(1)
    shift = torch.zeros_like(old)
    removed = old[few_kept] * pruned[few_kept]
    shift[few_kept] = _solve_principal(hessian, keep[few_kept], removed @ hessian)
    many_kept = ~few_kept
    solved = _solve_principal(inverse, pruned[many_kept], old[many_kept])
    shift[many_kept] = -solved @ inverse
    return ((old + shift) * keep).to(weight.dtype)


@register
class LayerwiseOBS(PruningMethod):
    """Layer-wise Optimal Brain Surgeon: prune each layer by the exact Hessian of its own
    output reconstruction error, and correct the surviving weights.

    For a layer with inputs x (features, or im2col patches of a Conv2d), removing weights
    from an output row w changes the row's mean squared output error ½ (1/n) Σ (δᵀx)² by
    ½ δᵀ H δ, H = (1/n) Σ x xᵀ (the same H for every row). OBS on this quadratic gives the
    saliency of one weight and the compensating update of the others:

        L_q = θ_q² / (2 [H⁻¹]_qq),   δw = −(θ_q / [H⁻¹]_qq) H⁻¹ e_q,

    and :meth:`update_` applies the exact update for the whole pruned set Q of each row,
    δw = −H⁻¹[:, Q] ([H⁻¹]_QQ)⁻¹ w_Q (:func:`obs_update`). As in the paper, H comes from
    the inputs of the unpruned layers (one pass before any update), and the saliencies of
    a layer pruned before use its full H, not the one restricted to its survivors. Biases
    are neither pruned nor updated.

    Saliencies are in units of each layer's output error, which do not compare across
    layers: the paper prunes each layer to a ratio set by hand. With
    ``allocation="magnitude"`` (default) each layer keeps as many weights as global
    magnitude pruning would keep there, and OBS chooses which: the scores are the
    layer's magnitudes reassigned in the order of its saliencies, so the shared
    selector's global cut yields magnitude's per-layer counts. ``"saliency"`` ranks the
    raw saliencies of all layers together, which empties the layers of small inputs
    first: on LeNet-300-100 after 10 epochs, at 98.5 % it kept 75 weights of the first
    layer (22 % error after 2 epochs of fine-tuning, against 10 % with the magnitude
    allocation; 90 %: 2.3 % against 2.0 %).

    H is damped, H + λ·mean(diag H)·I (``damping`` λ): H is singular whenever inputs are
    linearly dependent or constant (MNIST's border pixels are always zero) or there are
    fewer input rows than d. A relative λ = 1e-4 bounds the condition number by about
    1e4 × d, and changes H by a relative λ·mean/e in an eigendirection of eigenvalue e:
    at most 1e-4 wherever the data pin the weights down at least as well as on average;
    a dead input's weights get saliency ½ θ² λ·mean(diag H): nearly free to remove, as
    they should be.

    Args:
        damping: λ >= 0 (default 1e-4).
        batch_size: examples per forward pass while collecting inputs.
        num_batches: use only the first ``num_batches`` batches of ``data`` (None: all).
        allocation: ``"magnitude"`` or ``"saliency"``: how many weights each layer keeps
            under a global target (above).

    References:
        Dong, Chen, Pan. "Learning to prune deep neural networks via layer-wise optimal
        brain surgeon". NeurIPS 2017.
        Hassibi, Stork. "Second order derivatives for network pruning: Optimal Brain
        Surgeon". NeurIPS 1992.
    """

    name = "obs"
    family = "second_order"
    needs_data = True

    def __init__(
        self,
        damping: float = 1e-4,
        batch_size: int = 128,
        num_batches: int | None = None,
        allocation: str = "magnitude",
        **options: Any,
    ) -> None:
        super().__init__(**options)
        _check_damping(damping)
        check_option("batch_size", batch_size, integer=True)
        check_option("num_batches", num_batches, integer=True, optional=True)
        _check_choice("allocation", allocation, ALLOCATIONS)
        self.damping = float(damping)
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.allocation = allocation

    def _hessians(self, net: nn.Module, data: Data | None) -> dict[str, Tensor]:
        data = require_data(self, data)
        hessians = input_hessians(net, data, self.batch_size, self.num_batches)
        return {name: _damped(h, self.damping) for name, h in hessians.items()}

    def scores(self, net: nn.Module, data: Data | None) -> dict[str, Tensor]:
        layers = prunable_layers(net)
        scores = {}
        for name, hessian in self._hessians(net, data).items():
            weight = trained_weight(layers[name]).detach()
            saliency = 0.5 * _matrix(layers[name]).square() * _kept_curvatures(hessian)
            saliency = saliency.reshape(weight.shape)
            if self.allocation == "magnitude":
                saliency = _in_order_of(weight.abs(), saliency)
            scores[param_key(name)] = saliency
        return scores

    def update_(self, net: nn.Module, masks: dict[str, Tensor], data: Data | None) -> None:
        layers = prunable_layers(net)
        for name, hessian in self._hessians(net, data).items():
            key = param_key(name)
            if key not in masks:
                continue
            weight = _matrix(layers[name])
            keep = masks[key].to(weight.device).reshape(weight.shape)
            _write_(layers[name], "weight", obs_update(weight, keep, hessian))


def _in_order_of(values: Tensor, order: Tensor) -> Tensor:
    """``values`` reassigned so that they rank as ``order`` does: the k-th smallest of
    ``order``'s positions gets the k-th smallest value (ties broken stably)."""
    ranked = order.flatten().argsort(stable=True)
    result = torch.empty_like(values.flatten())
    result[ranked] = values.flatten().sort().values
    return result.view_as(values)


@register
class LayerwiseOBSIterative(LayerwiseOBS):
    """Layer-wise OBS in rounds: each of ``rounds`` rounds prunes the survivors to the
    round's target ``1 − (1 − s)^(k/rounds)`` by the saliencies and compensating update
    of :class:`LayerwiseOBS`, with Hessians from the current net, then fine-tunes for its
    share of the budget (as :class:`~bayessparse.pruning.magnitude.MagnitudeIterative`
    does for magnitudes). At extreme sparsity one shot removes too much at once for the
    compensation's quadratic model to hold; rounds keep each step within it.

    References:
        Dong, Chen, Pan. "Learning to prune deep neural networks via layer-wise optimal
        brain surgeon". NeurIPS 2017.
    """

    name = "obs_iterative"
    rounds = 5


# ---------------------------------------------------------------------------------------
# Kronecker-factored OBD and OBS over output units.


def kron_factors(
    net: nn.Module,
    data: Data,
    layers: dict[str, nn.Module],
    fisher: str = "true",
    batch_size: int = 128,
    num_batches: int | None = None,
    seed: int = 0,
) -> dict[str, tuple[Tensor, Tensor]]:
    """The K-FAC factors (A, S) of each of ``layers`` reached by the forward pass.

    For a layer computing s = W̃ ã (ã: the input row with a 1 appended for the bias, if
    the layer has one), the Fisher of W̃ (rows of W̃ concatenated, row-major) is
    approximated by F ≈ S ⊗ A with

        A = E[ã ãᵀ]  (mean over examples and output positions),
        S = E[Σ_t g_t g_tᵀ]  (mean over examples of the sum over positions t),

    g_t = ∂(−log p(y|x))/∂s_t. For a Linear there is one position; for a Conv2d, ã_t are
    the im2col patches and this is the KFC approximation (spatially uncorrelated
    derivatives), whose total scale equals Grosse & Martens' Ω ⊗ Γ.

    Args:
        net: the network, returning logits.
        data: ``(inputs, labels)``.
        layers: the layers to factor, by name.
        fisher: ``"true"``: y sampled from the model's predictive distribution (the
            Fisher); ``"empirical"``: y the data's labels.
        batch_size: examples per forward-backward pass.
        num_batches: use only the first ``num_batches`` batches (None: all).
        seed: seeds the sampled labels.

    Returns:
        ``(A, S)`` per layer name: A of size fan-in (+1 with a bias), S of size out.

    Raises:
        ValueError: for an unknown ``fisher``, or a layer other than a Linear or a
            Conv2d with ``groups=1`` and zero padding.

    References:
        Martens, Grosse. "Optimizing neural networks with Kronecker-factored approximate
        curvature". ICML 2015. Grosse, Martens. "A Kronecker-factored approximate Fisher
        matrix for convolution layers". ICML 2016.
    """
    _check_choice("fisher", fisher, FISHERS)
    if not layers:
        return {}
    device = next(net.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    a_sums: dict[str, Tensor] = {}
    a_rows: dict[str, int] = {}
    s_sums: dict[str, Tensor] = {}
    examples = 0
    with _evaluation(net), _recording(layers) as calls:
        for x, y in device_batches(net, data, batch_size, num_batches):
            calls.clear()
            with torch.enable_grad():
                # Inputs that need grad make every layer output need grad, even of frozen
                # weights.
                logits = net(x.detach().requires_grad_() if x.is_floating_point() else x)
                if fisher == "true":
                    probs = logits.detach().softmax(-1)
                    y = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
                loss = F.cross_entropy(logits, y, reduction="sum")
                seen = [(name, inp, out) for name, pairs in calls.items() for inp, out in pairs]
                output_grads = torch.autograd.grad(loss, [out for _, _, out in seen])
            with torch.no_grad():
                for (name, inp, _), g in zip(seen, output_grads, strict=True):
                    a = _input_rows(layers[name], inp.detach())
                    if layers[name].bias is not None:
                        a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
                    g_rows = _output_rows(layers[name], g)
                    _accumulate(a_sums, name, a.T @ a)
                    _accumulate(s_sums, name, g_rows.T @ g_rows)
                    a_rows[name] = a_rows.get(name, 0) + a.shape[0]
            examples += x.shape[0]
    return {name: (a_sums[name] / a_rows[name], s_sums[name] / examples) for name in a_sums}


def _row_quadratics(weight_bias: Tensor, a: Tensor) -> Tensor:
    """w̃_iᵀ A w̃_i for every row i."""
    return ((weight_bias @ a) * weight_bias).sum(1)


def kron_obd_saliency(weight_bias: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """Kron-OBD: ΔL_i = ½ S_ii w̃_iᵀ A w̃_i, the loss increase of zeroing row i of W̃
    under F = S ⊗ A with no compensation. Returns one value per row."""
    return 0.5 * s.diagonal() * _row_quadratics(weight_bias, a)


def kron_obs_saliency(weight_bias: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """Kron-OBS: ΔL_i = ½ w̃_iᵀ A w̃_i / [S⁻¹]_ii, the least loss increase under
    F = S ⊗ A of zeroing row i of W̃ when the other rows compensate. One value per row."""
    return 0.5 * _row_quadratics(weight_bias, a) * _kept_curvatures(s)


def kron_obs_update(weight_bias: Tensor, s: Tensor, pruned: Tensor) -> Tensor:
    """The optimal W̃ under F = S ⊗ A once the rows ``pruned`` are zeroed:

        W̃ ← W̃ − S⁻¹[:, Q] ([S⁻¹]_QQ)⁻¹ W̃_Q,

    which zeroes the rows Q and, for any A, minimises ½ vec(ΔW̃)ᵀ F vec(ΔW̃) (the optimum
    does not depend on A because F's row coupling is S alone).

    Args:
        weight_bias: (out, d) matrix W̃.
        s: (out, out) symmetric positive definite factor S (or zero: then the rows are
            only zeroed).
        pruned: boolean (out,), true for the rows to remove.
    """
    if not bool(pruned.any() and s.any()):  # nothing to remove, or no loss to keep
        return weight_bias * ~pruned[:, None]
    inverse, old = _inverse(s.double()), weight_bias.double()
    coefficients = torch.linalg.solve(inverse[pruned][:, pruned], old[pruned])
    updated = old - inverse[:, pruned] @ coefficients
    updated[pruned] = 0
    return updated.to(weight_bias.dtype)


class _Kronecker(PruningMethod):
    """Shared by :class:`KronOBD` and :class:`KronOBS`: K-FAC factors and unit scores."""

    family = "second_order"
    structure = "unit"
    needs_data = True

    def __init__(
        self,
        fisher: str = "true",
        damping: float = 1e-3,
        batch_size: int = 128,
        num_batches: int | None = None,
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        _check_choice("fisher", fisher, FISHERS)
        _check_damping(damping)
        check_option("batch_size", batch_size, integer=True)
        check_option("num_batches", num_batches, integer=True, optional=True)
        self.fisher = fisher
        self.damping = float(damping)
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.seed = seed

    def _saliency(self, weight_bias: Tensor, a: Tensor, s: Tensor) -> Tensor:
        raise NotImplementedError

    def _factors(self, net: nn.Module, data: Data | None) -> dict[str, tuple[Tensor, Tensor]]:
        factors = kron_factors(
            net,
            require_data(self, data),
            unit_layers(net),
            self.fisher,
            self.batch_size,
            self.num_batches,
            self.seed,
        )
        return {
            name: (_damped(a, self.damping), _damped(s, self.damping))
            for name, (a, s) in factors.items()
        }

    def scores(self, net: nn.Module, data: Data | None) -> dict[str, Tensor]:
        layers = prunable_layers(net)
        scores = {}
        for name, (a, s) in self._factors(net, data).items():
            weight = trained_weight(layers[name])
            saliency = self._saliency(_with_bias(layers[name]), a, s)
            scores[param_key(name)] = saliency.reshape(-1, *[1] * (weight.dim() - 1))
        return scores


@register
class KronOBD(_Kronecker):
    """Kronecker-factored OBD over output units (neurons, channels), no compensation.

    With the K-FAC Fisher F ≈ S ⊗ A of each layer (:func:`kron_factors`) and
    W̃ = [W, b] (one row per output unit), removing unit i raises the loss by

        ΔL_i = ½ S_ii · w̃_iᵀ A w̃_i.

    Every prunable layer but the last (the classifier) is scored per output unit; the
    selector prunes whole units and their biases.

    Args:
        fisher: ``"true"`` (labels sampled from the model, default) or ``"empirical"``.
        damping: λ >= 0; A and S each get λ·mean(diag)·I added (default 1e-3, as
            :class:`KronOBS`, so that both rank with the same curvature; OBD inverts
            nothing, and λ only adds λ·mean(diag) to each factor's curvatures).
        batch_size: examples per forward-backward pass.
        num_batches: use only the first ``num_batches`` batches of ``data`` (None: all).
        seed: seeds the sampled labels of the true Fisher.

    References:
        Wang, Grosse, Fidler, Zhang. "EigenDamage: Structured pruning in the
        Kronecker-factored eigenbasis". ICML 2019, §3 (Kron-OBD; the official code's
        ``kfac_OBD_F2.py`` scores Σ_j w_ij² Σ_k A_jk instead of w̃_iᵀ A w̃_i).
    """

    name = "kron_obd"

    def _saliency(self, weight_bias: Tensor, a: Tensor, s: Tensor) -> Tensor:
        return kron_obd_saliency(weight_bias, a, s)


@register
class KronOBS(_Kronecker):
    """Kronecker-factored OBS over output units, with the compensating update.

    With the K-FAC Fisher F ≈ S ⊗ A of each layer (:func:`kron_factors`) and
    W̃ = [W, b], removing unit i while the other units of the layer compensate raises the
    loss by at least

        ΔL_i = ½ w̃_iᵀ A w̃_i / [S⁻¹]_ii,   attained by ΔW̃ = −S⁻¹ e_i w̃_iᵀ / [S⁻¹]_ii.

    :meth:`update_` applies the set version for all removed units Q of a layer at once,
    ΔW̃ = −S⁻¹[:, Q] ([S⁻¹]_QQ)⁻¹ W̃_Q (:func:`kron_obs_update`); weights pruned one by
    one before stay zero. Every prunable layer but the last is scored per output unit.

    Args:
        fisher: ``"true"`` (labels sampled from the model, default) or ``"empirical"``.
        damping: λ >= 0; A and S each get λ·mean(diag)·I added (default 1e-3), which
            keeps S invertible when units are dead (their gradients are zero).
        batch_size: examples per forward-backward pass.
        num_batches: use only the first ``num_batches`` batches of ``data`` (None: all).
        seed: seeds the sampled labels of the true Fisher.

    References:
        Wang, Grosse, Fidler, Zhang. "EigenDamage: Structured pruning in the
        Kronecker-factored eigenbasis". ICML 2019, §3 (Kron-OBS; the official code's
        ``kfac_OBS_F2.py`` scores Σ_j w_ij² Σ_k A_jk / [S⁻¹]_ii and sums the
        single-unit updates instead of the set update).
    """

    name = "kron_obs"

    def _saliency(self, weight_bias: Tensor, a: Tensor, s: Tensor) -> Tensor:
        return kron_obs_saliency(weight_bias, a, s)

    def update_(self, net: nn.Module, masks: dict[str, Tensor], data: Data | None) -> None:
        layers = prunable_layers(net)
        for name, (_, s) in self._factors(net, data).items():
            key = param_key(name)
            if key not in masks:
                continue
            module = layers[name]
            weight_mask = masks[key].to(s.device).reshape(s.shape[0], -1)
            pruned = ~weight_mask.any(1)
            updated = kron_obs_update(_with_bias(module), s, pruned)
            columns = weight_mask.shape[1]
            _write_(module, "weight", updated[:, :columns] * weight_mask)
            if module.bias is not None:
                _write_(module, "bias", updated[:, columns])


# ---------------------------------------------------------------------------------------
# EigenDamage: pruning in the Kronecker-factored eigenbasis.


class KFEBottleneck(nn.Sequential):
    """A layer rewritten in the Kronecker-factored eigenbasis (KFE) of its K-FAC Fisher.

    With A = Q_A diag(λ^A) Q_Aᵀ and S = Q_S diag(λ^S) Q_Sᵀ, the layer's W̃ = [W, b] is
    Q_S W' Q_Aᵀ with W' = Q_Sᵀ W̃ Q_A, computed by three plain layers:

    * ``rotate_in``: z = Q_Aᵀ ã (the weight is Q_Aᵀ without its last column, the bias
      that column, when the layer has a bias; a Conv2d keeps the kernel, stride,
      padding and dilation);
    * ``core``: W' z, no bias (a 1×1 convolution for a Conv2d);
    * ``rotate_out``: Q_S (W' z).

    In this basis the K-FAC Fisher of W' is diagonal, diag(λ^S) ⊗ diag(λ^A). The
    eigenvalues are non-persistent buffers ``eigenvalues_a`` and ``eigenvalues_s``: they
    move with the module but are not in its state dict.
    """

    eigenvalues_a: Tensor
    eigenvalues_s: Tensor

    def __init__(
        self,
        rotate_in: nn.Module,
        core: nn.Module,
        rotate_out: nn.Module,
        eigenvalues_a: Tensor,
        eigenvalues_s: Tensor,
    ) -> None:
        super().__init__(OrderedDict(rotate_in=rotate_in, core=core, rotate_out=rotate_out))
        self.register_buffer("eigenvalues_a", eigenvalues_a, persistent=False)
        self.register_buffer("eigenvalues_s", eigenvalues_s, persistent=False)


def _kfe_layers(layer: nn.Module, size: int, bias: bool) -> tuple[nn.Module, nn.Module, nn.Module]:
    """Empty ``rotate_in``, ``core`` and ``rotate_out`` for ``layer`` (Linear or Conv2d:
    :func:`kron_factors` accepts no other), with ``size`` eigen-directions of A."""
    if isinstance(layer, nn.Linear):
        out = layer.out_features
        return (
            nn.Linear(layer.in_features, size, bias=bias),
            nn.Linear(size, out, bias=False),
            nn.Linear(out, out, bias=False),
        )
    assert isinstance(layer, nn.Conv2d)
    out = layer.out_channels
    (height, width), (down, across) = layer.kernel_size, layer.stride
    rotate_in = nn.Conv2d(layer.in_channels, size, (height, width), (down, across), bias=bias)
    rotate_in.padding, rotate_in.dilation = layer.padding, layer.dilation
    return rotate_in, nn.Conv2d(size, out, 1, bias=False), nn.Conv2d(out, out, 1, bias=False)


def _kfe_bottleneck(layer: nn.Module, a: Tensor, s: Tensor) -> KFEBottleneck:
    """``layer`` as a :class:`KFEBottleneck` for the K-FAC factors ``a`` and ``s``."""
    eigenvalues_a, basis_a = torch.linalg.eigh(a.double())
    eigenvalues_s, basis_s = torch.linalg.eigh(s.double())
    fan_in = _matrix(layer).shape[1]
    has_bias = basis_a.shape[0] > fan_in
    # eigh may return tiny negative eigenvalues of these positive semi-definite factors.
    bottleneck = KFEBottleneck(
        *_kfe_layers(layer, basis_a.shape[0], has_bias),
        eigenvalues_a.clamp(min=0),
        eigenvalues_s.clamp(min=0),
    )
    weight = trained_weight(layer)
    bottleneck.to(dtype=weight.dtype, device=weight.device)
    rotate_in, core, rotate_out = bottleneck
    _write_(rotate_in, "weight", basis_a.T[:, :fan_in])
    if has_bias:
        _write_(rotate_in, "bias", basis_a.T[:, fan_in])
    _write_(core, "weight", basis_s.T @ _with_bias(layer).double() @ basis_a)
    _write_(rotate_out, "weight", basis_s)
    return bottleneck


def _copy(net: nn.Module) -> nn.Module:
    """A deep copy of ``net``, also when pruned in :mod:`torch.nn.utils.prune` format: the
    masked ``weight`` attribute is no graph leaf after a forward pass, which deepcopy
    refuses, so it is copied detached (the prune hook recomputes it anyway)."""
    memo: dict[int, Any] = {
        id(value): value.detach().clone()
        for module in net.modules()
        for value in module.__dict__.values()
        if isinstance(value, Tensor) and not value.is_leaf
    }
    return copy.deepcopy(net, memo)


def kfe_reparameterise(
    net: nn.Module,
    data: Data,
    fisher: str = "true",
    batch_size: int = 128,
    num_batches: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """A copy of ``net`` with every prunable layer but the last replaced by its
    :class:`KFEBottleneck`: the same function, with weights in the eigenbasis of the
    layer's K-FAC factors (:func:`kron_factors`, same arguments).

    Raises:
        ValueError: the net has no prunable layer before its classifier, or one the
            factors do not support (see :func:`kron_factors`).
    """
    factors = kron_factors(net, data, unit_layers(net), fisher, batch_size, num_batches, seed)
    if not factors:
        raise ValueError(
            f"Expected a network with a Linear or Conv2d layer before its classifier, got "
            f"{type(net).__name__} with none. EigenDamage rotates the hidden layers only."
        )
    rotated = _copy(net)
    for name, (a, s) in factors.items():
        parent, _, child = name.rpartition(".")
        bottleneck = _kfe_bottleneck(net.get_submodule(name), a, s)
        setattr(rotated.get_submodule(parent), child, bottleneck)
    return rotated


class EigenDamage(PruningMethod):
    """EigenDamage's unit scores on a network rewritten by :func:`kfe_reparameterise`.

    In the KFE the K-FAC Fisher of a core W' is diagonal, so removing W'_ij raises the
    loss by ΔL_ij = ½ (W'_ij)² λ^S_i λ^A_j, and removing an eigen-direction removes a
    row or a column of W':

        row i (an output direction, a unit of ``core``):  Σ_j ΔL_ij,
        column j (an input direction, a unit of ``rotate_in``):  Σ_i ΔL_ij.

    The scores are unit scores of ``core`` (its rows) and of ``rotate_in`` (its rows,
    i.e. W''s columns), so the shared selector makes masks on the reparameterised net's
    units and compaction then removes them (:func:`eigendamage`). It is not registered:
    it scores only :class:`KFEBottleneck` layers, which a plain net does not have.

    References:
        Wang, Grosse, Fidler, Zhang. "EigenDamage: Structured pruning in the
        Kronecker-factored eigenbasis". ICML 2019, §4.
    """

    name = "eigendamage"
    family = "second_order"
    structure = "unit"

    def scores(self, net: nn.Module, data: Data | None) -> dict[str, Tensor]:
        scores = {}
        for name, module in net.named_modules():
            if not isinstance(module, KFEBottleneck):
                continue
            core_layer = module.get_submodule("core")
            core = _matrix(core_layer)
            outer = module.eigenvalues_s[:, None] * module.eigenvalues_a[None, :]
            damage = 0.5 * core.square() * outer
            ones = [1] * (trained_weight(core_layer).dim() - 1)
            scores[param_key(f"{name}.core")] = damage.sum(1).reshape(-1, *ones)
            scores[param_key(f"{name}.rotate_in")] = damage.sum(0).reshape(-1, *ones)
        if not scores:
            raise ValueError(
                f"Expected a network rewritten by kfe_reparameterise, got "
                f"{type(net).__name__} without KFEBottleneck layers. Call "
                "eigendamage(net, data, sparsity), which rewrites it first."
            )
        return scores


def eigendamage(
    net: nn.Module,
    data: Data,
    sparsity: float,
    scope: str = "global",
    fisher: str = "true",
    batch_size: int = 128,
    num_batches: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """EigenDamage: structured pruning in the Kronecker-factored eigenbasis, one shot.

    Every prunable layer but the classifier is rewritten in the KFE of its K-FAC Fisher
    (:func:`kfe_reparameterise`): W̃ = Q_S W' Q_Aᵀ, three plain layers. Rows and columns
    of each W' are scored by ΔL = ½ Σ (W'_ij)² λ^S_i λ^A_j over the row or column
    (:class:`EigenDamage`); the shared selector prunes the lowest in the mask currency,
    as units of the reparameterised net (rows of ``core`` and of ``rotate_in``), and
    :func:`~bayessparse.compaction.pruned.compact_pruned` cuts them: each layer becomes a
    bottleneck of three smaller layers, ``in → k_A → k_S → out``.

    ``sparsity`` is the fraction of the weights of the ``rotate_in`` and ``core`` layers
    to prune (the ``rotate_out`` columns of pruned rows go with them). A layer is
    rewritten whatever the sparsity, so at low sparsity the bottleneck has more weights
    than the layer it replaces (the paper keeps such layers as they were); the
    classifier is not rewritten (as the paper's code).

    Args:
        net: the trained network (not modified).
        data: ``(inputs, labels)`` for the K-FAC factors.
        sparsity: the fraction to prune, in [0, 1).
        scope: ``"global"`` (all layers ranked together, as the paper) or ``"layer"``.
        fisher, batch_size, num_batches, seed: as in :func:`kron_factors`.

    Returns:
        A smaller plain network computing the pruned function (an ``nn.Sequential`` for
        an ``nn.Sequential``); at sparsity 0 it computes ``net``'s function.

    References:
        Wang, Grosse, Fidler, Zhang. "EigenDamage: Structured pruning in the
        Kronecker-factored eigenbasis". ICML 2019.
    """
    rotated = kfe_reparameterise(net, data, fisher, batch_size, num_batches, seed)
    prune(rotated, EigenDamage(), sparsity, scope=scope)
    return compact_pruned(rotated)
