"""Group-scale layers (BC-GNJ, group horseshoe) against their definitions, and the
horseshoe regression against sparse VD on the same data.

Statistical tolerances follow test_statistics: family-wise failure rate 2e-5.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from test_statistics import (
    fit_sparse_vd_regression,
    least_squares_z,
    sparse_regression_data,
    z_for,
)
from torch import nn
from torch.distributions import kl_divergence

import bayessparse as bs
from bayessparse.nn import (
    GroupNJConv2d,
    GroupNJLinear,
    HorseshoeConv2d,
    HorseshoeLinear,
    SpikeSlabLinear,
)


def check_moments(samples: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, z: float) -> None:
    """Sample mean and variance (draws along dim 0) vs their targets, for any distribution:
    the SE of the sample variance uses the sample fourth central moment."""
    n = samples.shape[0]
    centred = samples - samples.mean(0)
    m4 = centred.pow(4).mean(0)
    mean_err = (samples.mean(0) - mean).abs() / (var / n).sqrt()
    var_err = (samples.var(0) - var).abs() / ((m4 - var**2) / n).sqrt()
    assert mean_err.max() < z, f"mean off by {mean_err.max():.2f} SE (limit {z:.2f})"
    assert var_err.max() < z, f"variance off by {var_err.max():.2f} SE (limit {z:.2f})"


def test_group_nj_lrt_moments_match_weight_space_monte_carlo():
    torch.manual_seed(0)
    n = 40000
    layer = GroupNJLinear(6, 3, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.normal_(0, 0.5)
        layer.weight_log_sigma2.uniform_(-4, -1)
        layer.bias.normal_()
        layer.scale_loc.uniform_(0.5, 1.5)
        layer.scale_log_sigma2.uniform_(-4, -1)
    x = torch.randn(6, dtype=torch.float64)
    theta, sigma2 = layer.weight.detach(), layer.weight_log_sigma2.detach().exp()
    mu, s2 = layer.scale_loc.detach(), layer.scale_log_sigma2.detach().exp()
    # w = z w~ with z ~ N(mu, s2) per input unit and w~ ~ N(theta, sigma2) per weight.
    mean = F.linear(x * mu, theta, layer.bias.detach())
    var = F.linear(x * x, s2 * theta**2 + (mu**2 + s2) * sigma2)
    z = z_for(2 * 2 * 3)
    with torch.no_grad():
        lrt = layer.train()(x.expand(n, 6))
        scales = mu + s2.sqrt() * torch.randn(n, 1, 6, dtype=torch.float64)
        weights = scales * (theta + sigma2.sqrt() * torch.randn(n, 3, 6, dtype=torch.float64))
        weight_space = torch.einsum("noi,i->no", weights, x) + layer.bias
    check_moments(lrt, mean, var, z)
    check_moments(weight_space, mean, var, z)


def test_horseshoe_conv_given_its_scales_is_the_lrt_of_the_scaled_weights():
    torch.manual_seed(1)
    n = 20000
    layer = HorseshoeConv2d(2, 3, 2, dtype=torch.float64)
    with torch.no_grad():
        layer.weight_log_sigma2.uniform_(-4, -1)
        layer.bias.normal_()
    tau, lam = torch.tensor(0.7, dtype=torch.float64), torch.tensor([0.5, 2.0, 1.0]).double()
    conditioned = poutine.condition(layer.train(), {"global_scale": tau, "local_scale": lam})
    x = torch.randn(2, 3, 3, dtype=torch.float64)
    scale = (tau * lam).view(3, 1, 1)
    theta, sigma2 = layer.weight.detach(), layer.weight_log_sigma2.detach().exp()
    mean = scale * F.conv2d(x, theta, layer.bias.detach())
    var = scale**2 * F.conv2d(x * x, sigma2)
    with torch.no_grad():
        draws = conditioned(x.expand(n, 2, 3, 3))
    check_moments(draws, mean, var, z_for(2 * mean.numel()))


def test_horseshoe_per_example_scales_match_weight_space_monte_carlo():
    # scale_draws="example": each example's τ and λ are fresh draws of the log-normal
    # posteriors, so the outputs are those of weights z ⊙ w̃ drawn anew for every example.
    torch.manual_seed(2)
    n = 40000
    layer = HorseshoeLinear(5, 3, dtype=torch.float64, scale_draws="example")
    with torch.no_grad():
        layer.weight.normal_(0, 0.5)
        layer.weight_log_sigma2.uniform_(-4, -1)
        layer.bias.normal_()
        layer.global_loc.fill_(-0.3)
        layer.global_log_sigma.fill_(-1.0)
        layer.local_loc.uniform_(-0.5, 0.5)
        layer.local_log_sigma.uniform_(-2.0, -0.5)
    x = torch.randn(5, dtype=torch.float64)
    with torch.no_grad():
        lrt = layer.train()(x.expand(n, 5))
        # log z_i = log τ + log λ_i, jointly normal: the moments of z in closed form.
        m = layer.global_loc + layer.local_loc
        s2_tau, s2 = (2 * layer.global_log_sigma).exp(), (2 * layer.local_log_sigma).exp()
        log_var = 4 * s2_tau + s2[:, None] + s2[None, :] + 2 * torch.diag(s2)
        second = (m[:, None] + m[None, :] + 0.5 * log_var).exp()  # E[z_i z_j]
        first = (m + 0.5 * (s2_tau + s2)).exp()  # E[z_i]
        theta, sigma2 = layer.weight, layer.weight_log_sigma2.exp()
        a = theta * x  # a_oi = θ_oi x_i
        mean = a @ first + layer.bias
        cov = second - first[:, None] * first[None, :]
        var = torch.einsum("oi,ij,oj->o", a, cov, a) + (sigma2 * x**2) @ torch.diag(second)
    check_moments(lrt, mean, var, z_for(2 * 3))
    # The sites are still sampled: the ELBO keeps the scales' prior and posterior.
    trace = poutine.trace(layer).get_trace(x.expand(4, 5))
    assert {"global_scale", "local_scale"} <= set(trace.stochastic_nodes)


def test_horseshoe_per_step_scales_are_shared_by_the_batch():
    layer = HorseshoeLinear(3, 1, bias=False, log_sigma2_init=-30.0)  # no weight noise
    x = torch.ones(6, 3)
    torch.manual_seed(0)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.local_log_sigma.fill_(0.0)  # λ spread over a factor of e
        step = layer.train()(x)
        layer.scale_draws = "example"
        example = layer(x)
    assert torch.allclose(step, step[0].expand_as(step))
    assert example.std() > 0.5


def test_horseshoe_guide_draws_its_log_normal_posteriors():
    layer = HorseshoeLinear(4, 2, slab_scale=2.0, slab_df=4.0)
    with torch.no_grad():
        layer.local_loc.copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0]))
    trace = poutine.trace(layer.guide).get_trace()
    assert set(trace.stochastic_nodes) == {"global_scale", "local_scale", "slab"}
    site = trace.nodes["local_scale"]
    assert isinstance(site["fn"].base_dist, dist.LogNormal)
    assert torch.equal(site["fn"].base_dist.loc, layer.local_loc)
    # The model's sites carry the priors, under the same names.
    model_trace = poutine.trace(poutine.replay(layer.train(), trace=trace)).get_trace(
        torch.randn(3, 4)
    )
    for name in ("global_scale", "local_scale", "slab"):
        assert torch.equal(model_trace.nodes[name]["value"], trace.nodes[name]["value"])
    assert isinstance(model_trace.nodes["global_scale"]["fn"], dist.HalfCauchy)


def test_regularized_horseshoe_caps_the_scale_at_the_slab():
    layer = HorseshoeLinear(3, 1, slab_scale=0.5)
    with torch.no_grad():
        layer.local_loc.copy_(torch.tensor([-5.0, 0.0, 8.0]))
    z = layer._scale_estimate().detach()
    assert (z <= 0.5).all() and z[1] < 0.5
    # Small scales are untouched by the slab, huge ones approach it.
    assert torch.allclose(z[0], torch.tensor(math.exp(-5.0)), rtol=1e-3)
    assert torch.allclose(z[2], torch.tensor(0.5), rtol=1e-6)


@pytest.mark.parametrize(
    "bad", [{"slab_df": 4.0}, {"global_scale_prior": 0.0}, {"scale_draws": "batch"}]
)
def test_horseshoe_rejects_bad_options(bad):
    with pytest.raises(ValueError, match="slab_df|global_scale_prior|scale_draws"):
        HorseshoeLinear(3, 2, **bad)


def test_group_layers_reject_input_groups_on_grouped_convolutions():
    with pytest.raises(ValueError, match="groups=1"):
        GroupNJConv2d(4, 4, 3, groups=2, group="input")
    with pytest.raises(ValueError, match="group to be one of"):
        GroupNJLinear(3, 2, group="weight")


def fit_horseshoe_regression(x, y, noise, global_scale_prior, steps=4000):
    pyro.set_rng_seed(0)
    pyro.clear_param_store()  # PyroModule parameters are looked up there by name
    net = bs.to_sparse_(
        nn.Sequential(nn.Linear(x.shape[1], 1, bias=False)).double(),
        "horseshoe",
        global_scale_prior=global_scale_prior,
    )
    with torch.no_grad():
        net[0].weight.normal_(0, 0.01)

    def model(x, y=None):
        pyro.factor("kl", -bs.kl(net))
        mean = net(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(mean, noise), obs=y)

    guide = bs.SparseGuide(net)
    optim = bs.JointOptim(torch.optim.Adam, {"lr": 0.02})
    svi = SVI(model, guide, optim, Trace_ELBO())
    for step in range(steps):
        optim.lr_factor = bs.infer.linear_decay(step, steps, steps / 2)
        svi.step(x, y)
    return net, guide


def test_horseshoe_regression_keeps_the_truth_with_fewer_false_positives_than_sparse_vd(
    record_property,
):
    x, y, coef, noise = sparse_regression_data()
    n, d = x.shape
    truth = coef != 0
    # Piironen and Vehtari's global scale for p0 = 5 expected non-zeros out of d.
    tau0 = 5 / (d - 5) * noise / math.sqrt(n)
    net, guide = fit_horseshoe_regression(x, y, noise, tau0)
    kept = bs.masks(net)["0.weight"][0]
    assert kept[truth].all(), f"true coefficients pruned: {torch.nonzero(truth & ~kept)}"
    horseshoe_fp = int(kept[~truth].sum())
    vd_kept = bs.masks(fit_sparse_vd_regression(x, y, noise))["0.weight"][0]
    vd_fp = int(vd_kept[~truth].sum())
    assert horseshoe_fp < vd_fp
    # The horseshoe's kept nulls (if any) are ones the data make look non-zero.
    assert (least_squares_z(x, y, noise)[~truth & kept].abs() > 1.0).all()

    # 90 % posterior predictive intervals on fresh data: guide draws of the scales, LRT
    # draws of x.w given them, plus the observation noise.
    g = torch.Generator().manual_seed(123)
    x_new = torch.randn(2000, d, generator=g, dtype=torch.float64)
    y_new = x_new @ coef + noise * torch.randn(2000, generator=g, dtype=torch.float64)
    with torch.no_grad():
        draws = []
        for _ in range(1000):
            scales = poutine.trace(guide).get_trace()
            mean = poutine.replay(net.train(), trace=scales)(x_new).squeeze(-1)
            draws.append(mean + noise * torch.randn_like(mean))
        lo, hi = torch.stack(draws).quantile(torch.tensor([0.05, 0.95]).double(), dim=0)
    coverage = float(((y_new >= lo) & (y_new <= hi)).double().mean())
    record_property("horseshoe_false_positives", horseshoe_fp)
    record_property("sparse_vd_false_positives", vd_fp)
    record_property("coverage_90", coverage)
    print(
        f"false positives: horseshoe {horseshoe_fp} of {int((~truth).sum())}, sparse VD "
        f"{vd_fp}; 90 % interval coverage on 2000 new points: {coverage:.4f}"
    )
    # The SE of the coverage estimate is about 0.007; the issue asks for 85 to 95 %.
    assert 0.85 <= coverage <= 0.95


def test_spike_slab_kl_is_the_bernoulli_kl_plus_the_inclusion_weighted_slab_kl():
    torch.manual_seed(0)
    layer = SpikeSlabLinear(4, 3, prior_inclusion=0.2, slab_scale=0.7, dtype=torch.float64)
    with torch.no_grad():
        layer.inclusion_logit.copy_(torch.tensor([-3.0, -0.5, 1.0, 4.0]))
        layer.weight_log_sigma2.uniform_(-3, 0)
    p = torch.sigmoid(layer.inclusion_logit)
    gate = kl_divergence(dist.Bernoulli(p), dist.Bernoulli(p.new_full((4,), 0.2)))
    q = dist.Normal(layer.weight, layer.weight_log_sigma2.mul(0.5).exp())
    prior = dist.Normal(
        torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    )
    slab = kl_divergence(q, prior).sum(0)  # per input unit
    assert torch.allclose(layer.kl(), (gate + p * slab).sum(), rtol=1e-12)


def test_spike_slab_training_gates_are_relaxed_bernoulli_draws():
    torch.manual_seed(0)
    layer = SpikeSlabLinear(3, 1, bias=False, log_sigma2_init=-30.0, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.inclusion_logit.copy_(torch.tensor([-2.0, 0.0, 2.0]))
    n = 20000
    x = torch.eye(3, dtype=torch.float64).repeat(n, 1)  # each row reads one gate
    with torch.no_grad():
        z = layer.train()(x).view(n, 3)
    # A binary-concrete draw is above 1/2 exactly with the Bernoulli probability.
    above = (z > 0.5).double().mean(0)
    p = torch.sigmoid(layer.inclusion_logit.detach())
    se = (p * (1 - p) / n).sqrt()
    assert ((above - p).abs() / se).max() < z_for(3)
