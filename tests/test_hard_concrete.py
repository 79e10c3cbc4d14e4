"""HardConcrete: atoms, density, cdf/icdf, moments, reparameterised samples and shapes.

Monte Carlo tests share one family failure rate, split by Bonferroni over every comparison
in this file (``N_COMPARISONS``). Binomial and mean comparisons are two-sided normal
approximations; KS comparisons use the exact/asymptotic p-value directly.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch
from scipy import integrate, stats

from bayessparse.distributions.hard_concrete import HardConcrete

F64 = torch.float64
PAPER: dict[str, Any] = {"temperature": 2.0 / 3.0, "low": -0.1, "high": 1.1}

# --- Monte Carlo budget -----------------------------------------------------------------------
FAMILY_FAILURE_RATE = 2e-5
# (log_alpha, temperature) at the paper's stretch; each case gives two atom comparisons and one
# KS comparison. Atom masses range from 0.01 to 0.88, so n p (1 - p) > 1000 for every atom.
SAMPLER_CASES = [(la, t) for la in (-3.0, 0.0, 2.0) for t in (1.0 / 3.0, 2.0 / 3.0)]
N_SAMPLER = 150_000
# prob_nonzero by Monte Carlo on a batch, at a non-default stretch and temperature.
NONZERO_STRETCH: dict[str, Any] = {"temperature": 0.5, "low": -0.3, "high": 1.05}
NONZERO_LOG_ALPHAS = (-2.0, 0.0, 2.0)
N_NONZERO = 200_000
# (log_alpha, temperature) for the mean and for the pathwise gradient of the mean.
MEAN_CASES = [(-1.0, 2.0 / 3.0), (0.5, 1.0 / 3.0), (2.0, 1.5)]
GRADIENT_CASES = [(0.0, 2.0 / 3.0), (-1.5, 0.5)]
N_MEAN = 200_000

N_COMPARISONS = (
    3 * len(SAMPLER_CASES)  # P(Z=0), P(Z=1), KS on the interior
    + len(NONZERO_LOG_ALPHAS)
    + len(MEAN_CASES)
    + len(GRADIENT_CASES)
)
ALPHA_PER_COMPARISON = FAMILY_FAILURE_RATE / N_COMPARISONS
Z_TWO_SIDED = float(stats.norm.isf(ALPHA_PER_COMPARISON / 2))  # ≈ 4.94 for 26 comparisons
# The normal approximation to a binomial tail at ~5 sd is off by a relative ~skew·(z²-1)/6; with
# n p (1 - p) ≥ 1000 the skew is ≤ 0.03, so the realised rate is within ~15% of the nominal one.
MIN_BINOMIAL_VARIANCE = 1000.0

# Deterministic checks: (log_alpha, temperature, low, high), covering the paper's setting, cold
# and hot temperatures, a different stretch and gates that are almost surely closed or open.
PARAMS = [
    (-3.0, 2.0 / 3.0, -0.1, 1.1),
    (0.0, 2.0 / 3.0, -0.1, 1.1),
    (2.5, 2.0 / 3.0, -0.1, 1.1),
    (1.0, 0.2, -0.1, 1.1),
    (-1.0, 3.0, -0.1, 1.1),
    (0.5, 1.0, -0.3, 1.05),
    (6.0, 2.0 / 3.0, -0.1, 1.1),
    (-6.0, 0.5, -0.02, 1.4),
]


def make(log_alpha: float, temperature: float, low: float, high: float) -> HardConcrete:
    return HardConcrete(torch.tensor(log_alpha, dtype=F64), temperature, low, high)


def sigmoid(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * x))  # no overflow for large |x|


def paper_atoms(
    log_alpha: float, temperature: float, low: float, high: float
) -> tuple[float, float]:
    """P(Z=0), P(Z=1) from the binary concrete cdf σ(β logit(s) - log α) at the clip points.

    Z = 0 ⇔ s ≤ -γ/(ζ-γ) and Z = 1 ⇔ s ≥ (1-γ)/(ζ-γ), where logit(s) = log(-γ/ζ), log((1-γ)/(ζ-1)).
    """
    p_zero = sigmoid(temperature * math.log(-low / high) - log_alpha)
    p_one = 1.0 - sigmoid(temperature * math.log((1 - low) / (high - 1)) - log_alpha)
    return p_zero, p_one


def paper_density(z: np.ndarray | float, log_alpha, temperature, low, high) -> np.ndarray:
    """Stretched binary concrete density, written as in Maddison et al. (no log-space tricks)."""
    s = (np.asarray(z, dtype=np.float64) - low) / (high - low)
    alpha, b = math.exp(log_alpha), temperature
    binary_concrete = (
        b * alpha * s ** (-b - 1) * (1 - s) ** (-b - 1) / (alpha * s**-b + (1 - s) ** -b) ** 2
    )
    return binary_concrete / (high - low)


def quad(f, a: float, b: float) -> float:
    value, _ = integrate.quad(f, a, b, epsabs=1e-13, epsrel=1e-12, limit=200)
    return value


def reference_moments(log_alpha, temperature, low, high) -> tuple[float, float]:
    """E[Z] and Var[Z] from the density and the atom at 1, by adaptive quadrature."""
    _, p_one = paper_atoms(log_alpha, temperature, low, high)
    args = (log_alpha, temperature, low, high)
    first = p_one + quad(lambda z: z * float(paper_density(z, *args)), 0.0, 1.0)
    second = p_one + quad(lambda z: z * z * float(paper_density(z, *args)), 0.0, 1.0)
    return first, second - first**2


def reference_mean_gradient(log_alpha, temperature, low, high) -> float:
    """d E[Z] / d log α = ∫_0^1 ∂/∂log α σ(log α - β t(z)) dz, with E[Z] = ∫_0^1 P(Z > z) dz."""

    def integrand(z: float) -> float:
        x = log_alpha - temperature * math.log((z - low) / (high - z))
        return sigmoid(x) * sigmoid(-x)

    return quad(integrand, 0.0, 1.0)


def one_minus_ulp() -> torch.Tensor:
    return torch.tensor(np.nextafter(1.0, 0.0), dtype=F64)


# --- Sampler against the distribution (Monte Carlo) -------------------------------------------


@pytest.mark.parametrize(("log_alpha", "temperature"), SAMPLER_CASES)
def test_atom_frequencies_match_the_atom_masses(log_alpha, temperature):
    d = HardConcrete(torch.tensor(log_alpha, dtype=F64), temperature)
    z = d.sample((N_SAMPLER,))
    p_zero = d.cdf(torch.tensor(0.0, dtype=F64)).item()
    p_one = 1.0 - d.cdf(one_minus_ulp()).item()  # the jump of the cdf at 1
    for p, hits in ((p_zero, z == 0), (p_one, z == 1)):
        assert N_SAMPLER * p * (1 - p) > MIN_BINOMIAL_VARIANCE, p  # normal approximation holds
        tolerance = Z_TWO_SIDED * math.sqrt(p * (1 - p) / N_SAMPLER)
        frequency = hits.double().mean().item()
        assert abs(frequency - p) < tolerance, (frequency, p, tolerance)


@pytest.mark.parametrize(("log_alpha", "temperature"), SAMPLER_CASES)
def test_interior_samples_follow_the_conditional_cdf(log_alpha, temperature):
    d = HardConcrete(torch.tensor(log_alpha, dtype=F64), temperature)
    z = d.sample((N_SAMPLER,))
    interior = z[(z > 0) & (z < 1)].numpy()
    p_zero, p_one = paper_atoms(log_alpha, temperature, PAPER["low"], PAPER["high"])

    def conditional_cdf(x: np.ndarray) -> np.ndarray:
        # Given 0 < Z < 1 the law is continuous, so KS applies: F(z | interior).
        return (d.cdf(torch.from_numpy(x)).numpy() - p_zero) / (1 - p_zero - p_one)

    assert interior.size > 10_000
    result = stats.kstest(interior, conditional_cdf)
    assert result.pvalue > ALPHA_PER_COMPARISON, result


def test_prob_nonzero_matches_monte_carlo_on_a_batch():
    d = HardConcrete(torch.tensor(NONZERO_LOG_ALPHAS, dtype=F64), **NONZERO_STRETCH)
    frequency = (d.sample((N_NONZERO,)) != 0).double().mean(0)
    for p, f in zip(d.prob_nonzero().tolist(), frequency.tolist(), strict=True):
        assert N_NONZERO * p * (1 - p) > MIN_BINOMIAL_VARIANCE, p
        assert abs(f - p) < Z_TWO_SIDED * math.sqrt(p * (1 - p) / N_NONZERO), (f, p)


@pytest.mark.parametrize(("log_alpha", "temperature"), MEAN_CASES)
def test_sample_mean_matches_the_mean(log_alpha, temperature):
    d = HardConcrete(torch.tensor(log_alpha, dtype=F64), temperature)
    mean, variance = reference_moments(log_alpha, temperature, PAPER["low"], PAPER["high"])
    assert d.mean.item() == pytest.approx(mean, abs=1e-12)
    sample_mean = d.sample((N_MEAN,)).mean().item()
    # CLT on a bounded variable, with the exact variance from quadrature.
    assert abs(sample_mean - mean) < Z_TWO_SIDED * math.sqrt(variance / N_MEAN)


@pytest.mark.parametrize(("log_alpha", "temperature"), GRADIENT_CASES)
def test_pathwise_gradient_is_unbiased_for_the_gradient_of_the_mean(log_alpha, temperature):
    # One parameter per draw, so each leaf's gradient is that draw's ∂z/∂log α.
    leaf = torch.full((N_MEAN,), log_alpha, dtype=F64, requires_grad=True)
    HardConcrete(leaf, temperature).rsample().sum().backward()
    assert leaf.grad is not None
    grads = leaf.grad
    expected = reference_mean_gradient(log_alpha, temperature, PAPER["low"], PAPER["high"])
    # CLT with the sample sd: at n = 2e5 its relative error is ~0.2%, negligible against z.
    tolerance = Z_TWO_SIDED * grads.std().item() / math.sqrt(N_MEAN)
    assert abs(grads.mean().item() - expected) < tolerance, (grads.mean().item(), expected)


# --- Density, cdf and icdf (deterministic) ------------------------------------------------------


@pytest.mark.parametrize("params", PARAMS)
def test_log_prob_at_the_atoms_is_the_atom_mass(params):
    d = make(*params)
    p_zero, p_one = paper_atoms(*params)
    zero, one = torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64)
    assert d.log_prob(zero).exp().item() == pytest.approx(p_zero, rel=1e-12)
    assert d.log_prob(one).exp().item() == pytest.approx(p_one, rel=1e-12)
    assert d.cdf(zero).item() == pytest.approx(p_zero, rel=1e-12)
    # The cdf jumps by P(Z=1) at 1; just below 1 it is 1 - P(Z=1) up to density × 1 ulp.
    assert 1.0 - d.cdf(one_minus_ulp()).item() == pytest.approx(p_one, rel=1e-9, abs=1e-15)
    assert d.cdf(one).item() == 1.0


@pytest.mark.parametrize(
    "params", [*PARAMS, (30.0, 2.0 / 3.0, -0.1, 1.1), (-30.0, 1.0, -0.1, 1.1)]
)
def test_log_prob_inside_matches_the_paper_density(params):
    d = make(*params)
    z = np.linspace(0.0, 1.0, 203)[1:-1]
    log_prob = d.log_prob(torch.from_numpy(z))
    assert torch.isfinite(log_prob).all()  # stable even where α s^-β dwarfs (1 - s)^-β
    np.testing.assert_allclose(log_prob.exp().numpy(), paper_density(z, *params), rtol=1e-11)


@pytest.mark.parametrize("params", PARAMS)
def test_density_and_atoms_integrate_to_one(params):
    d = make(*params)
    p_zero, p_one = paper_atoms(*params)

    def density(z: float) -> float:
        return math.exp(d.log_prob(torch.tensor(z, dtype=F64)).item())

    assert quad(density, 0.0, 1.0) + p_zero + p_one == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize("params", PARAMS)
def test_cdf_derivative_is_the_density(params):
    d = make(*params)
    z = torch.linspace(0.0, 1.0, 203, dtype=F64)[1:-1].requires_grad_(True)
    (derivative,) = torch.autograd.grad(d.cdf(z).sum(), z)
    # Autograd of the closed-form cdf vs the log-space density: two codes, rounding apart.
    torch.testing.assert_close(derivative, d.log_prob(z).exp().detach(), rtol=1e-10, atol=0.0)


@pytest.mark.parametrize("params", PARAMS)
def test_cdf_is_monotone_from_the_zero_atom_to_one(params):
    d = make(*params)
    z = torch.linspace(0.0, 1.0, 1001, dtype=F64)
    cdf = d.cdf(z)
    assert (cdf.diff() >= 0).all()
    assert cdf[0].item() == pytest.approx(paper_atoms(*params)[0], rel=1e-12)
    assert cdf[-1].item() == 1.0


def test_cdf_and_log_prob_outside_the_support():
    d = HardConcrete(torch.tensor(0.3, dtype=F64), validate_args=False)
    outside = torch.tensor([-0.5, -1e-12, 1 + 1e-12, 2.0], dtype=F64)
    assert d.cdf(outside).tolist() == [0.0, 0.0, 1.0, 1.0]
    assert torch.isneginf(d.log_prob(outside)).all()
    assert torch.isnan(d.log_prob(torch.tensor(math.nan, dtype=F64)))
    validated = HardConcrete(torch.tensor(0.3, dtype=F64))
    for method in (validated.cdf, validated.log_prob):
        with pytest.raises(ValueError, match="support"):
            method(outside)


def test_log_prob_gradient_is_finite_at_atoms_and_inside():
    log_alpha = torch.tensor(0.7, dtype=F64, requires_grad=True)
    value = torch.tensor([0.0, 1e-9, 0.4, 1 - 1e-9, 1.0], dtype=F64)
    (grad,) = torch.autograd.grad(HardConcrete(log_alpha).log_prob(value).sum(), log_alpha)
    assert torch.isfinite(grad)


@pytest.mark.parametrize("params", PARAMS)
def test_icdf_inverts_the_cdf_on_the_continuous_range(params):
    d = make(*params)
    p_zero, p_one = paper_atoms(*params)
    p = torch.linspace(p_zero, 1 - p_one, 403, dtype=F64)[1:-1]
    z = d.icdf(p)
    assert ((z > 0) & (z < 1)).all()
    torch.testing.assert_close(d.cdf(z), p, rtol=0.0, atol=1e-13)
    inside = torch.linspace(0.0, 1.0, 203, dtype=F64)[1:-1]
    torch.testing.assert_close(d.icdf(d.cdf(inside)), inside, rtol=0.0, atol=1e-10)


@pytest.mark.parametrize("params", PARAMS)
def test_icdf_returns_the_atoms(params):
    d = make(*params)
    p_zero, p_one = paper_atoms(*params)
    assert (d.icdf(torch.linspace(0.0, p_zero, 50, dtype=F64)[:-1]) == 0).all()
    assert (d.icdf(torch.linspace(1 - p_one, 1.0, 50, dtype=F64)[1:]) == 1).all()
    quantiles = d.icdf(torch.linspace(0.0, 1.0, 1001, dtype=F64))
    assert (quantiles.diff() >= 0).all()
    assert quantiles[0].item() == 0.0
    assert quantiles[-1].item() == 1.0


def test_icdf_rejects_probabilities_outside_the_unit_interval():
    with pytest.raises(ValueError, match=re.escape("got tensor([1.5000")):
        HardConcrete(torch.tensor(0.0)).icdf(torch.tensor([1.5]))


# --- prob_nonzero, deterministic_gate and moments -------------------------------------------


@pytest.mark.parametrize("params", PARAMS)
def test_prob_nonzero_closed_form(params):
    log_alpha, temperature, low, high = params
    d = make(*params)
    expected = sigmoid(log_alpha - temperature * math.log(-low / high))
    assert d.prob_nonzero().item() == pytest.approx(expected, rel=1e-12)
    assert d.prob_nonzero().item() == pytest.approx(1 - d.cdf(torch.tensor(0.0, dtype=F64)).item())


@pytest.mark.parametrize(
    "stretch", [PAPER, {"temperature": 0.25, "low": -0.1, "high": 1.1}, NONZERO_STRETCH]
)
def test_deterministic_gate_opens_where_prob_nonzero_passes_the_keep_threshold(stretch):
    temperature, low, high = stretch["temperature"], stretch["low"], stretch["high"]
    open_above = math.log(-low / high)  # σ(log α)(ζ-γ) + γ > 0 ⇔ log α > logit(-γ/(ζ-γ))
    closed_below = math.log((1 - low) / (high - 1))  # ... ≥ 1 ⇔ log α ≥ logit((1-γ)/(ζ-γ))
    keep_threshold = sigmoid((1 - temperature) * open_above)
    if stretch is PAPER:
        assert keep_threshold == pytest.approx(0.31018, abs=5e-6)
    at_threshold = HardConcrete(torch.tensor(open_above, dtype=F64), **stretch)
    assert at_threshold.prob_nonzero().item() == pytest.approx(keep_threshold, rel=1e-13)

    grid = torch.linspace(-8.0, 8.0, 1601, dtype=F64)
    assert (grid - open_above).abs().min() > 1e-6  # no ties that rounding could flip
    assert (grid - closed_below).abs().min() > 1e-6
    d = HardConcrete(grid, **stretch)
    gate = d.deterministic_gate()
    assert torch.equal(gate > 0, grid > open_above)
    assert torch.equal(gate > 0, d.prob_nonzero() > keep_threshold)
    assert torch.equal(gate == 1, grid > closed_below)
    expected = (torch.sigmoid(grid) * (high - low) + low).clamp(0, 1)
    torch.testing.assert_close(gate, expected, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("params", [*PARAMS, (0.0, 5.0, -0.1, 1.1), (3.0, 10.0, -0.1, 1.1)])
def test_mean_and_variance_match_adaptive_quadrature(params):
    d = make(*params)
    mean, variance = reference_moments(*params)
    # The fixed rule errs by < 1e-12 for β (t1 - t0) ≲ 100 (here ≤ 48); quad is asked for 1e-13.
    assert d.mean.item() == pytest.approx(mean, abs=1e-12)
    assert d.variance.item() == pytest.approx(variance, abs=1e-12)
    log_alpha = torch.tensor(params[0], dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(HardConcrete(log_alpha, *params[1:]).mean, log_alpha)
    assert grad.item() == pytest.approx(reference_mean_gradient(*params), abs=1e-12)


# --- Reparameterisation, shapes, expand, arguments --------------------------------------------


def test_rsample_gradient_is_the_analytic_derivative_inside_and_zero_at_the_atoms():
    low, high, temperature = PAPER["low"], PAPER["high"], PAPER["temperature"]
    log_alpha = torch.linspace(-3.0, 3.0, 2001, dtype=F64, requires_grad=True)
    z = HardConcrete(log_alpha).rsample()
    z.sum().backward()
    assert log_alpha.grad is not None
    grad = log_alpha.grad
    inside = (z > 0) & (z < 1)
    assert inside.any() and (~inside).any()
    assert torch.isfinite(grad).all()
    assert (grad[inside] > 0).all()
    assert (grad[~inside] == 0).all()  # the clamp stops the gradient at the atoms
    # z = γ + (ζ-γ) σ((L + log α)/β)  ⇒  ∂z/∂log α = (ζ-γ) s (1-s) / β.
    s = ((z.detach() - low) / (high - low))[inside]
    torch.testing.assert_close(
        grad[inside], (high - low) * s * (1 - s) / temperature, rtol=1e-9, atol=0.0
    )


def test_sample_is_detached_and_float32_stays_in_range():
    d = HardConcrete(torch.zeros(100_000, requires_grad=True))
    z = d.sample()
    assert not z.requires_grad
    assert z.dtype == torch.float32
    assert ((z >= 0) & (z <= 1)).all()
    assert torch.isfinite(d.log_prob(z)).all()


@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 3)])
@pytest.mark.parametrize("sample_shape", [(), (4,), (5, 1)])
def test_shapes(batch_shape, sample_shape):
    d = HardConcrete(torch.randn(batch_shape, dtype=F64), temperature=0.5)
    assert d.batch_shape == batch_shape
    assert d.event_shape == ()
    z = d.rsample(sample_shape)
    assert z.shape == sample_shape + batch_shape
    for value in (d.log_prob(z), d.cdf(z), d.icdf(torch.rand(z.shape, dtype=F64))):
        assert value.shape == sample_shape + batch_shape
    for stat in (d.mean, d.variance, d.prob_nonzero(), d.deterministic_gate()):
        assert stat.shape == batch_shape


def test_python_float_log_alpha():
    d = HardConcrete(0.5)
    assert d.batch_shape == ()
    assert d.log_alpha.dtype == torch.get_default_dtype()


def test_expand():
    d = HardConcrete(torch.tensor([-1.0, 0.0, 2.0], dtype=F64), 0.5, -0.2, 1.3)
    e = d.expand((4, 3))
    assert type(e) is HardConcrete
    assert e.batch_shape == (4, 3)
    assert (e.temperature, e.low, e.high) == (0.5, -0.2, 1.3)
    assert e._validate_args == d._validate_args
    assert e.rsample((2,)).shape == (2, 4, 3)
    value = torch.rand(4, 3, dtype=F64)
    torch.testing.assert_close(e.log_prob(value), d.log_prob(value))
    torch.testing.assert_close(e.mean, d.mean.expand(4, 3))
    assert type(d.expand_by((5,))) is HardConcrete
    assert d.expand_by((5,)).batch_shape == (5, 3)


BAD_ARGUMENTS = [
    ("temperature", 0.0),
    ("temperature", -1.0),
    ("temperature", math.inf),
    ("temperature", math.nan),
    ("low", 0.0),
    ("low", 0.05),
    ("low", -math.inf),
    ("high", 1.0),
    ("high", 0.9),
    ("high", math.nan),
]


@pytest.mark.parametrize(("name", "value"), BAD_ARGUMENTS)
def test_bad_parameters_raise_naming_the_value(name, value):
    with pytest.raises(ValueError, match=rf"Expected {name} .*, got {re.escape(repr(value))}\."):
        HardConcrete(torch.tensor(0.0), **{name: value})


def test_nan_log_alpha_is_rejected_under_validation():
    with pytest.raises(ValueError, match="log_alpha"):
        HardConcrete(torch.tensor([0.0, math.nan]))


def test_works_as_a_pyro_sample_site():
    def model() -> torch.Tensor:
        with pyro.plate("gates", 5):
            return pyro.sample("z", HardConcrete(torch.zeros(5, dtype=F64)))

    trace = poutine.trace(model).get_trace()
    trace.compute_log_prob()
    value = trace.nodes["z"]["value"]
    assert isinstance(value, torch.Tensor)
    assert value.shape == (5,)
    assert torch.isfinite(trace.nodes["z"]["log_prob_sum"])
    assert HardConcrete(torch.zeros(2, 5)).to_event(1).log_prob(torch.rand(2, 5)).shape == (2,)
