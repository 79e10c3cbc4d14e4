"""Selection arguments of masks, to_dense, sparsity_report and compact: per-layer
thresholds, target sparsities (global and per layer), ties, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from test_masks import SPREAD  # family -> the parameter that spreads keep-probabilities
from torch import nn

import bayessparse as bs
from bayessparse.models import LeNet5Caffe, LeNet300100

PER_WEIGHT = [("sparse_vd", {}), ("l0", {"gate": "weight"})]


def spread_net(make: type[nn.Module], method: str = "sparse_vd", **options) -> nn.Module:
    """``make()`` converted to ``method``, its keep-probabilities drawn at random."""
    torch.manual_seed(0)
    net = bs.to_sparse_(make(), method, **options)
    name, low, high = SPREAD[method]
    with torch.no_grad():
        for _, layer in bs.sparse_modules(net):
            getattr(layer, name).uniform_(low, high)
    return net


def pruned_scores(net: nn.Module, masks: dict[str, torch.Tensor]):
    """The keep-probabilities of the pruned and of the kept weights, over all layers."""
    pruned, kept = [], []
    for name, layer in bs.sparse_modules(net):
        p = layer.keep_prob().detach().expand_as(layer.weight)
        mask = masks[f"{name}.weight"]
        pruned.append(p[~mask])
        kept.append(p[mask])
    return torch.cat(pruned), torch.cat(kept)


@pytest.mark.parametrize("make", [LeNet300100, LeNet5Caffe])
@pytest.mark.parametrize(("method", "options"), PER_WEIGHT)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 0.99, 0.999])
def test_global_target_is_hit_exactly_with_per_weight_scores(make, method, options, sparsity):
    net = spread_net(make, method, **options)
    report = bs.sparsity_report(net, sparsity=sparsity)
    assert report["weights"] - report["kept"] == round(sparsity * report["weights"])
    assert abs(report["sparsity"] - sparsity) < 1e-3  # within 0.1 percentage point
    pruned, kept = pruned_scores(net, bs.masks(net, sparsity=sparsity))
    if len(pruned) and len(kept):  # ranked by keep-probability, all layers together
        assert pruned.max() <= kept.min()


@pytest.mark.parametrize("make", [LeNet300100, LeNet5Caffe])
@pytest.mark.parametrize(("method", "options"), PER_WEIGHT)
@pytest.mark.parametrize("sparsity", [0.3, 0.9, 0.99])
def test_layer_target_is_hit_exactly_in_each_layer(make, method, options, sparsity):
    net = spread_net(make, method, **options)
    report = bs.sparsity_report(net, sparsity=sparsity, scope="layer")
    for name, layer in report["layers"].items():
        assert layer["weights"] - layer["kept"] == round(sparsity * layer["weights"]), name
    assert abs(report["sparsity"] - sparsity) < 1e-3


def unit_dims(layer: bs.SparseModule) -> tuple[int, ...]:
    """The weight dimensions over which one score (a unit) is shared."""
    p = layer.keep_prob()
    return tuple(d for d in range(layer.weight.dim()) if p.shape[d] == 1)


@pytest.mark.parametrize("make", [LeNet300100, LeNet5Caffe])
@pytest.mark.parametrize("method", ["l0", "group_nj", "spike_slab"])
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_unit_scores_prune_whole_units_reaching_the_target(make, method, scope, sparsity):
    net = spread_net(make, method)
    masks = bs.masks(net, sparsity=sparsity, scope=scope)
    layers = dict(bs.sparse_modules(net))
    for name, layer in layers.items():
        mask = masks[f"{name}.weight"].int()
        dims = unit_dims(layer)
        assert torch.equal(mask.amax(dims), mask.amin(dims)), name  # whole units
    groups = [[name] for name in layers] if scope == "layer" else [list(layers)]
    for names in groups:
        n = sum(layers[name].weight.numel() for name in names)
        pruned = sum(int((~masks[f"{name}.weight"]).sum()) for name in names)
        unit = max(
            math.prod(layers[name].weight.shape[d] for d in unit_dims(layers[name]))
            for name in names
        )
        # The unit boundary nearest the target: at most half a unit away.
        assert abs(pruned - round(sparsity * n)) <= unit / 2


def test_ties_are_broken_by_position_deterministically():
    torch.manual_seed(0)
    net = bs.to_sparse_(LeNet300100())
    with torch.no_grad():
        for _, layer in bs.sparse_modules(net):
            layer.weight_log_sigma2.fill_(30.0)  # log alpha clamped at 8: all scores equal
    target = round(0.6 * 266_200)
    masks = bs.masks(net, sparsity=0.6)
    first = masks["1.weight"].flatten()
    assert not first[:target].any() and first[target:].all()  # layer order, row-major
    assert masks["3.weight"].all() and masks["5.weight"].all()
    again = bs.masks(net, sparsity=0.6)
    assert all(torch.equal(masks[k], again[k]) for k in masks)
    per_layer = bs.masks(net, sparsity=0.6, scope="layer")
    for key, mask in per_layer.items():
        k = round(0.6 * mask.numel())
        assert not mask.flatten()[:k].any() and mask.flatten()[k:].all(), key


def test_weights_pruned_for_good_count_towards_the_target():
    net = spread_net(LeNet300100)
    fixed = torch.rand(300, 784) > 0.4  # about 40% of fc1 pruned for good
    net[1].prune_(fixed)
    n = 266_200
    masks = bs.masks(net, sparsity=0.7)
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.7 * n)
    assert not (masks["1.weight"] & ~fixed).any()
    few = bs.masks(net, sparsity=0.01)  # fewer than pruned already: nothing more
    assert torch.equal(few["1.weight"], fixed) and few["3.weight"].all()


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec, self.out = nn.Linear(20, 20), nn.Linear(20, 20), nn.Linear(20, 3)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.out(torch.relu(self.dec(torch.relu(self.enc(x)))))


def test_a_tied_weight_counts_once_towards_a_global_target():
    torch.manual_seed(0)
    net = bs.to_sparse_(Tied())
    with torch.no_grad():
        net.enc.weight_log_sigma2.uniform_(-12, 0)
    report = bs.sparsity_report(net, sparsity=0.5)
    assert report["weights"] == 460 and report["weights"] - report["kept"] == 230
    masks = bs.masks(net, sparsity=0.5)
    assert torch.equal(masks["enc.weight"], masks["dec.weight"])


def test_per_layer_thresholds_by_layer_name_or_state_dict_key():
    net = spread_net(LeNet5Caffe, "group_nj")
    masks = bs.masks(net, threshold={"0": 0.0, "3.weight": 1.0, "7.bias": 0.3})
    assert masks["0.weight"].all() and masks["0.bias"].all()
    assert not masks["3.weight"].any() and not masks["3.bias"].any()
    assert torch.equal(masks["7.weight"], net[7].mask(0.3))
    assert torch.equal(masks["9.weight"], net[9].mask())  # not named: the default
    report = bs.sparsity_report(net, threshold={"3.weight": 1.0, "3": 1.0})
    assert report["selection"] == {"threshold": {"3": 1.0}, "sparsity": None, "scope": None}
    assert report["layers"]["3"]["threshold"] == 1.0
    assert report["layers"]["0"]["threshold"] == net[0].default_threshold


def test_sparsity_report_adds_the_selection_and_keeps_its_keys():
    net = spread_net(LeNet300100)
    keys = {"layers", "weights", "kept", "sparsity", "compression"}
    layer_keys = {"weights", "kept", "sparsity", "inputs_kept", "outputs_kept"}
    cases = [
        ({}, {"threshold": None, "sparsity": None, "scope": None}),
        ({"threshold": 0.25}, {"threshold": 0.25, "sparsity": None, "scope": None}),
        ({"sparsity": 0.8}, {"threshold": None, "sparsity": 0.8, "scope": "global"}),
        (
            {"sparsity": 0.8, "scope": "layer"},
            {"threshold": None, "sparsity": 0.8, "scope": "layer"},
        ),
    ]
    for kwargs, selection in cases:
        report = bs.sparsity_report(net, **kwargs)
        assert keys < set(report) and report["selection"] == selection
        assert all(layer_keys < set(layer) for layer in report["layers"].values())
        cut = kwargs.get("threshold", None if "sparsity" in kwargs else net[1].default_threshold)
        assert report["layers"]["1"]["threshold"] == cut


def test_to_dense_applies_the_selected_masks():
    net = spread_net(LeNet5Caffe, "l0").eval()
    dense = bs.to_dense(net, sparsity=0.95, bake=True)
    masks = bs.masks(net, sparsity=0.95)
    kept = sum(int(dense.get_parameter(k).ne(0).sum()) for k in masks if k.endswith("weight"))
    assert kept == sum(int(m.sum()) for k, m in masks.items() if k.endswith("weight"))
    layer = bs.to_dense(net[0], sparsity=0.5)  # a bare layer
    assert torch.equal(layer.weight_mask.bool(), bs.masks(net[0], sparsity=0.5)["weight"])


FUNCTIONS = {
    "masks": bs.masks,
    "to_dense": bs.to_dense,
    "sparsity_report": bs.sparsity_report,
    "compact": bs.compact,
}
BAD = [
    ({"threshold": 0.5, "sparsity": 0.5}, ValueError, "either threshold= or sparsity="),
    ({"threshold": math.nan}, ValueError, "threshold"),
    ({"threshold": 1.5}, ValueError, r"threshold in \[0.0, 1.0\]"),
    ({"threshold": "0.5"}, TypeError, "threshold"),
    ({"sparsity": math.nan}, ValueError, "sparsity"),
    ({"sparsity": 1.0}, ValueError, r"sparsity in \[0, 1\)"),
    ({"sparsity": -0.1}, ValueError, "sparsity"),
    ({"sparsity": "0.9"}, TypeError, "sparsity"),
    ({"sparsity": True}, TypeError, "sparsity"),
    ({"sparsity": 0.5, "scope": "local"}, ValueError, "scope"),
    ({"threshold": {"fc9": 0.1}}, ValueError, r"'fc9'.*\['1', '3', '5'\]"),
    ({"threshold": {"1": 2.0}}, ValueError, r"threshold\['1'\]"),
    ({"threshold": {"1": math.nan}}, ValueError, r"threshold\['1'\]"),
    ({"threshold": {"1": "x"}}, TypeError, r"threshold\['1'\]"),
    ({"threshold": {"1": 0.1, "1.weight": 0.2}}, ValueError, "one threshold per layer"),
]


@pytest.mark.parametrize("function", sorted(FUNCTIONS))
@pytest.mark.parametrize(("kwargs", "error", "match"), BAD)
def test_bad_selections_fail_clearly(function, kwargs, error, match):
    net = bs.to_sparse_(LeNet300100())
    with pytest.raises(error, match=match):
        FUNCTIONS[function](net, **kwargs)
