"""The compiled per-weight kernels (bayessparse.fusion) against their eager maths."""

from __future__ import annotations

import copy

import pytest
import torch

from bayessparse import fusion
from bayessparse.distributions.kl import sparse_vd_kl_sum
from bayessparse.nn import VariationalLinear


def _kl_and_grads(theta: torch.Tensor, log_sigma2: torch.Tensor):
    theta, log_sigma2 = theta.clone().requires_grad_(), log_sigma2.clone().requires_grad_()
    kl = sparse_vd_kl_sum(theta, log_sigma2)
    return (kl, *torch.autograd.grad(kl, (theta, log_sigma2)))


def _weights(numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    theta = torch.randn(numel // 100, 100, generator=generator) * 0.1
    log_sigma2 = torch.randn(numel // 100, 100, generator=generator) * 6 - 6
    theta[0, :3] = torch.tensor([0.0, 1e-6, -1e-5])  # log alpha at the upper clamp
    log_sigma2[1, :3] = -30.0  # at the lower clamp
    return theta, log_sigma2


# torch.compile's own imports warn of torch.jit deprecations.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_compiled_sparse_vd_kl_and_its_gradient_equal_the_eager_ones(monkeypatch):
    theta, log_sigma2 = _weights(4 * fusion.MIN_NUMEL)
    eager = _kl_and_grads(theta, log_sigma2)
    monkeypatch.setenv("BAYESSPARSE_COMPILE", "1")
    compiled = _kl_and_grads(theta, log_sigma2)  # a fallback warning would fail the test
    # float32 sums of 65,536 terms in another order: relative 1e-5 of the total.
    assert torch.allclose(compiled[0], eager[0], rtol=1e-5)
    for got, want in zip(compiled[1:], eager[1:], strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
        assert torch.equal(got == 0, want == 0)  # the clamped weights get no gradient


def test_a_failing_compiler_falls_back_to_the_eager_maths_with_one_warning(monkeypatch):
    monkeypatch.setenv("BAYESSPARSE_COMPILE", "1")

    def broken(fn, **options):
        def call(*args):
            raise RuntimeError("no C++ compiler")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    kernel = fusion.Fusible(lambda x: x * 2)
    x = torch.ones(fusion.MIN_NUMEL)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler.*BAYESSPARSE_COMPILE=0"):
        assert torch.equal(kernel(x), x * 2)
    assert torch.equal(kernel(x), x * 2)  # no second attempt, no second warning


def test_small_tensors_and_a_switched_off_compiler_stay_eager(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: calls.append(fn) or fn)
    kernel = fusion.Fusible(lambda x: x + 1)
    monkeypatch.setenv("BAYESSPARSE_COMPILE", "1")
    kernel(torch.ones(fusion.MIN_NUMEL - 1))
    monkeypatch.setenv("BAYESSPARSE_COMPILE", "0")
    kernel(torch.ones(fusion.MIN_NUMEL))
    assert calls == []
    monkeypatch.setenv("BAYESSPARSE_COMPILE", "1")
    kernel(torch.ones(fusion.MIN_NUMEL))
    assert len(calls) == 1


def _train_clip_step(layer: VariationalLinear, x: torch.Tensor) -> list[torch.Tensor]:
    """The gradients of a loss through the layer's output and its KL."""
    torch.manual_seed(1)
    layer.zero_grad()
    (layer(x).square().sum() + 100 * layer.kl()).backward()
    return [layer.weight.grad.clone(), layer.weight_log_sigma2.grad.clone()]


def _train_clip_layer() -> VariationalLinear:
    layer = VariationalLinear(200, 100, train_clip=True)
    theta, log_sigma2 = _weights(layer.weight.numel())
    with torch.no_grad():
        layer.weight.copy_(theta.view(100, 200))
        layer.weight_log_sigma2.copy_(log_sigma2.view(100, 200))
    return layer


def test_train_clip_drops_weights_at_log_alpha_3_from_the_mean_without_gradient():
    layer, x = _train_clip_layer(), torch.randn(8, 200)
    got = _train_clip_step(layer, x)
    theta = layer.weight.detach().clone().requires_grad_()
    log_sigma2 = layer.weight_log_sigma2.detach().clone().requires_grad_()
    keep = (log_sigma2 - torch.log(theta**2 + 1e-8) < 3).detach()
    assert 0 < keep.float().mean() < 1
    torch.manual_seed(1)
    mean = torch.nn.functional.linear(x, theta * keep, layer.bias)
    var = torch.nn.functional.linear(x * x, log_sigma2.exp())
    output = mean + (var + 1e-8).sqrt() * torch.randn_like(mean)
    (output.square().sum() + 100 * sparse_vd_kl_sum(theta, log_sigma2)).backward()
    assert torch.allclose(got[0], theta.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got[1], log_sigma2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_compiled_train_clip_weights_equal_the_eager_ones(monkeypatch):
    layer, x = _train_clip_layer(), torch.randn(8, 200)
    eager = _train_clip_step(layer, x)
    monkeypatch.setenv("BAYESSPARSE_COMPILE", "1")
    compiled = _train_clip_step(layer, x)
    for got, want in zip(compiled, eager, strict=True):
        # Sums of float32 terms of both signs: rounding of the largest term's size.
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * want.abs().max())


def test_kl_after_a_training_pass_is_the_pass_s_own_until_the_weights_change():
    layer, x = _train_clip_layer(), torch.randn(8, 200)
    recomputed = layer.kl().detach()
    layer(x)
    from_the_pass = layer.kl()
    assert from_the_pass.grad_fn is not None
    assert torch.allclose(from_the_pass.detach(), recomputed, rtol=1e-6)
    layer(x)
    assert isinstance(copy.deepcopy(layer), VariationalLinear)  # no graph in the layer
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1, fused=True)
    layer.kl().backward()
    optimizer.step()  # an in-place update: the pass's KL is stale now
    assert not torch.allclose(layer.kl().detach(), recomputed, rtol=1e-6)
    with torch.no_grad():
        layer.weight.copy_(_train_clip_layer().weight)
        layer.weight_log_sigma2.copy_(_train_clip_layer().weight_log_sigma2)
    assert torch.allclose(layer.kl().detach(), recomputed, rtol=1e-6)
