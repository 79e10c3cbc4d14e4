"""Contract tests shared by every sparse layer class.

A new layer family joins by adding one ``LayerCase`` line to ``CASES``.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field
from typing import Any

import pyro
import pytest
import torch
from pyro import poutine
from torch import nn
from torch.nn.utils import prune

import bayessparse as bs
from bayessparse.nn import (
    GroupNJConv1d,
    GroupNJConv2d,
    GroupNJConv3d,
    GroupNJLinear,
    HorseshoeConv1d,
    HorseshoeConv2d,
    HorseshoeConv3d,
    HorseshoeLinear,
    L0Conv1d,
    L0Conv2d,
    L0Conv3d,
    L0Linear,
    SBPConv1d,
    SBPConv2d,
    SBPConv3d,
    SBPLinear,
    SparseModule,
    SpikeSlabConv1d,
    SpikeSlabConv2d,
    SpikeSlabConv3d,
    SpikeSlabLinear,
    VariationalConv1d,
    VariationalConv2d,
    VariationalConv3d,
    VariationalLinear,
)
from bayessparse.nn.group import _GroupHorseshoe, _GroupNJ
from bayessparse.nn.l0 import _L0Gated
from bayessparse.nn.sbp import _StructuredBayesianPruning
from bayessparse.nn.spike_slab import _SpikeSlab
from bayessparse.nn.variational import _SparseVD


@dataclass
class LayerCase:
    cls: type[SparseModule]
    args: tuple
    input_shape: tuple[int, ...]
    bad_input_shape: tuple[int, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)  # torch layer arguments
    options: dict[str, Any] = field(default_factory=dict)  # sparse-layer options

    @property
    def variational_params(self) -> tuple[str, ...]:
        """Parameters that carry the posterior and must get a gradient from kl()."""
        if issubclass(self.cls, _L0Gated):
            return ("gate_log_alpha",) + (("weight",) if self.options.get("weight_decay") else ())
        if issubclass(self.cls, _GroupNJ):
            return ("weight", "weight_log_sigma2", "scale_loc", "scale_log_sigma2")
        if issubclass(self.cls, _SpikeSlab):
            return ("weight", "weight_log_sigma2", "inclusion_logit")
        if issubclass(self.cls, _StructuredBayesianPruning):
            return ("noise_mu", "noise_log_sigma")  # point-estimate weights: no weight KL
        # Sparse VD; the horseshoe's scale KL lives in its Pyro sample sites.
        return ("weight", "weight_log_sigma2")

    @property
    def open_options(self) -> dict[str, Any]:
        """Options under which a fresh layer passes its dense weights through unchanged."""
        # L0: the test gate is 1 once log alpha >= log 11, i.e. droprate_init < 1/12.
        return {"droprate_init": 0.01} if issubclass(self.cls, _L0Gated) else {}

    @property
    def exact_from_dense(self) -> bool:
        """A regularized horseshoe scale c·z/sqrt(c² + z²) is below 1 at z = 1, by design;
        so is SBP's E[θ] under its initial noise (0.9946 at μ = 0, σ = e⁻⁵, as official)."""
        return "slab_scale" not in self.options and not issubclass(
            self.cls, _StructuredBayesianPruning
        )

    def __str__(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in {**self.kwargs, **self.options}.items())
        return f"{self.cls.__name__}{self.args}{extra}"


CASES = [
    LayerCase(VariationalLinear, (7, 5), (4, 7), (4, 6)),
    LayerCase(VariationalLinear, (7, 5), (3, 2, 7), (3, 7, 2), {"bias": False}),
    LayerCase(VariationalLinear, (7, 5), (4, 7), (4, 8), options={"train_clip": True}),
    LayerCase(VariationalConv1d, (3, 4, 3), (2, 3, 9), (2, 9, 3)),
    LayerCase(VariationalConv1d, (4, 6, 3), (2, 4, 9), (2, 5, 9), {"groups": 2, "dilation": 2}),
    LayerCase(VariationalConv2d, (3, 4, (3, 2)), (2, 3, 8, 7), (2, 8, 7), {"padding": 1}),
    LayerCase(
        VariationalConv2d,
        (3, 4, 3),
        (2, 3, 8, 8),
        (2, 4, 8, 8),
        {"padding": 1, "padding_mode": "reflect"},
        {"log_sigma2_init": -8.0},
    ),
    LayerCase(
        VariationalConv2d, (2, 3, 3), (2, 6, 6), (1, 2, 2, 6, 6), {"stride": 2}
    ),  # unbatched
    LayerCase(VariationalConv3d, (2, 3, 2), (2, 2, 4, 5, 4), (2, 3, 4, 5, 4), {"bias": False}),
    LayerCase(L0Linear, (7, 5), (4, 7), (4, 6)),  # gates on input units
    LayerCase(L0Linear, (7, 5), (3, 2, 7), (3, 7, 2), options={"gate": "output"}),
    LayerCase(L0Linear, (7, 5), (4, 7), (4, 8), {"bias": False}, {"gate": "weight"}),
    LayerCase(L0Linear, (7, 5), (4, 7), (4, 8), options={"weight_decay": 0.1, "l0_lambda": 0.5}),
    LayerCase(L0Conv1d, (4, 6, 3), (2, 4, 9), (2, 5, 9), {"groups": 2}),  # output channels
    LayerCase(L0Conv2d, (3, 4, (3, 2)), (2, 3, 8, 7), (2, 8, 7), {"padding": 1}),
    LayerCase(L0Conv2d, (3, 4, 3), (3, 8, 8), (2, 8, 8), options={"gate": "input"}),
    LayerCase(
        L0Conv3d,
        (2, 3, 2),
        (2, 2, 4, 5, 4),
        (2, 3, 4, 5, 4),
        {"bias": False},
        {"gate": "weight", "temperature": 0.5},
    ),
    LayerCase(GroupNJLinear, (7, 5), (4, 7), (4, 6)),  # groups: input units
    LayerCase(GroupNJLinear, (7, 5), (3, 2, 7), (3, 7, 2), options={"group": "output"}),
    LayerCase(GroupNJConv1d, (4, 6, 3), (2, 4, 9), (2, 5, 9), {"groups": 2}),  # out channels
    LayerCase(GroupNJConv2d, (3, 4, (3, 2)), (3, 8, 7), (2, 8, 7), options={"group": "input"}),
    LayerCase(GroupNJConv3d, (2, 3, 2), (2, 2, 4, 5, 4), (2, 3, 4, 5, 4), {"bias": False}),
    LayerCase(HorseshoeLinear, (7, 5), (4, 7), (4, 6)),
    LayerCase(HorseshoeLinear, (7, 5), (3, 2, 7), (3, 7, 2), options={"slab_scale": 2.0}),
    LayerCase(
        HorseshoeLinear,
        (7, 1),
        (4, 7),
        (4, 8),
        {"bias": False},
        {"slab_scale": 2.0, "slab_df": 4.0, "global_scale_prior": 0.1},
    ),
    LayerCase(HorseshoeConv1d, (4, 6, 3), (2, 4, 9), (2, 5, 9), {"groups": 2}),
    LayerCase(HorseshoeConv2d, (3, 4, 3), (2, 3, 8, 8), (2, 8, 8), {"padding": 1}),
    LayerCase(HorseshoeConv2d, (3, 4, 3), (3, 8, 8), (2, 8, 8), options={"group": "input"}),
    LayerCase(HorseshoeConv3d, (2, 3, 2), (2, 2, 4, 5, 4), (2, 3, 4, 5, 4), {"bias": False}),
    LayerCase(SpikeSlabLinear, (7, 5), (4, 7), (4, 6)),
    LayerCase(
        SpikeSlabLinear,
        (7, 5),
        (3, 2, 7),
        (3, 7, 2),
        options={"group": "output", "prior_inclusion": 0.1, "slab_scale": 0.5},
    ),
    LayerCase(SpikeSlabConv1d, (4, 6, 3), (2, 4, 9), (2, 5, 9), {"groups": 2}),
    LayerCase(SpikeSlabConv2d, (3, 4, 3), (3, 8, 8), (2, 8, 8), options={"group": "input"}),
    LayerCase(SpikeSlabConv3d, (2, 3, 2), (2, 2, 4, 5, 4), (2, 3, 4, 5, 4), {"bias": False}),
    LayerCase(SBPLinear, (7, 5), (4, 7), (4, 6)),  # noise on input units
    LayerCase(
        SBPLinear,
        (7, 5),
        (3, 2, 7),
        (3, 7, 2),
        options={"group": "output", "log_sigma_init": -3.0, "mu_init": -1.0},
    ),
    LayerCase(SBPConv1d, (4, 6, 3), (2, 4, 9), (2, 5, 9), {"groups": 2}),  # output channels
    LayerCase(SBPConv2d, (3, 4, (3, 2)), (2, 3, 8, 7), (2, 8, 7), {"padding": 1}),
    LayerCase(SBPConv2d, (3, 4, 3), (3, 8, 8), (2, 8, 8), options={"group": "input"}),
    LayerCase(SBPConv3d, (2, 3, 2), (2, 2, 4, 5, 4), (2, 3, 4, 5, 4), {"bias": False}),
]
DTYPES = [torch.float32, torch.float64]


def spread_(layer: SparseModule) -> None:
    """Spread the posterior so that masks are neither all-on nor all-off."""
    with torch.no_grad():
        if isinstance(layer, _SparseVD):
            steps = torch.linspace(-6, 6, layer.weight.numel()).view_as(layer.weight)
            layer.weight_log_sigma2.copy_(torch.log(layer.weight**2) + steps)
        elif isinstance(layer, _L0Gated):
            gates = layer.gate_log_alpha
            gates.copy_(torch.linspace(-4, 4, gates.numel()).view_as(gates))
        elif isinstance(layer, _GroupNJ):
            steps = torch.linspace(-6, 6, layer.num_groups)
            layer.scale_loc.copy_(torch.linspace(0.5, 1.5, layer.num_groups))
            layer.scale_log_sigma2.copy_(torch.log(layer.scale_loc**2) + steps)
        elif isinstance(layer, _SpikeSlab):
            layer.inclusion_logit.copy_(torch.linspace(-4, 4, layer.num_groups))
        elif isinstance(layer, _StructuredBayesianPruning):
            # log sigma from -3 (SNR about 20) to 1.5 (SNR about 0.3), mu inside [-20, 0].
            layer.noise_log_sigma.copy_(torch.linspace(-3, 1.5, layer.num_groups))
            layer.noise_mu.copy_(torch.linspace(-2, -0.5, layer.num_groups))
        else:
            assert isinstance(layer, _GroupHorseshoe)
            # Log-normal s² from e^-8 to e^2: log alpha from about -8 to 2.
            layer.local_log_sigma.copy_(torch.linspace(-4, 1, layer.num_groups))
            layer.global_log_sigma.fill_(-5.0)
            layer.local_loc.copy_(torch.linspace(-0.5, 0.5, layer.num_groups))


def train_forward(layer: SparseModule, x: torch.Tensor) -> torch.Tensor:
    """A training-mode forward pass with the layer's latent sites drawn from its guide."""
    guide_trace = poutine.trace(layer.guide).get_trace()
    return poutine.replay(layer.train(), trace=guide_trace)(x)


def make(case: LayerCase, dtype: torch.dtype) -> SparseModule:
    torch.manual_seed(0)
    layer = case.cls(*case.args, **case.kwargs, **case.options, dtype=dtype)
    spread_(layer)
    return layer


def torch_type(layer: SparseModule) -> type[nn.Module]:
    return next(t for t in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(layer, t))


@pytest.fixture(params=CASES, ids=str)
def case(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=str)
def dtype(request):
    return request.param


def test_is_drop_in_torch_and_pyro_module(case, dtype):
    layer = make(case, dtype)
    assert isinstance(layer, torch_type(layer))
    assert isinstance(layer, pyro.nn.PyroModule)
    assert layer.weight.dtype == dtype


def test_output_shape_matches_torch_layer(case, dtype):
    layer = make(case, dtype)
    x = torch.randn(case.input_shape, dtype=dtype)
    plain = bs.to_dense(layer, threshold=0.0)
    expected = plain(x).shape
    assert train_forward(layer, x).shape == expected
    assert layer.eval()(x).shape == expected


def test_eval_is_deterministic_and_train_is_stochastic(case, dtype):
    layer = make(case, dtype)
    x = torch.randn(case.input_shape, dtype=dtype)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    assert not torch.equal(train_forward(layer, x), train_forward(layer, x))


@pytest.mark.parametrize("threshold", [None, 0.0, 0.3, 1.0])
def test_eval_equals_to_dense(case, dtype, threshold):
    layer = make(case, dtype)
    x = torch.randn(case.input_shape, dtype=dtype)
    cut = layer.default_threshold if threshold is None else threshold
    layer.default_threshold = cut  # eval uses the layer's default rule
    dense = layer.to_dense(threshold)
    assert type(dense) is torch_type(layer)
    assert torch.equal(layer.eval()(x), dense.eval()(x))
    baked = bs.to_dense(layer, threshold, bake=True)
    assert type(baked) is torch_type(layer) and not prune.is_pruned(baked)
    assert torch.equal(layer(x), baked.eval()(x))


def test_to_dense_uses_prune_format(case, dtype):
    layer = make(case, dtype)
    dense = layer.to_dense()
    assert torch.equal(dense.weight_orig, layer.dense_weight().detach())
    assert torch.equal(dense.weight_mask.bool(), layer.mask())
    assert 0 < int(dense.weight_mask.sum()) < layer.weight.numel()


def test_keep_prob_in_unit_interval_and_mask_monotone(case, dtype):
    layer = make(case, dtype)
    p = layer.keep_prob()
    assert torch.broadcast_shapes(p.shape, layer.weight.shape) == layer.weight.shape
    assert ((p >= 0) & (p <= 1)).all()
    counts = [int(layer.mask(t).sum()) for t in torch.linspace(0, 1, 11).tolist()]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] == layer.weight.numel() and counts[-1] == 0
    assert layer.mask().dtype == torch.bool and layer.mask().shape == layer.weight.shape


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_bad_threshold_raises_value_error(case, bad):
    layer = make(case, torch.float32)
    with pytest.raises(ValueError, match="threshold"):
        layer.mask(bad)
    with pytest.raises(ValueError, match="threshold"):
        layer.to_dense(bad)
    with pytest.raises(ValueError, match="threshold"):
        bs.masks(layer, bad)


def test_threshold_of_wrong_type_raises_type_error(case):
    layer = make(case, torch.float32)
    with pytest.raises(TypeError, match="threshold"):
        layer.mask("0.5")  # type: ignore[arg-type]


def test_kl_is_finite_scalar_with_gradients_to_every_variational_parameter(case, dtype):
    layer = make(case, dtype)
    kl = layer.kl()
    assert kl.shape == () and torch.isfinite(kl)
    kl.backward()
    for name in case.variational_params:
        grad = getattr(layer, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_forward_gives_gradients_to_every_parameter(case, dtype):
    layer = make(case, dtype)
    x = torch.randn(case.input_shape, dtype=dtype)
    train_forward(layer, x).square().sum().backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_from_dense_keeps_the_weights_and_the_output(case, dtype):
    torch.manual_seed(1)
    plain = torch_type(make(case, dtype))(*case.args, **case.kwargs, dtype=dtype)
    layer = case.cls.from_dense(plain, **case.options, **case.open_options)
    assert type(layer) is case.cls
    for option, value in case.options.items():
        assert getattr(layer, option) == value
    if not case.exact_from_dense:
        return
    assert torch.equal(layer.dense_weight(), plain.weight)
    x = torch.randn(case.input_shape, dtype=dtype)
    assert torch.equal(layer.to_dense(threshold=0.0)(x), plain(x))
    if plain.bias is not None:
        assert torch.equal(layer.bias, plain.bias)


def test_from_dense_rejects_the_wrong_layer_type(case):
    with pytest.raises(TypeError, match="expects"):
        case.cls.from_dense(nn.Bilinear(2, 2, 2))


def test_state_dict_torch_save_and_deepcopy_round_trips(case, dtype):
    layer = make(case, dtype)
    x = torch.randn(case.input_shape, dtype=dtype)
    expected = layer.eval()(x)

    fresh = case.cls(*case.args, **case.kwargs, **case.options, dtype=dtype).eval()
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), expected)

    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is case.cls and torch.equal(loaded(x), expected)

    clone = copy.deepcopy(layer)
    assert torch.equal(clone(x), expected)
    assert clone.weight is not layer.weight


def test_wrong_input_shape_raises_clear_error(case):
    layer = make(case, torch.float32)
    with pytest.raises(ValueError, match="expected input of shape") as info:
        layer(torch.randn(case.bad_input_shape))
    assert str(case.bad_input_shape) in str(info.value)


def test_reset_parameters_redraws_everything_as_at_construction(case):
    layer = make(case, torch.float32)
    torch.manual_seed(5)
    layer.reset_parameters()
    torch.manual_seed(5)
    fresh = case.cls(*case.args, **case.kwargs, **case.options)
    for (name, value), expected in zip(
        layer.state_dict().items(), fresh.state_dict().values(), strict=True
    ):
        assert torch.equal(value, expected), name
