"""Dynamic sparse training: set_masks_ (regrowth at zero, optimiser state reset), the
Erdős–Rényi layer shares, and each method's rule on hand-set weights (SET's sign rule,
DeepR's sign bookkeeping, DSR's threshold and reallocation, RigL's drop and gradient
regrowth); in a short training loop every method keeps its sparsity exactly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bayessparse.models import LeNet300100
from bayessparse.pruning import DSR, SET, DeepR, RigL, get_method, layer_counts, prune, set_masks_
from bayessparse.pruning.dynamic import adapt_threshold, apportion, cosine_drop_fraction


def counts(net: nn.Module) -> list[int]:
    """Active weights of each masked layer."""
    return [int(m.weight_mask.sum()) for m in net.modules() if hasattr(m, "weight_mask")]


def set_active_(layer: nn.Module, values: list[float]) -> None:
    """Write ``values`` into the active positions of a masked layer, in row-major order."""
    with torch.no_grad():
        layer.weight_orig[layer.weight_mask.bool()] = torch.tensor(values, dtype=torch.float64)
        layer.weight = layer.weight_orig * layer.weight_mask


# --- set_masks_ -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "slots"),
    [
        (lambda p: torch.optim.Adam(p, lr=0.1), ["exp_avg", "exp_avg_sq"]),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), ["momentum_buffer"]),
    ],
)
def test_set_masks_regrows_at_zero_and_resets_the_optimizer_state_there_only(make, slots):
    torch.manual_seed(0)
    layer = nn.Linear(3, 2, bias=False).double()
    first = torch.tensor([[True, False, True], [True, True, False]])
    set_masks_(layer, {"weight": first})
    optimizer = make(layer.parameters())
    for _ in range(2):  # the state becomes non-zero everywhere active
        optimizer.zero_grad()
        layer(torch.randn(4, 3, dtype=torch.float64)).pow(2).sum().backward()
        optimizer.step()
    orig = layer.weight_orig.detach().clone()
    state = {s: optimizer.state[layer.weight_orig][s].clone() for s in slots}
    second = torch.tensor([[True, True, True], [False, True, False]])  # (0,1) on, (1,0) off
    set_masks_(layer, {"weight": second}, optimizer)
    turned_on = second & ~first
    assert torch.equal(layer.weight_mask.bool(), second)
    assert layer.weight_orig[turned_on].tolist() == [0.0]
    assert torch.equal(layer.weight_orig[~turned_on], orig[~turned_on])  # (1,0) keeps θ
    assert torch.equal(layer.weight, layer.weight_orig * second)
    for s in slots:
        now = optimizer.state[layer.weight_orig][s]
        assert now[turned_on].tolist() == [0.0]
        assert torch.equal(now[~turned_on], state[s][~turned_on])


def test_set_masks_on_a_dense_layer_applies_the_torch_prune_format():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2).double()
    weight = layer.weight.detach().clone()
    mask = torch.tensor([[True, False, True], [False, True, True]])
    set_masks_(layer, {"weight": mask})
    assert torch.equal(layer.weight_orig.detach(), weight)  # nothing turned on
    assert torch.equal(layer.weight, weight * mask)


# --- how the active weights are shared between layers ------------------------------------


def test_apportion_rounds_by_the_largest_remainder_and_respects_caps():
    assert apportion(10, [1, 1, 1], [10, 10, 10]) == [4, 3, 3]  # 3.33 each; ties by index
    assert apportion(8, [4, 8], [16, 8]) == [3, 5]  # 2.67 and 5.33
    assert apportion(10, [9, 1], [2, 20]) == [2, 8]  # 9 > cap 2: the rest goes to the other
    assert apportion(3, [0, 0], [1, 4]) == [1, 2]  # no weight: the caps stand in (0.6, 2.4)
    with pytest.raises(ValueError, match="sum of the caps"):
        apportion(5, [1], [4])


def test_erdos_renyi_shares_follow_the_formula_with_epsilon_solved_for_the_target():
    # ε(n_in + n_out)/(n_in·n_out): (10 + 10)/100 = 0.2 and (20 + 10)/200 = 0.15; keeping
    # 150 of 300 weights, ε·(0.2·100 + 0.15·200) = 150 gives ε = 3: densities 0.6, 0.45.
    assert layer_counts([(10, 10), (10, 20)], 0.5, "er") == [60, 90]
    # A 2×2 layer has ratio 1: ε = 102/34 = 3 would make it 300 % dense, so it is dense and
    # ε = (102 − 4)/30 is solved again over the other layer.
    assert layer_counts([(2, 2), (10, 20)], 0.5, "er") == [4, 98]


def test_erk_counts_the_kernel_dimensions_and_er_does_not():
    # ERK: (4 + 1 + 3 + 3)/36 and (3 + 24)/72, so counts ∝ 11 and 27; keeping 76 of 108
    # gives ε = 2: 22 and 54. ER uses the channels only: (4 + 1)/4 per kernel position.
    shapes = [(4, 1, 3, 3), (3, 24)]
    assert layer_counts(shapes, 32 / 108, "erk") == [22, 54]
    assert layer_counts(shapes, 32 / 108, "er") == [36, 40]  # 45ε vs 27ε: the conv is capped
    assert layer_counts([(10, 10), (10, 20)], 0.9, "uniform") == [10, 20]


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
@pytest.mark.parametrize("sparsity", [0.0, 0.37, 0.9, 0.99])
def test_layer_counts_prune_exactly_round_s_n(distribution, sparsity):
    shapes = [(6, 1, 5, 5), (16, 6, 5, 5), (120, 256), (84, 120), (10, 84)]
    sizes = [math.prod(s) for s in shapes]
    found = layer_counts(shapes, sparsity, distribution)
    assert sum(sizes) - sum(found) == round(sparsity * sum(sizes))
    assert all(0 <= c <= n for c, n in zip(found, sizes, strict=True))


# --- SET --------------------------------------------------------------------------------


def test_set_drops_the_fraction_of_each_sign_closest_to_zero_and_regrows_at_random():
    net = nn.Sequential(nn.Linear(6, 2, bias=False)).double()
    method = SET(zeta=0.5, frequency=1)
    method.start_(net, 0.5, 10)  # 6 of 12 active
    set_active_(net[0], [0.1, 0.2, 0.7, -0.4, -0.45, -0.8])
    active = net[0].weight_mask.bool().clone()
    kept, grown = method.drop_and_grow(net, 1)
    # ⌊0.5·3⌋ = 1 of each sign: 0.1 and −0.4 (the smallest |θ| would be 0.1 and 0.2).
    dropped = active & ~kept["0.weight"]
    assert sorted(net[0].weight[dropped].tolist()) == [-0.4, 0.1]
    assert int(grown["0.weight"].sum()) == 2
    assert not (grown["0.weight"] & kept["0.weight"]).any()
    method.after_step(net, None, 0)  # an update step: (0 + 1) % 1 == 0
    assert counts(net) == [6]
    assert int(net[0].weight.count_nonzero()) == 4  # two regrown at exactly zero


def test_periodic_methods_update_every_frequency_steps_until_end():
    method = SET(frequency=3, end=0.5)
    method.total_steps = 20
    assert [t for t in range(20) if method.is_update(t)] == [2, 5, 8]  # 3, 6, 9 steps done


# --- DeepR ------------------------------------------------------------------------------


def deepr_layer(sparsity: float = 0.5, **options) -> tuple[nn.Module, DeepR]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 2, bias=False)).double()
    method = DeepR(**options)
    method.prepare_(net)
    method.start_(net, sparsity, 10)
    return net, method


def test_deepr_shares_connections_near_the_official_scripts_hand_set_ones():
    # The official MNIST script connects 1 % - 3 % - 30 % of LeNet-300-100's layers;
    # Erdős–Rényi's shares are near that, where uniform ones starve the output layer.
    net = LeNet300100()
    method = DeepR()
    method.prepare_(net)
    method.start_(net, 0.98, 10)
    assert counts(net) == layer_counts([(300, 784), (100, 300), (10, 100)], 0.98, "er")
    assert counts(net) == [3621, 1336, 367]  # 1.5 % - 4.5 % - 37 %


def test_deepr_puts_connections_that_cross_zero_to_sleep_and_wakes_as_many():
    net, method = deepr_layer(alpha=0.0, temperature=0.0)
    layer = net[0]
    sign = layer.deepr_sign.clone()
    active = layer.weight_mask.bool().clone()
    # Two active connections crossed zero (as an optimiser step would push them).
    magnitudes = torch.tensor([0.3, 0.2, 0.5, 0.1, 0.4, 0.6], dtype=torch.float64)
    crossed = torch.tensor([False, True, False, False, True, False])
    set_active_(layer, (torch.where(crossed, -magnitudes, magnitudes) * sign[active]).tolist())
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    method.after_step(net, optimizer, 0)
    now = layer.weight_mask.bool()
    survivors = active.clone()
    survivors[active] = ~crossed
    woken = now & ~survivors  # the crossed ones slept; 2 drawn among all dormant woke
    assert bool(now[survivors].all()) and int(woken.sum()) == 2
    assert set(layer.weight_orig[survivors].abs().tolist()) == {0.3, 0.5, 0.1, 0.6}
    assert layer.weight_orig[woken].tolist() == [0.0, 0.0]
    assert torch.equal(layer.deepr_sign, sign)  # signs are fixed
    assert bool((sign * layer.weight)[now].ge(0).all())


def test_deepr_l1_step_shrinks_every_active_magnitude_by_eta_alpha():
    net, method = deepr_layer(alpha=0.5, temperature=0.0)
    layer = net[0]
    before = layer.weight_orig.detach().clone()
    active = layer.weight_mask.bool()
    set_active_(layer, (layer.deepr_sign[active] * 1.0).tolist())  # |θ| = 1, no crossing
    method.after_step(net, torch.optim.SGD(net.parameters(), lr=0.1), 0)
    # η·α = 0.1 · 0.5 = 0.05 off each magnitude; dormant entries untouched.
    expected = layer.deepr_sign[active] * 0.95
    torch.testing.assert_close(layer.weight_orig[active], expected, rtol=0, atol=1e-15)
    assert torch.equal(layer.weight_orig[~active], before[~active])


def test_deepr_noise_has_the_standard_deviation_sqrt_2_eta_t():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(100, 100, bias=False)).double()
    method = DeepR(alpha=0.0, temperature=0.5)
    method.prepare_(net)
    method.start_(net, 0.5, 10)
    layer = net[0]
    active = layer.weight_mask.bool()
    set_active_(layer, (layer.deepr_sign[active] * 10.0).tolist())  # far from crossing
    method.after_step(net, torch.optim.SGD(net.parameters(), lr=0.1), 0)
    noise = layer.weight_orig.detach()[active] - layer.deepr_sign[active] * 10.0
    # √(2·0.1·0.5) = 0.316; a sample std of n = 5000 has relative error ≈ 1/√(2n) = 1 %.
    assert float(noise.std()) == pytest.approx(math.sqrt(0.1), rel=0.05)
    assert abs(float(noise.mean())) < 5 * math.sqrt(0.1 / 5000)


def test_deepr_needs_the_optimizer_and_finalize_removes_the_signs():
    net, method = deepr_layer()
    with pytest.raises(ValueError, match="learning rate"):
        method.after_step(net, None, 0)
    method.finalize_(net)
    assert "0.deepr_sign" not in net.state_dict()


# --- DSR --------------------------------------------------------------------------------


def test_dsr_threshold_doubles_below_and_halves_above_the_tolerance_band():
    assert adapt_threshold(1e-3, 80, 100, 0.1) == 2e-3  # 80 < 90: too few pruned
    assert adapt_threshold(1e-3, 120, 100, 0.1) == 5e-4  # 120 > 110: too many
    assert adapt_threshold(1e-3, 90, 100, 0.1) == 1e-3  # 90 to 110 is within δ
    assert adapt_threshold(1e-3, 110, 100, 0.1) == 1e-3


def test_dsr_prunes_under_the_threshold_and_reallocates_in_proportion_to_survivors():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Linear(5, 4, bias=False)).double()
    method = DSR(threshold=0.01, prune_fraction=0.5, frequency=1)
    method.start_(net, 0.5, 10)  # 10 of 20 active in each layer
    set_active_(net[0], [1e-3] * 6 + [1.0] * 4)  # 6 under H, 4 survive
    set_active_(net[1], [1e-3] * 2 + [1.0] * 8)  # 2 under H, 8 survive
    method.after_step(net, None, 0)
    # K = 8 regrown in proportion to 4 : 8 survivors: 2.67 → 3 and 5.33 → 5.
    assert counts(net) == [4 + 3, 8 + 5]
    assert [int(m.weight.count_nonzero()) for m in net] == [4, 8]  # regrown at zero
    # K = 8 < (1 − 0.1)·N_p = 0.9 · 0.5 · 40 = 18: too few pruned, H doubles.
    assert method.current_threshold == 0.02


# --- RigL -------------------------------------------------------------------------------


def test_rigl_drop_fraction_decays_along_a_cosine():
    assert cosine_drop_fraction(0, 0.3, 100) == pytest.approx(0.3, abs=1e-16)
    assert cosine_drop_fraction(25, 0.3, 100) == pytest.approx(0.15 * (1 + 0.5**0.5), abs=1e-16)
    assert cosine_drop_fraction(50, 0.3, 100) == pytest.approx(0.15, abs=1e-16)
    assert cosine_drop_fraction(100, 0.3, 100) == 0.0
    assert cosine_drop_fraction(150, 0.3, 100) == 0.0  # and after T_end


def test_rigl_drops_the_smallest_and_regrows_the_largest_dense_gradients():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3, bias=False)).double()
    method = RigL(alpha=0.34, frequency=1, end=1.0)
    method.prepare_(net)
    method.start_(net, 0.5, 100)  # 6 of 12 active
    layer = net[0]
    set_active_(layer, [0.5, -0.1, 0.9, 0.3, -0.05, 0.7])
    active = layer.weight_mask.bool().clone()
    x = torch.tensor([[1.0, 0.7, -0.3, 1.9]], dtype=torch.float64)
    c = torch.tensor([[1.0, -2.3, 3.1]], dtype=torch.float64)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    (net(x) * c).sum().backward()  # ∂L/∂W = cᵀx, distinct magnitudes everywhere
    torch.testing.assert_close(method.dense_grad(layer), c.T @ x, rtol=0, atol=0)
    # f(1) = 0.17·(1 + cos(π/100)) = 0.3398, so ⌊0.3398·6⌋ = 2 dropped: −0.05 and −0.1.
    assert int(cosine_drop_fraction(1, 0.34, 100) * 6) == 2
    kept, grown = method.drop_and_grow(net, 1)
    dropped = active & ~kept["0.weight"]
    assert sorted(layer.weight[dropped].tolist()) == [-0.1, -0.05]
    candidates = [(abs(g), i) for i, g in enumerate((c.T @ x).flatten().tolist())]
    candidates = [(g, i) for g, i in candidates if not kept["0.weight"].flatten()[i]]
    expected = {i for _, i in sorted(candidates, reverse=True)[:2]}
    assert set(grown["0.weight"].flatten().nonzero().flatten().tolist()) == expected
    optimizer.step()
    method.after_step(net, optimizer, 0)
    regrown = layer.weight_mask.bool() & ~kept["0.weight"]
    assert torch.equal(regrown, grown["0.weight"])
    assert layer.weight_orig[regrown].tolist() == [0.0, 0.0]
    assert optimizer.state[layer.weight_orig]["exp_avg"][regrown].tolist() == [0.0, 0.0]


def test_rigl_finalize_removes_its_hooks():
    net = nn.Sequential(nn.Linear(4, 3)).double()
    method = RigL()
    method.prepare_(net)
    assert len(net[0]._forward_hooks) == 1
    method.finalize_(net)
    assert len(net[0]._forward_hooks) == 0


# --- every method in a training loop ----------------------------------------------------

LOOP_OPTIONS = {
    "set": {"frequency": 2},
    "deepr": {"alpha": 1.0},  # a strong L1 term, so that connections cross zero
    "dsr": {"frequency": 2, "threshold": 0.05},
    "rigl": {"frequency": 2},
}


@pytest.mark.parametrize("name", sorted(LOOP_OPTIONS))
def test_sparsity_is_constant_at_every_step_and_the_final_prune_changes_nothing(name):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    method = get_method(name, **LOOP_OPTIONS[name])
    method.prepare_(net)
    method.start_(net, 0.6, 20)
    start = counts(net)
    assert sum(start) == 56 - round(0.6 * 56)
    layers = (net[0], net[2])
    first = [m.weight_mask.clone() for m in layers]

    def conserved(per_layer: list[int]) -> int | list[int]:
        # DSR moves weights between layers; the others keep each layer's count.
        return sum(per_layer) if name == "dsr" else per_layer

    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    for step in range(20):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
        method.after_step(net, optimizer, step)
        assert conserved(counts(net)) == conserved(start)
    assert any(not torch.equal(a, m.weight_mask) for a, m in zip(first, layers, strict=True))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    prune(net, method, 0.6)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    method.finalize_(net)
    assert all("sign" not in k for k in net.state_dict())


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("set", {"zeta": 1.0}, "zeta"),
        ("rigl", {"alpha": 0.0}, "alpha"),
        ("rigl", {"distribution": "normal"}, "distribution"),
        ("dsr", {"tolerance": 1.0}, "tolerance"),
        ("dsr", {"end": 1.5}, "end"),
        ("deepr", {"temperature": -1.0}, "temperature"),
        ("set", {"frequency": 0}, "frequency"),
    ],
)
def test_options_out_of_range_are_refused(name, options, message):
    with pytest.raises(ValueError, match=message):
        get_method(name, **options)


@pytest.mark.parametrize("name", sorted(LOOP_OPTIONS))
def test_after_step_before_start_says_so(name):
    net = nn.Sequential(nn.Linear(4, 3)).double()
    method = get_method(name)
    method.prepare_(net)
    with pytest.raises(RuntimeError, match="start_"):
        method.after_step(net, torch.optim.SGD(net.parameters(), lr=0.1), 0)
