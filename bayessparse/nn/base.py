"""The contract every Bayesian sparse layer satisfies, and the helpers it is built from."""

from __future__ import annotations

import math
import types
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import Tensor, nn
from torch.nn.utils import prune

# The torch layer types a sparse layer can stand in for, most specific first.
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TORCH_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, *CONV_TYPES)


def check_threshold(threshold: float) -> float:
    """Return ``threshold`` as a float after checking it is a probability.

    Raises:
        TypeError: if it is not a real number.
        ValueError: if it is NaN or outside [0, 1].
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(
            f"Expected threshold to be a float in [0, 1], got {threshold!r} of type "
            f"{type(threshold).__name__}. Pass a keep-probability such as 0.05, or None for "
            "the layer's default."
        )
    threshold = float(threshold)
    if math.isnan(threshold) or not 0.0 <= threshold <= 1.0:
        raise ValueError(
            f"Expected threshold in [0, 1], got {threshold!r}. Thresholds are on keep_prob(), "
            "not on log_alpha: keep weights with keep_prob() > threshold, e.g. "
            "threshold=torch.sigmoid(torch.tensor(-3.0)).item() for log alpha < 3."
        )
    return threshold


def torch_layer_type(module: nn.Module | type) -> type[nn.Module]:
    """The plain torch layer class that ``module`` (an instance or a class) is or subclasses."""
    cls = module if isinstance(module, type) else type(module)
    for layer_type in TORCH_LAYER_TYPES:
        if issubclass(cls, layer_type):
            return layer_type
    raise TypeError(
        f"Expected one of {[t.__name__ for t in TORCH_LAYER_TYPES]}, got {cls.__name__}."
    )


def torch_layer_kwargs(module: nn.Module) -> dict[str, Any]:
    """Constructor arguments that rebuild ``module``'s torch layer type with the same shape."""
    if isinstance(module, nn.Linear):
        return {
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
        }
    if isinstance(module, nn.modules.conv._ConvNd):
        return {
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "kernel_size": module.kernel_size,
            "stride": module.stride,
            "padding": module.padding,
            "dilation": module.dilation,
            "groups": module.groups,
            "bias": module.bias is not None,
            "padding_mode": module.padding_mode,
        }
    raise TypeError(f"Expected nn.Linear or nn.ConvNd, got {type(module).__name__}.")


def _torch_pruned(module: nn.Module, name: str) -> tuple[Any, Tensor | None]:
    """A parameter's value, and its :mod:`torch.nn.utils.prune` mask if it is pruned.

    A pruned parameter lives in ``{name}_orig`` and ``{name}_mask``; the ``name``
    attribute is only refreshed by the next forward pass, so after an optimizer step it
    is stale and the value is recomputed here.
    """
    orig = module._parameters.get(f"{name}_orig")
    mask = module._buffers.get(f"{name}_mask")
    if orig is None or mask is None:
        return getattr(module, name), None
    return orig.detach() * mask, mask


# A layer's predictive masks: (weight mask, bias mask or None), boolean, prune_'s included.
PredictiveMasks = tuple[Tensor, Tensor | None]


@contextmanager
def predictive_masks(masks: Mapping[SparseModule, PredictiveMasks]) -> Iterator[None]:
    """Put layers in predictive mode with the given masks, until the block exits.

    In predictive mode a layer's masks are its whole mask rule: :meth:`SparseModule.mask`
    and :meth:`SparseModule.bias_mask` (with ``threshold=None``) return them, and the one
    operation every family computes through applies them, so the pruned weights and biases
    are exactly zero in evaluation passes (the masked posterior mean) and in training
    passes (samples of the masked posterior: their means and variances alike). A training
    pass also samples the posterior itself rather than its training surrogate (no sqrt
    jitter; spike-and-slab gates are Bernoulli, not relaxed). :func:`bayessparse.predict`
    runs its passes in here; nesting restores the outer masks on exit.

    Args:
        masks: layer -> (boolean weight mask of ``weight``'s shape, boolean bias mask or
            ``None``); they must include the layer's :meth:`~SparseModule.prune_` masks.
    """
    previous = {layer: layer.__dict__.get("_predictive_masks") for layer in masks}
    try:
        for layer, pair in masks.items():
            # Plain instance state, not a buffer: it is never saved with the layer.
            layer.__dict__["_predictive_masks"] = pair
        yield
    finally:
        for layer, old in previous.items():
            if old is None:
                layer.__dict__.pop("_predictive_masks", None)
            else:
                layer.__dict__["_predictive_masks"] = old


class SparseModule(PyroModule):
    """Mixin contract of a Bayesian sparse layer (a :class:`~pyro.nn.PyroModule`).

    A sparse layer subclasses its torch layer first and this mixin second, e.g.
    ``class VariationalLinear(nn.Linear, SparseModule)``, so it *is* an ``nn.Linear``
    whose ``weight`` holds the deterministic (posterior-mean) weight.

    Every family exposes the same mask currency: :meth:`keep_prob` in [0, 1] (1/(1+α) for
    Gaussian posteriors, P(z ≠ 0) for hard-concrete gates), and :meth:`mask` thresholds it.
    Never threshold :attr:`log_alpha` directly: its sign convention differs by family.

    Subclasses implement :attr:`log_alpha`, :meth:`keep_prob`, :meth:`kl` and
    :meth:`dense_weight`, set :attr:`default_threshold` to their paper's rule and declare
    :attr:`per_weight_params`. This is not an ``abc.ABC`` because PyroModule's metaclass
    conflicts with ABCMeta.

    Layers can share a weight (tied weights): :meth:`share_weight_posterior_` makes a layer
    use another's ``weight`` and per-weight posterior parameters, the same Parameter
    objects, and :func:`~bayessparse.to_sparse_` does it for layers whose dense weights
    were shared. Per-unit parameters (gates, group scales) stay per layer.

    Weights and biases can be pruned for good (:meth:`prune_`; :meth:`from_dense` carries
    the masks of :mod:`torch.nn.utils.prune`): every family computes through one
    operation, which applies these masks, so they are exactly zero in training and
    evaluation whatever the posterior says. Being constants, they drop out of :meth:`kl`.

    Invariant (tested for every class): ``m.eval()(x) == m.to_dense()(x)``.
    """

    default_threshold: float  # class default; an instance may override it
    # Set only inside predictive_masks(): then these are the layer's whole mask rule.
    _predictive_masks: PredictiveMasks | None = None
    # The posterior parameters with one value per weight (the shape of ``weight``), which
    # with ``weight`` make up the weight's posterior: layers that share a weight share
    # these too. Each family declares its own; an instance may override it when an option
    # makes a parameter per-weight (L0's gate="weight").
    per_weight_params: tuple[str, ...]

    @property
    def log_alpha(self) -> Tensor:
        """The family's native log-parameter (see the class docstring for its sign)."""
        raise NotImplementedError

    def keep_prob(self) -> Tensor:
        """Posterior probability-like score in [0, 1] that a weight is kept."""
        raise NotImplementedError

    def kl(self) -> Tensor:
        """Scalar, differentiable complexity cost of this layer's posterior.

        Weights pruned by :meth:`prune_` are constants: they add nothing, or a constant.
        """
        raise NotImplementedError

    def dense_weight(self) -> Tensor:
        """The deterministic weight before masking, same shape as ``weight``."""
        raise NotImplementedError

    def dense_bias(self) -> Tensor | None:
        """The deterministic bias before masking (``bias`` unless the family gates it)."""
        return self.bias

    def reset_parameters(self) -> None:
        """Redraw every parameter as at construction: the torch layer's, then the posterior's.

        Concrete classes bind it explicitly (``reset_parameters =
        SparseModule.reset_parameters``): their torch base class comes first in the MRO.
        """
        torch_layer_type(self).reset_parameters(self)  # type: ignore[attr-defined]
        # torch's __init__ calls this before the family has built its posterior parameters.
        if self.__dict__.get("_posterior_built"):
            self._reset_posterior()

    def _construct(self, *args: Any, **options: Any) -> None:
        """Build the torch layer from its constructor's ``args`` (and ``device``,
        ``dtype``) and the family's posterior from its keyword ``options``."""
        raise NotImplementedError

    def _finish_construction(self) -> None:
        """Mark the posterior parameters as built and initialise them."""
        self._posterior_built = True
        self._reset_posterior()

    def _reset_posterior(self) -> None:
        """Initialise the family's posterior parameters (called by reset_parameters)."""
        raise NotImplementedError

    def guide(self) -> None:
        """Sample this layer's latent sites from its posterior; a no-op for families whose
        whole posterior lives in the layer's parameters (sparse VD, L0, BC-GNJ).

        Families with Pyro latent sites (the horseshoe scales) override it; run it through
        :class:`~bayessparse.SparseGuide`.
        """

    def project_(self) -> None:
        """Project parameters back onto their allowed range after an optimiser step.

        A no-op unless the family's recipe constrains a parameter (L0 clamps its gate
        locations); :func:`bayessparse.infer.project_` calls it on every layer of a network.
        """

    def share_weight_posterior_(self, other: SparseModule) -> None:
        """Use ``other``'s weight posterior: its ``weight`` and :attr:`per_weight_params`.

        The parameters become the same objects in both layers (tied weights), so that a
        step trains them once for both; this layer's own ones are dropped. Each layer's
        :meth:`kl` still includes the shared weight's terms, so a sum over layers (such
        as :func:`bayessparse.kl`) counts them once per layer.

        Raises:
            ValueError: if ``other`` is of another class, declares other per-weight
                parameters, or has a weight of another shape.
        """
        if (
            type(other) is not type(self)
            or other.per_weight_params != self.per_weight_params
            or other.weight.shape != self.weight.shape
        ):
            raise ValueError(
                f"Expected a {type(self).__name__} with per-weight parameters "
                f"{self.per_weight_params} and weight shape {tuple(self.weight.shape)} to "
                f"share the weight posterior of, got a {type(other).__name__} with "
                f"{other.per_weight_params} and {tuple(other.weight.shape)}. Layers that "
                "share a weight need the same family and options."
            )
        for name in ("weight", *self.per_weight_params):
            self._parameters[name] = other._parameters[name]

    def bias_mask(self, threshold: float | None = None) -> Tensor | None:
        """Boolean bias mask where biases can be pruned, else ``None``.

        Families that prune whole output units mask their biases; so does :meth:`prune_`.
        """
        if threshold is not None:
            check_threshold(threshold)
        elif self._predictive_masks is not None:
            return self._predictive_masks[1]
        kept, fixed = self._bias_kept(threshold), self._prune_mask("bias")
        if kept is None or fixed is None:
            return fixed if kept is None else kept
        return kept & fixed

    def _bias_kept(self, threshold: float | None) -> Tensor | None:
        """The family's bias mask (families that prune whole output units), else ``None``."""
        return None

    def prune_(self, weight_mask: Tensor | None = None, bias_mask: Tensor | None = None) -> None:
        """Fix the weights and biases where a mask is false (zero) at exactly zero, for good.

        The masks are kept as buffers (``weight_prune_mask``, ``bias_prune_mask``), so they
        are saved in the state dict; :meth:`mask`, :meth:`bias_mask` and :meth:`to_dense`
        include them. Calls accumulate: a weight once pruned stays pruned.

        Args:
            weight_mask: boolean or 0/1 tensor of the shape of ``weight``; false prunes.
            bias_mask: the same for ``bias``.

        Raises:
            ValueError: for a mask of the wrong shape, or a bias mask without a bias.
        """
        for name, mask in (("weight", weight_mask), ("bias", bias_mask)):
            if mask is None:
                continue
            param = getattr(self, name)
            if param is None:
                raise ValueError(
                    f"Expected bias_mask=None for a {type(self).__name__} without a bias, "
                    f"got a mask of shape {tuple(mask.shape)}. Drop the bias mask."
                )
            if mask.shape != param.shape:
                raise ValueError(
                    f"Expected a {name} mask of shape {tuple(param.shape)}, got "
                    f"{tuple(mask.shape)}. Pass one entry per {name} entry."
                )
            keep = mask.detach().to(device=param.device, dtype=torch.bool)
            old = self._prune_mask(name)
            self.register_buffer(f"{name}_prune_mask", keep if old is None else keep & old)

    def _prune_mask(self, name: str) -> Tensor | None:
        """The :meth:`prune_` mask of ``"weight"`` or ``"bias"``, or ``None`` if unpruned."""
        return self._buffers.get(f"{name}_prune_mask")

    @property
    def _predicting(self) -> bool:
        """Whether the layer is in predictive mode (see :func:`predictive_masks`)."""
        return self._predictive_masks is not None

    # Shared by all families: the torch layer's operation and input check.
    def _op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        # Every family's training and evaluation paths (means and variances alike) compute
        # through here, so masking here keeps what prune_ pruned, and what predictive
        # masks prune, exactly zero. Predictive masks include prune_'s.
        weight_mask, bias_mask = self._predictive_masks or (
            self._prune_mask("weight"),
            self._prune_mask("bias"),
        )
        if weight_mask is not None:
            weight = weight * weight_mask
        if bias is not None and bias_mask is not None:
            bias = bias * bias_mask
        if isinstance(self, nn.Linear):
            return F.linear(x, weight, bias)
        # nn.ConvNd._conv_forward handles padding_mode, stride, dilation and groups.
        return self._conv_forward(x, weight, bias)

    def _gaussian_sample(self, mean: Tensor, var: Tensor) -> Tensor:
        """A local-reparameterisation draw ``mean + sqrt(var) * ε``, ε ~ N(0, 1) per entry."""
        # In training, 1e-8 keeps sqrt differentiable where every input to a unit is zero.
        # Prediction needs no gradient, and without it a fully pruned unit is exactly zero.
        jitter = 0.0 if self._predicting else 1e-8
        return mean + (var + jitter).sqrt() * torch.randn_like(mean)

    def _check_input(self, x: Tensor) -> None:
        if isinstance(self, nn.Linear):
            if x.dim() == 0 or x.shape[-1] != self.in_features:
                raise ValueError(
                    f"{type(self).__name__} expected input of shape (*, {self.in_features}), "
                    f"got {tuple(x.shape)}. Flatten or reshape the input so its last "
                    "dimension is in_features."
                )
            return
        n, channels = self.weight.dim() - 2, self.in_channels
        if x.dim() not in (n + 1, n + 2) or x.shape[-n - 1] != channels:
            spatial = ", ".join("*" * n)
            raise ValueError(
                f"{type(self).__name__} expected input of shape (N, {channels}, {spatial}) "
                f"or ({channels}, {spatial}), got {tuple(x.shape)}. Check the channel "
                "dimension and the number of spatial dimensions."
            )

    @classmethod
    def from_dense(cls, module: nn.Module, **kwargs: Any) -> SparseModule:
        """A new sparse layer whose deterministic weight and bias are copied from ``module``.

        A weight or bias pruned with :mod:`torch.nn.utils.prune` (``weight_orig`` and
        ``weight_mask``) stays pruned: its mask goes to :meth:`prune_`.

        Args:
            module: a trained torch layer of the type this class replaces.
            **kwargs: layer options (e.g. ``log_sigma2_init``).

        Raises:
            TypeError: if ``module`` is not of this class's torch layer type.
        """
        base = torch_layer_type(cls)
        if not isinstance(module, base):
            raise TypeError(
                f"{cls.__name__}.from_dense expects an {base.__name__}, got "
                f"{type(module).__name__}."
            )
        weight, weight_mask = _torch_pruned(module, "weight")
        bias, bias_mask = _torch_pruned(module, "bias")
        layer_cls: Any = cls  # concrete subclasses take the torch layer's arguments
        layer = layer_cls(
            **torch_layer_kwargs(module), device=weight.device, dtype=weight.dtype, **kwargs
        )
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                assert layer.bias is not None
                layer.bias.copy_(bias)
        layer.prune_(weight_mask, bias_mask)
        return layer

    def mask(self, threshold: float | None = None) -> Tensor:
        """Boolean mask, same shape as ``weight``: ``keep_prob() > threshold``.

        Args:
            threshold: keep-probability cut in [0, 1]; ``None`` uses
                :attr:`default_threshold`, the rule of the family's paper.

        Raises:
            ValueError: if ``threshold`` is NaN or outside [0, 1].
        """
        if threshold is None and self._predictive_masks is not None:
            return self._predictive_masks[0]
        kept = self._kept(threshold).expand_as(self.weight)
        fixed = self._prune_mask("weight")
        return kept if fixed is None else kept & fixed

    def _kept(self, threshold: float | None = None) -> Tensor:
        """``keep_prob() > threshold`` in keep_prob's own (gate) shape, without gradient.

        In predictive mode the default rule keeps everything: the predictive masks, which
        :meth:`_op` applies, are the whole rule, and they need not follow the gate shape.
        """
        cut = self.default_threshold if threshold is None else check_threshold(threshold)
        with torch.no_grad():
            keep_prob = self.keep_prob()
            if threshold is None and self._predicting:
                return torch.ones_like(keep_prob, dtype=torch.bool)
            return keep_prob > cut

    def to_dense(self, threshold: float | None = None) -> nn.Module:
        """A plain torch layer with this layer's masked deterministic weight.

        The mask is attached in :mod:`torch.nn.utils.prune` format (``weight_orig`` and
        ``weight_mask``, and ``bias_orig``/``bias_mask`` for families that prune whole
        output units); ``torch.nn.utils.prune.remove`` bakes it into plain zeros.
        """
        mask = self.mask(threshold)
        weight = self.weight
        layer_type = torch_layer_type(self)
        dense: Any = layer_type(
            **torch_layer_kwargs(self), device=weight.device, dtype=weight.dtype
        )
        bias, bias_mask = self.dense_bias(), self.bias_mask(threshold)
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if bias is not None:
                dense.bias.copy_(bias)
        prune.custom_from_mask(dense, "weight", mask)
        if bias_mask is not None:
            prune.custom_from_mask(dense, "bias", bias_mask)
        return dense.train(self.training)


def convolutions(
    family: type[SparseModule], linear: type[SparseModule], prior: str, **defaults: Any
) -> tuple[type[SparseModule], ...]:
    """A family's ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d`` layers, made alike.

    Each subclasses its torch convolution first and ``family`` second, takes the torch
    constructor plus ``linear``'s keyword-only options (``defaults`` replacing their
    defaults, e.g. ``group="output"``: one group per output channel), and is named after
    ``linear`` in its module (``L0Linear`` -> ``L0Conv1d``...), so it pickles by name.

    Args:
        family: the family's mixin (a :class:`SparseModule` with ``_construct``).
        linear: the family's ``nn.Linear`` layer, whose docstring lists the options.
        prior: what the layer adds to the convolution, for the docstring.
        defaults: keyword options whose default differs from ``linear``'s.
    """
    prefix = linear.__name__.removesuffix("Linear")
    changed = ", ".join(f"``{key}={value!r}``" for key, value in defaults.items())
    return tuple(
        _convolution(family, torch_type, f"{prefix}{torch_type.__name__}", defaults, doc)
        for torch_type in CONV_TYPES
        for doc in [
            f"``nn.{torch_type.__name__}`` with {prior}; options as :class:`{linear.__name__}`"
            + (f", with {changed} by default." if changed else ".")
        ]
    )


def _convolution(
    family: type[SparseModule],
    torch_type: type[nn.Module],
    name: str,
    defaults: dict[str, Any],
    doc: str,
) -> type[SparseModule]:
    def __init__(self: Any, *args: Any, **options: Any) -> None:
        family._construct(self, *args, **{**defaults, **options})

    namespace = {
        "__init__": __init__,
        "__doc__": doc,
        "__module__": family.__module__,
        "__qualname__": name,
        # The torch type comes first in the MRO: the family's methods must win.
        "reset_parameters": SparseModule.reset_parameters,
        "forward": family.forward,
    }
    return types.new_class(name, (torch_type, family), exec_body=lambda ns: ns.update(namespace))
