"""SVI building blocks: the complexity cost of a network, an empty guide, KL schedules."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pyro
import torch
from pyro.optim import PyroOptim
from torch import Tensor, nn

from bayessparse.convert import sparse_modules


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
        optim_constructor: a :class:`torch.optim.Optimizer` class, e.g. ``torch.optim.Adam``.
        optim_args: its keyword arguments, e.g. ``{"lr": 1e-3}``.

    Example:
        >>> svi = pyro.infer.SVI(model, EmptyGuide(), JointOptim(torch.optim.Adam, {"lr": 1e-3}),
        ...                      pyro.infer.Trace_ELBO())  # doctest: +SKIP
    """

    def __init__(self, optim_constructor: type[torch.optim.Optimizer], optim_args: dict) -> None:
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
