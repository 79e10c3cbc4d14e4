"""Supermasks and the lottery-ticket ablations: the straight-through gradient by hand,
frozen weights that training leaves alone, scores that learn the one mask solving a tiny
problem, the signed-constant and zeros ablations on hand-written weights, and Paganini &
Forde's grid of registered variants."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bayessparse.pruning import (
    LotteryTicketIterative,
    Supermask,
    apply_masks_,
    get_method,
    methods,
    paganini_forde_grid,
    prune,
    rewind_to_sign_,
    snapshot,
    zero_pruned_,
)
from bayessparse.pruning.supermask import frozen_values, straight_through_mask

DOUBLE = torch.float64


def linear(weight: list[list[float]], bias: list[float]) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(len(weight[0]), len(weight))).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(weight))
        net[0].bias.copy_(torch.tensor(bias))
    return net


def test_the_straight_through_mask_is_binary_with_the_sigmoid_gradient():
    score = torch.tensor([-2.0, 0.0, 0.5, 3.0], dtype=DOUBLE, requires_grad=True)
    mask = straight_through_mask(score)
    assert set(mask.tolist()) <= {0.0, 1.0}
    weights = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=DOUBLE)
    (mask * weights).sum().backward()
    prob = torch.sigmoid(score.detach())
    torch.testing.assert_close(score.grad, weights * prob * (1 - prob), rtol=1e-14, atol=0)


def test_score_gradient_is_the_masked_weight_gradient_times_w_times_sigmoid_slope():
    net = Supermask().prepare_(linear([[1.0, -2.0, 0.5], [3.0, 1.0, -1.0]], [0.1, -0.2]))
    with torch.no_grad():
        net[0].supermask_score.copy_(torch.tensor([[0.3, -0.4, 1.0], [-1.0, 0.0, 2.0]]))
    x = torch.tensor([[1.0, 2.0, -1.0], [0.5, -1.0, 2.0]], dtype=DOUBLE)
    torch.manual_seed(5)
    net(x).pow(2).sum().backward()
    # Replay: the same Bernoulli draw, then ∂L/∂W' for W' = W ⊙ m by autograd.
    score = net[0].supermask_score.detach()
    prob = torch.sigmoid(score)
    torch.manual_seed(5)
    sample = torch.bernoulli(prob)
    masked = (net[0].weight * sample).requires_grad_()
    (x @ masked.T + net[0].bias).pow(2).sum().backward()
    expected = masked.grad * net[0].weight * prob * (1 - prob)
    torch.testing.assert_close(net[0].supermask_score.grad, expected, rtol=1e-12, atol=0)


def test_training_moves_the_scores_and_never_the_frozen_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    method = Supermask()
    net = method.prepare_(net)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    assert net[0].supermask_score.abs().sum() > 0
    method.finalize_(net)
    assert set(net.state_dict()) == set(before)
    assert all(p.requires_grad for p in net.parameters())


def test_scores_learn_the_mask_that_solves_a_tiny_problem():
    # Frozen W = [[1, 1], [-1, 1]]: class 0 for x = (1, 0) is right (logits 1, -1), but
    # x = (0, 1) ties (1, 1). Masking W_01 alone gives (0, 1): both right. Training the
    # scores must find it: σ(s_01) falls below 1/2 while the others stay above.
    net = Supermask().prepare_(linear([[1.0, 1.0], [-1.0, 1.0]], [0.0, 0.0]))
    x, y = torch.eye(2, dtype=DOUBLE), torch.tensor([0, 1])
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    torch.manual_seed(0)
    for _ in range(100):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    keep = torch.sigmoid(net[0].supermask_score.detach())
    assert keep[0, 1] < 0.5 and (keep.flatten()[[0, 2, 3]] > 0.5).all()
    net.eval()
    assert torch.equal(net(x).argmax(1), y)


def test_eval_masks_deterministically_by_the_sign_of_the_score():
    net = Supermask().prepare_(linear([[1.0, -2.0], [3.0, 4.0]], [0.5, -0.5])).eval()
    x = torch.tensor([[1.0, 1.0]], dtype=DOUBLE)
    torch.testing.assert_close(net(x), torch.tensor([[-0.5, 6.5]], dtype=DOUBLE))  # all kept
    with torch.no_grad():
        net[0].supermask_score.copy_(torch.tensor([[1.0, -1.0], [-3.0, 0.0]]))
    # Kept: W_00 and W_11 (score ≥ 0): outputs 1 + 0.5 and 4 − 0.5.
    torch.testing.assert_close(net(x), torch.tensor([[1.5, 3.5]], dtype=DOUBLE))


def test_the_harness_prunes_by_keep_probability_and_finalize_leaves_the_frozen_weights():
    net = linear([[1.0, -2.0], [3.0, 4.0]], [0.0, 0.0])
    method = Supermask()
    net = method.prepare_(net)
    with torch.no_grad():
        net[0].supermask_score.copy_(torch.tensor([[2.0, -1.0], [0.5, -3.0]]))
    masks = prune(net, method, 0.5)
    assert masks["0.weight"].tolist() == [[True, False], [True, False]]
    net = method.finalize_(net)
    torch.testing.assert_close(net[0].weight, torch.tensor([[1.0, 0.0], [3.0, 0.0]]).double())


def pruned_pair() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A Linear layer with θ₀ = [[3, −1], [1, −3]], b₀ = [0.5, −0.5], trained to
    θ_T = [[2, −4], [0.5, 1]], b_T = [9, 9], with weight (0, 1) and (1, 0) pruned."""
    net = linear([[3.0, -1.0], [1.0, -3.0]], [0.5, -0.5])
    init = snapshot(net)
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[2.0, -4.0], [0.5, 1.0]]))
        net[0].bias.fill_(9.0)
    apply_masks_(net, {"0.weight": torch.tensor([[True, False], [False, True]])})
    return net, init


def test_signed_constant_gives_survivors_their_initial_sign_times_the_layer_std():
    net, init = pruned_pair()
    rewind_to_sign_(net, init, constant=True)
    # θ₀ has mean 0 and squares 9, 1, 1, 9: σ = sqrt(20 / 4) = √5 (population std).
    root5 = math.sqrt(5.0)
    expected = torch.tensor([[root5, 0.0], [0.0, -root5]], dtype=DOUBLE)
    torch.testing.assert_close(net[0].weight, expected, rtol=1e-15, atol=0)
    torch.testing.assert_close(net[0].bias, torch.tensor([0.5, -0.5], dtype=DOUBLE))
    assert net[0].weight_mask.tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_signed_reshuffle_permutes_survivor_magnitudes_and_keeps_their_signs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5)).double()
    init = snapshot(net)
    prune(net, "random", 0.4)
    kept = net[0].weight_mask.bool()
    rewind_to_sign_(net, init, constant=False, seed=3)
    initial, now = init["0.weight"][kept], net[0].weight[kept]
    assert torch.equal(now.sign(), initial.sign())
    assert torch.equal(now.abs().sort().values, initial.abs().sort().values)
    assert not torch.equal(now, initial)  # 18 survivors: the identity has odds 1/18!


def test_frozen_values_follow_how_each_pruned_weight_moved():
    initial = torch.tensor([3.0, -1.0, 1.0, -3.0, 2.0])
    trained = torch.tensor([2.0, -4.0, 0.5, 1.0, -2.0])  # toward, away, toward, toward, same
    kept = torch.tensor([True, False, False, False, False])
    assert frozen_values(initial, trained, kept, "toward").tolist() == [0, -1, 0, 0, 2]
    assert frozen_values(initial, trained, kept, "away").tolist() == [0, 0, 1, -3, 2]
    assert frozen_values(initial, trained, kept, "none").tolist() == [0, -1, 1, -3, 2]
    with pytest.raises(ValueError, match="moved to be one of"):
        frozen_values(initial, trained, kept, "sideways")


@pytest.mark.parametrize(
    ("moved", "effective"),
    [
        # Pruned: (0, 1) moved away from 0 (|−4| > |−1|), (1, 0) toward (|0.5| < |1|).
        ("toward", [[3.0, -1.0], [0.0, -3.0]]),
        ("away", [[3.0, 0.0], [1.0, -3.0]]),
        ("none", [[3.0, -1.0], [1.0, -3.0]]),
    ],
)
def test_zero_pruned_freezes_pruned_weights_and_rewinds_survivors(moved, effective):
    net, init = pruned_pair()
    zero_pruned_(net, init, moved)
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=DOUBLE)
    expected = x @ torch.tensor(effective, dtype=DOUBLE).T + torch.tensor([0.5, -0.5]).double()
    torch.testing.assert_close(net(x), expected, rtol=1e-15, atol=0)
    frozen = net[0].weight_frozen.clone()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    net(x).sum().backward()
    optimizer.step()
    net(x)
    survivors = net[0].weight_mask.bool()
    assert torch.equal(net[0].weight[~survivors], frozen[~survivors])
    assert not torch.equal(net[0].weight[survivors], torch.tensor([3.0, -3.0]).double())


def test_zero_pruned_applies_once():
    net, init = pruned_pair()
    zero_pruned_(net, init)
    with pytest.raises(ValueError, match="applied to already"):
        zero_pruned_(net, init)


def test_the_paganini_forde_grid_names_registered_variants_of_each_cell():
    grid = paganini_forde_grid()
    registered = methods()
    assert len(grid) == len(set(grid)) == 12 and set(grid) <= set(registered)
    cells = {(get_method(n).policy, get_method(n).scope or "global") for n in grid}
    assert cells == {(p, s) for p in ("rewind", "reinit") for s in ("global", "layer")}
    assert (
        "lottery_iterative" in grid and registered["lottery_iterative"] is LotteryTicketIterative
    )
    for name in grid:
        method = get_method(name)
        assert method.stage == "after_training" and method.rounds == 5
        assert method.structure == ("unit" if "filter" in name or "unit" in name else "weight")
    assert registered["magnitude_local_rewind"].scope == "layer"


def test_filter_l2_scores_unit_norms_and_random_unit_is_seeded():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 3)).double()
    scores = get_method("filter_l2").scores(net, None)
    torch.testing.assert_close(scores["0.weight"].flatten(), net[0].weight.flatten(1).norm(dim=1))
    first, second = (get_method("random_unit", seed=1).scores(net, None) for _ in range(2))
    assert first["0.weight"].shape == (4, 1, 1, 1) and torch.equal(
        first["0.weight"], second["0.weight"]
    )
