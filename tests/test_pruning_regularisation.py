"""Regularisation methods (L1, L2, group lasso, decorrelation, sensitivity-driven): each
penalty against its formula written out in float64, its gradient against the formula's
derivative or finite differences, the sensitivity and its update on hand cases, and a
short training run through the harness's hooks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bayessparse.pruning import get_method, prune
from bayessparse.pruning.base import learning_rate
from bayessparse.pruning.regularisation import (
    Decorrelation,
    GroupLasso,
    SensitivityDriven,
    bounded_insensitivity,
    decorrelation,
    output_sensitivity,
)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(24, 8), nn.ReLU(), nn.Linear(8, 3),
    )  # fmt: skip


def weights(net: nn.Module) -> list[nn.Parameter]:
    return [m.weight for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def value(tensor: torch.Tensor) -> float:
    return float(tensor.detach())


def gradients(penalty: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(penalty, params))


def test_l1_is_lambda_times_the_sum_of_absolute_weights_with_the_sign_as_gradient():
    net = mlp().double()
    penalty = get_method("l1", l1=0.3).penalty(net)
    expected = 0.3 * sum(value(w.abs().sum()) for w in weights(net))
    assert value(penalty) == pytest.approx(expected, rel=1e-12)
    for grad, w in zip(gradients(penalty, weights(net)), weights(net), strict=True):
        torch.testing.assert_close(grad, 0.3 * w.sign(), rtol=0, atol=0)


def test_l2_is_half_lambda_times_the_sum_of_squares_with_lambda_theta_as_gradient():
    net = mlp().double()
    penalty = get_method("l2", l2=0.3).penalty(net)
    expected = 0.15 * sum(value((w**2).sum()) for w in weights(net))
    assert value(penalty) == pytest.approx(expected, rel=1e-12)
    for grad, w in zip(gradients(penalty, weights(net)), weights(net), strict=True):
        torch.testing.assert_close(grad, 0.3 * w, rtol=1e-14, atol=0)


def test_penalties_ignore_pruned_weights_and_give_them_no_gradient():
    net = mlp().double()
    masks = prune(net, "magnitude", 0.5)
    penalty = get_method("l1", l1=1.0).penalty(net)
    layers = [net[0], net[2], net[4]]
    assert value(penalty) == pytest.approx(
        sum(
            value(m.weight_orig[masks[f"{i}.weight"]].abs().sum())
            for i, m in zip((0, 2, 4), layers, strict=True)
        ),
        rel=1e-12,
    )
    grads = gradients(penalty, [m.weight_orig for m in layers])
    assert all(not g[~m.weight_mask.bool()].any() for g, m in zip(grads, layers, strict=True))


@pytest.mark.parametrize("build", [mlp, cnn])
def test_group_lasso_is_the_sqrt_size_weighted_sum_of_unit_norms(build):
    net = build().double()
    penalty = GroupLasso(group_lasso=0.2).penalty(net)
    hidden = weights(net)[:-1]  # the last layer's units are the classes: not penalised
    expected = 0.0
    for w in hidden:
        for unit in w.detach():
            expected += math.sqrt(unit.numel()) * math.sqrt(float((unit**2).sum()))
    assert value(penalty) == pytest.approx(0.2 * expected, rel=1e-12)
    # d/dθ_g of λ √|g| ‖θ_g‖ is λ √|g| θ_g / ‖θ_g‖.
    for grad, w in zip(gradients(penalty, hidden), hidden, strict=True):
        rows = w.flatten(1)
        direct = 0.2 * math.sqrt(rows.shape[1]) * rows / rows.norm(dim=1, keepdim=True)
        torch.testing.assert_close(grad.flatten(1), direct, rtol=1e-12, atol=0)


def test_group_lasso_scores_are_unit_norms_shaped_to_broadcast():
    net = cnn().double()
    scores = GroupLasso().scores(net, None)
    assert sorted(scores) == ["0.weight", "3.weight", "6.weight"]
    assert scores["0.weight"].shape == (4, 1, 1, 1) and scores["6.weight"].shape == (8, 1)
    torch.testing.assert_close(scores["3.weight"].flatten(), net[3].weight.flatten(1).norm(dim=1))


def direct_decorrelation(w: torch.Tensor) -> float:
    """Σ_{i≠j} cos²(w_i, w_j), pair by pair."""
    rows = w.detach().flatten(1)
    total = 0.0
    for i in range(len(rows)):
        for j in range(len(rows)):
            if i != j:
                cosine = float(rows[i] @ rows[j]) / float(rows[i].norm() * rows[j].norm())
                total += cosine**2
    return total


def test_decorrelation_is_the_sum_of_squared_off_diagonal_cosines():
    w = torch.randn(5, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert value(decorrelation(w, 0.0)) == pytest.approx(direct_decorrelation(w), rel=1e-12)
    # Hand cases: orthogonal units are uncorrelated; n parallel units (of either sign)
    # have every cosine ±1, so n(n − 1) ordered pairs.
    assert value(decorrelation(torch.eye(3, dtype=torch.float64), 0.0)) == 0.0
    parallel = torch.tensor([[1.0, 2.0], [-2.0, -4.0], [0.5, 1.0]], dtype=torch.float64)
    assert value(decorrelation(parallel, 0.0)) == pytest.approx(6.0, rel=1e-12)


def test_decorrelation_gradient_matches_finite_differences():
    w = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.autograd.gradcheck(lambda t: decorrelation(t, 0.0), (w.requires_grad_(),))


def test_decorrelation_leaves_out_small_and_pruned_units():
    base = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    w = torch.cat([base, 1e-4 * base[:1], torch.zeros(1, 5, dtype=torch.float64)])
    # The small unit is far below 1 % of the largest norm; the zero one has no direction.
    assert value(decorrelation(w, 1e-2)) == pytest.approx(direct_decorrelation(base), rel=1e-12)
    grad = torch.autograd.grad(decorrelation(w.requires_grad_(), 1e-2), w)[0]
    assert torch.isfinite(grad).all() and not grad[4:].any()


def test_decorrelation_adds_its_term_to_group_lasso():
    net = mlp().double()
    method = Decorrelation(group_lasso=0.2, decorrelation=0.7, relative_norm=0.0)
    direct = sum(direct_decorrelation(w) for w in weights(net)[:-1])
    expected = value(GroupLasso(group_lasso=0.2).penalty(net)) + 0.7 * direct
    assert value(method.penalty(net)) == pytest.approx(expected, rel=1e-12)


def test_linear_sensitivity_is_the_mean_input_over_the_classes():
    # y = W x + b: ∂ȳ_k/∂W_ij = δ_ki x̄_j, so S_ij = (1/C) Σ_k |δ_ki x̄_j| = |x̄_j| / 2.
    net = nn.Sequential(nn.Linear(2, 2)).double()
    x = torch.tensor([[0.0, 1.0], [1.0, 3.0]], dtype=torch.float64)  # x̄ = (0.5, 2)
    sensitivity = output_sensitivity(net, x)["0.weight"]
    torch.testing.assert_close(sensitivity, torch.tensor([[0.25, 1.0], [0.25, 1.0]]).double())
    torch.testing.assert_close(
        bounded_insensitivity(sensitivity), torch.tensor([[0.75, 0.0], [0.75, 0.0]]).double()
    )


def test_sensitivity_is_the_mean_absolute_jacobian_of_the_mean_output():
    net = mlp().double()
    x = torch.randn(7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    first = net[0].weight

    def mean_output(w: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(x @ w.T + net[0].bias)
        return net[2:](hidden).mean(0)

    jacobian = torch.autograd.functional.jacobian(mean_output, first.detach())  # (C, 6, 4)
    expected = jacobian.abs().mean(0)
    torch.testing.assert_close(output_sensitivity(net, x)["0.weight"], expected)


def test_the_update_shrinks_insensitive_weights_by_lr_lambda_w_insensitivity():
    net = nn.Sequential(nn.Linear(2, 2)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    method = SensitivityDriven(strength=2.0)
    net = method.prepare_(net)
    net(torch.tensor([[0.0, 1.0], [1.0, 3.0]], dtype=torch.float64))  # a training batch
    net.eval()
    net(torch.full((3, 2), 100.0, dtype=torch.float64))  # evaluation: not recorded
    net.train()
    method.after_step(net, torch.optim.SGD(net.parameters(), lr=0.1), step=0)
    # S̄ = [[0.75, 0], [0.75, 0]] (previous test): w ← w (1 − 0.1·2·S̄), 1 − 0.15 = 0.85.
    expected = torch.tensor([[0.85, 2.0], [2.55, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(net[0].weight, expected, rtol=1e-14, atol=0)


def test_the_sensitivity_update_needs_a_training_batch_and_an_optimizer():
    method = SensitivityDriven()
    net = mlp()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="no training batch"):
        method.after_step(net, optimizer, 0)
    with pytest.raises(ValueError, match="Expected a torch optimizer"):
        learning_rate(None, net[0].weight)


@pytest.mark.parametrize("name", ["l1", "l2", "group_lasso", "decorrelation", "sensitivity"])
def test_a_short_run_through_the_harness_hooks_prunes_and_finalizes(name):
    """prepare_, a few steps with penalty and after_step, prune, finalize_: as the bench."""
    torch.manual_seed(0)
    net = mlp()
    keys = set(net.state_dict())
    method = get_method(name)
    net = method.prepare_(net)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(3):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        penalty = method.penalty(net)
        (loss if penalty is None else loss + penalty).backward()
        optimizer.step()
        method.after_step(net, optimizer, step)
    prune(net, method, 0.5)
    net = method.finalize_(net)
    assert {k.replace("_orig", "").replace("_mask", "") for k in net.state_dict()} == keys
    assert torch.isfinite(net(x)).all()


@pytest.mark.parametrize(
    ("name", "option"),
    [("l1", "l1"), ("l2", "l2"), ("group_lasso", "group_lasso"), ("sensitivity", "strength")],
)
def test_negative_or_nan_strengths_are_refused(name, option):
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match=f"Expected {option} to be a finite number"):
            get_method(name, **{option: bad})
    with pytest.raises(ValueError, match="relative_norm in \\[0, 1\\]"):
        get_method("decorrelation", relative_norm=2.0)
