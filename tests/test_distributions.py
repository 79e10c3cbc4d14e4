"""LogScaleUniform and the sparse-VD KL approximation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats
from torch.distributions import Normal, kl_divergence

from bayessparse.distributions import LogScaleUniform, sparse_vd_kl
from bayessparse.distributions.kl import sparse_vd_kl_sum

EULER_GAMMA = 0.5772156649015329


def exact_neg_kl(log_alpha: float) -> float:
    """-KL(N(theta, alpha theta^2) || p(w) ∝ 1/|w|) by quadrature, normalised to 0 at alpha→∞.

    -KL = ½ log α - E_{ε~N(1,α)} log|ε| + C. As α→∞, E log|ε| → ½ log α - (γ + log 2)/2,
    so C = -(γ + log 2)/2 makes the exact value tend to 0, as the approximation does.
    """
    sd = math.exp(0.5 * log_alpha)

    def pdf(x: float) -> float:
        return math.exp(-0.5 * ((x - 1) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))

    def quad(*args, **kwargs) -> float:
        return integrate.quad(*args, limit=500, epsabs=1e-13, epsrel=1e-12, **kwargs)[0]

    lo, hi = 1 - 40 * sd, 1 + 40 * sd  # the Gaussian mass beyond 40 sd is < 1e-300
    e_log = quad(lambda x: math.log(x) * pdf(x), 1.0, hi)
    if lo >= 0.0:
        e_log += quad(lambda x: math.log(x) * pdf(x), lo, 1.0)
    else:
        # QUADPACK's logarithmic weights integrate the singularity of log|x| at 0 exactly:
        # 'alg-loga' weights by log(x - 0) on [0, 1], 'alg-logb' by log(0 - x) on [lo, 0].
        e_log += quad(pdf, 0.0, 1.0, weight="alg-loga", wvar=(0.0, 0.0))
        e_log += quad(pdf, lo, 0.0, weight="alg-logb", wvar=(0.0, 0.0))
    return 0.5 * log_alpha - e_log - 0.5 * (EULER_GAMMA + math.log(2))


def series_neg_kl(log_alpha: float) -> float:
    """The same quantity from the Poisson-mixture series of a noncentral chi-square.

    ε²/α is noncentral χ²₁ with noncentrality λ = 1/α, a Poisson(λ/2) mixture of χ²_{1+2j},
    and E log χ²_m = log 2 + ψ(m/2).
    """
    half_lambda = 0.5 * math.exp(-log_alpha)
    j = np.arange(int(half_lambda + 40 * math.sqrt(half_lambda) + 60))
    weights = stats.poisson.pmf(j, half_lambda)
    e_log_sq = log_alpha + np.sum(weights * (math.log(2) + special.digamma(0.5 + j)))
    return 0.5 * log_alpha - 0.5 * e_log_sq - 0.5 * (EULER_GAMMA + math.log(2))


def test_kl_approximation_matches_quadrature():
    grid = np.linspace(-6, 8, 57)
    exact = np.array([exact_neg_kl(la) for la in grid])
    approx = -sparse_vd_kl(torch.tensor(grid, dtype=torch.float64)).numpy()
    deviation = np.abs(exact - approx)
    # Molchanov et al. report a maximum error of about 0.007 nats for their fit.
    assert deviation.max() < 1e-2, (grid[deviation.argmax()], deviation.max())


@pytest.mark.parametrize("log_alpha", [-6.0, -2.0, 0.0, 1.5, 4.0, 8.0])
def test_quadrature_agrees_with_the_series(log_alpha):
    assert exact_neg_kl(log_alpha) == pytest.approx(series_neg_kl(log_alpha), abs=1e-9)


def test_quadrature_reference_is_right_where_the_answer_is_known():
    # Small alpha: ε ≈ 1 + √α z, E log|ε| ≈ -α/2, so -KL ≈ ½ log α + α/2 - (γ + log 2)/2.
    la = -12.0
    expected = 0.5 * la + 0.5 * math.exp(la) - 0.5 * (EULER_GAMMA + math.log(2))
    assert exact_neg_kl(la) == pytest.approx(expected, abs=1e-8)
    # Large alpha: -KL → 0.
    assert abs(exact_neg_kl(16.0)) < 1e-3


def test_kl_is_decreasing_in_log_alpha_and_nonnegative():
    log_alpha = torch.linspace(-8, 8, 200, dtype=torch.float64)
    kl = sparse_vd_kl(log_alpha)
    assert (kl.diff() < 0).all()
    assert (kl > 0).all()


def test_registered_kl_uses_the_approximation():
    loc = torch.tensor([1.0, -0.3, 0.02, 0.0], dtype=torch.float64)
    scale = torch.tensor([0.1, 0.3, 0.5, 0.1], dtype=torch.float64)
    kl = kl_divergence(Normal(loc, scale), LogScaleUniform((4,)))
    log_alpha = (2 * scale.log() - torch.log(loc**2 + 1e-8)).clamp(-8, 8)
    assert torch.allclose(kl, sparse_vd_kl(log_alpha), rtol=0, atol=1e-12)


def test_fused_kl_sum_matches_autograd_through_the_formula():
    torch.manual_seed(0)
    theta = (torch.randn(200, dtype=torch.float64) * 0.1).requires_grad_()
    log_sigma2 = (torch.randn(200, dtype=torch.float64) * 6 - 6).requires_grad_()
    with torch.no_grad():
        theta[:3] = torch.tensor([0.0, 1e-6, -1e-5])  # saturated at the upper clamp
        log_sigma2[3:6] = -30.0  # saturated at the lower clamp
    reference = sparse_vd_kl((log_sigma2 - torch.log(theta**2 + 1e-8)).clamp(-8, 8)).sum()
    fused = sparse_vd_kl_sum(theta, log_sigma2)
    assert torch.allclose(fused, reference, rtol=1e-12)
    grads = torch.autograd.grad(fused, (theta, log_sigma2))
    expected = torch.autograd.grad(reference, (theta, log_sigma2))
    for g, e in zip(grads, expected, strict=True):
        assert torch.allclose(g, e, rtol=1e-10, atol=1e-14)
    assert torch.autograd.gradcheck(sparse_vd_kl_sum, (theta, log_sigma2))


def test_log_scale_uniform_is_improper():
    prior = LogScaleUniform()
    with pytest.raises(NotImplementedError, match="improper"):
        prior.sample()
    with pytest.raises(NotImplementedError, match="improper"):
        prior.rsample((3,))
    value = torch.tensor([0.5, -2.0])
    assert torch.allclose(prior.log_prob(value), -value.abs().log())
    assert LogScaleUniform().expand((3, 2)).batch_shape == (3, 2)
