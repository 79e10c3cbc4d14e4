"""compact(): physically smaller networks that compute the same function; FLOPs."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import bayessparse as bs
from bayessparse import compact
from bayessparse.compaction import compact_pruned
from bayessparse.metrics import flops
from bayessparse.models import LeNet5Caffe, LeNet300100
from bayessparse.recipes import kept_architecture

# The parameter that opens (value 0) or closes (value 1) a group, per family.
GROUP_SWITCHES = {
    "l0": ("gate_log_alpha", (10.0, -10.0)),
    "group_nj": ("scale_log_sigma2", (-8.0, 8.0)),  # log alpha of z = 1: -8 or 8
    "horseshoe": ("local_log_sigma", (-5.0, 2.0)),  # scale noise e^-10 or e^4 (x mean²)
    "spike_slab": ("inclusion_logit", (10.0, -10.0)),
    "sbp": ("noise_log_sigma", (-5.0, 4.0)),  # SNR 247 or 0.34 at mu = 0
}


def closed_lenet5(method: str = "l0") -> nn.Module:
    """LeNet-5-Caffe with structured sparse layers: 5 of 20 and 10 of 50 channels, 76 of 800
    and 16 of 500 inputs open (the BC-GHS architecture 5-10-76-16)."""
    torch.manual_seed(0)
    net = bs.to_sparse_(LeNet5Caffe().double(), method)
    opened = {"0": range(3, 8), "3": range(10, 20), "7": range(0, 800, 10)[:76], "9": range(16)}
    name_of_switch, (open_value, closed_value) = GROUP_SWITCHES[method]
    with torch.no_grad():
        for name, layer in bs.sparse_modules(net):
            switch = getattr(layer, name_of_switch)
            switch.fill_(closed_value)
            switch.view(-1)[list(opened[name])] = open_value
    return net.eval()


@pytest.mark.parametrize("method", sorted(GROUP_SWITCHES))
def test_compacted_lenet5_has_the_kept_architecture_and_the_same_outputs(method):
    net = closed_lenet5(method)
    small = compact(net)
    x = torch.randn(7, 1, 28, 28, dtype=torch.float64)
    assert torch.allclose(small(x), net(x), rtol=1e-12, atol=1e-12)
    convs = [m for m in small if isinstance(m, nn.Conv2d)]
    linears = [m for m in small if isinstance(m, nn.Linear)]
    # fc1 reads 76 features, which live in (a subset of) conv2's 10 open channels.
    assert [c.out_channels for c in convs] == [5, 10]
    assert linears[0].in_features <= 10 * 16 and linears[1].in_features == 16
    assert linears[-1].out_features == 10
    assert kept_architecture(net) == "5-10-76-16"
    assert not any(
        isinstance(m, (bs.SparseModule, torch.nn.utils.prune.BasePruningMethod))
        for m in small.modules()
    )


def test_flops_fall_with_compaction():
    net = closed_lenet5()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    before = flops(bs.to_dense(net), x)
    after = flops(compact(net), x)
    dense = flops(LeNet5Caffe().double(), x)
    # LeNet-5-Caffe: 20*25*24*24 + 50*20*25*8*8 + 800*500 + 500*10 = 2,293,000 MACs.
    # (Only the two counts compared here: flops may report more.)
    assert {key: dense[key] for key in ("dense", "nonzero")} == {
        "dense": 2_293_000,
        "nonzero": 2_293_000,
    }
    assert before["dense"] == dense["dense"]
    # Compaction drops zeros and weights that only ever see zero inputs (conv2's weights on
    # conv1's closed channels count as non-zero before), none that the output depends on.
    assert after["nonzero"] <= after["dense"] < before["nonzero"]
    assert after["dense"] < dense["dense"] / 10


def test_weight_level_sparsity_removes_dead_units():
    torch.manual_seed(0)
    net = bs.to_sparse_(LeNet300100().double())
    with torch.no_grad():
        for _, layer in bs.sparse_modules(net):
            layer.weight_log_sigma2.fill_(-20.0)
        net[1].weight_log_sigma2[:250] = 10.0  # 250 of the 300 hidden units get no input
        net[1].bias[:250] = 0.0
        net[3].weight_log_sigma2[:, 280:] = 10.0  # ... and 20 are never read
    small = compact(net.eval())
    assert [m.out_features for m in small if isinstance(m, nn.Linear)] == [30, 100, 10]
    x = torch.randn(5, 784, dtype=torch.float64)
    assert torch.allclose(small(x), net(x), rtol=1e-12, atol=1e-12)


def test_units_with_a_bias_but_no_inputs_are_folded_into_the_next_bias():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        net[0].weight[1] = 0.0  # unit 1 outputs relu(bias), a constant the next layer reads
        net[0].bias[1] = 0.5
    small = compact(net)
    assert small[0].out_features == 2 and small[2].in_features == 2
    assert torch.allclose(small[2].bias, net[2].bias + 0.5 * net[2].weight[:, 1])
    x = torch.randn(3, 4, dtype=torch.float64)
    assert torch.allclose(small(x), net(x), rtol=1e-12, atol=1e-12)


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) if x.sum() > 0 else self.b(x)  # control flow on a value


def test_networks_that_cannot_be_compacted_are_refused_clearly():
    with pytest.raises(TypeError, match=r"torch.fx can trace, got Branchy.*control flow"):
        compact(Branchy())
    sparse = bs.to_sparse_(LeNet300100())
    with pytest.raises(TypeError, match=r"Bayesian sparse layer '1'.*bayessparse.compact"):
        compact_pruned(sparse)


def test_a_bare_layer_compacts_to_a_sequential():
    layer = nn.Linear(5, 2).double()
    with torch.no_grad():
        layer.weight[:, [1, 3]] = 0.0
    small = compact(layer)
    assert isinstance(small, nn.Sequential) and small[1].in_features == 3
    x = torch.randn(4, 5, dtype=torch.float64)
    assert torch.allclose(small(x), layer(x), rtol=1e-12, atol=1e-12)


def pruned_sparse_vd(net: nn.Module, closed: set[str]) -> nn.Module:
    """``net`` with sparse VD layers; the layers named in ``closed`` are fully pruned."""
    torch.manual_seed(0)
    bs.to_sparse_(net.double())
    with torch.no_grad():
        for name, layer in bs.sparse_modules(net):
            layer.weight_log_sigma2.fill_(10.0 if name in closed else -20.0)
            layer.bias.uniform_(-1, 1)  # the constants that flow through
    return net.eval()


@pytest.mark.parametrize(
    ("make", "closed", "shape"),
    [
        (LeNet5Caffe, {"0", "3", "7", "9"}, (4, 1, 28, 28)),  # everything
        (LeNet5Caffe, {"3"}, (4, 1, 28, 28)),  # conv2: constant channels across Flatten
        (LeNet5Caffe, {"7"}, (4, 1, 28, 28)),  # fc1
        (LeNet5Caffe, {"0"}, (4, 1, 28, 28)),  # the first layer
        (LeNet5Caffe, {"9"}, (4, 1, 28, 28)),  # the last layer
        (LeNet300100, {"1", "3", "5"}, (4, 784)),
        (LeNet300100, {"3"}, (4, 784)),
    ],
)
def test_fully_pruned_layers_compact_to_the_same_function(make, closed, shape):
    net = pruned_sparse_vd(make(), closed)
    small = compact(net)
    x = torch.randn(shape, dtype=torch.float64)
    assert torch.allclose(small(x), net(x), rtol=1e-12, atol=1e-12)
    # Nothing reads the layer before a fully pruned one: it keeps one zero unit.
    weighted = [i for i, m in enumerate(small) if isinstance(m, (nn.Linear, nn.Conv2d))]
    for before, after in itertools.pairwise(weighted):
        if str(after) in closed:
            assert small[before].weight.shape[0] == 1 and not small[before].weight.any()
            assert not small[before].bias.any()


def test_everything_pruned_gives_the_constant_of_the_biases():
    net = pruned_sparse_vd(LeNet300100(), {"1", "3", "5"})
    out = compact(net)(torch.randn(3, 784, dtype=torch.float64))
    assert torch.equal(out, net[5].bias.detach().expand(3, -1))


@pytest.mark.parametrize("convert", [False, True])
def test_layers_pruned_with_torch_prune_compact_from_their_current_weights(convert):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    prune.l1_unstructured(net[2], "weight", 0.5)
    if convert:  # the pruned layer is left dense
        bs.to_sparse_(net, include=lambda name, m: name == "0")
    with torch.no_grad():
        net[2].weight_orig.add_(1.0)  # an optimizer step: net[2].weight is stale until a forward
    small = compact(net.eval())
    baked = bs.to_dense(net, bake=True)
    assert not prune.is_pruned(baked)
    dense = bs.to_dense(net)
    assert torch.equal(dense[2].weight, dense[2].weight_orig * dense[2].weight_mask)
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = net(x)
    assert torch.allclose(small(x), expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(baked(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "selection",
    [{"threshold": {"9": 0.5}}, {"sparsity": 0.95}, {"sparsity": 0.9, "scope": "layer"}],
    ids=str,
)
def test_compact_takes_the_selection_of_to_dense(selection):
    net = closed_lenet5("group_nj")
    with torch.no_grad():
        for _, layer in bs.sparse_modules(net):  # spread the open groups' keep-probabilities
            log_sigma2 = layer.scale_log_sigma2  # log alpha, as the scales' means are 1
            opened = log_sigma2 < 0
            log_sigma2[opened] = torch.rand_like(log_sigma2[opened]) * 6 - 5
    small = compact(net, **selection)
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    dense = bs.to_dense(net, **selection)
    assert torch.allclose(small(x), dense(x), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(small(x), compact(net)(x))  # not the default selection
    with pytest.raises(ValueError, match="either threshold= or sparsity="):
        compact(net, threshold=0.5, sparsity=0.5)


def test_subnormal_weights_are_flushed_to_zero_and_their_dead_units_removed():
    # Sparse VD leaves pruned means in the subnormal range; CPUs multiply them tens of
    # times slower, and a unit holding only subnormals computes nothing but its bias.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    tiny = torch.finfo(torch.float32).tiny
    with torch.no_grad():
        net[0].weight[1] = tiny / 4  # a whole unit of subnormals
        net[0].weight[2, :3] = -tiny / 8
    small = compact_pruned(net)
    weights = [p for p in small.parameters() if p.dim() == 2]
    assert all(not ((w != 0) & (w.abs() < tiny)).any() for w in weights)
    assert small[0].out_features == 3  # unit 1 is folded into the next bias
    x = torch.randn(5, 6)
    torch.testing.assert_close(small(x), net(x), rtol=1e-5, atol=1e-6)
