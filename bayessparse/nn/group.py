"""Group sparsity by a multiplicative scale per neuron or channel (Bayesian Compression).

Louizos, Ullrich, Welling (2017), *Bayesian Compression for Deep Learning*, NeurIPS: every
weight of a group g (an input unit or an output channel) is :math:`w = z_g \\tilde w`, with
:math:`q(\\tilde w) = \\mathcal N(\\theta, \\sigma^2)` and prior :math:`\\mathcal N(0, 1)`, and a
sparsity-inducing prior on the group scale :math:`z_g`. A group whose scale is pruned
removes a whole neuron or channel, so :func:`bayessparse.compact` can cut it out.

- :class:`GroupNJLinear` ... (BC-GNJ): log-uniform (normal-Jeffreys) prior on
  :math:`z_g`, Gaussian posterior, Molchanov KL, :math:`z` drawn per example.
- :class:`HorseshoeLinear` ... (BC-GHS): :math:`z_g = \\tau\\lambda_g`, half-Cauchy global and
  local scales as Pyro latent sites (``global_scale``, ``local_scale``) with log-normal
  posteriors held by the layer and sampled by its :meth:`guide`; optionally the regularized
  horseshoe (Piironen and Vehtari 2017).
"""

from __future__ import annotations

import math
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import pyro_method
from torch import Tensor, nn

from bayessparse.distributions.kl import sparse_vd_kl
from bayessparse.nn.base import SparseModule, convolutions, torch_layer_type

GROUPS = ("input", "output")
SCALE_DRAWS = ("step", "example")
# keep_prob = 1 / (1 + alpha) > sigmoid(3)  <=>  log alpha < -3: the official BC tutorial's
# per-layer thresholds on log alpha are -2.8, -3 and -5.
GROUP_THRESHOLD = float(torch.sigmoid(torch.tensor(3.0, dtype=torch.float64)))


class _GroupScaled(SparseModule):
    r"""Weights :math:`w = z_g \tilde w` with one scale :math:`z_g` per group.

    Training uses the local reparameterization trick given :math:`z`: with input groups
    the input is scaled, :math:`\tilde x = x \odot z`, and the pre-activation
    :math:`\mathrm{op}(\tilde x, \theta) + \sqrt{\mathrm{op}(\tilde x^2, \sigma^2)}\,\varepsilon`
    is sampled; with output groups the sampled pre-activation (bias included) is scaled by
    :math:`z`, so a pruned channel outputs exactly 0. Evaluation is deterministic:
    weight :math:`\theta \cdot \hat z_g` with :math:`\hat z` the family's point estimate of
    the scale, masked by ``keep_prob() > threshold``.

    ``weight`` is :math:`\theta`, the mean of :math:`\tilde w`; :meth:`dense_weight` is
    :math:`\theta \hat z`. :meth:`kl` holds :math:`\mathrm{KL}(q(\tilde w) \| \mathcal N(0, 1))`
    plus the family's analytic scale KL, if any.
    """

    default_threshold: float = GROUP_THRESHOLD
    # The scales z_g are per unit, so layers that share a weight keep their own.
    per_weight_params: tuple[str, ...] = ("weight_log_sigma2",)
    weight_log_sigma2: nn.Parameter

    def _construct_groups(
        self, *args: Any, group: str, log_sigma2_init: float = -9.0, **kwargs: Any
    ) -> None:
        torch_layer_type(self).__init__(self, *args, **kwargs)
        if group not in GROUPS:
            raise ValueError(f"Expected group to be one of {GROUPS}, got {group!r}.")
        if group == "input" and getattr(self, "groups", 1) != 1:
            raise ValueError(
                f"group='input' needs groups=1, got groups={self.groups!r}: grouped "
                "convolutions share weight columns across input channels. Use group='output'."
            )
        self.group = group
        self.log_sigma2_init = float(log_sigma2_init)
        self.weight_log_sigma2 = nn.Parameter(torch.empty_like(self.weight))

    def _reset_posterior(self) -> None:
        with torch.no_grad():
            self.weight_log_sigma2.fill_(self.log_sigma2_init)
        self._reset_scales()

    @property
    def num_groups(self) -> int:
        """Input units (input channels) or output units (output channels)."""
        return self.weight.shape[self._group_dim()]

    def _group_dim(self) -> int:
        return 1 if self.group == "input" else 0

    def _as_weight(self, per_group: Tensor) -> Tensor:
        """Per-group values of shape (G,), reshaped to broadcast against ``weight``."""
        shape = [1] * self.weight.dim()
        shape[self._group_dim()] = -1
        return per_group.reshape(shape)

    def _as_activation(self, z: Tensor) -> Tensor:
        """Scales of shape (*batch, G) laid out along the channel axis of an activation."""
        spatial = self.weight.dim() - 2
        return z.reshape(z.shape + (1,) * spatial)

    def _batch_shape(self, x: Tensor) -> tuple[int, ...]:
        return tuple(x.shape[: -(self.weight.dim() - 1)])

    # Family hooks.
    def _reset_scales(self) -> None:
        raise NotImplementedError

    def _group_log_alpha(self) -> Tensor:
        """Noise-to-signal ratio Var(z) / E[z]² of each group scale, in log, shape (G,)."""
        raise NotImplementedError

    def _scale_estimate(self) -> Tensor:
        """The deterministic scale ẑ used at test time, shape (G,)."""
        raise NotImplementedError

    def _scale_sample(self, batch_shape: tuple[int, ...]) -> Tensor:
        """A training draw of z, shape (*batch_shape, G) or (G,)."""
        raise NotImplementedError

    def _scale_kl(self) -> Tensor:
        """Analytic KL of the scale posterior (zero when it lives in Pyro sample sites)."""
        return self.weight.new_zeros(())

    @property
    def log_alpha(self) -> Tensor:
        """Group noise-to-signal ratio log Var(z)/E[z]², broadcastable to ``weight``.
        Higher means prune."""
        return self._as_weight(self._group_log_alpha())

    def keep_prob(self) -> Tensor:
        """1 / (1 + α) of the group scale, broadcastable to ``weight``."""
        return torch.sigmoid(-self.log_alpha)

    def kl(self) -> Tensor:
        """KL(q(w̃) ‖ N(0, 1)) summed over weights, plus the analytic scale KL."""
        theta, log_sigma2 = self.weight, self.weight_log_sigma2
        weight_kl = 0.5 * (theta.square() + log_sigma2.exp() - log_sigma2 - 1.0)
        pruned = self._prune_mask("weight")
        if pruned is not None:
            weight_kl = weight_kl * pruned
        return weight_kl.sum() + self._scale_kl()

    def dense_weight(self) -> Tensor:
        """θ ẑ: the weight mean times the deterministic group scale."""
        return self.weight * self._as_weight(self._scale_estimate())

    def dense_bias(self) -> Tensor | None:
        bias = self.bias
        if bias is None or self.group != "output":
            return bias
        return bias * self._scale_estimate()

    def _bias_kept(self, threshold: float | None) -> Tensor | None:
        if self.bias is None or self.group != "output":
            return None
        return self._kept(threshold).reshape(-1)

    def forward(self, input: Tensor) -> Tensor:
        x = input
        self._check_input(x)
        theta, bias = self.weight, self.bias
        if not self.training:
            z = self._scale_estimate() * self._kept().reshape(-1).to(theta.dtype)
            if bias is not None and self.group == "output":
                bias = bias * z
            return self._op(x, theta * self._as_weight(z), bias)
        z = self._as_activation(self._scale_sample(self._batch_shape(x)))
        if self.group == "input":
            x = x * z
        mean = self._op(x, theta, bias)
        var = self._op(x * x, self.weight_log_sigma2.exp(), None)
        out = self._gaussian_sample(mean, var)
        return out * z if self.group == "output" else out


class _GroupNJ(_GroupScaled):
    r"""BC-GNJ: log-uniform prior on the group scale, :math:`q(z_g) = \mathcal N(\mu_g,
    \sigma_g^2)`, group :math:`\log\alpha_g = \log\sigma_g^2 - \log\mu_g^2`, Molchanov KL;
    one draw of :math:`z` per example, as the official code.

    Unlike sparse VD's, this log α is not clamped to [−8, 8] (nor is it in the official
    code): the scales start at log α = −9, where a clamp would cut the KL's gradient and no
    group would ever be pruned."""

    scale_loc: nn.Parameter
    scale_log_sigma2: nn.Parameter

    def _construct(
        self, *args: Any, group: str, scale_log_sigma2_init: float = -9.0, **kwargs: Any
    ) -> None:
        self._construct_groups(*args, group=group, **kwargs)
        self.scale_log_sigma2_init = float(scale_log_sigma2_init)
        g = self.weight.new_empty(self.num_groups)
        self.scale_loc = nn.Parameter(g.clone())
        self.scale_log_sigma2 = nn.Parameter(g.clone())
        self._finish_construction()

    def _reset_scales(self) -> None:
        # The official code draws mu ~ N(1, 0.01); starting at exactly 1 keeps a converted
        # layer's output equal to its dense original, and theta already breaks the symmetry.
        with torch.no_grad():
            self.scale_loc.fill_(1.0)
            self.scale_log_sigma2.fill_(self.scale_log_sigma2_init)

    def _group_log_alpha(self) -> Tensor:
        return self.scale_log_sigma2 - torch.log(self.scale_loc.square() + 1e-8)

    def _scale_estimate(self) -> Tensor:
        return self.scale_loc

    def _scale_sample(self, batch_shape: tuple[int, ...]) -> Tensor:
        loc = self.scale_loc
        noise = torch.randn(batch_shape + loc.shape, dtype=loc.dtype, device=loc.device)
        return loc + (0.5 * self.scale_log_sigma2).exp() * noise

    def _scale_kl(self) -> Tensor:
        return sparse_vd_kl(self._group_log_alpha()).sum()

    def weight_variance(self) -> Tensor:
        """Each weight's marginal posterior variance, of ``w = z w̃`` with independent
        ``z ~ N(μ_z, σ_z²)`` and ``w̃ ~ N(θ, σ²)``: ``μ_z² σ² + σ_z² θ² + σ_z² σ²`` (the
        Bayesian-compression code's, for :func:`~bayessparse.compression.bayesian_bits`);
        its mean is :meth:`dense_weight`."""
        loc = self._as_weight(self.scale_loc).square()
        scale_var = self._as_weight(self.scale_log_sigma2.exp())
        var = self.weight_log_sigma2.exp()
        return loc * var + scale_var * (self.weight.square() + var)


class _GroupHorseshoe(_GroupScaled):
    r"""BC-GHS: :math:`z_g = \tau \lambda_g`, :math:`\tau \sim C^+(0, \tau_0)`,
    :math:`\lambda_g \sim C^+(0, 1)`, non-centred (the weights :math:`\tilde w` have a unit
    normal prior).

    ``global_scale`` (τ) and ``local_scale`` (λ) are Pyro latent sample sites (named under
    the module's Pyro name, as :class:`~pyro.nn.PyroSample` names them) whose priors come
    from :meth:`global_prior` and :meth:`local_prior` (override them to change the prior);
    their log-normal posteriors are parameters of the layer (``global_loc``,
    ``global_log_sigma``, ``local_loc``, ``local_log_sigma``) and :meth:`guide` samples them.
    Train with a guide that runs every layer's :meth:`guide` (:class:`~bayessparse.
    SparseGuide`). With ``scale_draws="step"`` (default) the likelihood uses the sites'
    draw, one per step shared by the mini-batch; with ``"example"`` each example gets its
    own draw of τ and λ from the same log-normal posteriors (reparameterised), as BC-GNJ
    draws z per example: the expected log-likelihood is unchanged and its estimate less
    noisy, while the sites (still sampled) carry the scales' KL.

    With ``slab_scale`` set, the regularized horseshoe: :math:`\tilde\lambda_g^2 = c^2
    \lambda_g^2 / (c^2 + \tau^2 \lambda_g^2)` and :math:`z_g = \tau\tilde\lambda_g`, so no
    weight scale exceeds :math:`c`; with ``slab_df`` too, :math:`c^2 \sim
    \mathrm{Inv\text{-}Gamma}(\nu/2, \nu s^2/2)` is a third latent site (``slab``).

    Deterministic scale: the posterior median :math:`\hat z_g = e^{m_\tau + m_{\lambda_g}}`
    (regularized when a slab is set, with :math:`c` at its median). Group log α is the
    log-normal noise-to-signal ratio of the scale, :math:`\log(e^{s_\tau^2 +
    s_{\lambda_g}^2} - 1)`, thresholded like BC-GNJ's (log α < −3): a group is kept when the
    data pin its scale down; the scale of an unneeded group keeps a wide posterior.
    """

    global_loc: nn.Parameter
    global_log_sigma: nn.Parameter
    local_loc: nn.Parameter
    local_log_sigma: nn.Parameter

    def _construct(
        self,
        *args: Any,
        group: str,
        global_scale_prior: float = 1.0,
        slab_scale: float | None = None,
        slab_df: float | None = None,
        log_sigma_init: float = -3.0,
        scale_draws: str = "step",
        **kwargs: Any,
    ) -> None:
        self._construct_groups(*args, group=group, **kwargs)
        if scale_draws not in SCALE_DRAWS:
            raise ValueError(
                f"Expected scale_draws to be one of {SCALE_DRAWS}, got {scale_draws!r}."
            )
        self.scale_draws = scale_draws
        for name, value in (
            ("global_scale_prior", global_scale_prior),
            ("slab_scale", slab_scale),
        ):
            if value is not None and not value > 0:
                raise ValueError(f"Expected {name} > 0, got {value!r}.")
        if slab_df is not None and (slab_scale is None or not slab_df > 0):
            raise ValueError(
                f"slab_df={slab_df!r} needs a positive slab_df and a slab_scale (got "
                f"slab_scale={slab_scale!r}): the slab is c² ~ Inv-Gamma(df/2, df·scale²/2)."
            )
        self.global_scale_prior = float(global_scale_prior)
        self.slab_scale = None if slab_scale is None else float(slab_scale)
        self.slab_df = None if slab_df is None else float(slab_df)
        self.log_sigma_init = float(log_sigma_init)
        w = self.weight
        self.global_loc = nn.Parameter(w.new_empty(()))
        self.global_log_sigma = nn.Parameter(w.new_empty(()))
        self.local_loc = nn.Parameter(w.new_empty(self.num_groups))
        self.local_log_sigma = nn.Parameter(w.new_empty(self.num_groups))
        if self.slab_df is not None:
            self.slab_loc = nn.Parameter(w.new_empty(()))
            self.slab_log_sigma = nn.Parameter(w.new_empty(()))
        self._finish_construction()

    def _reset_scales(self) -> None:
        # Scales start at median 1 (the slab at its scale), so that a converted layer
        # computes its dense original.
        start = {"global": 0.0, "local": 0.0, "slab": math.log(self.slab_scale or 1.0)}
        with torch.no_grad():
            for name, loc in start.items():
                if f"{name}_loc" in self._parameters:
                    getattr(self, f"{name}_loc").fill_(loc)
                    getattr(self, f"{name}_log_sigma").fill_(self.log_sigma_init)

    def global_prior(self) -> dist.TorchDistribution:
        """τ ~ HalfCauchy(global_scale_prior)."""
        return dist.HalfCauchy(self.weight.new_tensor(self.global_scale_prior))

    def local_prior(self) -> dist.TorchDistribution:
        """λ_g ~ HalfCauchy(1), one per group."""
        return dist.HalfCauchy(self.weight.new_ones(self.num_groups)).to_event(1)

    def slab_prior(self) -> dist.TorchDistribution:
        """c, with c² ~ Inv-Gamma(ν/2, ν s²/2) (ν = ``slab_df``, s = ``slab_scale``)."""
        assert self.slab_df is not None and self.slab_scale is not None
        half_df = self.weight.new_tensor(self.slab_df / 2)
        rate = half_df * self.slab_scale**2
        return dist.TransformedDistribution(
            dist.InverseGamma(half_df, rate),
            [dist.transforms.PowerTransform(half_df.new_tensor(0.5))],
        )

    def _priors(self) -> dict[str, dist.TorchDistribution]:
        sites = {"global_scale": self.global_prior(), "local_scale": self.local_prior()}
        if self.slab_df is not None:
            sites["slab"] = self.slab_prior()
        return sites

    def _posteriors(self) -> dict[str, dist.TorchDistribution]:
        sites = {
            "global_scale": dist.LogNormal(self.global_loc, self.global_log_sigma.exp()),
            "local_scale": dist.LogNormal(self.local_loc, self.local_log_sigma.exp()).to_event(1),
        }
        if self.slab_df is not None:
            sites["slab"] = dist.LogNormal(self.slab_loc, self.slab_log_sigma.exp())
        return sites

    @pyro_method
    def guide(self) -> None:
        """Sample the scale sites from their log-normal posteriors (the layer's guide)."""
        for site, posterior in self._posteriors().items():
            pyro.sample(self._pyro_get_fullname(site), posterior)

    def _combine(self, tau: Tensor, lam: Tensor, slab: Tensor | float | None) -> Tensor:
        if slab is None:
            return tau * lam
        # tau * lambda~ with lambda~² = c² λ² / (c² + τ² λ²), in a form safe for large λ.
        z = tau * lam
        return z * slab / (slab**2 + z**2).sqrt()

    def _slab_value(self) -> Tensor | float | None:
        if self.slab_df is not None:
            return self.slab_loc.exp()
        return self.slab_scale

    def _scale_estimate(self) -> Tensor:
        return self._combine(self.global_loc.exp(), self.local_loc.exp(), self._slab_value())

    def _scale_sample(self, batch_shape: tuple[int, ...]) -> Tensor:
        # The model's sites; under SVI the guide's draws are replayed into them. A layer
        # that runs more than once in a forward pass (a shared module) reuses the pass's
        # draw, cached in the network's Pyro context as PyroSample does: the scales are
        # one latent variable, and Pyro allows one site per name.
        draws = {}
        for site, prior in self._priors().items():
            name = self._pyro_get_fullname(site)
            value = self._pyro_context.get(name)
            if value is None:
                value = pyro.sample(name, prior)
                self._pyro_context.set(name, value)
            draws[site] = value
        slab = draws.get("slab", self.slab_scale)
        if self.scale_draws == "example" and batch_shape:
            return self._combine(*self._example_draws(batch_shape), slab)
        return self._combine(draws["global_scale"], draws["local_scale"], slab)

    def _example_draws(self, batch_shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """τ and λ drawn per example from their log-normal posteriors, shapes
        ``(*batch_shape, 1)`` and ``(*batch_shape, G)``."""
        loc = self.local_loc
        noise = torch.randn((*batch_shape, loc.numel() + 1), dtype=loc.dtype, device=loc.device)
        tau = (self.global_loc + self.global_log_sigma.exp() * noise[..., :1]).exp()
        lam = (loc + self.local_log_sigma.exp() * noise[..., 1:]).exp()
        return tau, lam

    def _group_log_alpha(self) -> Tensor:
        # Var(z) / E[z]² of the log-normal z = tau * lambda: exp(s_tau² + s_lambda²) - 1.
        s2 = (2 * self.global_log_sigma).exp() + (2 * self.local_log_sigma).exp()
        return torch.log(torch.expm1(s2))


class GroupNJLinear(nn.Linear, _GroupNJ):
    """``nn.Linear`` with a group normal-Jeffreys scale per input unit (BC-GNJ).

    Same constructor as :class:`torch.nn.Linear`, plus keyword-only options.

    Args:
        in_features, out_features, bias, device, dtype: as for :class:`torch.nn.Linear`.
        group: ``"input"`` (default: a pruned group removes a neuron of the previous layer,
            as in the official code) or ``"output"``.
        log_sigma2_init: initial log σ² of the weights (−9, official).
        scale_log_sigma2_init: initial log σ² of the group scales (−9, official).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        group: str = "input",
        **options: Any,
    ) -> None:
        self._construct(in_features, out_features, bias, device, dtype, group=group, **options)

    reset_parameters = SparseModule.reset_parameters
    forward = _GroupNJ.forward


GroupNJConv1d, GroupNJConv2d, GroupNJConv3d = convolutions(
    _GroupNJ,
    GroupNJLinear,
    "a group normal-Jeffreys scale per output channel (BC-GNJ)",
    group="output",
)
GROUP_NJ_LAYERS: tuple[type[SparseModule], ...] = (
    GroupNJLinear,
    GroupNJConv1d,
    GroupNJConv2d,
    GroupNJConv3d,
)


class HorseshoeLinear(nn.Linear, _GroupHorseshoe):
    """``nn.Linear`` with a (group) horseshoe prior: one local scale per input unit (BC-GHS).

    With ``out_features=1`` every weight is its own group: the classic horseshoe regression.
    Train it with :class:`~bayessparse.SparseGuide` (or any guide that calls
    :meth:`guide`). Same constructor as :class:`torch.nn.Linear`, plus keyword-only options.

    Args:
        in_features, out_features, bias, device, dtype: as for :class:`torch.nn.Linear`.
        group: ``"input"`` (default) or ``"output"``.
        global_scale_prior: τ₀, the scale of the half-Cauchy prior on τ.
        slab_scale, slab_df: regularized horseshoe slab (see :class:`_GroupHorseshoe`).
        log_sigma2_init: initial log σ² of the weights.
        log_sigma_init: initial log standard deviation of the log-normal scale posteriors.
        scale_draws: ``"step"`` (one draw of the scales per step) or ``"example"`` (one
            per example; see :class:`_GroupHorseshoe`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        group: str = "input",
        **options: Any,
    ) -> None:
        self._construct(in_features, out_features, bias, device, dtype, group=group, **options)

    reset_parameters = SparseModule.reset_parameters
    forward = _GroupHorseshoe.forward


HorseshoeConv1d, HorseshoeConv2d, HorseshoeConv3d = convolutions(
    _GroupHorseshoe,
    HorseshoeLinear,
    "a group horseshoe prior per output channel (BC-GHS)",
    group="output",
)
HORSESHOE_LAYERS: tuple[type[SparseModule], ...] = (
    HorseshoeLinear,
    HorseshoeConv1d,
    HorseshoeConv2d,
    HorseshoeConv3d,
)
