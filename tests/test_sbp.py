"""Structured Bayesian Pruning: the truncated log-normal noise, its KL, and the layers.

The closed forms are checked against numerical integration (scipy) and the sampler
against the truncated normal; Monte Carlo checks use tolerances of a few standard errors,
each derived from the distribution's own moments, with fixed seeds.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mnist_subset import write_mnist_subset
from scipy import integrate, stats
from torch import nn

import bayessparse as bs
from bayessparse.bench import Bench, Item
from bayessparse.data import Split
from bayessparse.distributions import TruncatedLogNormal
from bayessparse.nn import SBPConv2d, SBPLinear
from bayessparse.nn.sbp import PARAM_RANGE, SBP_THRESHOLD
from bayessparse.pruning import prunable_layers

LOW, HIGH = -20.0, 0.0
# (mu, log sigma): the official start at the upper bound, central, wide, near and at the
# lower bound, beyond the upper bound, and the widest posterior the clip allows.
CASES = [
    (0.0, -5.0),
    (-3.0, 0.0),
    (-10.0, 2.0),
    (-19.5, -1.0),
    (-20.0, 0.0),
    (0.5, -1.2),
    (2.0, 1.0),
    (-20.0, 5.0),
    (5.0, 5.0),
]


def scipy_log_theta(mu: float, log_sigma: float) -> stats.rv_continuous:
    """log θ as scipy's truncated normal (an independent implementation)."""
    sigma = math.exp(log_sigma)
    return stats.truncnorm((LOW - mu) / sigma, (HIGH - mu) / sigma, loc=mu, scale=sigma)


def noise(mu: float, log_sigma: float, dtype: torch.dtype = torch.float64) -> TruncatedLogNormal:
    return TruncatedLogNormal(
        torch.tensor(mu, dtype=dtype), torch.tensor(log_sigma, dtype=dtype).exp(), LOW, HIGH
    )


def integrate_over_support(f, mu: float, log_sigma: float, epsabs: float = 0.0) -> float:
    """∫ f(y) dy over log θ's support, cut to μ ± 40σ where the density is nonzero; to a
    relative tolerance unless ``epsabs`` is given (the moments of θ near e^-20 are tiny)."""
    sigma = math.exp(log_sigma)
    inside = min(max(mu, LOW), HIGH)  # the mode
    lo, hi = max(LOW, inside - 40 * sigma), min(HIGH, inside + 40 * sigma)
    median = float(scipy_log_theta(mu, log_sigma).median())
    points = [median] if lo < median < hi else None
    value, _ = integrate.quad(f, lo, hi, points=points, limit=500, epsabs=epsabs, epsrel=1e-11)
    return value


# --- the KL ---------------------------------------------------------------------------


@pytest.mark.parametrize(("mu", "log_sigma"), CASES)
def test_kl_matches_numerical_integration(mu, log_sigma):
    log_q = scipy_log_theta(mu, log_sigma).logpdf
    expected = integrate_over_support(
        lambda y: math.exp(log_q(y)) * (log_q(y) + math.log(HIGH - LOW)), mu, log_sigma, 1e-13
    )
    kl = noise(mu, log_sigma).kl_log_uniform().item()
    assert kl == pytest.approx(expected, rel=1e-7, abs=1e-9)


def test_kl_at_the_official_start():
    # Half a normal of sigma = e^-5 at the upper bound: log 20 - log(sigma sqrt(2 pi e)/2).
    expected = math.log(20) - (
        math.log(math.exp(-5) * math.sqrt(2 * math.pi * math.e)) - math.log(2)
    )
    assert noise(0.0, -5.0).kl_log_uniform().item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("mu", "log_sigma"), [(0.5, -12.0), (3.0, -15.0), (5.0, -20.0)])
def test_kl_far_beyond_the_bound_is_the_exponential_limit(mu, log_sigma):
    # Where Φ(α) and Φ(β) both underflow, log θ is b minus an exponential of rate
    # (μ − b)/σ²: KL = log(b − a) − (1 − log rate), up to O(σ²/(μ − b)²).
    sigma = math.exp(log_sigma)
    rate = (mu - HIGH) / sigma**2
    expected = math.log(HIGH - LOW) - (1.0 - math.log(rate))
    q = noise(mu, log_sigma)
    assert q.kl_log_uniform().item() == pytest.approx(expected, abs=1e-6)
    assert q.mean.item() == pytest.approx(1.0, abs=1e-6)


def test_kl_and_its_gradients_are_finite_over_the_clipped_range_in_both_dtypes():
    grid = torch.linspace(*PARAM_RANGE, 101, dtype=torch.float64)
    mu, log_sigma = torch.meshgrid(grid, grid, indexing="ij")
    reference = None
    for dtype in (torch.float64, torch.float32):
        m = mu.to(dtype).clone().requires_grad_()
        s = log_sigma.to(dtype).clone().requires_grad_()
        q = TruncatedLogNormal(m, s.exp(), LOW, HIGH)
        kl = q.kl_log_uniform()
        (kl.sum() + q.mean.sum() + q.rsample((2,)).sum()).backward()
        for tensor in (kl, q.mean, q.log_noise_ratio(), m.grad, s.grad):
            assert torch.isfinite(tensor).all()
        assert (kl >= 0).all()
        if reference is None:
            reference = kl.detach()
        else:  # float32 parameters: the float64 maths, rounded
            torch.testing.assert_close(kl.double(), reference, rtol=1e-6, atol=1e-6)


def test_kl_gradient_matches_finite_differences():
    for mu, log_sigma in CASES:
        params = torch.tensor([mu, log_sigma], dtype=torch.float64, requires_grad=True)
        torch.autograd.gradcheck(
            lambda p: TruncatedLogNormal(p[0], p[1].exp(), LOW, HIGH).kl_log_uniform(),
            (params,),
            eps=1e-6,
            atol=1e-5,
            rtol=1e-4,
        )


# --- the sampler and the moments ------------------------------------------------------

# (mu, log sigma) for the sampler: central, the official start, a reflected interval
# (alpha + beta > 0) and the exponential tail (the upper bound 50 sigma below the mean).
SAMPLER_CASES = [(-3.0, 0.0), (0.0, -5.0), (-18.0, 0.7), (1.0, math.log(0.02))]


@pytest.mark.parametrize(("mu", "log_sigma"), SAMPLER_CASES)
def test_samples_follow_the_truncated_normal(mu, log_sigma):
    n, delta = 20_000, 1e-6
    # DKW: P(sup |F_n - F| > eps) <= 2 exp(-2 n eps²), so this bound fails with
    # probability below delta (0.019 at n = 20,000); the seed is fixed besides.
    eps = math.sqrt(math.log(2 / delta) / (2 * n))
    torch.manual_seed(0)
    log_theta = noise(mu, log_sigma).rsample((n,)).log().numpy()
    assert log_theta.min() >= LOW and log_theta.max() <= HIGH
    assert stats.kstest(log_theta, scipy_log_theta(mu, log_sigma).cdf).statistic < eps


@pytest.mark.parametrize(("mu", "log_sigma"), [*CASES, *SAMPLER_CASES])
def test_mean_and_snr_match_integration_and_monte_carlo(mu, log_sigma):
    q = noise(mu, log_sigma)
    density = scipy_log_theta(mu, log_sigma).pdf
    moments = [
        integrate_over_support(lambda y, k=k: math.exp(k * y) * density(y), mu, log_sigma)
        for k in (1, 2, 4)
    ]
    mean, second, fourth = moments
    assert q.mean.item() == pytest.approx(mean, rel=1e-7, abs=0.0)
    variance = second - mean**2
    if variance > 1e-6 * second:  # else the integrals' rounding is the variance
        assert q.variance.item() == pytest.approx(variance, rel=1e-5, abs=0.0)
        snr = mean / math.sqrt(variance)
        assert q.signal_to_noise().item() == pytest.approx(snr, rel=1e-5, abs=0.0)
    # Monte Carlo, to 5 standard errors of the sample mean and of the sample second moment.
    n = 200_000
    torch.manual_seed(1)
    theta = q.rsample((n,))
    assert abs(theta.mean().item() - mean) < 5 * math.sqrt(variance / n) + 1e-12
    var_of_square = max(fourth - second**2, 0.0)
    assert abs(theta.square().mean().item() - second) < 5 * math.sqrt(var_of_square / n) + 1e-12


def test_samples_are_reparameterised():
    # d E[θ] / d(μ, log σ) by the closed form, and as the mean of the samples' gradients.
    n = 200_000
    for mu, log_sigma in [(-3.0, 0.0), (-1.0, -1.0), (-18.0, 0.7)]:
        params = torch.tensor([mu, log_sigma], dtype=torch.float64, requires_grad=True)
        q = TruncatedLogNormal(params[0], params[1].exp(), LOW, HIGH)
        (exact,) = torch.autograd.grad(q.mean, params, retain_graph=True)
        torch.manual_seed(2)
        samples = q.rsample((n,))
        chunks = 16  # independent chunk sums, whose spread gives the estimate's error
        sums = torch.stack(
            [
                torch.autograd.grad(samples[i::chunks].sum(), params, retain_graph=True)[0]
                for i in range(chunks)
            ]
        )
        estimate = sums.sum(0) / n
        spread = sums.std(0) * math.sqrt(chunks) / n
        assert ((estimate - exact).abs() < 5 * spread + 1e-9).all(), (mu, estimate, exact)


def test_keep_prob_is_monotone_in_the_snr_and_the_threshold_is_snr_one():
    layer = SBPLinear(40, 2, dtype=torch.float64)
    with torch.no_grad():
        layer.noise_mu.uniform_(-20, 1)
        layer.noise_log_sigma.uniform_(-4, 4)
    snr = layer.signal_to_noise()
    keep = layer.keep_prob().reshape(-1)
    order = snr.argsort()
    assert (keep[order].diff() >= 0).all()
    torch.testing.assert_close(keep, snr**2 / (1 + snr**2))
    assert layer.default_threshold == SBP_THRESHOLD == 0.5
    assert torch.equal(layer.mask()[0], snr > 1)
    assert 0 < int((snr > 1).sum()) < 40


# --- the layers -----------------------------------------------------------------------


def test_default_start_is_the_official_one_and_project_clips_like_it():
    layer = SBPConv2d(3, 8, 3)
    assert (layer.noise_mu == 0).all() and (layer.noise_log_sigma == -5).all()
    assert layer.kl().item() == pytest.approx(8 * noise(0.0, -5.0).kl_log_uniform().item())
    with torch.no_grad():
        layer.noise_mu.fill_(7.0)
        layer.noise_log_sigma.fill_(-30.0)
    layer.project_()
    assert (layer.noise_mu == 5).all() and (layer.noise_log_sigma == -20).all()


def test_training_draws_the_noise_per_example():
    torch.manual_seed(0)
    layer = SBPLinear(5, 3, group="output")
    with torch.no_grad():
        layer.noise_log_sigma.fill_(0.0)
    out = layer.train()(torch.ones(2, 5))
    assert not torch.equal(out[0], out[1])  # one input, two draws of θ


def test_from_dense_starts_close_to_the_dense_layer():
    torch.manual_seed(0)
    dense = nn.Linear(6, 4)
    layer = SBPLinear.from_dense(dense).eval()
    x = torch.randn(5, 6)
    # E[θ] = 0.9946 at the official start: the dense layer, slightly shrunk.
    torch.testing.assert_close(
        layer(x) - layer.bias, (dense(x) - dense.bias) * 0.99465, atol=1e-4, rtol=1e-4
    )


def test_bad_options_are_refused_naming_the_value():
    with pytest.raises(ValueError, match="group"):
        SBPLinear(3, 2, group="weight")
    with pytest.raises(ValueError, match="groups=1"):
        SBPConv2d(4, 4, 3, groups=2, group="input")
    with pytest.raises(ValueError, match="log_sigma_init"):
        SBPLinear(3, 2, log_sigma_init=-30.0)
    with pytest.raises(ValueError, match="log_low < log_high"):
        SBPLinear(3, 2, log_low=0.0, log_high=-20.0)


def small_net() -> nn.Module:
    """conv (4 output channels) -> ReLU -> linear (4 * 36 inputs) -> 3, made SBP."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    return bs.to_sparse_(net.double(), "sbp")


def test_a_low_snr_channel_is_masked_with_its_bias_and_compacted_away():
    net = small_net()
    conv, linear = net[0], net[3]
    assert conv.group == "output" and linear.group == "input"
    with torch.no_grad():
        conv.noise_log_sigma[2] = 4.0  # mu = 0: SNR 0.34
    assert conv.signal_to_noise()[2] < 1 < conv.signal_to_noise()[[0, 1, 3]].min()
    masks = bs.masks(net)
    assert masks["0.weight"][2].sum() == 0 and masks["0.weight"][[0, 1, 3]].all()
    assert masks["0.bias"].tolist() == [True, True, False, True]
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    net.eval()
    assert (net[1](net[0](x))[:, 2] == 0).all()  # the channel outputs exactly 0
    small = bs.compact(net).eval()
    convs = [m for m in small.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in small.modules() if isinstance(m, nn.Linear)]
    assert convs[0].out_channels == 3 and linears[0].in_features == 3 * 36
    torch.testing.assert_close(small(x), net(x), rtol=1e-12, atol=1e-12)


def test_eval_is_exactly_the_dense_network():
    net = small_net()
    with torch.no_grad():
        net[0].noise_log_sigma.copy_(torch.tensor([-5.0, 3.0, 0.0, 4.0]))
        net[3].noise_log_sigma.uniform_(-4, 4)
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    for threshold in (None, 0.3):
        dense = bs.to_dense(net, threshold).eval()
        assert torch.equal(bs.to_dense(net, threshold, bake=True).eval()(x), dense(x))
        for layer_name in ("0", "3"):
            net.get_submodule(layer_name).default_threshold = threshold or SBP_THRESHOLD
        assert torch.equal(net.eval()(x), dense(x))


def test_the_cli_trains_lenet5_with_sbp(tmp_path):
    data = write_mnist_subset(tmp_path / "mnist", n_train=256, n_test=64)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "bayessparse", "train", "--no-progress", "--threads", "1"]
    command += ["--model", "lenet5", "--method", "sbp", "--epochs", "2", "--batch-size", "128"]
    command += ["--data-dir", str(data), "--out", str(out)]
    result = subprocess.run(
        command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["method"] == "sbp"
    # The recipe's 400 epochs, scaled: KL off for the first half, lr decay from 3/4.
    assert report["settings"]["kl_warmup"] == [1.0, 1.0]
    assert report["settings"]["lr_decay_start"] == 1.5


def test_the_bench_prunes_each_layers_share_of_sbp_units(tmp_path):
    def synthetic(n: int, seed: int) -> Split:
        generator = torch.Generator().manual_seed(seed)
        return Split(torch.randn(n, 1, 28, 28, generator=generator), torch.arange(n) % 10)

    bench = Bench(tmp_path, "lenet300", 1, synthetic(200, 0), synthetic(50, 1))
    row = bench.run(Item("lenet300", "sbp", 0.9, 0))
    assert row["family"] == "bayesian"
    assert row["achieved_sparsity"] == pytest.approx(0.9, abs=0.01)
    net, _ = bench.bayesian(Item("lenet300", "sbp", 0.9, 0))
    for layer in prunable_layers(net).values():  # the target selector's layer scope
        kept = layer.weight_mask.bool().any(0).float().mean()  # input units kept
        assert 0.05 <= float(kept) <= 0.15
