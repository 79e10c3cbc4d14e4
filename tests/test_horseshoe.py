"""log_exp1_scaled against SciPy; the Horseshoe density and sampler against its scale mixture."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from bayessparse.distributions.horseshoe import Horseshoe, log_exp1_scaled

EPS32 = float(np.finfo(np.float32).eps)
K = 1 / math.sqrt(2 * math.pi**3)  # normaliser of the marginal density
# Test grid for log_exp1_scaled: log-spaced over [1e-10, 1e3].
GRID = np.logspace(-10, 3, 2000)


def reference_log_exp1_scaled(x: np.ndarray) -> np.ndarray:
    """log(e^x E1(x)) in float64 from SciPy for x <= 100, the asymptotic series above.

    Below 100 both factors are far from overflow (e^100 ~ 3e43, E1(100) ~ 4e-46), each is
    accurate to about an ulp, and the log of their product adds no cancellation. Above,
    e^x E1(x) ~ (1/x) sum_k (-1)^k k!/x^k, whose error after 20 terms is below the next
    term, 20!/100^20 ~ 2e-22.
    """
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    small = x <= 100
    out[small] = np.log(np.exp(x[small]) * special.exp1(x[small]))
    k = np.arange(20)
    large = x[~small, None]
    series = np.sum((-1.0) ** k * special.factorial(k) / large**k, axis=1)
    out[~small] = np.log(series) - np.log(x[~small])
    return out


def reference_derivative(x: np.ndarray) -> np.ndarray:
    """d/dx log(e^x E1(x)) = 1 - 1/(x e^x E1(x)), in float64 (x <= 1e3).

    For large x this cancels (f' ~ -1/x), losing about log10(x) digits: ~1e-13 at x = 1e3.
    """
    return 1 - 1 / (x * np.exp(reference_log_exp1_scaled(x)))


def mixture_density(w: float, scale: float) -> tuple[float, float]:
    """p(w) = ∫_0^∞ N(w; 0, λ²s²) (2/π)/(1 + λ²) dλ by quadrature, and quad's error estimate.

    With λ = e^t and r = |w|/s, N(w; 0, λ²s²) dλ = φ(r e^{-t})/s dt (φ the standard normal
    density), so p(w) = (2/(π s)) ∫ φ(r e^{-t}) / (1 + e^{2t}) dt: a smooth integrand that
    vanishes doubly exponentially for t < log r and like e^{-2t} for t > 0, with a plateau
    φ(0)/(1 + e^{2t}) in between (the logarithmic pole of p at 0 is the plateau's length,
    |log r|). Below t = log r - 5, φ(r e^{-t}) < φ(148) = 0 in float64.
    """
    r = abs(w) / scale

    def integrand(t: float) -> float:
        # 1/(1 + e^{2t}), written so that quad's far-out points do not overflow math.exp.
        logistic = (
            1 / (1 + math.exp(2 * t)) if t < 0 else math.exp(-2 * t) / (1 + math.exp(-2 * t))
        )
        return math.exp(-0.5 * (r * math.exp(-t)) ** 2) / math.sqrt(2 * math.pi) * logistic

    log_r = math.log(r)
    knots = [log_r - 5, log_r, max(log_r, 0.0)]
    total, error = 0.0, 0.0
    for lo, hi in [(knots[0], knots[1]), (knots[1], knots[2]), (knots[2], math.inf)]:
        if hi > lo:
            value, err = integrate.quad(integrand, lo, hi, epsabs=0, epsrel=1e-13, limit=200)
            total, error = total + value, error + err
    return 2 / (math.pi * scale) * total, 2 / (math.pi * scale) * error


def abs_cdf(a: np.ndarray) -> np.ndarray:
    """P(|w|/s <= a) for the horseshoe, by the trapezoid rule over the scale mixture.

    P(|w| <= a s | λ) = erf(a/(√2 λ)), and with λ = e^t the half-Cauchy measure is
    (2/π) dλ/(1 + λ²) = sech(t)/π dt, so the cdf is (1/π) ∫ erf(a e^{-t}/√2) sech(t) dt.
    The integrand is analytic and bounded in the strip |Im t| < π/4 (where the erf argument
    stays within 45° of the real axis), so the trapezoid rule with step h converges like
    exp(-2π (π/4)/h) = exp(-49) for h = 0.1; truncating to |t| <= 45 drops mass
    (4/π) e^{-45} ~ 4e-20.
    """
    h = 0.1
    t = np.arange(-45, 45 + h / 2, h)
    weights = h / (math.pi * np.cosh(t))
    a = np.asarray(a, dtype=np.float64)
    out = np.empty_like(a)
    for start in range(0, a.size, 2000):  # chunks keep the (chunk, nodes) array small
        chunk = a[start : start + 2000]
        out[start : start + 2000] = (
            special.erf(chunk[:, None] * np.exp(-t) / math.sqrt(2)) @ weights
        )
    return out


# --- log_exp1_scaled ---------------------------------------------------------------------


def test_reference_agrees_with_mpmath():
    mpmath = pytest.importorskip("mpmath")  # a torch dependency (through sympy)
    mpmath.mp.dps = 30
    x = np.logspace(-10, 3, 53)
    exact = np.array([float(mpmath.log(mpmath.exp(v) * mpmath.e1(v))) for v in x])
    np.testing.assert_allclose(reference_log_exp1_scaled(x), exact, rtol=1e-13, atol=0)
    # The two halves of the reference agree where both apply.
    mid = np.linspace(100, 600, 11)
    scipy_side = np.log(np.exp(mid) * special.exp1(mid))
    np.testing.assert_allclose(reference_log_exp1_scaled(mid), scipy_side, rtol=1e-13)


def test_log_exp1_scaled_float64_matches_scipy():
    value = log_exp1_scaled(torch.tensor(GRID, dtype=torch.float64))
    assert value.dtype == torch.float64
    # The result crosses 0 near x = 0.4348 (e^x E1(x) = 1), where a relative tolerance is
    # hardest to meet; the nearest grid point has |f| = 6.4e-4. The measured maximum
    # relative error is 8e-14 there (3.6e-14 against mpmath) and 8e-15 elsewhere.
    np.testing.assert_allclose(value.numpy(), reference_log_exp1_scaled(GRID), rtol=1e-10, atol=0)


def test_log_exp1_scaled_float32_matches_scipy():
    x32 = torch.tensor(GRID, dtype=torch.float32)
    value = log_exp1_scaled(x32)
    assert value.dtype == torch.float32
    # Compare at the float32 inputs themselves, so only the evaluation's rounding counts.
    expected = reference_log_exp1_scaled(x32.double().numpy())
    # The evaluation forms e^x E1(x) (or its factors) to within a few ulps ε, relative, and
    # the log turns that into an absolute error of a few ε in f; the final rounding adds
    # ε|f|. So |Δf| <= c ε (1 + |f|): a relative tolerance of c ε times the condition number
    # 1 + 1/|f| of f = log(y) with respect to relative changes of y. c = 16 covers the
    # series' cancellation at the split x = 1 (about 9, see _PLANS); measured c = 1.5.
    tol = 16 * EPS32
    np.testing.assert_allclose(value.double().numpy(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_log_exp1_scaled_gradient_matches_closed_form(dtype):
    x = torch.tensor(GRID, dtype=dtype).requires_grad_()
    (grad,) = torch.autograd.grad(log_exp1_scaled(x).sum(), x)
    expected = reference_derivative(x.detach().double().numpy())
    # float64: the reference itself is good to ~1e-13 (see reference_derivative).
    # float32: f' = 1 - 1/(x g) with x g from exp(f), whose relative error is the absolute
    # error of f, c ε (1 + |f|) <= 4.2 c ε on the grid (|f| <= 3.2), amplified by
    # 1/(x g |f'|) <= 2.5 on the series branch; the continued-fraction branch is a few ulps.
    rtol = 1e-10 if dtype == torch.float64 else 32 * EPS32
    np.testing.assert_allclose(grad.double().numpy(), expected, rtol=rtol, atol=0)


def test_log_exp1_scaled_second_derivative():
    # Points on both branches of both dtypes' splits (1 and 2), and far into each.
    x = torch.tensor(np.logspace(-6, 4, 101), dtype=torch.float64).requires_grad_()
    (grad,) = torch.autograd.grad(log_exp1_scaled(x).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), x)
    x0 = x.detach().numpy()
    moderate = x0 <= 100
    # Central differences of the (tested) reference first derivative with relative step h:
    # truncation error ~h² and rounding ~1e-14/h, relative, both below 1e-9 for h = 1e-5.
    h = 1e-5
    xm = x0[moderate]
    numeric = (reference_derivative(xm * (1 + h)) - reference_derivative(xm * (1 - h))) / (
        2 * h * xm
    )
    np.testing.assert_allclose(second.numpy()[moderate], numeric, rtol=1e-7)
    # Above 100 the reference f' has lost digits to cancellation; use the asymptotic series
    # instead. With S = x e^x E1(x) ~ sum_k (-1)^k k!/x^k, f'' = (g + xg - 1)/(xg)² equals
    # sum_{j>=2} (-1)^j (j-1)(j-1)!/x^j / S², whose terms need no cancellation.
    xl = x0[~moderate, None]
    k = np.arange(20)
    s = np.sum((-1.0) ** k * special.factorial(k) / xl**k, axis=1)
    j = np.arange(2, 22)
    numerator = np.sum((-1.0) ** j * (j - 1) * special.factorial(j - 1) / xl**j, axis=1)
    np.testing.assert_allclose(second.numpy()[~moderate], numerator / s**2, rtol=1e-12)
    # The double backward's plumbing (grad_output dependence), at points away from 0.
    points = torch.tensor([0.05, 0.5, 1.5, 2.5, 30.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(log_exp1_scaled, (points,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_log_exp1_scaled_limits(dtype):
    x = torch.tensor([0.0, 1e10, 1e30, math.inf, -1.0, math.nan], dtype=dtype, requires_grad=True)
    value = log_exp1_scaled(x)
    (grad,) = torch.autograd.grad(value.sum(), x)
    # E1(0) = ∞, and the density of the horseshoe has its pole there.
    assert value[0].item() == math.inf
    assert grad[0].item() == -math.inf
    # Large x: e^x E1(x) = (1/x)(1 - 1/x + ...), so f = -log x - 1/x + O(x⁻²).
    big = x.detach()[1:3].double()
    torch.testing.assert_close(value[1:3].double(), -big.log() - 1 / big, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad[1:3].double(), -1 / big, rtol=1e-6, atol=0)
    assert value[3].item() == -math.inf
    # E1 of a negative argument is not real (and the horseshoe never asks for it).
    assert value[4:].isnan().all()


def test_log_exp1_scaled_dtypes():
    x = torch.tensor([0.25, 1.5, 40.0])
    expected = log_exp1_scaled(x)
    half = log_exp1_scaled(x.half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), expected, rtol=1e-3, atol=0)
    assert log_exp1_scaled(torch.tensor([1, 2])).dtype == torch.get_default_dtype()
    with pytest.raises(TypeError):
        log_exp1_scaled(torch.tensor([1 + 1j]))


# --- Horseshoe density ------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.01, 1.0, 7.5])
def test_density_matches_scale_mixture(scale):
    # |w|/s from 1e-6 (deep in the pole) to 1e4 (the 1/w² tail), x from 5e-13 to 5e7.
    ratios = [1e-6, 1e-3, 0.1, 0.5, 1.0, 2.0, 5.0, 30.0, 1e4]
    w = torch.tensor([scale * r for r in ratios], dtype=torch.float64)
    density = Horseshoe(torch.tensor(scale, dtype=torch.float64)).log_prob(w).exp().numpy()
    for i, wi in enumerate(w.tolist()):
        expected, error = mixture_density(wi, scale)
        assert error < 1e-11 * expected
        assert density[i] == pytest.approx(expected, rel=1e-8), wi
    # The density is even.
    torch.testing.assert_close(Horseshoe(scale).log_prob(-w), Horseshoe(scale).log_prob(w))


def test_density_within_carvalho_bounds():
    # K/2 log(1 + 4/θ²) < p(θ) < K log(1 + 2/θ²) (Carvalho, Polson, Scott 2010, Theorem 1).
    theta = torch.tensor(np.logspace(-4, 4, 81), dtype=torch.float64)
    density = Horseshoe().log_prob(theta).exp()
    assert (density > K / 2 * torch.log1p(4 / theta**2)).all()
    assert (density < K * torch.log1p(2 / theta**2)).all()


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_density_integrates_to_one(scale):
    prior = Horseshoe(torch.tensor(scale, dtype=torch.float64))

    # ∫ p = 2 ∫_0^∞ p(w) dw. With w = s e^t the log pole at 0 becomes the integrable
    # -t e^t as t -> -∞ and the 1/w² tail becomes e^{-t}: smooth on [-60, 60]. The mass
    # dropped outside is about 2K 61 e^{-60} + 2K e^{-60} ~ 2e-25.
    def integrand(t: float) -> float:
        w = scale * math.exp(t)
        return math.exp(prior.log_prob(torch.tensor(w, dtype=torch.float64)).item()) * w

    value, error = integrate.quad(integrand, -60, 60, points=[0.0], epsabs=0, epsrel=1e-12)
    assert error < 1e-12
    # Tolerance: quad's error estimate (a conservative bound on the integration error),
    # doubled with the integral, plus a margin for rounding in the float64 sum.
    assert 2 * value == pytest.approx(1.0, abs=2 * error + 1e-13)


def test_log_prob_at_the_pole_and_shapes():
    prior = Horseshoe(torch.tensor([0.5, 2.0]))
    assert prior.batch_shape == (2,) and prior.event_shape == ()
    assert (prior.log_prob(torch.zeros(2)) == math.inf).all()
    assert prior.log_prob(torch.ones(3, 1)).shape == (3, 2)
    expanded = Horseshoe(torch.tensor(2.0)).expand((4, 3))
    assert expanded.batch_shape == (4, 3)
    torch.testing.assert_close(
        expanded.log_prob(torch.full((4, 3), 0.7)),
        Horseshoe(2.0).log_prob(torch.tensor(0.7)).expand(4, 3),
    )
    assert prior.to_event(1).log_prob(torch.ones(2)).shape == ()
    assert Horseshoe(torch.tensor(1.0, dtype=torch.float64)).log_prob(torch.tensor(1.0)).dtype == (
        torch.float64
    )
    assert prior.mean.isnan().all()
    assert (prior.variance == math.inf).all()


def test_log_prob_is_differentiable():
    scale = torch.tensor([0.5, 3.0], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.2, -4.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, v: Horseshoe(s).log_prob(v), (scale, w))


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan])
def test_invalid_scale_raises(bad):
    with pytest.raises(ValueError):
        Horseshoe(bad)
    with pytest.raises(ValueError):
        Horseshoe(torch.tensor([1.0, bad]))


def test_invalid_value_raises():
    with pytest.raises(ValueError):
        Horseshoe().log_prob(torch.tensor(math.nan))


# --- Horseshoe sampler ------------------------------------------------------------------


def test_rsample_shape_and_gradient():
    scale = torch.tensor([0.5, 2.0, 3.0], requires_grad=True)
    prior = Horseshoe(scale)
    w = prior.rsample((5,))
    assert w.shape == (5, 3)
    assert w.requires_grad
    (grad,) = torch.autograd.grad(w.sum(), scale)
    # w = s λ ε, so dw/ds = w/s.
    torch.testing.assert_close(grad, (w / scale).sum(0).detach())
    assert not prior.sample((2,)).requires_grad
    assert Horseshoe(torch.tensor(1.0, dtype=torch.float64)).rsample((2,)).dtype == torch.float64


def test_abs_cdf_matches_the_integral_of_the_density():
    # The sampler test's cdf, checked against quadrature of log_prob itself.
    prior = Horseshoe(torch.tensor(1.0, dtype=torch.float64))

    def integrand(t: float) -> float:  # 2 p(w) dw with w = e^t, as in the normalisation test
        w = math.exp(t)
        return 2 * math.exp(prior.log_prob(torch.tensor(w, dtype=torch.float64)).item()) * w

    for a in [1e-3, 0.3, 1.0, 10.0]:
        value, error = integrate.quad(integrand, -60, math.log(a), epsabs=0, epsrel=1e-12)
        assert abs_cdf(np.array([a]))[0] == pytest.approx(value, abs=10 * error + 1e-13)


@pytest.mark.parametrize("scale", [1.0, 0.05])
def test_rsample_matches_the_cdf(scale):
    n = 20_000
    w = Horseshoe(torch.tensor(scale, dtype=torch.float64)).sample((n,)).numpy()
    a = np.abs(w) / scale
    # The draws are seeded (conftest), so this is deterministic; the threshold is the chance
    # that a correct sampler fails under another seed: 2e-5. The KS critical distance at
    # that level and n = 2e4 is sqrt(log(2/2e-5)/(2n)) = 0.017, so a cdf error of 0.02 is
    # caught; that is about a 10% error in the scale (the density of log|w| peaks near 0.25).
    assert stats.kstest(a, abs_cdf).pvalue > 2e-5
    # ... which the test does detect: the same draws mis-scaled by 15% are rejected.
    assert stats.kstest(1.15 * a, abs_cdf).pvalue < 2e-5
    # The signs are symmetric: a binomial test, same threshold.
    assert stats.binomtest(int((w > 0).sum()), n).pvalue > 2e-5
