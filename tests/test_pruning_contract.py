"""The contract every registered pruning method keeps (as torch.nn.utils.prune's property
tests): finite scores that broadcast to the weights, the exact requested sparsity, masks in
torch prune format equal to what is returned, idempotence, nested masks as sparsity grows,
no side effect of choosing masks, and clear errors for bad input. A new method is covered
by registering it."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from bayessparse.pruning import compute_masks, get_method, methods, prunable_layers, prune
from bayessparse.pruning.base import param_key

NAMES = sorted(methods())


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(24, 8), nn.ReLU(), nn.Linear(8, 3),
    )  # fmt: skip


NETS = {"mlp": (mlp, (1, 4, 4)), "cnn": (cnn, (1, 10, 10))}


def setup(name: str, net_name: str, seed: int = 0):
    """A method, a prepared net and data of 64 examples for it."""
    build, shape = NETS[net_name]
    torch.manual_seed(seed)
    net = build().double()
    x = torch.randn(64, *shape, dtype=torch.float64)
    y = torch.randint(0, 3, (64,))
    method = get_method(name)
    net = method.prepare_(net)
    return method, net, (x, y)


def weights_in_scope(net: nn.Module, masks: dict) -> tuple[int, int]:
    """(pruned, total) over the weights the method scored."""
    layers = prunable_layers(net)
    total = sum(layers[k.rpartition(".")[0]].weight.numel() for k in masks if k.endswith("weight"))
    pruned = sum(int((~m).sum()) for k, m in masks.items() if k.endswith("weight"))
    return pruned, total


def largest_unit(net: nn.Module, masks: dict) -> int:
    layers = prunable_layers(net)
    return max(
        math.prod(layers[k.rpartition(".")[0]].weight.shape[1:])
        for k in masks
        if k.endswith("weight")
    )


@pytest.mark.parametrize("net_name", sorted(NETS))
@pytest.mark.parametrize("name", NAMES)
def test_scores_are_finite_and_broadcast_to_the_weights(name, net_name):
    method, net, data = setup(name, net_name)
    scores = method.scores(net, data)
    layers = prunable_layers(net)
    assert scores
    for key, value in scores.items():
        weight = layers[key.rpartition(".")[0]].weight
        assert torch.broadcast_shapes(value.shape, weight.shape) == weight.shape, key
        assert torch.isfinite(value).all(), key
        if method.structure == "unit":
            assert value.shape[0] == weight.shape[0] and value[0].numel() == 1, key


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.8])
@pytest.mark.parametrize("net_name", sorted(NETS))
@pytest.mark.parametrize("name", NAMES)
def test_prune_hits_the_sparsity_in_torch_prune_format(name, net_name, sparsity):
    method, net, data = setup(name, net_name)
    masks = prune(net, method, sparsity, data=data)
    pruned, total = weights_in_scope(net, masks)
    # Per-weight scores prune exactly round(s*N); units stop at the nearest unit boundary.
    slack = 0 if method.structure == "weight" else largest_unit(net, masks) / 2
    assert abs(pruned - round(sparsity * total)) <= slack
    modules = dict(net.named_modules())
    for key, mask in masks.items():
        layer, _, param = key.rpartition(".")
        module = modules[layer]
        assert mask.dtype == torch.bool
        assert torch.equal(getattr(module, f"{param}_mask").bool(), mask), key
        assert torch.equal(
            getattr(module, param)[~mask], torch.zeros_like(getattr(module, param)[~mask])
        )
    state = net.state_dict()
    assert all(f"{k}_orig" in state and f"{k}_mask" in state for k in masks)


@pytest.mark.parametrize("name", NAMES)
def test_pruning_again_at_the_same_sparsity_changes_nothing(name):
    method, net, data = setup(name, "cnn")
    first = prune(net, method, 0.5, data=data)
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    second = prune(net, method, 0.5, data=data)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    if method.stage != "after_training" or name not in ("obs", "kron_obs"):
        # Methods without a compensating update leave every value as it was.
        assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("name", NAMES)
def test_masks_are_nested_as_sparsity_grows(name):
    method, net, data = setup(name, "mlp")
    low = prune(net, method, 0.3, data=data)
    high = prune(net, method, 0.7, data=data)
    for key in low:
        assert not (high[key] & ~low[key]).any(), f"{key}: a pruned weight came back"


@pytest.mark.parametrize("name", NAMES)
def test_choosing_masks_changes_nothing(name):
    method, net, data = setup(name, "cnn")
    before = copy.deepcopy(net.state_dict())
    compute_masks(net, method, 0.6, data)
    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", NAMES)
def test_prepare_and_finalize_keep_the_eval_output(name):
    method, _, (x, _) = setup(name, "cnn")
    torch.manual_seed(1)
    net = cnn().double().eval()
    expected = net(x)
    keys = set(net.state_dict())
    net = method.finalize_(method.prepare_(net)).eval()
    torch.testing.assert_close(net(x), expected, rtol=1e-10, atol=1e-10)
    assert set(net.state_dict()) == keys


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown pruning method 'nope'.*magnitude"):
        prune(mlp(), "nope", 0.5)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, math.nan])
def test_sparsity_outside_0_1_is_refused(sparsity):
    with pytest.raises(ValueError, match="sparsity in \\[0, 1\\)"):
        prune(mlp(), "magnitude", sparsity)


@pytest.mark.parametrize("name", [n for n in NAMES if get_method(n).needs_data])
def test_a_method_that_needs_data_says_so(name):
    with pytest.raises(ValueError, match="data=None"):
        prune(mlp(), name, 0.5)


@pytest.mark.parametrize("name", [n for n in NAMES if get_method(n).structure == "unit"])
def test_a_unit_method_on_a_net_without_units_says_so(name):
    method, _, data = setup(name, "mlp")
    net = method.prepare_(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).double())
    with pytest.raises(ValueError, match="nothing to prune|no prunable|units"):
        prune(net, method, 0.5, data=data)


def test_unknown_options_are_refused():
    with pytest.raises(TypeError, match="unknown options \\['colour'\\]"):
        get_method("magnitude", colour="red")


def test_masks_are_keyed_like_the_state_dict():
    net = mlp()
    masks = prune(net, "magnitude", 0.5)
    assert sorted(masks) == [param_key("1"), param_key("3"), param_key("5")]


def test_the_readme_lists_every_registered_method():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("| Name | Family |") :].split("\n\n")[0]
    assert [name for name in NAMES if f"`{name}`" not in table] == []
