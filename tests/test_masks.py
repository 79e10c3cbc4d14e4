"""masks, to_dense and sparsity_report on whole networks."""

from __future__ import annotations

import pytest
import torch
from pyro.nn import PyroModule
from torch import nn
from torch.nn.utils import prune

import bayessparse as bs
from bayessparse.convert import METHODS
from bayessparse.models import LeNet5Caffe, LeNet300100
from bayessparse.nn.variational import SPARSE_VD_THRESHOLD
from bayessparse.recipes import kept_architecture


def sparse_net(net: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    bs.to_sparse_(net)
    for _, layer in bs.sparse_modules(net):
        with torch.no_grad():
            layer.weight_log_sigma2.copy_(
                layer.weight.square().log() + torch.empty_like(layer.weight).uniform_(-6, 6)
            )
    return net


def test_default_threshold_is_log_alpha_below_three():
    net = sparse_net(LeNet300100())
    layer = net[1]
    assert torch.sigmoid(torch.tensor(-3.0, dtype=torch.float64)).item() == SPARSE_VD_THRESHOLD
    assert torch.equal(layer.mask(), layer.log_alpha < 3)


def test_masks_are_keyed_like_the_state_dict():
    net = sparse_net(LeNet5Caffe())
    masks = bs.masks(net)
    assert list(masks) == ["0.weight", "3.weight", "7.weight", "9.weight"]
    state = net.state_dict()
    for key, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == state[key].shape


def test_to_dense_gives_a_plain_torch_network_equal_to_the_eval_net():
    net = sparse_net(LeNet5Caffe()).eval()
    dense = bs.to_dense(net)
    assert not any(isinstance(m, (PyroModule, bs.SparseModule)) for m in dense.modules())
    assert type(dense) is LeNet5Caffe
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(dense(x), net(x))
    assert prune.is_pruned(dense)
    baked = bs.to_dense(net, bake=True)
    assert not prune.is_pruned(baked)
    assert torch.equal(baked(x), net(x))
    # the original is untouched
    assert isinstance(net[0], bs.SparseModule)


def test_to_dense_round_trips_through_state_dict_of_plain_model():
    net = sparse_net(LeNet300100()).eval()
    baked = bs.to_dense(net, bake=True)
    plain = LeNet300100()
    plain.load_state_dict(baked.state_dict())
    x = torch.randn(5, 784)
    assert torch.equal(plain.eval()(x), net(x))


def test_sparsity_report_counts_weights_only():
    net = sparse_net(LeNet300100())
    report = bs.sparsity_report(net)
    masks = bs.masks(net)
    kept = sum(int(m.sum()) for m in masks.values())
    assert report["weights"] == 784 * 300 + 300 * 100 + 100 * 10
    assert report["kept"] == kept
    assert report["compression"] == report["weights"] / kept
    assert set(report["layers"]) == {"1", "3", "5"}
    assert report["layers"]["1"]["sparsity"] == 1 - int(masks["1.weight"].sum()) / (784 * 300)
    everything = bs.sparsity_report(net, threshold=0.0)
    assert everything["compression"] == 1.0 and everything["sparsity"] == 0.0
    nothing = bs.sparsity_report(net, threshold=1.0)
    assert nothing["compression"] == float("inf")


def test_sparsity_report_counts_kept_units():
    net = bs.to_sparse_(LeNet300100(), method="l0")  # gates on each layer's input units
    with torch.no_grad():
        net[1].gate_log_alpha[0, 10:] = -10.0  # close all but 10 of the 784 input gates
        net[3].gate_log_alpha.fill_(10.0)
        net[5].gate_log_alpha[0, :60] = -10.0
        net[5].gate_log_alpha[0, 60:] = 10.0
    layers = bs.sparsity_report(net)["layers"]
    assert layers["1"]["inputs_kept"] == 10 and layers["1"]["outputs_kept"] == 300
    assert layers["5"]["inputs_kept"] == 40 and layers["5"]["outputs_kept"] == 10
    assert kept_architecture(net) == "10-300-40"


def test_reports_on_a_net_without_sparse_layers_fail_clearly():
    with pytest.raises(ValueError, match="to_sparse_"):
        bs.sparsity_report(LeNet300100())
    with pytest.raises(ValueError, match="to_sparse_"):
        bs.kl(LeNet300100())


# family -> (parameter, low, high): drawing it uniformly spreads the keep-probabilities.
SPREAD = {
    "sparse_vd": ("weight_log_sigma2", -14.0, 2.0),
    "l0": ("gate_log_alpha", -4.0, 4.0),
    "group_nj": ("scale_log_sigma2", -8.0, 8.0),
    "horseshoe": ("local_log_sigma", -5.0, 2.0),
    "spike_slab": ("inclusion_logit", -4.0, 4.0),
    "sbp": ("noise_log_sigma", -2.0, 4.0),  # SNR from 13 to 0.34 at mu = 0
}
SELECTIONS = [
    {},
    {"threshold": 0.3},
    {"threshold": {"0": 0.0, "7.weight": 0.6}},
    {"sparsity": 0.8},
    {"sparsity": 0.8, "scope": "layer"},
]


def spread_lenet5(method: str) -> nn.Module:
    """LeNet-5-Caffe of ``method`` (output-channel groups on the convolutions, so their
    biases are pruned too, except sparse VD's), with spread keep-probabilities and conv2's
    third bias pruned for good."""
    torch.manual_seed(0)
    net = bs.to_sparse_(LeNet5Caffe(), method)
    name, low, high = SPREAD[method]
    with torch.no_grad():
        for _, layer in bs.sparse_modules(net):
            getattr(layer, name).uniform_(low, high)
    net[3].prune_(bias_mask=torch.arange(50) != 2)
    return net


def applied_masks(dense: nn.Module) -> dict[str, torch.Tensor]:
    """The torch.nn.utils.prune masks of ``dense``, keyed like its state_dict."""
    return {
        f"{name}.{buffer[: -len('_mask')]}": mask
        for name, module in dense.named_modules()
        for buffer, mask in module.named_buffers(recurse=False)
        if buffer.endswith("_mask")
    }


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("selection", SELECTIONS, ids=str)
def test_masks_are_exactly_the_masks_to_dense_applies(method, selection):
    net = spread_lenet5(method)
    masks = bs.masks(net, **selection)
    applied = applied_masks(bs.to_dense(net, **selection))
    assert list(masks) == list(applied)
    for key, mask in masks.items():
        assert mask.dtype == torch.bool and torch.equal(applied[key].bool(), mask), key
    expected = {"3.bias"} | ({"0.bias", "3.bias"} if method != "sparse_vd" else set())
    assert {key for key in masks if key.endswith("bias")} == expected


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("threshold", [None, 0.3])
def test_thresholded_masks_are_the_layers_own(method, threshold):
    net = spread_lenet5(method)
    masks = bs.masks(net, threshold)
    for name, layer in bs.sparse_modules(net):
        assert torch.equal(masks[f"{name}.weight"], layer.mask(threshold)), name
        bias = layer.bias_mask(threshold)
        assert (f"{name}.bias" in masks) == (bias is not None), name
        if bias is not None:
            assert torch.equal(masks[f"{name}.bias"], bias), name


@pytest.mark.parametrize("method", sorted(METHODS))
def test_to_dense_builds_each_layer_as_the_layers_own_to_dense(method):
    net = spread_lenet5(method)
    dense = bs.to_dense(net)
    for name, layer in bs.sparse_modules(net):
        own = layer.to_dense().state_dict()
        built = dense.get_submodule(name).state_dict()
        assert list(own) == list(built), name
        assert all(torch.equal(own[k], built[k]) for k in own), name


def test_keep_probs_give_the_expected_flops():
    from bayessparse.masks import keep_probs
    from bayessparse.metrics import flops

    torch.manual_seed(0)
    net = bs.to_sparse_(
        nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)), "l0", gate="input"
    )
    probs = keep_probs(net)
    assert set(probs) == {"0.weight", "2.weight"}
    x = torch.randn(2, 6)
    counts = flops(net, x, keep_probs=probs)
    # Input gates: each of the 4 x 6 and 3 x 4 weights is kept with its input's probability.
    by_hand = float(4 * probs["0.weight"].sum() + 3 * probs["2.weight"].sum())
    assert counts["expected"] == pytest.approx(by_hand, rel=1e-6)
    assert counts["dense"] == 4 * 6 + 3 * 4
