"""Pruning at initialisation (SNIP, SNIP at an orthogonal init, GraSP): each score against
explicit autograd on tiny float64 nets, the initialisations against their formulas, and
approximate isometry by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from scipy import stats
from torch import nn
from torch.nn import functional as F

from bayessparse.pruning import compute_masks, get_method, prune
from bayessparse.pruning.at_init import (
    VARIANCE_SCALING,
    SNIPOrthogonal,
    approximate_isometry_,
    fans,
    isometry_gap,
)

# Two-sided level of the variance checks: a correct draw fails one in a million runs.
LEVEL = 1e-6


def tiny_net() -> nn.Module:
    # Tanh: curvature in every layer, so Hg has no structural zeros.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def tiny_data(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 2, (n,), generator=generator)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(24, 8), nn.ReLU(), nn.Linear(8, 3),
    ).double()  # fmt: skip


def test_snip_scores_are_the_connection_sensitivity_at_its_draw():
    net, (x, y) = tiny_net(), tiny_data(8)
    method = get_method("snip", batch_size=5)
    scores = method.scores(net, (x, y))
    # The same net loaded with the draw SNIP scores at, differentiated the plain way.
    reference = copy.deepcopy(net)
    reference.load_state_dict(method.initial_weights(net), strict=False)
    F.cross_entropy(reference(x[:5]), y[:5]).backward()
    for key in ("0", "2"):
        weight = reference.get_parameter(f"{key}.weight")
        assert weight.grad is not None
        torch.testing.assert_close(
            scores[f"{key}.weight"], (weight * weight.grad).abs(), rtol=1e-12, atol=1e-15
        )
    # Scoring leaves the net as it was: it is not re-initialised.
    fresh = tiny_net().state_dict()
    assert all(torch.equal(value, fresh[key]) for key, value in net.state_dict().items())


@pytest.mark.parametrize("init", sorted(VARIANCE_SCALING))
@pytest.mark.parametrize("shape", [(300, 200), (16, 8, 3, 3)])
def test_snip_draws_weights_by_variance_scaling(init, shape):
    layer = nn.Linear(shape[1], shape[0]) if len(shape) == 2 else nn.Conv2d(8, 16, 3)
    net = nn.Sequential(layer, nn.ReLU(), nn.Linear(shape[0], 2)).double()
    drawn = get_method("snip", init=init, seed=3).initial_weights(net)
    weight = drawn["0.weight"]
    variance = VARIANCE_SCALING[init](*fans(shape))
    # n·mean(w²)/σ² of n independent N(0, σ²) draws is chi-square with n degrees of freedom.
    n = weight.numel()
    statistic = float(weight.square().sum()) / variance
    assert stats.chi2.ppf(LEVEL / 2, n) < statistic < stats.chi2.isf(LEVEL / 2, n)
    assert torch.equal(drawn["0.bias"], torch.zeros(shape[0], dtype=torch.float64))


def test_variance_scaling_fans_count_the_kernel():
    assert fans((300, 784)) == (784, 300)
    assert fans((50, 20, 5, 5)) == (500, 1250)
    assert VARIANCE_SCALING["vs_h"](500, 1250) == 2 / 500


def test_the_draw_depends_on_the_seed_only():
    net = tiny_net()
    first = get_method("snip", seed=5).initial_weights(net)
    again = get_method("snip", seed=5).initial_weights(tiny_net())
    other = get_method("snip", seed=6).initial_weights(net)
    assert torch.equal(first["0.weight"], again["0.weight"])
    assert not torch.equal(first["0.weight"], other["0.weight"])


@pytest.mark.parametrize(
    ("layer", "rows_orthonormal"),
    [(nn.Linear(9, 4), True), (nn.Linear(4, 9), False), (nn.Conv2d(2, 6, 3), True)],
)
def test_snip_orthogonal_draws_isometric_weights(layer, rows_orthonormal):
    net = nn.Sequential(layer, nn.Flatten(), nn.Linear(layer.weight.shape[0], 2)).double()
    weight = SNIPOrthogonal().initial_weights(net)["0.weight"].flatten(1)
    gram = weight @ weight.T if rows_orthonormal else weight.T @ weight
    torch.testing.assert_close(gram, torch.eye(len(gram), dtype=torch.float64))


def test_isometry_gap_by_hand():
    # [[1, 1]]: WWᵀ = [[2]], one off the identity.
    assert float(isometry_gap(torch.tensor([[1.0, 1.0]]))) == 1.0
    assert float(isometry_gap(torch.eye(3))) == 0.0


def test_one_isometry_step_follows_the_gradient_of_the_masked_gap():
    weight = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(1)) > 0.4
    leaf = weight.clone().requires_grad_()
    isometry_gap(leaf * mask).backward()
    assert leaf.grad is not None
    expected = torch.where(mask, weight - 0.1 * leaf.grad, weight)
    approximate_isometry_(weight, mask, steps=1, lr=0.1)
    torch.testing.assert_close(weight, expected, rtol=1e-12, atol=1e-15)


def test_approximate_isometry_makes_reachable_rows_orthonormal():
    # diag(0.5, 1.5) goes to the identity; the rows (a, b, 0) and (0, c, d) can become
    # orthonormal (b·c = 0) without their pruned entries, which stay as they were.
    diagonal = torch.diag(torch.tensor([0.5, 1.5], dtype=torch.float64))
    approximate_isometry_(diagonal, torch.ones(2, 2, dtype=torch.bool), steps=10000, lr=0.1)
    torch.testing.assert_close(diagonal, torch.eye(2, dtype=torch.float64))
    weight = torch.tensor([[0.3, 0.4, 7.0], [8.0, 0.2, 0.1]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    approximate_isometry_(weight, mask, steps=10000, lr=0.1)
    assert float(isometry_gap(weight * mask)) < 1e-12
    assert weight[0, 2] == 7.0 and weight[1, 0] == 8.0


def test_snip_orthogonal_enforces_isometry_on_the_pruned_net():
    net = small_cnn()
    data = (torch.randn(16, 1, 10, 10, dtype=torch.float64), torch.arange(16) % 3)
    masks = prune(net, "snip_orthogonal", 0.5, data=data)
    # The output layer keeps 12 of its 24 weights in 3 rows of 8: orthonormal rows are
    # reachable as long as each row keeps a weight.
    last = net[8].weight
    assert masks["8.weight"].any(1).all()
    assert float(isometry_gap(last)) < 1e-10
    before = {k: v.clone() for k, v in net.state_dict().items()}
    prune(net, "snip_orthogonal", 0.5, data=data)  # no mask changes: AI does nothing
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_grasp_scores_theta_times_hessian_gradient():
    net, (x, y) = tiny_net(), tiny_data(8)
    method = get_method("grasp", batch_size=4, num_batches=2, temperature=3.0)
    scores = method.scores(net, (x, y))
    shapes = {"0.weight": (4, 3), "2.weight": (2, 4)}
    theta = torch.cat([net.get_parameter(k).detach().reshape(-1) for k in shapes])

    def loss(flat: torch.Tensor) -> torch.Tensor:
        # The official sum over batches of each batch's mean loss, at temperature T.
        weights = dict(zip(shapes, flat.split([12, 8]), strict=True))
        weights = {k: w.reshape(shapes[k]) for k, w in weights.items()}
        logits = torch.func.functional_call(net, weights, (x,)) / 3.0
        return F.cross_entropy(logits[:4], y[:4]) + F.cross_entropy(logits[4:], y[4:])

    hessian = torch.autograd.functional.hessian(loss, theta)
    gradient = torch.autograd.functional.jacobian(loss, theta)
    expected = theta * (hessian @ gradient)
    got = torch.cat([scores[k].reshape(-1) for k in shapes])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-15)
    # GraSP removes the weights of highest S = −θ ⊙ Hg: here the top 5 of 20.
    masks = compute_masks(net, method, 0.25, (x, y))
    pruned = ~torch.cat([masks[k].reshape(-1) for k in shapes])
    highest = (-expected).topk(5).indices
    assert torch.equal(pruned.nonzero().flatten(), highest.sort().values)


@pytest.mark.parametrize("name", ["snip", "snip_orthogonal", "grasp"])
def test_prune_at_init_hits_the_exact_sparsity(name):
    net = small_cnn()
    data = (torch.randn(250, 1, 10, 10, dtype=torch.float64), torch.arange(250) % 3)
    masks = prune(net, name, 0.9, data=data)
    total = sum(m.numel() for m in masks.values())  # 36 + 216 + 192 + 24 = 468 weights
    assert total == 468
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.9 * 468)
    for key, mask in masks.items():
        assert not net.get_submodule(key.rpartition(".")[0]).weight[~mask].any()


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("snip", {"init": "xavier"}, "init to be one of"),
        ("snip", {"batch_size": 0}, "batch_size to be a finite integer > 0"),
        ("grasp", {"temperature": float("nan")}, "temperature"),
        ("snip_orthogonal", {"isometry_steps": -1}, "isometry_steps"),
    ],
)
def test_bad_options_are_refused(name, options, message):
    with pytest.raises(ValueError, match=message):
        get_method(name, **options)


@pytest.mark.parametrize("name", ["snip", "grasp"])
def test_scores_without_data_say_what_to_pass(name):
    with pytest.raises(ValueError, match=r"data=\(inputs, targets\)"):
        get_method(name).scores(tiny_net(), None)
