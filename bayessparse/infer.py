"""SVI building blocks (the complexity cost of a network, guides, KL schedules) and Monte
Carlo prediction from the masked posterior."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.optim import PyroOptim
from torch import Tensor, nn

from bayessparse.convert import sparse_modules
from bayessparse.nn.base import PredictiveMasks, SparseModule, predictive_masks


def kl(net: nn.Module) -> Tensor:
    """Sum of :meth:`~bayessparse.nn.SparseModule.kl` over every sparse layer of ``net``.

    Add it to a Pyro model once, outside the data plate: ``pyro.factor("kl", -kl(net))``.

    Raises:
        ValueError: if ``net`` has no sparse layer (call :func:`~bayessparse.to_sparse_`).
    """
    terms = [module.kl() for _, module in sparse_modules(net)]
    if not terms:
        raise ValueError(
            f"{type(net).__name__} has no sparse layers, so it has no KL term. Convert it "
            "first with bayessparse.to_sparse_(net)."
        )
    return torch.stack(terms).sum() if len(terms) > 1 else terms[0]


def project_(net: nn.Module) -> nn.Module:
    """Call :meth:`~bayessparse.nn.SparseModule.project_` on every sparse layer of ``net``.

    Run it after each optimiser step (:func:`~bayessparse.training.train` does), e.g.
    ``svi.step(x, y); bs.project_(net)``. Returns ``net``.
    """
    for _, module in sparse_modules(net):
        module.project_()
    return net


class SparseGuide:
    """The guide of a network's sparse layers: runs every layer's
    :meth:`~bayessparse.nn.SparseModule.guide`.

    Layers that hold their whole posterior in their parameters (sparse VD, L0, BC-GNJ) add
    nothing, so for a network of those it is an :class:`EmptyGuide`; horseshoe layers sample
    their global and local scales here, from log-normal posteriors they own. Pass it as the
    ``guide`` of :class:`pyro.infer.SVI`; wrap the call in ``poutine.scale`` together with
    the model's scale sites for a KL warm-up (as :class:`~bayessparse.training.
    SparseClassifier` does).
    """

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        for _, module in sparse_modules(self.net):
            module.guide()

    def __repr__(self) -> str:
        return f"SparseGuide({type(self.net).__name__})"


class EmptyGuide:
    """A guide with no latent sites, for models whose posterior lives in the layers.

    Sparse layers hold their variational parameters themselves and add their KL with
    ``pyro.factor``, so the ELBO needs no guide samples. Pass an instance as the ``guide``
    of :class:`pyro.infer.SVI`.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __repr__(self) -> str:
        return "EmptyGuide()"


class JointOptim(PyroOptim):
    """A :class:`pyro.optim.PyroOptim` that steps one torch optimizer over all parameters.

    Pyro's stock wrappers (``pyro.optim.Adam`` ...) keep one optimizer per parameter tensor,
    which costs a Python-level step per tensor. A network's parameter set is fixed, so one
    optimizer serves it all, exactly as in plain PyTorch: same maths, one call. Parameters
    first seen after the first step join as a new parameter group.

    The learning rate of every group is ``lr * lr_factor``; set :attr:`lr_factor` to follow
    a schedule. :meth:`get_state` and :meth:`set_state` key the state by Pyro parameter
    names, so a checkpoint restores into a freshly built network.

    Args:
        optim_constructor: a :class:`torch.optim.Optimizer` class, e.g. ``torch.optim.Adam``,
            or any callable ``(params, **optim_args)`` that returns an optimizer.
        optim_args: its keyword arguments, e.g. ``{"lr": 1e-3}``.

    Example:
        >>> svi = pyro.infer.SVI(model, EmptyGuide(), JointOptim(torch.optim.Adam, {"lr": 1e-3}),
        ...                      pyro.infer.Trace_ELBO())  # doctest: +SKIP
    """

    def __init__(
        self, optim_constructor: Callable[..., torch.optim.Optimizer], optim_args: dict
    ) -> None:
        if not isinstance(optim_args, dict):
            raise TypeError(
                f"Expected optim_args to be a dict such as {{'lr': 1e-3}}, got "
                f"{type(optim_args).__name__}."
            )
        super().__init__(optim_constructor, optim_args)
        self._constructor = optim_constructor
        self._kwargs = optim_args
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr_factor = 1.0
        self._group_names: list[list[str]] = []
        self._known: set[Tensor] = set()
        self._pending: dict[str, Any] | None = None

    def __call__(self, params: Iterable[Tensor], *args: Any, **kwargs: Any) -> None:
        new = [p for p in params if p not in self._known]
        if new:
            self._add_params(new)
        assert self.optimizer is not None
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * self.lr_factor
        self.optimizer.step(*args, **kwargs)
        # Free the gradients as torch's zero_grad() does; SVI's own zero_grads() then has
        # nothing left to overwrite with fresh zero tensors.
        self.optimizer.zero_grad(set_to_none=True)

    def _add_params(self, new: list[Tensor]) -> None:
        store = pyro.get_param_store()
        by_name = {store.param_name(p): p for p in new}
        if self._pending is not None:
            # Rebuild the saved groups in their saved order, then load the saved state.
            saved = self._pending
            self._pending = None
            for names in saved["group_names"]:
                missing = [n for n in names if n not in by_name]
                if missing:
                    raise ValueError(
                        f"Cannot restore optimizer state: parameters {missing} of the saved "
                        "state are not in the model. Restore into the same network."
                    )
                self._add_group([by_name.pop(n) for n in names], names)
            assert self.optimizer is not None
            self.optimizer.load_state_dict(saved["optimizer"])
        if by_name:
            names = sorted(by_name)
            self._add_group([by_name[n] for n in names], names)

    def _add_group(self, params: list[Tensor], names: list[str]) -> None:
        if self.optimizer is None:
            self.optimizer = self._constructor(params, **self._kwargs)
        else:
            self.optimizer.add_param_group({"params": params})
        self.optimizer.param_groups[-1].setdefault("base_lr", self.optimizer.defaults["lr"])
        self._group_names.append(names)
        self._known.update(params)

    def get_state(self) -> dict:
        """Optimizer state with its parameters named as in Pyro's param store."""
        if self.optimizer is None:
            return {} if self._pending is None else dict(self._pending)
        return {"group_names": self._group_names, "optimizer": self.optimizer.state_dict()}

    def set_state(self, state_dict: dict) -> None:
        """Restore a :meth:`get_state` result; it takes effect at the next step."""
        if state_dict:
            self._pending = state_dict


def linear_warmup(epoch: float, start: float, end: float) -> float:
    """KL weight that is 0 until ``start``, rises linearly, and is 1 from ``end`` on.

    The official sparse-VD recipe is ``linear_warmup(epoch, 5, 20)``.
    """
    if end <= start:
        return 1.0 if epoch >= start else 0.0
    return min(max((epoch - start) / (end - start), 0.0), 1.0)


def linear_decay(epoch: float, total: float, start: float = 0.0) -> float:
    """Learning-rate factor that is 1 until ``start`` and falls linearly to 0 at ``total``."""
    if epoch <= start:
        return 1.0
    return max(0.0, (total - epoch) / (total - start))


def cosine_decay(epoch: float, total: float) -> float:
    """Learning-rate factor following half a cosine from 1 at 0 to 0 at ``total``."""
    return 0.5 * (1.0 + math.cos(math.pi * min(epoch / total, 1.0)))


@dataclass(frozen=True)
class Prediction:
    """The posterior predictive of a classifier on N examples (see :func:`predict`).

    Attributes:
        probs: the mean predictive E_q[softmax(net(x))], shape (N, C); with
            ``num_samples=0``, the softmax of the masked-mean network.
        entropy: entropy in nats of ``probs``, shape (N,): the total predictive uncertainty.
        mutual_information: BALD, H[E p] − E H[p] in nats, shape (N,): the part of the
            uncertainty due to the weights (epistemic). Zero for ``num_samples`` 0 or 1;
            clamped at zero against rounding.
        num_samples: the number S of posterior samples averaged.
        samples: the per-sample probabilities, shape (S, N, C), if asked for
            (``keep_samples=True``), else ``None``.
    """

    probs: Tensor
    entropy: Tensor
    mutual_information: Tensor
    num_samples: int
    samples: Tensor | None = None


def predict(
    net: nn.Module,
    x: Tensor,
    *,
    num_samples: int,
    masks: Mapping[str, Tensor] | None = None,
    batch_size: int = 1000,
    keep_samples: bool = False,
    seed: int | None = None,
) -> Prediction:
    """Monte Carlo posterior predictive of a classifier, from its masked posterior.

    Each of the ``num_samples`` passes draws the network from the *masked* posterior:
    the surviving weights are random, as in training (sparse VD's local reparameterisation,
    L0's hard-concrete gates, the group scales; the horseshoe's scales from the layers'
    guide, :class:`SparseGuide`, i.e. from the posterior, not the prior; spike-and-slab
    gates from their Bernoulli posterior), while pruned weights and biases are exactly zero
    in every sample, their mean and their variance alike. Other modules run in eval mode
    (no dropout; batch norm uses its running statistics). ``num_samples=0`` gives the
    deterministic masked-mean network: with the default masks it is ``net.eval()(x)``,
    exactly when ``x`` fits in one batch.

    The draws come from torch's global RNG (the one ``pyro.set_rng_seed`` seeds), so
    ``pyro.set_rng_seed(0)`` before the call makes it reproducible; or pass ``seed`` to
    draw from a forked RNG, which leaves the global one as it was. A pass draws once per
    layer what its training pass draws once (L0 gates, horseshoe scales), shared by the
    examples of a batch, which leaves each example's predictive unchanged. The network's
    train/eval modes are restored, and Pyro's param store is not cleared (the passes
    register the layers' parameters in it, as any forward pass does).

    Cost: ``num_samples * ceil(N / batch_size)`` forward passes, under ``torch.no_grad()``.

    Args:
        net: a classifier returning logits of shape (batch, classes), with sparse layers
            (:func:`~bayessparse.to_sparse_`) unless ``num_samples=0``.
        x: the inputs, examples along the first dimension.
        num_samples: the number S >= 0 of posterior samples; 0 for the masked-mean network.
        masks: boolean (or 0/1) masks keyed like ``net.state_dict()`` (``"0.weight"``,
            ``"0.bias"``), such as :func:`bayessparse.masks` returns; a layer's weight or
            bias that is left out keeps its default rule (``layer.mask()``,
            ``layer.bias_mask()``). Weights fixed by ``prune_`` stay pruned regardless.
        batch_size: examples per forward pass.
        keep_samples: also return the per-sample probabilities (S * N * C values).
        seed: if given, sample from a forked RNG seeded with it.

    Returns:
        A :class:`Prediction`.

    Raises:
        TypeError: for a ``net`` that is not an ``nn.Module``, an ``x`` that is not a
            tensor, a non-integer count or seed, or a mask that is not a tensor.
        ValueError: for a negative ``num_samples`` or non-positive ``batch_size``, sampling
            a network without sparse layers, an unknown mask key or a mask of the wrong
            shape or values, an input the network cannot take, or an output that is not
            logits of shape (batch, classes).

    Example:
        >>> pred = predict(net, x_test, num_samples=100, seed=0)  # doctest: +SKIP
        >>> pred.probs.argmax(1), pred.mutual_information  # doctest: +SKIP
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"Expected an nn.Module to predict with, got {type(net).__name__}.")
    _check_count("num_samples", num_samples, minimum=0)
    _check_count("batch_size", batch_size, minimum=1)
    if seed is not None:
        _check_count("seed", seed, minimum=None)
    _check_inputs(x)
    layers = dict.fromkeys(module for _, module in sparse_modules(net))
    if num_samples > 0 and not layers:
        raise ValueError(
            f"MC prediction from a net with no stochastic layers: {type(net).__name__} has "
            f"no sparse layers, so all {num_samples} samples would be the same. Pass "
            "num_samples=0 for its deterministic prediction, or convert it first with "
            "bayessparse.to_sparse_(net)."
        )
    chosen = _resolve_masks(net, masks)
    modes = [(module, module.training) for module in net.modules()]
    try:
        net.eval()
        if num_samples > 0:
            for layer in layers:
                layer.train()  # training passes sample the posterior
        with torch.no_grad(), predictive_masks(chosen), _seeded(seed, net, x):
            return _predict(net, x, num_samples, batch_size, keep_samples)
    finally:
        for module, training in modes:
            module.training = training


def _check_count(name: str, value: Any, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"Expected {name} to be an int, got {value!r} of type {type(value).__name__}. "
            f"Pass a whole number, e.g. {name}={max(minimum or 0, 1)}."
        )
    if minimum is not None and value < minimum:
        raise ValueError(f"Expected {name} >= {minimum}, got {value!r}.")


def _check_inputs(x: Any) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(
            f"Expected x to be a torch.Tensor of inputs, got {type(x).__name__}. Convert it "
            "with torch.as_tensor(x, dtype=torch.float32)."
        )
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(
            f"Expected x with at least one example along its first dimension, got shape "
            f"{tuple(x.shape)}. Add a batch dimension with x.unsqueeze(0)."
        )


def _resolve_masks(
    net: nn.Module, masks: Mapping[str, Tensor] | None
) -> dict[SparseModule, PredictiveMasks]:
    """Each sparse layer's weight and bias masks: the given ones, else the default rule."""
    # state_dict keys of every sparse weight and bias, under every name of a shared layer.
    slots: dict[str, tuple[SparseModule, str]] = {}
    for name, module in net.named_modules(remove_duplicate=False):
        if isinstance(module, SparseModule):
            for param in ("weight", "bias"):
                if getattr(module, param) is not None:
                    slots[f"{name}.{param}" if name else param] = (module, param)
    given: dict[tuple[SparseModule, str], tuple[str, Tensor]] = {}
    for key, value in (masks or {}).items():
        if key not in slots:
            known = sorted(slots)
            raise ValueError(
                f"Expected masks keyed by the weights and biases of {type(net).__name__}'s "
                f"sparse layers, got the unknown key {key!r}. Valid keys: {known[:8]}"
                f"{' ...' if len(known) > 8 else ''}; bayessparse.masks(net) builds them."
            )
        module, param = slots[key]
        mask = _check_mask(key, value, getattr(module, param))
        other = given.setdefault((module, param), (key, mask))
        if not torch.equal(other[1], mask):
            raise ValueError(
                f"Expected one mask per layer, got different masks for {other[0]!r} and "
                f"{key!r}, which name the same layer. Pass one of them."
            )
    chosen = {}
    for module in dict.fromkeys(module for module, _ in slots.values()):
        weight = given[module, "weight"][1] if (module, "weight") in given else None
        bias = given[module, "bias"][1] if (module, "bias") in given else None
        chosen[module] = (
            module.mask() if weight is None else _and(weight, module._prune_mask("weight")),
            module.bias_mask() if bias is None else _and(bias, module._prune_mask("bias")),
        )
    return chosen


def _check_mask(key: str, value: Any, param: Tensor) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(
            f"Expected the mask {key!r} to be a boolean tensor, got {type(value).__name__}."
        )
    if value.shape != param.shape:
        raise ValueError(
            f"Expected the mask {key!r} to have the shape {tuple(param.shape)} of the "
            f"parameter, got {tuple(value.shape)}."
        )
    if value.dtype != torch.bool and not ((value == 0) | (value == 1)).all():
        raise ValueError(
            f"Expected the mask {key!r} to be boolean or 0/1, got values other than 0 and "
            "1. Threshold it first, e.g. mask > 0.5."
        )
    return value.detach().to(device=param.device, dtype=torch.bool)


def _and(mask: Tensor, fixed: Tensor | None) -> Tensor:
    return mask if fixed is None else mask & fixed


@contextmanager
def _seeded(seed: int | None, net: nn.Module, x: Tensor) -> Iterator[None]:
    """Draw from a forked RNG seeded with ``seed``; the global RNG as it is if ``None``."""
    if seed is None:
        yield
        return
    tensors = [x, *net.parameters(), *net.buffers()]
    cuda = sorted({int(t.device.index or 0) for t in tensors if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def _predict(
    net: nn.Module, x: Tensor, num_samples: int, batch_size: int, keep_samples: bool
) -> Prediction:
    batches = [
        _predict_batch(net, x[start : start + batch_size], num_samples, keep_samples)
        for start in range(0, x.shape[0], batch_size)
    ]
    kept = [batch.samples for batch in batches if batch.samples is not None]
    return Prediction(
        probs=torch.cat([batch.probs for batch in batches]),
        entropy=torch.cat([batch.entropy for batch in batches]),
        mutual_information=torch.cat([batch.mutual_information for batch in batches]),
        num_samples=num_samples,
        samples=torch.cat(kept, dim=1) if keep_samples else None,
    )


def _predict_batch(net: nn.Module, xb: Tensor, num_samples: int, keep_samples: bool) -> Prediction:
    """The :class:`Prediction` of one batch."""
    if num_samples == 0:
        probs = _logits(net, xb).softmax(-1)
        entropy = _entropy(probs)
        samples = probs.new_empty((0, *probs.shape)) if keep_samples else None
        return Prediction(probs, entropy, torch.zeros_like(entropy), 0, samples)
    guide = SparseGuide(net)
    total = total_entropy = torch.zeros(())
    draws = []
    for _ in range(num_samples):
        # Latent sites (the horseshoe scales) take the guide's draws: from the posterior.
        guide_trace = poutine.trace(guide).get_trace()
        probs = _logits(net, xb, poutine.replay(net, trace=guide_trace)).softmax(-1)
        # Running sums: only keep_samples holds all S draws.
        total, total_entropy = total + probs, total_entropy + _entropy(probs)
        if keep_samples:
            draws.append(probs)
    mean = total / num_samples
    entropy = _entropy(mean)
    # Jensen makes BALD >= 0; the clamp only removes rounding below zero.
    information = (entropy - total_entropy / num_samples).clamp_min(0.0)
    samples = torch.stack(draws) if keep_samples else None
    return Prediction(mean, entropy, information, num_samples, samples)


def _entropy(probs: Tensor) -> Tensor:
    """Entropy in nats along the last dimension, with 0 log 0 = 0."""
    return -torch.special.xlogy(probs, probs).sum(-1)


def _logits(net: nn.Module, xb: Tensor, run: Any = None) -> Tensor:
    """``run(xb)`` (``net(xb)`` by default), checked to be logits of shape (batch, classes)."""
    name = type(net).__name__
    try:
        logits = (net if run is None else run)(xb)
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as error:
        raise ValueError(
            f"{name} could not take an input batch of shape {tuple(xb.shape)} and dtype "
            f"{xb.dtype}: {error} Check x against the network's first layer (shape, dtype, "
            "device)."
        ) from error
    if (
        not isinstance(logits, Tensor)
        or logits.dim() != 2
        or logits.shape[0] != xb.shape[0]
        or not logits.is_floating_point()
    ):
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"Expected {name} to return float logits of shape ({xb.shape[0]}, classes) for a "
            f"batch of {xb.shape[0]}, got {got}. predict takes classifiers; flatten or pool "
            "the output to (batch, classes)."
        )
    return logits
