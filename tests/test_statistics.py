"""Statistical checks of the sparse-VD layers against their definitions.

Tolerances come from the CLT: an estimate from n draws is compared with its target within
z standard errors, z chosen so that the whole test fails with probability 2e-5 when the
code is right (Bonferroni over its comparisons).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO
from scipy import stats
from torch import nn

import bayessparse as bs
from bayessparse.nn import VariationalConv2d, VariationalLinear

FAILURE_RATE = 2e-5


def z_for(num_comparisons: int) -> float:
    """Two-sided normal quantile for a family-wise failure rate of FAILURE_RATE."""
    return float(stats.norm.isf(FAILURE_RATE / (2 * num_comparisons)))


def check_moments(samples: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, z: float) -> None:
    """Sample mean and variance of Gaussian ``samples`` (draws along dim 0) vs their targets.

    SE of the mean is sqrt(var / n); SE of the sample variance of a Gaussian is
    var * sqrt(2 / (n - 1)).
    """
    n = samples.shape[0]
    mean_err = (samples.mean(0) - mean).abs() / (var / n).sqrt()
    var_err = (samples.var(0) - var).abs() / (var * math.sqrt(2 / (n - 1)))
    assert mean_err.max() < z, f"mean off by {mean_err.max():.2f} SE (limit {z:.2f})"
    assert var_err.max() < z, f"variance off by {var_err.max():.2f} SE (limit {z:.2f})"


def spread_posterior_(layer: nn.Module) -> None:
    with torch.no_grad():
        layer.weight.normal_(0, 0.5)
        layer.weight_log_sigma2.uniform_(-4, 0)
        if layer.bias is not None:
            layer.bias.normal_()


def posterior(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sd of the weight posterior q(w) = N(theta, sigma^2)."""
    return layer.weight.detach(), layer.weight_log_sigma2.detach().mul(0.5).exp()


def test_linear_lrt_moments_match_weight_space_monte_carlo():
    torch.manual_seed(0)
    n = 20000
    layer = VariationalLinear(6, 3, dtype=torch.float64)
    spread_posterior_(layer)
    x = torch.randn(6, dtype=torch.float64)
    theta, sigma = posterior(layer)
    mean = F.linear(x, theta, layer.bias.detach())
    var = F.linear(x * x, sigma**2)
    z = z_for(2 * 2 * 3)  # {LRT, weight space} x {mean, variance} x 3 units
    with torch.no_grad():
        lrt = layer.train()(x.expand(n, 6))
        weights = theta + sigma * torch.randn(n, *theta.shape, dtype=torch.float64)
        weight_space = torch.einsum("noi,i->no", weights, x) + layer.bias
    check_moments(lrt, mean, var, z)
    check_moments(weight_space, mean, var, z)


def test_conv_lrt_moments_match_weight_space_monte_carlo():
    torch.manual_seed(1)
    n = 20000
    layer = VariationalConv2d(2, 2, 3, padding=1, dtype=torch.float64)
    spread_posterior_(layer)
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    theta, sigma = posterior(layer)
    mean = F.conv2d(x, theta, layer.bias.detach(), padding=1).flatten()
    var = F.conv2d(x * x, sigma**2, padding=1).flatten()
    z = z_for(2 * 2 * mean.numel())
    with torch.no_grad():
        lrt = layer.train()(x.expand(n, -1, -1, -1)).flatten(1)
        # Weight space: one weight draw per output sample, via the unfolded input patches.
        weights = theta + sigma * torch.randn(n, *theta.shape, dtype=torch.float64)
        patches = F.unfold(x, 3, padding=1)[0]  # (in * k * k, positions)
        weight_space = (weights.flatten(2) @ patches + layer.bias[:, None]).flatten(1)
    check_moments(lrt, mean, var, z)
    check_moments(weight_space, mean, var, z)


def test_lrt_draws_are_independent_across_examples():
    torch.manual_seed(2)
    n = 20000
    layer = VariationalLinear(4, 1, dtype=torch.float64)
    spread_posterior_(layer)
    x = torch.randn(4, dtype=torch.float64)
    with torch.no_grad():
        pairs = layer.train()(x.expand(2 * n, 4)).view(n, 2)
    # Under independence the sample correlation has SE 1/sqrt(n).
    corr = torch.corrcoef(pairs.T)[0, 1]
    assert abs(float(corr)) * math.sqrt(n) < z_for(1)


def sparse_regression_data(seed: int = 0):
    """30 independent features, 5 non-zero coefficients with |w| >= 1, N = 500, noise sd 0.5."""
    g = torch.Generator().manual_seed(seed)
    n, d, noise = 500, 30, 0.5
    support = torch.randperm(d, generator=g)[:5]
    coef = torch.zeros(d, dtype=torch.float64)
    magnitudes = 1.0 + torch.rand(5, generator=g, dtype=torch.float64)
    signs = torch.where(torch.rand(5, generator=g) < 0.5, -1.0, 1.0).double()
    coef[support] = magnitudes * signs
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ coef + noise * torch.randn(n, generator=g, dtype=torch.float64)
    return x, y, coef, noise


def least_squares_z(x, y, noise):
    """OLS estimates divided by their standard errors at the known noise level."""
    gram_inv = torch.linalg.inv(x.T @ x)
    beta = gram_inv @ x.T @ y
    return beta / (noise * gram_inv.diagonal().sqrt())


def fit_sparse_vd_regression(x, y, noise, steps=4000):
    pyro.clear_param_store()  # PyroModule parameters are looked up there by name
    net = bs.to_sparse_(nn.Sequential(nn.Linear(x.shape[1], 1, bias=False)).double())
    with torch.no_grad():
        net[0].weight.normal_(0, 0.01)

    def model(x, y):
        pyro.factor("kl", -bs.kl(net))
        mean = net(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(mean, noise), obs=y)

    optim = bs.JointOptim(torch.optim.Adam, {"lr": 0.02})
    svi = SVI(model, bs.EmptyGuide(), optim, Trace_ELBO())
    for step in range(steps):
        optim.lr_factor = bs.infer.linear_decay(step, steps, steps / 2)
        svi.step(x, y)
    return net


def test_sparse_regression_keeps_the_truth_and_prunes_clear_nulls(record_property):
    x, y, coef, noise = sparse_regression_data()
    net = fit_sparse_vd_regression(x, y, noise)
    kept = bs.masks(net)["0.weight"][0]
    truth = coef != 0
    z = least_squares_z(x, y, noise)
    assert kept[truth].all(), f"true coefficients pruned: {torch.nonzero(truth & ~kept)}"
    clear_nulls = ~truth & (z.abs() < 0.5)
    assert clear_nulls.sum() >= 5
    assert not kept[clear_nulls].any(), f"kept nulls with |z| < 0.5: {z[clear_nulls & kept]}"
    false_positive_rate = float(kept[~truth].double().mean())
    record_property("false_positive_rate", false_positive_rate)
    # The kept nulls are the ones the data itself makes look non-zero.
    assert (z[~truth & kept].abs() > 0.5).all()
    print(
        f"sparse VD false-positive rate: {false_positive_rate:.3f} "
        f"({int(kept[~truth].sum())} of {int((~truth).sum())} nulls kept; "
        f"|z| of kept nulls: {z[~truth & kept].abs().tolist()})"
    )
