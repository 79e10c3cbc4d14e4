"""Monte Carlo prediction from the masked posterior: ``bs.predict``."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from test_layers import spread_
from torch import Tensor, nn
from torch.nn.utils import prune

import bayessparse as bs
from bayessparse.convert import METHODS
from bayessparse.nn import HorseshoeLinear, SpikeSlabLinear, VariationalLinear

FAMILIES = sorted(METHODS)


class AppendZero(nn.Module):
    """Appends a logit fixed at 0, so that log p_i - log p_last recovers logit i exactly."""

    def forward(self, b: Tensor) -> Tensor:
        return torch.cat([b, b.new_zeros(b.shape[0], 1)], dim=1)


def make_net(method: str) -> nn.Module:
    """A small conv net (conv: output groups, linear: input groups) of one family."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)
    )
    bs.to_sparse_(net, method)
    for _, layer in bs.sparse_modules(net):
        spread_(layer)  # masks neither all-on nor all-off
    return net


def inputs(n: int = 10) -> Tensor:
    return torch.randn(n, 2, 5, 5, generator=torch.Generator().manual_seed(1))


def default_masks(net: nn.Module) -> dict[str, Tensor]:
    """Every sparse weight's and bias's default mask, keyed like ``state_dict``."""
    out = {}
    for name, layer in bs.sparse_modules(net):
        out[f"{name}.weight"] = layer.mask()
        bias = layer.bias_mask()
        if bias is not None:
            out[f"{name}.bias"] = bias
    return out


def random_masks(net: nn.Module) -> dict[str, Tensor]:
    """Arbitrary masks, not following any family's groups; every bias masked too."""
    g = torch.Generator().manual_seed(2)
    return {
        key: torch.rand(value.shape, generator=g) < 0.6
        for key, value in net.state_dict().items()
        if key.endswith(("weight", "bias")) and "log_sigma2" not in key
    }


@pytest.fixture(params=FAMILIES)
def method(request):
    return request.param


def test_shapes_and_normalisation(method):
    net, x = make_net(method), inputs()
    pred = bs.predict(net, x, num_samples=7, keep_samples=True, batch_size=4)
    assert pred.num_samples == 7
    assert pred.probs.shape == (10, 3) and pred.samples is not None
    assert pred.samples.shape == (7, 10, 3)
    assert pred.entropy.shape == pred.mutual_information.shape == (10,)
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(10))
    torch.testing.assert_close(pred.samples.sum(-1), torch.ones(7, 10))
    torch.testing.assert_close(pred.probs, pred.samples.mean(0))
    assert ((pred.entropy >= 0) & (pred.entropy <= math.log(3) + 1e-6)).all()
    # Samples are draws: they differ between passes for every family.
    assert not torch.equal(pred.samples[0], pred.samples[1])
    assert bs.predict(net, x, num_samples=2).samples is None


def test_zero_samples_is_the_masked_mean_network_exactly(method):
    net, x = make_net(method), inputs()
    expected = net.eval()(x).softmax(-1)
    for masks in (None, default_masks(net), bs.masks(net)):
        pred = bs.predict(net, x, num_samples=0, masks=masks)
        assert torch.equal(pred.probs, expected)
        assert torch.equal(pred.mutual_information, torch.zeros(10))
        torch.testing.assert_close(pred.entropy, -(expected * expected.log()).sum(-1))


def test_zero_samples_with_other_masks_is_that_masked_network(method):
    net, x = make_net(method), inputs()
    masks = random_masks(net)
    # The reference: each layer's deterministic weight and bias under these masks.
    dense = bs.to_dense(net, threshold=0.0)
    for name, _ in bs.sparse_modules(net):
        plain = dense.get_submodule(name)
        plain.weight_mask.copy_(masks[f"{name}.weight"])
        if hasattr(plain, "bias_mask"):
            plain.bias_mask.copy_(masks[f"{name}.bias"])
        else:
            prune.custom_from_mask(plain, "bias", masks[f"{name}.bias"])
    expected = dense.eval()(x).softmax(-1)
    assert torch.equal(bs.predict(net, x, num_samples=0, masks=masks).probs, expected)


@pytest.mark.parametrize("which", ["default", "random"])
def test_pruned_weights_do_not_matter_in_any_sample(method, which):
    net, x = make_net(method), inputs()
    masks = default_masks(net) if which == "default" else random_masks(net)
    before = [
        bs.predict(net, x, num_samples=n, masks=masks, seed=0, keep_samples=True) for n in (0, 10)
    ]
    # Huge means and variances wherever a weight or bias is pruned (finite: 0 * inf = nan).
    with torch.no_grad():
        for name, layer in bs.sparse_modules(net):
            pruned = ~masks[f"{name}.weight"]
            layer.weight[pruned] = 1e30
            if hasattr(layer, "weight_log_sigma2"):
                layer.weight_log_sigma2[pruned] = 60.0  # σ² = e^60 ≈ 1e26
            if f"{name}.bias" in masks:
                layer.bias[~masks[f"{name}.bias"]] = 1e30
    after = [
        bs.predict(net, x, num_samples=n, masks=masks, seed=0, keep_samples=True) for n in (0, 10)
    ]
    for old, new in zip(before, after, strict=True):
        assert torch.equal(old.probs, new.probs)
        assert old.samples is not None and new.samples is not None
        assert torch.equal(old.samples, new.samples)


def test_mutual_information_is_nonnegative_and_zero_without_spread(method):
    net, x = make_net(method), inputs()
    pred = bs.predict(net, x, num_samples=30, seed=0)
    assert (pred.mutual_information >= 0).all() and (pred.mutual_information > 0).any()
    assert (pred.mutual_information <= pred.entropy + 1e-6).all()
    for n in (0, 1):
        assert torch.equal(bs.predict(net, x, num_samples=n).mutual_information, torch.zeros(10))


@pytest.fixture(scope="module")
def lrt_case():
    """One sparse-VD layer, the LRT moments of its masked pre-activations, and S samples."""
    pyro.set_rng_seed(0)
    layer = VariationalLinear(5, 3, dtype=torch.float64)
    spread_(layer)
    weight_mask = layer.mask().clone()
    weight_mask[2] = False  # a unit with every weight pruned, and its bias too:
    bias_mask = torch.tensor([True, True, False])  # its pre-activation is exactly 0
    net = nn.Sequential(layer, AppendZero())
    x = torch.randn(4, 5, dtype=torch.float64)
    with torch.no_grad():
        mean = x @ (layer.weight * weight_mask).T + layer.bias * bias_mask
        var = (x * x) @ (layer.weight_log_sigma2.exp() * weight_mask).T
    masks = {"0.weight": weight_mask, "0.bias": bias_mask}
    pred = bs.predict(net, x, num_samples=2000, masks=masks, keep_samples=True, seed=0)
    return mean, var, pred


def test_sparse_vd_samples_have_the_masked_lrt_moments(lrt_case):
    mean, var, pred = lrt_case
    samples = pred.samples
    b = samples[..., :3].log() - samples[..., 3:].log()  # the sampled pre-activations
    s = b.shape[0]
    assert torch.equal(b[..., 2], torch.zeros_like(b[..., 2]))
    b, mean, var = b[..., :2], mean[:, :2], var[:, :2]
    # CLT: the sample mean of S Gaussian draws has sd sqrt(var / S), and the sample
    # variance has sd var * sqrt(2 / (S - 1)); 5 sd bounds each of the 8 entries.
    torch.testing.assert_close(b.mean(0), mean, rtol=0, atol=float(5 * (var / s).sqrt().max()))
    assert ((b.var(0) - var).abs() <= 5 * var * math.sqrt(2 / (s - 1))).all()


def test_sparse_vd_mc_mean_converges_to_the_predictive(lrt_case):
    mean, var, pred = lrt_case
    # Reference: E softmax([b, 0]) with b ~ N(mean, var), by direct sampling of R draws.
    r = 400_000
    eps = torch.randn(
        (r, *mean.shape), dtype=mean.dtype, generator=torch.Generator().manual_seed(3)
    )
    reference = AppendZero()((mean + var.sqrt() * eps).flatten(0, 1)).softmax(-1)
    reference = reference.view(r, *mean.shape[:1], 4).mean(0)
    # Both estimates are means of [0, 1] draws with per-entry sd σ_p: CLT, 5 sd each.
    sd = pred.samples.std(0)
    s = pred.num_samples
    assert (
        (pred.probs - reference).abs() <= 5 * sd / math.sqrt(s) + 5 * sd / math.sqrt(r) + 1e-12
    ).all()


def test_horseshoe_scales_come_from_the_guide_not_the_prior():
    # A posterior pinned at scale 3 (log-normal sd e^-20), far from a half-Cauchy draw, and
    # weights with no variance: every sample must then be the deterministic network.
    layer = HorseshoeLinear(4, 3, dtype=torch.float64)
    with torch.no_grad():
        layer.local_loc.fill_(math.log(3.0))
        layer.local_log_sigma.fill_(-20.0)
        layer.global_log_sigma.fill_(-20.0)
        layer.weight_log_sigma2.fill_(-60.0)
    x = torch.randn(6, 4, dtype=torch.float64)
    pred = bs.predict(layer, x, num_samples=20, keep_samples=True)
    expected = layer.eval()(x).softmax(-1)
    assert pred.samples is not None
    torch.testing.assert_close(pred.samples, expected.expand(20, -1, -1), rtol=0, atol=1e-6)


def test_spike_slab_samples_its_bernoulli_posterior():
    layer = SpikeSlabLinear(4, 3, group="output", dtype=torch.float64)
    with torch.no_grad():
        layer.weight_log_sigma2.fill_(-60.0)  # only the gates are random
        layer.inclusion_logit.copy_(torch.tensor([3.0, 0.5, -3.0]))  # p = .95, .62, .05
    x = torch.randn(1, 4, dtype=torch.float64).expand(400, 4)
    pred = bs.predict(nn.Sequential(layer, AppendZero()), x, num_samples=5, keep_samples=True)
    b = (pred.samples[..., :3].log() - pred.samples[..., 3:].log()).flatten(0, 1)
    with torch.no_grad():
        full = layer.eval()(x[:1]).squeeze(0)  # unit 2 is pruned: p < 1/2
        full[2] = layer.weight[2] @ x[0] + layer.bias[2]
    off, on = b.abs() < 1e-9, (b - full).abs() < 1e-9
    assert (off | on).all() and off[:, 2].all()  # hard gates; the pruned unit never on
    # 2000 Bernoulli draws per unit: the share of open gates is p within 5 sd.
    p = torch.sigmoid(torch.tensor([3.0, 0.5]))
    assert ((on[:, :2].double().mean(0) - p).abs() <= 5 * (p * (1 - p) / 2000).sqrt()).all()


def test_modes_rng_and_param_store_are_left_usable():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)
    )
    bs.to_sparse_(net)
    net.train()
    net[1].eval()  # mixed modes must come back as they were
    modes = [m.training for m in net.modules()]
    stats = net[1].running_mean.clone()
    pyro.param("unrelated", torch.ones(2))
    x = torch.randn(5, 6)
    rng = torch.get_rng_state()
    a = bs.predict(net, x, num_samples=4, seed=1, keep_samples=True)
    assert torch.equal(torch.get_rng_state(), rng)  # a seed forks the RNG
    b = bs.predict(net, x, num_samples=4, seed=1, keep_samples=True)
    assert a.samples is not None and b.samples is not None and torch.equal(a.samples, b.samples)
    pyro.set_rng_seed(7)
    c = bs.predict(net, x, num_samples=4).probs
    pyro.set_rng_seed(7)
    assert torch.equal(bs.predict(net, x, num_samples=4).probs, c)
    with pytest.raises(ValueError):
        bs.predict(net, x[:, :5], num_samples=2)
    assert [m.training for m in net.modules()] == modes
    assert torch.equal(net[1].running_mean, stats)  # other modules ran in eval mode
    assert "_predictive_masks" not in net[0].__dict__
    assert "unrelated" in pyro.get_param_store()
    net.eval()
    assert torch.equal(bs.predict(net, x, num_samples=0).probs, net(x).softmax(-1))


def test_batches_give_the_same_deterministic_prediction(method):
    net, x = make_net(method), inputs()
    whole = bs.predict(net, x, num_samples=0)
    split = bs.predict(net, x, num_samples=0, batch_size=3)
    torch.testing.assert_close(split.probs, whole.probs)


def test_sampling_a_net_without_sparse_layers_raises():
    net, x = nn.Sequential(nn.Linear(4, 3)), torch.randn(2, 4)
    with pytest.raises(ValueError, match="no stochastic layers.*num_samples=0.*to_sparse_"):
        bs.predict(net, x, num_samples=5)
    assert torch.equal(bs.predict(net, x, num_samples=0).probs, net(x).softmax(-1))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_samples": -1}, ValueError, "num_samples >= 0"),
        ({"num_samples": 2.0}, TypeError, "num_samples to be an int"),
        ({"num_samples": True}, TypeError, "num_samples to be an int"),
        ({"num_samples": 2, "batch_size": 0}, ValueError, "batch_size >= 1"),
        ({"num_samples": 2, "seed": "0"}, TypeError, "seed to be an int"),
        ({"num_samples": 0, "masks": {"2.weight": torch.ones(3)}}, ValueError, "unknown key"),
        (
            {"num_samples": 0, "masks": {"0.weight": torch.ones(3, 4)}},
            ValueError,
            r"shape \(3, 6\)",
        ),
        ({"num_samples": 0, "masks": {"0.bias": torch.full((3,), 0.5)}}, ValueError, "0/1"),
        ({"num_samples": 0, "masks": {"0.bias": [1, 1, 0]}}, TypeError, "boolean tensor"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    net = bs.to_sparse_(nn.Sequential(nn.Linear(6, 3), nn.ReLU()))
    with pytest.raises(error, match=match):
        bs.predict(net, torch.randn(2, 6), **kwargs)


def test_masks_of_a_shared_layer_must_agree():
    layer = VariationalLinear(4, 4)
    net = nn.Sequential(layer, nn.ReLU(), layer)
    ones, some = torch.ones(4, 4, dtype=torch.bool), torch.eye(4, dtype=torch.bool)
    x = torch.randn(3, 4)
    bs.predict(net, x, num_samples=1, masks={"0.weight": some, "2.weight": some})
    with pytest.raises(ValueError, match="same layer"):
        bs.predict(net, x, num_samples=1, masks={"0.weight": ones, "2.weight": some})


def test_inputs_the_net_cannot_take_raise():
    net = bs.to_sparse_(nn.Sequential(nn.Linear(6, 3)))
    with pytest.raises(ValueError, match="expected input of shape"):
        bs.predict(net, torch.randn(2, 5), num_samples=1)  # the sparse layer's own check
    dense_first = nn.Sequential(nn.Linear(6, 6), VariationalLinear(6, 3))
    with pytest.raises(ValueError, match=r"could not take an input batch of shape \(2, 5\)"):
        bs.predict(dense_first, torch.randn(2, 5), num_samples=1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        bs.predict(net, [[0.0] * 6], num_samples=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one example"):
        bs.predict(net, torch.randn(0, 6), num_samples=1)
    with pytest.raises(ValueError, match="logits of shape"):
        bs.predict(
            nn.Sequential(VariationalLinear(6, 3), nn.Flatten(0)), torch.randn(2, 6), num_samples=1
        )
