"""What training minimises: the ELBO of a Bayesian net (by SVI), or a plain loss.

Both objectives take one optimisation step on a mini-batch given the schedule's KL weight
and learning-rate factor, report the data and complexity terms of that step, and expose
their optimiser state for checkpoints: the training loop needs nothing else.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.util import zero_grads
from torch import Tensor, nn

from bayessparse.compression.distillation import distillation_loss
from bayessparse.convert import sparse_modules
from bayessparse.infer import JointOptim, SparseGuide, kl, project_
from bayessparse.training.distributed import DataParallel


class Objective(Protocol):
    """What the training loop needs of an objective (see the module docstring)."""

    net: nn.Module

    def step(self, x: Tensor, y: Tensor, kl_weight: float, lr_factor: float) -> float: ...

    # Set by the loop when several processes train (gradients are all-reduced).
    parallel: DataParallel | None

    @property
    def last_terms(self) -> tuple[float, float]: ...

    @property
    def optimizer(self) -> torch.optim.Optimizer | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


OBJECTIVES = ("auto", "svi", "supervised")


# Plain training's optimisers: Adam (the Bayesian recipes'), or SGD with momentum 0.9 and
# weight decay 5e-4, the recipe of the pruning papers (SNIP, sparse_learning's DST).
OPTIMIZERS = ("adam", "sgd")


def make_optimizer(name: str, params: Iterable[Tensor], lr: float) -> torch.optim.Optimizer:
    """The optimiser of plain training named ``name`` (one of :data:`OPTIMIZERS`).

    Raises:
        ValueError: an unknown name.
    """
    if name == "adam":
        return adam(params, lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    raise ValueError(f"Unknown optimizer {name!r}. Choose one of {OPTIMIZERS}.")


def adam(params: Iterable[Tensor], lr: float) -> torch.optim.Adam:
    """torch's Adam, fused into one kernel per step where this torch has that kernel for
    the parameters' device (CPU since torch 2.4, CUDA): the same update, several times
    faster than one Python-level update per tensor."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # an older torch, or no fused kernel for the device
        return torch.optim.Adam(params, lr=lr)


@dataclass(frozen=True)
class Teacher:
    """A trained network whose softened predictions a student learns from (Hinton,
    Vinyals, Dean 2015): the supervised data term becomes
    :func:`~bayessparse.compression.distillation_loss` at ``temperature`` and ``alpha``.

    Raises:
        ValueError: ``temperature`` not finite and positive, or ``alpha`` outside [0, 1].
    """

    net: nn.Module
    temperature: float
    alpha: float

    def __post_init__(self) -> None:
        if not 0 < self.temperature < math.inf or not 0 <= self.alpha <= 1:
            raise ValueError(
                f"Expected a finite temperature > 0 and alpha in [0, 1], got "
                f"{self.temperature!r} and {self.alpha!r}. Hinton et al. use T = 20 on MNIST."
            )


def make_objective(
    kind: str,
    net: nn.Module,
    num_data: int,
    lr: float,
    penalty: Callable[[nn.Module], Tensor | None] | None = None,
    teacher: Teacher | None = None,
    optimizer: str = "adam",
) -> Objective:
    """The objective named ``kind``: ``"svi"``, ``"supervised"``, or ``"auto"`` (SVI for a
    network with Bayesian sparse layers, supervised for any other); supervised with a
    ``teacher`` is :class:`DistillationObjective`. ``optimizer`` names plain training's
    optimiser (:data:`OPTIMIZERS`); SVI always uses Adam.

    Raises:
        ValueError: an unknown kind or optimizer, SVI for a network without sparse
            layers, or a penalty, teacher or optimiser other than Adam given to SVI.
    """
    if kind not in OBJECTIVES:
        raise ValueError(f"Unknown objective {kind!r}. Choose one of {OBJECTIVES}.")
    bayesian = any(True for _ in sparse_modules(net))
    if kind == "auto":
        kind = "svi" if bayesian else "supervised"
    if kind == "supervised" and teacher is not None:
        return DistillationObjective(net, num_data, lr, teacher, penalty, optimizer)
    if kind == "supervised":
        return SupervisedObjective(net, num_data, lr, penalty, optimizer)
    if not bayesian:
        raise ValueError(
            f"{type(net).__name__} has no sparse layers to train by SVI. Convert it first "
            "with bayessparse.to_sparse_(net), or train it with objective='supervised'."
        )
    if penalty is not None:
        raise ValueError("SVI takes no penalty: its complexity term is the layers' KL.")
    if teacher is not None:
        raise ValueError("SVI takes no teacher: train a plain student by objective='supervised'.")
    if optimizer != "adam":
        raise ValueError(f"SVI trains with Adam, got optimizer={optimizer!r}. Drop it.")
    return SVIObjective(net, num_data, lr)


class SparseClassifier:
    """The Pyro model of a sparse classifier: ``y ~ Categorical(logits=net(x))`` plus KL.

    The layers' analytic KL enters once per step, outside the data plate, through
    ``pyro.factor("kl", -kl(net))``; latent sites of the layers (horseshoe scales) are
    sampled inside ``net`` and matched by :meth:`guide`. Both are scaled by
    :attr:`kl_weight` (KL warm-up). The data plate has ``size=num_data`` so that the
    mini-batch log-likelihood is scaled up to the full data set. With ``Trace_ELBO`` the
    loss is the un-normalised negative ELBO ``N * mean CE + kl_weight * KL``.

    Args:
        net: a network with sparse layers (see :func:`~bayessparse.to_sparse_`).
        num_data: size of the full training set.
        kl_weight: initial weight of the KL term, in [0, 1].
    """

    def __init__(self, net: nn.Module, num_data: int, kl_weight: float = 1.0) -> None:
        if num_data < 1:
            raise ValueError(f"Expected num_data >= 1, got {num_data!r}.")
        self.net = net
        self.num_data = num_data
        self.kl_weight = kl_weight
        self.sparse_guide = SparseGuide(net)
        self.last_kl = self.last_data = math.nan

    def _complexity_scale(self) -> Any:
        # poutine.scale rejects a zero scale; a zero weight masks the terms out instead.
        if self.kl_weight > 0:
            return poutine.scale(scale=self.kl_weight)
        return poutine.mask(mask=False)

    def __call__(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        with self._complexity_scale():
            logits = self.net(x)
            complexity = kl(self.net)
            pyro.factor("kl", -complexity)
        self.last_kl = float(complexity.detach())
        if y is not None:
            ce = F.cross_entropy(logits.detach(), y, reduction="sum")
            self.last_data = float(ce) * self.num_data / x.shape[0]
        with pyro.plate("data", size=self.num_data, subsample=torch.arange(x.shape[0])):
            pyro.sample("y", dist.Categorical(logits=logits), obs=y)
        return logits

    def guide(self, x: Tensor, y: Tensor | None = None) -> None:
        """The posterior of the layers' latent sites, scaled like them (see the class)."""
        with self._complexity_scale():
            self.sparse_guide()


class SVIObjective:
    """The negative ELBO of a Bayesian sparse classifier, minimised by SVI with Adam.

    One :meth:`step` is one ``SVI.step`` of ``Trace_ELBO`` on :class:`SparseClassifier`
    (data term ``N * mean CE`` plus ``kl_weight * KL``), then the layers' ``project_``.

    Args:
        net: a network with sparse layers.
        num_data: size of the full training set.
        lr: Adam's learning rate before the schedule's factor.
    """

    def __init__(self, net: nn.Module, num_data: int, lr: float) -> None:
        self.net = net
        self.model = SparseClassifier(net, num_data)
        self.optim = JointOptim(adam, {"lr": lr})
        self._elbo: Trace_ELBO | None = None
        self.parallel: DataParallel | None = None

    def step(self, x: Tensor, y: Tensor, kl_weight: float, lr_factor: float) -> float:
        if self._elbo is None:  # first step: after a resumed optimiser state was set
            _release_stale_params(self.net)
            self._elbo = Trace_ELBO()
        self.model.kl_weight = kl_weight
        self.optim.lr_factor = lr_factor
        # SVI.step, spelled out so that several processes can all-reduce between the
        # gradients and the optimiser step.
        with warnings.catch_warnings(), poutine.trace(param_only=True) as capture:
            # Pyro's NaN warning is silenced: the loop stops the run with a clearer error.
            warnings.filterwarnings("ignore", "Encountered NaN", UserWarning)
            loss = float(self._elbo.loss_and_grads(self.model, self.model.guide, x, y))
        sites = capture.trace.nodes.values()
        params = {site["value"].unconstrained() for site in sites}  # type: ignore[union-attr]
        if self.parallel is not None:
            store = pyro.get_param_store()
            # The same order on every rank.
            ordered = sorted(params, key=lambda p: store.param_name(p) or "")
            terms = (loss, self.model.last_data, self.model.last_kl)
            loss, self.model.last_data, self.model.last_kl = self.parallel.reduce_(ordered, terms)
        self.optim(params)
        zero_grads(params)
        project_(self.net)
        return loss

    @property
    def last_terms(self) -> tuple[float, float]:
        """``(data term, KL)`` of the last step."""
        return self.model.last_data, self.model.last_kl

    @property
    def optimizer(self) -> None:
        """No torch optimiser: Pyro's optimiser wraps one per parameter."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return self.optim.get_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optim.set_state(state)


class SupervisedObjective:
    """``N * mean cross-entropy + kl_weight * penalty(net)``, minimised by Adam or SGD.

    The objective of plain networks (dense baselines, classical pruning methods), on the
    same scale as the ELBO so that the two are logged alike.

    Args:
        net: any classifier returning logits.
        num_data: size of the full training set (scales the mean cross-entropy).
        lr: the learning rate before the schedule's factor.
        penalty: optional complexity term of the network (e.g. an L1 norm), weighted by
            the schedule's ``kl_weight``.
        optimizer: ``"adam"`` or ``"sgd"`` (see :func:`make_optimizer`).
    """

    def __init__(
        self,
        net: nn.Module,
        num_data: int,
        lr: float,
        penalty: Callable[[nn.Module], Tensor | None] | None = None,
        optimizer: str = "adam",
    ) -> None:
        self.net, self.num_data, self.lr, self.penalty = net, num_data, lr, penalty
        self.optim = make_optimizer(optimizer, net.parameters(), lr)
        # SGD's learning rate and weight decay are for the mean loss per example, as in
        # the papers that use it; Adam's step does not depend on the loss's scale.
        self._grad_scale = 1.0 / num_data if optimizer == "sgd" else 1.0
        self._last = (math.nan, math.nan)
        self.parallel: DataParallel | None = None

    def data_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """The batch's mean loss: the cross-entropy."""
        return F.cross_entropy(self.net(x), y)

    def step(self, x: Tensor, y: Tensor, kl_weight: float, lr_factor: float) -> float:
        for group in self.optim.param_groups:
            group["lr"] = self.lr * lr_factor
        data = self.data_loss(x, y) * self.num_data
        complexity = self.penalty(self.net) if self.penalty is not None else None
        if complexity is None:
            complexity = data.new_zeros(())
        loss = data + kl_weight * complexity
        self.optim.zero_grad(set_to_none=True)
        (loss * self._grad_scale).backward()
        terms = [float(loss.detach()), float(data.detach()), float(complexity.detach())]
        if self.parallel is not None:
            terms = self.parallel.reduce_(list(self.net.parameters()), terms)
        self.optim.step()
        self._last = (terms[1], terms[2])
        return terms[0]

    @property
    def last_terms(self) -> tuple[float, float]:
        """``(data term, penalty)`` of the last step."""
        return self._last

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The torch optimiser (for a method's ``after_step`` hook)."""
        return self.optim

    def state_dict(self) -> dict[str, Any]:
        return self.optim.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optim.load_state_dict(state)


class DistillationObjective(SupervisedObjective):
    """:class:`SupervisedObjective` with the data term ``N *``
    :func:`~bayessparse.compression.distillation_loss` of the student's and the
    teacher's logits (Hinton, Vinyals, Dean 2015). The teacher is not trained: it
    predicts in eval mode (no dropout) and without gradients.
    """

    def __init__(
        self,
        net: nn.Module,
        num_data: int,
        lr: float,
        teacher: Teacher,
        penalty: Callable[[nn.Module], Tensor | None] | None = None,
        optimizer: str = "adam",
    ) -> None:
        super().__init__(net, num_data, lr, penalty, optimizer)
        self.teacher = teacher

    def data_loss(self, x: Tensor, y: Tensor) -> Tensor:
        self.teacher.net.eval()
        with torch.no_grad():
            teacher_logits = self.teacher.net(x)
        return distillation_loss(
            self.net(x),
            teacher_logits,
            y,
            temperature=self.teacher.temperature,
            alpha=self.teacher.alpha,
        )


def _release_stale_params(net: nn.Module) -> None:
    """Drop param-store entries that share a name with ``net``'s parameters but are others.

    PyroModule registers parameters in Pyro's global param store by name; a stale entry
    from an earlier network (same names, other tensors) would otherwise be trained instead.
    """
    store = pyro.get_param_store()
    stored = dict(store.named_parameters())
    for name, param in net.named_parameters():
        if name in stored and stored[name] is not param:
            del store[name]
