"""Compaction beyond nn.Sequential: residual nets with batch norm, constants folded or kept,
skip-joined channels, dead inputs, networks in torch.nn.utils.prune format, export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from resnets import SmallResNet, gate_convs_, randomise_batch_norms_, resnet18
from torch import nn
from torch.nn.utils import prune

import bayessparse as bs
from bayessparse.compaction import Select, compact_pruned
from bayessparse.export import export
from bayessparse.models import LeNet5Caffe, LeNet300100


def params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def assert_same_function(small: nn.Module, net: nn.Module, x: torch.Tensor) -> None:
    """Equal outputs: 1e-10 in float64, 1e-5 in float32 (summation order differs)."""
    tol = 1e-10 if x.dtype == torch.float64 else 1e-5
    with torch.no_grad():
        expected, got = net(x), small(x)
    assert torch.allclose(got, expected, rtol=tol, atol=tol), (got - expected).abs().max()


# --- Residual networks ----------------------------------------------------------------


def test_small_resnet_with_closed_l0_gates_compacts_to_the_same_function():
    torch.manual_seed(0)
    net = gate_convs_(SmallResNet().double(), closed=0.4)
    small = bs.compact(net)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    assert_same_function(small, net, x)
    assert_same_function(small, bs.to_dense(net), x)
    assert params(small) < params(bs.to_dense(net))
    assert not any(isinstance(m, bs.SparseModule) for m in small.modules())
    # Channels of block1's inner space go where closed and, after bn1 and the ReLU, zero.
    conv1 = bs.to_dense(net, bake=True).block1.conv1
    closed = ~conv1.weight.flatten(1).ne(0).any(1)
    bn = net.block1.bn1
    shift = bn.bias - bn.weight * bn.running_mean / (bn.running_var + bn.eps).sqrt()
    expected = int((~closed | (shift > 0)).sum())  # a positive constant feeds a padded conv
    assert small.block1.conv1.out_channels == small.block1.bn1.num_features == expected
    assert expected < 8


def test_small_resnet_in_float32():
    torch.manual_seed(1)
    net = gate_convs_(SmallResNet(), closed=0.4, seed=1)
    assert_same_function(bs.compact(net), net, torch.randn(3, 3, 16, 16))


def test_resnet18_with_closed_channels_compacts_to_the_same_function():
    torch.manual_seed(0)
    net = gate_convs_(resnet18(num_classes=10).double(), closed=0.3)
    small = bs.compact(net)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert_same_function(small, net, x)
    assert params(small) < 0.9 * params(bs.to_dense(net))
    assert small.get_submodule("layer4.1.conv1").out_channels < 512
    assert isinstance(small, torch.fx.GraphModule)


def stream_net(stem_shift: float, block_shift: float, close_stem: bool = True) -> nn.Module:
    """SmallResNet with stream channel 2 closed in block1.conv2 (and in the stem), the
    constants after the batch norms being ``relu(shift)`` (running mean 0)."""
    torch.manual_seed(0)
    net = SmallResNet().double()
    randomise_batch_norms_(net)
    with torch.no_grad():
        for conv, bn, shift in (
            (net.stem[0], net.stem[1], stem_shift),
            (net.block1.conv2, net.block1.bn2, block_shift),
        ):
            if conv is net.stem[0] and not close_stem:
                continue
            conv.weight[2] = 0.0
            bn.running_mean[2], bn.bias[2] = 0.0, shift
    return net.eval()


def test_channels_joined_by_a_skip_are_removed_on_every_branch():
    net = stream_net(-1.0, -1.0)  # the stream channel is relu(-1) = 0 on both branches
    small = compact_pruned(net)
    assert_same_function(small, net, torch.randn(3, 3, 16, 16, dtype=torch.float64))
    assert small.stem[0].out_channels == small.block1.conv2.out_channels == 7
    assert small.block1.bn2.num_features == small.stem[1].num_features == 7
    assert small.block1.conv1.in_channels == small.block2.conv1.in_channels == 7


def test_channels_joined_by_a_skip_are_kept_where_one_branch_needs_them():
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    # The stem's channel is live: the block's closed conv2 channel must stay too.
    live_stem = stream_net(-1.0, -1.0, close_stem=False)
    # Both closed, but the block adds relu(1) = 1, which a padded conv reads.
    constant = stream_net(-1.0, 1.0)
    for net in (live_stem, constant):
        small = compact_pruned(net)
        assert_same_function(small, net, x)
        assert small.stem[0].out_channels == small.block1.conv2.out_channels == 8


# --- Batch norm after a closed channel ------------------------------------------------


def bn_after_closed(reader: nn.Module, shift: float) -> nn.Sequential:
    """conv (channel 1 closed) - BN (channel 1's constant: ``shift``) - ReLU - reader."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), reader)
    net = net.double()
    randomise_batch_norms_(net)
    with torch.no_grad():
        net[0].weight[1] = 0.0
        net[1].running_mean[1], net[1].bias[1] = 0.0, shift
    return net.eval()


READERS = {
    "linear": lambda: nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 3)),
    "unpadded conv": lambda: nn.Conv2d(4, 3, 1),
    "reflect-padded conv": lambda: nn.Conv2d(4, 3, 3, padding=1, padding_mode="reflect"),
    "zero-padded conv": lambda: nn.Conv2d(4, 3, 3, padding=1),
    "average pool with padding": lambda: nn.Sequential(
        nn.AvgPool2d(3, stride=1, padding=1), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ),
    "max pool, linear": lambda: nn.Sequential(nn.MaxPool2d(2, padding=1), nn.Flatten()),
}


def compact_bn_case(reader: str, shift: float) -> tuple[nn.Module, nn.Module]:
    net = bn_after_closed(READERS[reader]().double(), shift)
    if reader == "max pool, linear":
        net.append(nn.Linear(4 * 4 * 4, 3).double())
    small = compact_pruned(net)
    assert_same_function(small, net, torch.randn(5, 2, 8, 8, dtype=torch.float64))
    return net, small


def test_a_bn_constant_is_folded_where_the_reader_takes_it_exactly():
    for reader in ("linear", "unpadded conv", "reflect-padded conv", "max pool, linear"):
        net, small = compact_bn_case(reader, shift=0.7)
        conv, bn = small.get_submodule("0"), small.get_submodule("1")
        assert conv.out_channels == bn.num_features == 3, reader
        # Not a no-op: dropping the constant without folding it would change the output.
        with torch.no_grad():
            net[1].bias[1] = 0.0
        x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
        assert not torch.allclose(small(x), net(x)), reader


def test_a_bn_constant_is_kept_where_padding_would_break_it():
    for reader in ("zero-padded conv", "average pool with padding"):
        _, small = compact_bn_case(reader, shift=0.7)
        conv, bn = small.get_submodule("0"), small.get_submodule("1")
        assert conv.out_channels == bn.num_features == 4, reader


def test_a_bn_constant_that_the_relu_zeroes_goes_even_before_padding():
    for reader in ("zero-padded conv", "linear"):
        _, small = compact_bn_case(reader, shift=-0.7)
        assert small.get_submodule("0").out_channels == 3, reader


def test_a_convolution_without_bias_gains_one_to_take_a_constant():
    net = bn_after_closed(nn.Conv2d(4, 3, 1, bias=False).double(), 0.7)
    small = compact_pruned(net)
    assert small[3].bias is not None and small[3].in_channels == 3
    assert_same_function(small, net, torch.randn(2, 2, 8, 8, dtype=torch.float64))


ONE_DIMENSIONAL = {
    "conv1d": lambda: nn.Sequential(
        nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 3)
    ),
    "linear": lambda: nn.Sequential(
        nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)
    ),
}


@pytest.mark.parametrize("kind", sorted(ONE_DIMENSIONAL))
def test_batch_norm_1d_after_a_conv1d_or_a_linear_layer(kind):
    torch.manual_seed(0)
    net = ONE_DIMENSIONAL[kind]().double().eval()
    randomise_batch_norms_(net)
    layer, norm = (net[0], net[1]) if kind == "conv1d" else (net[1], net[2])
    with torch.no_grad():
        layer.weight[1] = 0.0  # a closed unit: its bias, normed, then folded
    small = compact_pruned(net)
    assert_same_function(small, net, torch.randn(5, 2, 8 if kind == "conv1d" else 4).double())
    small_norm = small[1] if kind == "conv1d" else small[2]
    assert small_norm.num_features == 3 and norm.num_features == 4


class ViewLeNet5(LeNet5Caffe):
    """LeNet-5-Caffe flattening with ``x.view(x.size(0), -1)``, as older code does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, module in enumerate(self):
            x = x.view(x.size(0), -1) if i == 6 else module(x)
        return x


def test_view_of_the_batch_size_then_minus_one_is_a_flatten():
    torch.manual_seed(0)
    net = ViewLeNet5().double()
    with torch.no_grad():
        net[3].weight[10:] = 0.0  # 40 of conv2's 50 channels closed
        net[3].bias[10:] = -1.0  # relu(-1) = 0 after them
    small = compact_pruned(net.eval())
    assert small.get_submodule("3").out_channels == 10
    assert small.get_submodule("7").in_features == 10 * 16
    assert_same_function(small, net, torch.randn(3, 1, 28, 28, dtype=torch.float64))


def test_batch_norm_1d_on_a_linear_output_of_unknown_rank_is_left_whole():
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))
    net = net.double().eval()
    randomise_batch_norms_(net)
    with torch.no_grad():
        net[0].weight[1] = 0.0  # constant, but the input could be (N, C, 4)
    small = compact_pruned(net)
    assert small[1].num_features == 3
    assert_same_function(small, net, torch.randn(5, 4, dtype=torch.float64))


# --- Dead inputs -------------------------------------------------------------------------


def sparse_vd_lenet300(pixels: int, hidden: tuple[int, int]) -> nn.Module:
    """Sparse VD LeNet-300-100 whose kept weights connect ``pixels`` random inputs to
    ``hidden[0]`` units of layer 1, those to ``hidden[1]`` of layer 2, those to all 10."""
    torch.manual_seed(0)
    net = bs.to_sparse_(LeNet300100().double())
    kept_in = torch.randperm(784)[:pixels]
    kept_1, kept_2 = torch.randperm(300)[: hidden[0]], torch.randperm(100)[: hidden[1]]
    with torch.no_grad():
        for layer, rows, cols in (
            (net[1], kept_1, kept_in),
            (net[3], kept_2, kept_1),
            (net[5], torch.arange(10), kept_2),
        ):
            layer.weight_log_sigma2.fill_(10.0)  # pruned ...
            layer.weight_log_sigma2[rows[:, None], cols] = -20.0  # ... but these
            layer.bias.uniform_(-1, 1)  # the pruned units' constants: folded
    return net.eval()


def test_dead_inputs_of_lenet300_are_selected_away():
    net = sparse_vd_lenet300(437, (113, 90))
    small = bs.compact(net)
    assert isinstance(small, nn.Sequential) and isinstance(small[1], Select)
    linears = [m for m in small if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(437, 113), (113, 90), (90, 10)]
    assert params(small) == 437 * 113 + 113 + 113 * 90 + 90 + 90 * 10 + 10
    assert_same_function(small, net, torch.randn(6, 1, 28, 28, dtype=torch.float64))
    assert_same_function(small, net, torch.randn(6, 784, dtype=torch.float64))


def test_dead_inputs_of_lenet5_features_are_selected_away():
    torch.manual_seed(0)
    net = bs.to_sparse_(LeNet5Caffe().double())
    with torch.no_grad():
        for _, layer in bs.sparse_modules(net):
            layer.weight_log_sigma2.uniform_(-12.0, 2.0)  # about 1/6 of each layer kept
        net[7].weight_log_sigma2[:, ::3] = 10.0  # fc1 reads no third feature
    net.eval()
    small = bs.compact(net)
    fc1 = next(m for m in small if isinstance(m, nn.Linear))
    assert fc1.in_features < 800 * 2 // 3 + 1
    assert_same_function(small, net, torch.randn(3, 1, 28, 28, dtype=torch.float64))


# --- Networks in torch.nn.utils.prune format -----------------------------------------------


def test_a_network_pruned_with_torch_prune_compacts_directly():
    torch.manual_seed(0)
    net = SmallResNet().double()
    randomise_batch_norms_(net)
    for conv in (net.stem[0], net.block1.conv1, net.block2.conv1):
        prune.ln_structured(conv, "weight", amount=0.5, n=1, dim=0)
    prune.l1_unstructured(net.head, "weight", amount=0.5)
    net.train()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    net(x).sum().backward()  # the pruned weights are now non-leaf tensors with a graph
    with torch.no_grad():  # an optimizer step: the weight attributes are stale
        for conv in (net.stem[0], net.block1.conv1, net.block2.conv1):
            conv.weight_orig.add_(0.1)
    net.eval()
    small = compact_pruned(net)
    assert small.training is False
    assert small.block1.conv1.out_channels < 8 or small.block2.conv1.out_channels < 16
    assert_same_function(small, net, x)
    assert prune.is_pruned(net)  # the network itself is untouched


def test_the_output_of_to_dense_compacts_after_a_forward_pass():
    torch.manual_seed(0)
    net = gate_convs_(SmallResNet().double(), closed=0.4)
    dense = bs.to_dense(net)  # prune format
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    dense(x).sum().backward()
    for small in (compact_pruned(dense), bs.compact(dense)):
        assert_same_function(small, net, x)
        assert params(small) < params(dense)


# --- What the analysis does not understand is kept -----------------------------------------


class Gated(nn.Module):
    """A squeeze-excitation-like gate (a product of tensors), a shared layer, in-place ops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1)
        self.gate = nn.Conv2d(4, 4, 1)
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = y * torch.sigmoid(self.gate(y))
        z = F.relu(y.mean((2, 3)))
        w = z.clone()
        F.relu(w.sub_(1.0), inplace=True)  # w changes in place, after z was read
        return self.head(self.shared(self.shared(z)) + w)


def test_unknown_operations_and_shared_layers_keep_their_units():
    torch.manual_seed(0)
    net = Gated().double().eval()
    with torch.no_grad():
        net.conv.weight[1] = 0.0  # a constant channel, but multiplied by a gate
        net.shared.weight[:, 3] = 0.0  # the shared layer reads no unit 3
    small = compact_pruned(net)
    assert_same_function(small, net, torch.randn(3, 2, 5, 5, dtype=torch.float64))
    assert small.conv.out_channels == 4 and small.shared.in_features == 4


def test_in_place_operations_are_followed():
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            before = self.b(h)  # reads h before the in-place ReLU changes it
            h.relu_()
            return before + self.c(h)

    torch.manual_seed(0)
    net = InPlace().double().eval()
    with torch.no_grad():
        net.a.weight[2] = 0.0
        net.a.bias[2] = -0.5  # unit 2 is -0.5 for b, relu(-0.5) = 0 for c
    small = compact_pruned(net)
    assert small.a.out_features == 3
    assert_same_function(small, net, torch.randn(5, 3, dtype=torch.float64))


class Aliased(nn.Module):
    """In-place changes through a view, and by operations the analysis does not know."""

    def __init__(self, change: str) -> None:
        super().__init__()
        self.change = change
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        before = self.b(h)
        if self.change == "view":
            h.view(h.size(0), -1).relu_()  # changes h through a view
        elif self.change == "identity":
            F.relu(nn.functional.dropout(h, training=False), inplace=True)
        elif self.change == "clamp_":
            h.clamp_(min=0.25)
        else:
            h.mul_(2.0)
        return before + self.c(h)


@pytest.mark.parametrize("change", ["view", "identity", "clamp_", "mul_"])
def test_constants_changed_in_place_through_aliases_are_not_folded_stale(change):
    torch.manual_seed(0)
    net = Aliased(change).double().eval()
    with torch.no_grad():
        net.a.weight[2] = 0.0
        net.a.bias[2] = -0.5  # unit 2: -0.5 for b; relu'd, clamped or doubled for c
    small = compact_pruned(net)
    assert_same_function(small, net, torch.randn(5, 3, dtype=torch.float64))


def test_compacting_twice_changes_nothing_more():
    net = sparse_vd_lenet300(300, (50, 20))
    once = bs.compact(net)
    twice = bs.compact(once)
    assert isinstance(twice, nn.Sequential) and params(twice) == params(once)
    assert_same_function(twice, net, torch.randn(2, 784, dtype=torch.float64))


# --- Export ------------------------------------------------------------------------------


def test_compacted_networks_export_with_torch_export(tmp_path):
    torch.manual_seed(0)
    lenet = sparse_vd_lenet300(437, (113, 90)).float()
    done = export(lenet, tmp_path / "lenet.pt2", torch.randn(1, 1, 28, 28))
    assert done.compacted and any(isinstance(m, Select) for m in done.module.modules())
    x = torch.randn(5, 1, 28, 28)
    assert_same_function(torch.export.load(tmp_path / "lenet.pt2").module(), lenet, x)

    resnet = gate_convs_(SmallResNet(), closed=0.4)
    done = export(resnet, tmp_path / "resnet.pt2", torch.randn(2, 3, 16, 16))
    assert done.compacted and done.parameters < params(bs.to_dense(resnet))
    x = torch.randn(3, 3, 16, 16)
    assert_same_function(torch.export.load(tmp_path / "resnet.pt2").module(), resnet, x)
