"""Structured pruning (filter L1, network slimming, sparse structure selection): planted
units are the ones pruned, masks cover whole units and their biases, the scales attached
by prepare_ fold away exactly, the proximal step by hand, and the pruned nets compact."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bayessparse.compaction import compact_pruned
from bayessparse.pruning import get_method, prunable_layers, prune
from bayessparse.pruning.structured import soft_threshold, unit_layers

# Unit-layer weights of planted_mlp: 6 units of 4 inputs and 5 units of 6.
UNIT_WEIGHTS = 6 * 4 + 5 * 6
# Planted: units 1 and 4 of layer "0" (4 weights each) and unit 0 of layer "2" (6).
PLANTED = {"0": [1, 4], "2": [0]}
PLANTED_SPARSITY = (2 * 4 + 6) / UNIT_WEIGHTS


def planted_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)
    ).double()  # fmt: skip


def small_cnn(bias: bool = True) -> nn.Module:
    """LeNet-5's shape in miniature: conv-relu-pool-conv-relu-flatten-linear-relu-linear."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, bias=bias), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3),
        nn.ReLU(), nn.Flatten(), nn.Linear(24, 8), nn.ReLU(), nn.Linear(8, 3),
    ).double()  # fmt: skip


def images(n: int = 32) -> torch.Tensor:
    return torch.randn(
        n, 1, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )


def assert_planted_units_pruned(masks: dict[str, torch.Tensor]) -> None:
    """Exactly the planted units are pruned, each whole, with its bias; the output layer
    is left alone."""
    assert sorted(masks) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    for layer, planted in PLANTED.items():
        weight, bias = masks[f"{layer}.weight"], masks[f"{layer}.bias"]
        expected = torch.ones_like(bias)
        expected[planted] = False
        assert torch.equal(bias, expected)
        assert torch.equal(weight, expected[:, None].expand_as(weight))


def test_filter_l1_prunes_the_filters_of_smallest_l1_norm():
    net = planted_mlp()
    with torch.no_grad():
        for layer, planted in PLANTED.items():
            net.get_parameter(f"{layer}.weight")[planted] *= 1e-3
    scores = get_method("filter_l1").scores(net, None)
    torch.testing.assert_close(scores["0.weight"], net[0].weight.abs().sum(1, keepdim=True))
    assert_planted_units_pruned(prune(net, "filter_l1", PLANTED_SPARSITY))


def test_filter_l1_scores_conv_filters_over_their_whole_kernel():
    net = small_cnn()
    scores = get_method("filter_l1").scores(net, None)
    assert scores["0.weight"].shape == (4, 1, 1, 1)
    torch.testing.assert_close(scores["3.weight"].flatten(), net[3].weight.abs().sum((1, 2, 3)))


def test_slimming_prunes_the_units_of_smallest_scale():
    method = get_method("slimming")
    net = method.prepare_(planted_mlp())
    with torch.no_grad():
        for layer, planted in PLANTED.items():
            gamma = net.get_submodule(f"{layer}.slim_bn").weight
            assert torch.equal(gamma, torch.full_like(gamma, 0.5))  # the official start
            gamma[planted] = torch.tensor([-1e-3, 2e-3][: len(planted)], dtype=gamma.dtype)
    assert_planted_units_pruned(prune(net, method, PLANTED_SPARSITY))


def test_slimming_uses_the_batch_norms_a_net_has():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)
    ).double()  # fmt: skip
    method = get_method("slimming")
    method.prepare_(net)
    assert not hasattr(net[0], "slim_bn") and hasattr(net[3], "slim_bn")
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([1.0, 0.5, 2.0, 1.5, 0.001, 0.7], dtype=torch.float64))
        net[3].slim_bn.weight.copy_(torch.tensor([0.3, 0.2, 0.4, 0.002, 0.6], dtype=torch.float64))
    # λ·Σ|γ| over both norms, per example.
    expected = 1e-4 * (1.0 + 0.5 + 2.0 + 1.5 + 0.001 + 0.7 + 0.3 + 0.2 + 0.4 + 0.002 + 0.6)
    torch.testing.assert_close(float(method.penalty(net).detach()), expected, rtol=1e-12, atol=0)
    masks = prune(net, method, (4 + 6) / UNIT_WEIGHTS)
    assert masks["0.bias"].tolist() == [True, True, True, True, False, True]
    assert masks["3.bias"].tolist() == [True, True, True, False, True]


def test_soft_threshold_by_hand():
    values = torch.tensor([1.0, 0.05, -0.3, -0.01, 0.2, 0.0], dtype=torch.float64)
    expected = torch.tensor([0.95, 0.0, -0.25, 0.0, 0.15, 0.0], dtype=torch.float64)
    torch.testing.assert_close(soft_threshold(values, 0.05), expected, rtol=1e-15, atol=1e-16)


def test_sss_proximal_step_uses_the_learning_rate_of_the_scales_group():
    method = get_method("sss", gamma=0.5)
    net = method.prepare_(planted_mlp())
    scale = net[0].sss_scale
    others = [p for p in net.parameters() if p is not scale]
    optimizer = torch.optim.SGD([{"params": others}, {"params": [scale], "lr": 0.1}], lr=1.0)
    with torch.no_grad():
        scale.copy_(torch.tensor([1.0, 0.05, -0.3, -0.01, 0.2, 0.0], dtype=torch.float64))
    before = net[2].sss_scale.clone()
    method.after_step(net, optimizer, step=0)
    # Threshold lr·γ = 0.1 · 0.5 = 0.05 on this group; 1.0 · 0.5 on the other layer's.
    expected = torch.tensor([0.95, 0.0, -0.25, 0.0, 0.15, 0.0], dtype=torch.float64)
    torch.testing.assert_close(scale.detach(), expected, rtol=1e-15, atol=1e-16)
    torch.testing.assert_close(net[2].sss_scale.detach(), before - 0.5, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="after the method.s prepare_"):
        method.after_step(net, torch.optim.SGD(others, lr=0.1), step=1)


def test_sss_prunes_the_units_of_smallest_scale():
    method = get_method("sss")
    net = method.prepare_(planted_mlp())
    with torch.no_grad():
        for layer, planted in PLANTED.items():
            net.get_parameter(f"{layer}.sss_scale")[planted] = 0.0
    assert_planted_units_pruned(prune(net, method, PLANTED_SPARSITY))


def trained_in_place(name: str, net: nn.Module) -> nn.Module:
    """``net`` prepared by method ``name`` with its scales and statistics moved away from
    their start, as training would."""
    generator = torch.Generator().manual_seed(3)
    get_method(name).prepare_(net)
    with torch.no_grad():
        for param_name, param in net.named_parameters():
            if "slim_bn" in param_name or "sss_scale" in param_name:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype))
        net.train()
        for _ in range(3):  # running statistics of the slim_bn norms
            net(images())
    return net.eval()


@pytest.mark.parametrize("name", ["slimming", "sss"])
@pytest.mark.parametrize("sparsity", [0.0, 0.4])
def test_finalize_folds_the_scales_exactly(name, sparsity):
    net = trained_in_place(name, small_cnn(bias=False))
    keys = set(small_cnn(bias=False).state_dict())
    masks = prune(net, name, sparsity) if sparsity else {}
    x = images()
    expected = net(x)
    get_method(name).finalize_(net)
    torch.testing.assert_close(net(x), expected, rtol=1e-12, atol=1e-12)
    state = set(net.state_dict())
    assert {f"{k}_orig" if k in masks else k for k in keys} <= state
    # Only the bias a folded norm's shift needs is new, and the attached scales are gone.
    assert not any("slim_bn" in k or "sss_scale" in k for k in state)
    assert all(not layer._forward_hooks for layer in prunable_layers(net).values())


def test_a_copy_of_a_prepared_net_finalizes_on_its_own():
    method = get_method("slimming")
    net = method.prepare_(small_cnn())
    twin = method.finalize_(copy.deepcopy(net))
    assert not hasattr(twin[0], "slim_bn") and not twin[0]._forward_hooks
    assert hasattr(net[0], "slim_bn") and net[0]._forward_hooks


@pytest.mark.parametrize("name", ["filter_l1", "slimming", "sss"])
def test_pruned_units_compact_away(name):
    method = get_method(name)
    net = trained_in_place(name, small_cnn()) if name != "filter_l1" else small_cnn().eval()
    # Half the units of each layer (a global ranking may empty a layer of small filters).
    prune(net, method, 0.5, scope="layer")
    net = method.finalize_(net).eval()
    small = compact_pruned(net)
    assert [m.weight.shape[0] for m in prunable_layers(small).values()] == [2, 3, 4, 3]
    torch.testing.assert_close(small(images()), net(images()), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["filter_l1", "slimming", "sss"])
def test_a_net_without_hidden_units_names_the_fix(name):
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    method = get_method(name)
    assert method.prepare_(net) is net  # nothing to attach
    with pytest.raises(ValueError, match="no units to prune.*'magnitude'"):
        method.scores(net, None)
    with pytest.raises(ValueError, match="no units to prune"):
        unit_layers(net)


@pytest.mark.parametrize("name", ["slimming", "sss"])
def test_scoring_before_prepare_says_so(name):
    with pytest.raises(ValueError, match=r"Call prepare_\(net\) first"):
        get_method(name).scores(planted_mlp(), None)


@pytest.mark.parametrize(("name", "option"), [("slimming", "l1"), ("sss", "gamma")])
def test_negative_strengths_are_refused(name, option):
    with pytest.raises(ValueError, match=f"{option} to be a finite number >= 0"):
        get_method(name, **{option: -1.0})
