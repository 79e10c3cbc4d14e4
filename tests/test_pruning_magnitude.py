"""Magnitude pruning and its variants (iterative, lottery ticket, reinit, GMP), random
pruning, and the fine-tuning policies (snapshot, rewind, reinit, round targets)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bayessparse.pruning import (
    GradualMagnitude,
    apply_masks_,
    compute_masks,
    cubic_sparsity,
    get_method,
    prune,
    reinit_,
    rewind_,
    round_sparsities,
    snapshot,
)

MAGNITUDE_SCORED = ["magnitude", "magnitude_iterative", "lottery", "lottery_iterative"]
MAGNITUDE_SCORED += ["magnitude_reinit", "gmp"]


def hand_net() -> nn.Sequential:
    """3 → 2 → 2 with ten distinct magnitudes: .1 .5 .9 .3 .7 .2 | .4 .05 .8 .6."""
    net = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.1, -0.5, 0.9], [-0.3, 0.7, -0.2]]))
        net[2].weight.copy_(torch.tensor([[0.4, -0.05], [0.8, -0.6]]))
    return net


def small_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def pruned_count(net: nn.Module) -> int:
    return sum(int((m.weight_mask == 0).sum()) for m in net if hasattr(m, "weight_mask"))


def sgd_steps(net: nn.Module, steps: int, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 4, generator=generator), torch.randint(0, 3, (16,), generator=generator)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()


# --- magnitude and random scores --------------------------------------------------------


@pytest.mark.parametrize("name", MAGNITUDE_SCORED)
def test_magnitude_prunes_the_smallest_weights_globally_and_per_layer(name):
    # Global 40 %: round(0.4 · 10) = 4 smallest of all, .05 .1 .2 .3.
    masks = compute_masks(hand_net(), get_method(name), 0.4)
    assert masks["0.weight"].tolist() == [[False, True, True], [False, True, False]]
    assert masks["2.weight"].tolist() == [[True, False], [True, True]]
    # Per layer: round(0.4 · 6) = 2 of layer 0 (.1 .2), round(0.4 · 4) = 2 of layer 2 (.05 .4).
    masks = compute_masks(hand_net(), get_method(name), 0.4, scope="layer")
    assert masks["0.weight"].tolist() == [[False, True, True], [True, True, False]]
    assert masks["2.weight"].tolist() == [[False, False], [True, True]]


def test_random_pruning_is_exact_and_one_seed_gives_one_mask():
    def masks(seed, scope="global"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 5))
        return prune(net, "random", 0.6, scope=scope, seed=seed)

    first = masks(seed=3)
    assert sum(int((~m).sum()) for m in first.values()) == 150  # 0.6 · 250
    per_layer = masks(seed=3, scope="layer")
    assert [int((~m).sum()) for m in per_layer.values()] == [120, 30]  # 0.6 · 200, 0.6 · 50
    assert all(torch.equal(first[k], m) for k, m in masks(seed=3).items())
    assert not torch.equal(first["0.weight"], masks(seed=4)["0.weight"])


@pytest.mark.parametrize(
    ("name", "stage", "policy", "rounds"),
    [
        ("magnitude", "after_training", "retain", 1),
        ("magnitude_iterative", "after_training", "retain", 5),
        ("lottery", "after_training", "rewind", 1),
        ("lottery_iterative", "after_training", "rewind", 5),
        ("magnitude_reinit", "after_training", "reinit", 1),
        ("gmp", "during_training", "retain", 1),
    ],
)
def test_each_variant_tells_the_harness_when_it_prunes_and_how_it_trains_on(
    name, stage, policy, rounds
):
    method = get_method(name)
    assert (method.family, method.stage, method.policy, method.rounds) == (
        "magnitude",
        stage,
        policy,
        rounds,
    )


# --- iterative pruning ------------------------------------------------------------------


def test_round_sparsities_prune_the_same_fraction_of_the_survivors_each_round():
    # 1 − (1 − 0.875)^(k/3) = 1 − 0.5^k; the power is within 1e-15 of the exact value.
    assert round_sparsities(0.875, 3) == pytest.approx([0.5, 0.75, 0.875], rel=1e-15)
    assert round_sparsities(0.875, 3)[-1] == 0.875  # exactly the target
    assert round_sparsities(0.9, 1) == [0.9]
    assert round_sparsities(0.0, 4) == [0.0] * 4
    survivors = [1.0] + [1 - s for s in round_sparsities(0.9, 5)]
    kept = [b / a for a, b in itertools.pairwise(survivors)]
    assert kept == pytest.approx([0.1 ** (1 / 5)] * 5, rel=1e-12)  # 63.1 % kept each round


@pytest.mark.parametrize(
    ("sparsity", "rounds", "error"),
    [(1.0, 5, ValueError), (0.9, 0, ValueError), (0.9, 2.5, TypeError)],
)
def test_round_sparsities_refuses_bad_input(sparsity, rounds, error):
    with pytest.raises(error, match="Expected"):
        round_sparsities(sparsity, rounds)


@pytest.mark.parametrize("name", ["magnitude_iterative", "lottery_iterative"])
def test_iterative_rounds_reach_the_target_and_keep_earlier_masks(name):
    method = get_method(name)
    net = small_net()  # 32 + 24 = 56 weights
    generator = torch.Generator().manual_seed(1)
    previous = None
    for target in round_sparsities(0.9, method.rounds):
        masks = prune(net, method, target)
        assert pruned_count(net) == round(target * 56)
        if previous is not None:  # nothing pruned comes back
            assert all(not (masks[k] & ~previous[k]).any() for k in masks)
        previous = masks
        with torch.no_grad():  # stands for the retraining: every value moves
            for layer in (net[0], net[2]):
                layer.weight_orig.add_(torch.randn(layer.weight_orig.shape, generator=generator))
    assert pruned_count(net) == 50  # round(0.9 · 56)


# --- snapshot and rewind ----------------------------------------------------------------


@pytest.mark.parametrize("rewind_step", [0, 2])
def test_lottery_ticket_rewinds_the_survivors_to_their_saved_values(rewind_step):
    net = small_net()
    sgd_steps(net, rewind_step)
    saved = snapshot(net)  # θ0 (Frankle & Carbin) or an early iterate θk (Frankle et al.)
    sgd_steps(net, 5, seed=2)
    assert not torch.equal(net[0].weight, saved["0.weight"])  # training moved it
    masks = prune(net, "lottery", 0.5)
    rewind_(net, saved)
    for i in (0, 2):
        mask = masks[f"{i}.weight"]
        assert torch.equal(net[i].weight_orig, saved[f"{i}.weight"])
        assert torch.equal(net[i].weight, torch.where(mask, saved[f"{i}.weight"], 0.0))
        assert torch.equal(net[i].bias, saved[f"{i}.bias"])
        assert torch.equal(net[i].weight_mask.bool(), mask)
    x = torch.randn(5, 4)
    hidden = F.linear(x, saved["0.weight"] * masks["0.weight"], saved["0.bias"]).relu()
    expected = F.linear(hidden, saved["2.weight"] * masks["2.weight"], saved["2.bias"])
    assert torch.equal(net(x), expected)  # the masks still act in the forward pass


def test_snapshot_is_a_copy_keyed_alike_before_and_after_pruning():
    net = small_net()
    dense = snapshot(net)
    prune(net, "magnitude", 0.5)
    pruned = snapshot(net)
    assert sorted(pruned) == sorted(dense) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    with torch.no_grad():
        net[0].weight_orig.add_(1.0)
    assert torch.equal(pruned["0.weight"], dense["0.weight"])  # unaffected by the net
    assert not pruned["0.weight"].requires_grad


def test_rewind_restores_buffers_and_pruned_biases():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    saved = snapshot(net)
    net(torch.randn(8, 4) + 3.0)  # a training-mode pass moves the running statistics
    bias_mask = torch.tensor([True, False, True, True, False, True])
    apply_masks_(net, {"0.weight": torch.rand(6, 4) > 0.5, "0.bias": bias_mask})
    with torch.no_grad():
        net[0].bias_orig.add_(1.0)
    assert "0.bias" in snapshot(net) and "0.bias_orig" not in snapshot(net)
    rewind_(net, saved)
    assert torch.equal(net[1].running_mean, saved["1.running_mean"])
    assert torch.equal(net[1].num_batches_tracked, saved["1.num_batches_tracked"])
    assert torch.equal(net[0].bias_orig, saved["0.bias"])
    assert torch.equal(net[0].bias, torch.where(bias_mask, saved["0.bias"], 0.0))


def test_rewind_names_missing_extra_and_mismatched_tensors():
    net = small_net()
    other = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    with pytest.raises(
        ValueError, match=r"missing \['2.bias', '2.weight'\].*extra \['1.bias', '1.weight'\]"
    ):
        rewind_(net, snapshot(other))
    wider = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"'0.weight' of shape \(8, 4\).*got shape \(8, 5\)"):
        rewind_(net, snapshot(wider))
    with pytest.raises(ValueError, match="dtype torch.float32.*torch.float64"):
        rewind_(net, snapshot(small_net().double()))


# --- reinit -----------------------------------------------------------------------------


def test_reinit_draws_the_default_initialisation_keeps_masks_and_leaves_the_rng_alone():
    net = small_net()
    masks = prune(net, "magnitude_reinit", 0.5)
    before = snapshot(net)
    twin = copy.deepcopy(net)
    rng = torch.get_rng_state()
    reinit_(net, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)
    for i in (0, 2):
        assert not torch.equal(net[i].weight_orig, before[f"{i}.weight"])
        assert torch.equal(net[i].weight_mask.bool(), masks[f"{i}.weight"])
        assert torch.equal(net[i].weight, net[i].weight_orig * masks[f"{i}.weight"])
    # The draw is what constructing the net with that seed draws, masks or not.
    fresh = snapshot(small_net(seed=3))
    assert all(torch.equal(value, fresh[key]) for key, value in snapshot(net).items())
    reinit_(twin, seed=3)
    assert torch.equal(twin[0].weight_orig, net[0].weight_orig)
    reinit_(twin, seed=4)
    assert not torch.equal(twin[0].weight_orig, net[0].weight_orig)


def test_reinit_resets_pruned_biases_and_normalisation_layers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    net(torch.randn(8, 4) + 3.0)
    with torch.no_grad():
        net[1].weight.fill_(2.0)
    bias_mask = torch.tensor([True, False, True, True, False, True])
    apply_masks_(net, {"0.bias": bias_mask})
    old_bias = net[0].bias_orig.detach().clone()
    reinit_(net, seed=5)  # not 0: that would redraw the values the net was built with
    assert not torch.equal(net[0].bias_orig, old_bias)
    assert torch.equal(net[0].bias, net[0].bias_orig * bias_mask)
    assert torch.equal(net[1].weight, torch.ones(6)) and torch.equal(
        net[1].running_mean, torch.zeros(6)
    )
    with pytest.raises(TypeError, match="integer seed"):
        reinit_(net, seed=1.5)


# --- gradual magnitude pruning ----------------------------------------------------------


def test_cubic_schedule_values_at_hand_computed_steps():
    def s(step, initial=0.0, begin=0, end=1000):
        return cubic_sparsity(step, 0.9, initial, begin, end, 100)

    # s_t = 0.9 (1 − (1 − t/1000)³), held between pruning steps (every 100).
    assert s(0) == 0.0 and s(99) == 0.0
    assert s(100) == pytest.approx(0.9 * (1 - 0.9**3), rel=1e-12)  # 0.2439
    assert s(500) == pytest.approx(0.9 * (1 - 0.5**3), rel=1e-12)  # 0.7875
    assert s(599) == s(500)
    assert s(900) == pytest.approx(0.9 * (1 - 0.1**3), rel=1e-12)  # 0.8991
    assert s(1000) == s(5000) == 0.9  # exactly the target, and held
    # From s_i = 0.5 at t0 = 200; at t = 600, half-way: 0.9 − 0.4 · 0.5³ = 0.85.
    assert s(199, 0.5, 200) == 0.0 and s(200, 0.5, 200) == 0.5
    assert s(600, 0.5, 200) == pytest.approx(0.85, rel=1e-12)
    # End not on the Δt grid: prunes at 0, 100, 200 and at the end, 250.
    assert s(249, end=250) == pytest.approx(0.9 * (1 - 0.2**3), rel=1e-12)
    assert s(250, end=250) == 0.9
    with pytest.raises(ValueError, match="initial_sparsity ≤ final_sparsity"):
        cubic_sparsity(0, 0.5, 0.6, 0, 10, 1)
    with pytest.raises(ValueError, match="frequency ≥ 1"):
        cubic_sparsity(0, 0.5, 0.0, 0, 10, 0)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_gmp_in_a_training_loop_reaches_the_target_exactly(scope):
    net = small_net().double()  # 32 + 24 = 56 weights
    method = GradualMagnitude(frequency=5, scope=scope)
    total, target = 40, 0.8
    method.start_(net, target, total)
    assert (method.begin_step, method.end_step) == (0, 30)  # 0.75 · 40
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=generator)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    previous = None
    for step in range(total):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
        method.after_step(net, optimizer, step)
        s = cubic_sparsity(step, target, 0.0, 0, 30, 5)
        sizes = [56] if scope == "global" else [32, 24]
        assert pruned_count(net) == sum(round(s * n) for n in sizes)
        masks = {f"{i}.weight": net[i].weight_mask.bool() for i in (0, 2) if s > 0}
        if previous:  # pruned weights stay pruned
            assert all(not (masks[k] & ~previous[k]).any() for k in masks)
        previous = {k: m.clone() for k, m in masks.items()}
    assert pruned_count(net) == (45 if scope == "global" else 26 + 19)  # round(0.8 · n)
    # The harness's final prune at the target finds it met and changes nothing.
    final = compute_masks(net, method, target, scope=scope)
    assert all(torch.equal(final[k], previous[k]) for k in final)
    prune(net, method, target, scope=scope)
    assert all(torch.equal(net[i].weight_mask.bool(), previous[f"{i}.weight"]) for i in (0, 2))


def test_gmp_refuses_bad_options_and_an_unplanned_step():
    with pytest.raises(ValueError, match="begin ≤ end"):
        GradualMagnitude(begin=0.8, end=0.5)
    with pytest.raises(ValueError, match="frequency"):
        get_method("gmp", frequency=0)
    with pytest.raises(TypeError, match="unknown options"):
        get_method("gmp", final_sparsity=0.9)
    method = GradualMagnitude(initial_sparsity=0.5)
    with pytest.raises(RuntimeError, match="start_"):
        method.after_step(small_net(), None, 0)
    with pytest.raises(ValueError, match="initial_sparsity=0.5"):
        method.start_(small_net(), 0.3, 100)
    assert repr(method) == (
        "GradualMagnitude(initial_sparsity=0.5, begin=0.0, end=0.75, frequency=100, "
        "scope='global')"
    )
