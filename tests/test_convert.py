"""to_sparse_: which layers become sparse, and how the network becomes a PyroModule."""

from __future__ import annotations

import copy
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.nn import PyroModule
from torch import nn
from torch.nn.utils import prune

import bayessparse as bs
from bayessparse.models import LeNet5Caffe, LeNet300100
from bayessparse.nn import (
    SparseMultiheadAttention,
    VariationalConv1d,
    VariationalConv2d,
    VariationalConv3d,
    VariationalLinear,
)
from bayessparse.nn.base import torch_layer_kwargs
from bayessparse.training import train


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.ReLU())
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.head(self.norm(self.conv(x)).relu()))


def test_converts_every_layer_type_and_keeps_the_weights():
    net = nn.Sequential(
        nn.Conv1d(2, 3, 3), nn.Conv2d(2, 3, 3), nn.Conv3d(2, 3, 3), nn.Linear(4, 5)
    )
    weights = [m.weight.clone() for m in net]
    bs.to_sparse_(net)
    assert [type(m) for m in net] == [
        VariationalConv1d,
        VariationalConv2d,
        VariationalConv3d,
        VariationalLinear,
    ]
    for module, weight in zip(net, weights, strict=True):
        assert torch.equal(module.weight, weight)


def test_l0_method_uses_the_papers_gate_granularity():
    net = bs.to_sparse_(LeNet5Caffe(), method="l0", l0_lambda=0.1)
    assert [type(m).__name__ for _, m in bs.sparse_modules(net)] == [
        "L0Conv2d",
        "L0Conv2d",
        "L0Linear",
        "L0Linear",
    ]
    gates = [m.gate_log_alpha.shape for _, m in bs.sparse_modules(net)]
    assert gates == [(20, 1, 1, 1), (50, 1, 1, 1), (1, 800), (1, 500)]
    assert all(m.l0_lambda == 0.1 for _, m in bs.sparse_modules(net))


@pytest.mark.parametrize("method", ["group_nj", "horseshoe", "spike_slab", "sbp"])
def test_group_methods_scale_conv_channels_and_linear_inputs(method):
    net = bs.to_sparse_(LeNet5Caffe(), method=method)
    groups = [(m.group, m.num_groups) for _, m in bs.sparse_modules(net)]
    assert groups == [("output", 20), ("output", 50), ("input", 800), ("input", 500)]


def test_root_and_containers_become_pyro_modules_and_norms_stay_deterministic():
    net = bs.to_sparse_(Custom())
    assert isinstance(net, PyroModule) and isinstance(net, Custom)
    assert isinstance(net.head, PyroModule)
    assert type(net.conv) is VariationalConv2d and type(net.head[1]) is VariationalLinear
    assert isinstance(net.norm, nn.BatchNorm2d) and not isinstance(net.norm, bs.SparseModule)
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_include_predicate_selects_layers_by_name():
    net = bs.to_sparse_(LeNet300100(), include=lambda name, m: name != "5")
    assert [name for name, _ in bs.sparse_modules(net)] == ["1", "3"]
    assert type(net[5]) is not VariationalLinear and isinstance(net[5], nn.Linear)


def test_is_idempotent_and_passes_layer_options():
    net = bs.to_sparse_(LeNet5Caffe(), train_clip=True, log_sigma2_init=-8.0)
    first = [id(m) for _, m in bs.sparse_modules(net)]
    bs.to_sparse_(net)
    assert [id(m) for _, m in bs.sparse_modules(net)] == first
    assert all(m.train_clip and m.log_sigma2_init == -8.0 for _, m in bs.sparse_modules(net))


def test_converting_in_steps_keeps_the_layer_order():
    torch.manual_seed(0)
    plain = LeNet300100()
    net = bs.to_sparse_(LeNet300100(), include=lambda name, m: name == "1")
    net.load_state_dict(plain.state_dict(), strict=False)
    bs.to_sparse_(net, include=lambda name, m: name == "3")
    assert [name for name, _ in net.named_children()] == [str(i) for i in range(6)]
    assert [type(m).__name__ for m in net][:4] == [
        "PyroFlatten",
        "VariationalLinear",
        "PyroReLU",
        "VariationalLinear",
    ]
    x = torch.randn(2, 784)
    assert torch.equal(bs.to_dense(net, threshold=0.0)(x), plain(x))


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="'sparse_vd'"):
        bs.to_sparse_(LeNet300100(), method="dropconnect")


def test_nothing_to_convert_is_an_error():
    with pytest.raises(ValueError, match="found nothing to convert"):
        bs.to_sparse_(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match="include"):
        bs.to_sparse_(LeNet300100(), include=lambda name, m: False)
    with pytest.raises(TypeError, match="nn.Module"):
        bs.to_sparse_("lenet")  # type: ignore[arg-type]


def test_layers_get_distinct_param_store_names_under_svi():
    net = bs.to_sparse_(Custom())

    def model(x, y):
        logits = net(x)
        pyro.factor("kl", -bs.kl(net))
        with pyro.plate("data", 100, subsample=torch.arange(len(x))):
            pyro.sample("y", dist.Categorical(logits=logits), obs=y)

    svi = SVI(model, bs.EmptyGuide(), bs.JointOptim(torch.optim.Adam, {"lr": 1e-2}), Trace_ELBO())
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    svi.step(torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,)))
    store = dict(pyro.get_param_store().named_parameters())
    assert set(store) == set(before)  # every parameter, BatchNorm's included, one name each
    for name, param in net.named_parameters():
        assert store[name] is param
        assert not torch.equal(param, before[name]), f"{name} was not trained"


class Blocks(nn.Module):
    """Containers two deep: a ModuleDict holding a Sequential, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({"a": nn.Sequential(nn.Linear(4, 4), nn.ReLU())})
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.blocks["a"](x))


def test_converting_again_after_a_forward_pass_through_nested_containers():
    torch.manual_seed(0)
    net = Blocks()
    x = torch.randn(3, 4)
    net(x)
    bs.to_sparse_(net, include=lambda name, m: name == "head")
    net(x)
    bs.to_sparse_(net)
    assert [name for name, _ in bs.sparse_modules(net)] == ["blocks.a.0", "head"]
    assert net.eval()(x).shape == (3, 2)
    names = {name for name, _ in pyro.get_param_store().named_parameters()}
    assert "blocks.a.0.weight_log_sigma2" in names and "head.weight_log_sigma2" in names


def test_every_pyro_module_is_named_by_its_path_and_shares_the_root_context():
    net = Blocks()
    bs.to_sparse_(net, include=lambda name, m: name == "head")
    net(torch.randn(3, 4))
    bs.to_sparse_(net)
    for name, module in net.named_modules():
        assert module._pyro_name == name
        assert module._pyro_context is net._pyro_context


class Shared(nn.Module):
    """One Linear under two names, and twice inside one Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a
        self.seq = nn.Sequential(self.a, nn.ReLU(), self.a)

    def forward(self, x):
        return self.seq(self.b(self.a(x)))


@pytest.mark.parametrize("include", [None, lambda name, m: name == "seq.2"])
def test_a_module_under_several_names_becomes_one_sparse_module(include):
    net = Shared()
    bs.to_sparse_(net, include=include)
    assert type(net.a) is VariationalLinear
    assert net.b is net.a and net.seq[0] is net.a and net.seq[2] is net.a
    assert [name for name, _ in bs.sparse_modules(net)] == ["a"]
    assert net(torch.randn(3, 4)).shape == (3, 4)


def pruned_net() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A conv net whose conv and first linear layer are pruned with torch's prune, weights
    and biases, and whose weight_orig moved after the last forward (as an optimizer step
    leaves it). Returns the net and the kept-entry masks by state_dict name."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )
    for layer in (net[0], net[3]):
        prune.l1_unstructured(layer, "weight", 0.5)
        prune.l1_unstructured(layer, "bias", 0.5)
    with torch.no_grad():
        net[3].weight_orig.add_(1.0)  # layer.weight is stale until the next forward
    kept = {
        f"{i}.{name}": getattr(net[i], f"{name}_mask").bool()
        for i in (0, 3)
        for name in ("weight", "bias")
    }
    return net, kept


def poison_pruned_(net: nn.Module, kept: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key, keep in kept.items():
            net.get_parameter(key)[~keep] = 1e3


@pytest.mark.parametrize("method", sorted(bs.convert.METHODS))
def test_weights_pruned_by_torch_prune_stay_pruned(method):
    net, kept = pruned_net()
    x = torch.randn(5, 1, 6, 6)
    expected = net(x)  # the hook recomputes weight_orig * weight_mask
    bs.to_sparse_(net, method)
    masks = bs.masks(net, threshold=0.0)
    for i in (0, 3):
        layer = net[i]
        assert not hasattr(layer, "weight_orig") and not layer._forward_pre_hooks
        assert (layer.weight[~kept[f"{i}.weight"]] == 0).all()
        assert not (layer.mask(0.0) & ~kept[f"{i}.weight"]).any()
        assert not (masks[f"{i}.weight"] & ~kept[f"{i}.weight"]).any()
        assert not (layer.bias_mask(0.0) & ~kept[f"{i}.bias"]).any()
    if method in ("sparse_vd", "group_nj", "horseshoe"):  # they start as the dense net
        assert torch.allclose(bs.to_dense(net, 0.0)(x), expected, atol=1e-6)
    # Exactly no effect in training and evaluation: poisoning the pruned entries changes
    # nothing (same noise draws by seed).
    outputs = []
    for _ in range(2):
        torch.manual_seed(1)
        outputs.append((net.train()(x), net.eval()(x)))
        poison_pruned_(net, kept)
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])


@pytest.mark.parametrize("method", sorted(bs.convert.METHODS))
def test_weights_pruned_by_torch_prune_stay_zero_through_training_and_to_dense(method):
    net, kept = pruned_net()
    bs.to_sparse_(net, method)
    x = torch.randn(60, 1, 6, 6)
    y = torch.randint(0, 3, (60,))
    train(net, x, y, epochs=2, batch_size=20, lr=1e-2, progress=False)
    for key, keep in kept.items():
        assert (net.get_parameter(key)[~keep] == 0).all(), key
    for threshold in (None, 0.0):
        dense = bs.to_dense(net, threshold, bake=True)
        for key, keep in kept.items():
            assert (dense.get_parameter(key)[~keep] == 0).all(), key
        assert not (bs.masks(net, threshold)["3.weight"] & ~kept["3.weight"]).any()


def test_prune_masks_are_state_and_survive_to_dense_and_back():
    net, kept = pruned_net()
    bs.to_sparse_(net)
    assert {"3.weight_prune_mask", "3.bias_prune_mask"} <= set(net.state_dict())
    fresh, _ = pruned_net()
    bs.to_sparse_(fresh)
    fresh.load_state_dict(net.state_dict())
    assert torch.equal(fresh[3].mask(0.0), kept["3.weight"])
    again = bs.to_sparse_(bs.to_dense(net, threshold=0.0))
    assert torch.equal(again[3].mask(0.0), kept["3.weight"])
    assert torch.equal(again[3].bias_mask(0.0), kept["3.bias"])


def test_prune_checks_the_mask():
    layer = VariationalLinear(3, 2)
    with pytest.raises(ValueError, match="shape"):
        layer.prune_(torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="bias"):
        VariationalLinear(3, 2, bias=False).prune_(bias_mask=torch.ones(2, dtype=torch.bool))
    layer.prune_(torch.tensor([[True, False, True], [True, True, True]]))
    layer.prune_(torch.tensor([[True, True, True], [False, True, True]]))  # masks accumulate
    assert int(layer.mask(0.0).sum()) == 4


@pytest.mark.parametrize(
    ("method", "options"),
    [(method, {}) for method in sorted(bs.convert.METHODS)]
    + [("l0", {"gate": "weight", "weight_decay": 0.1}), ("l0", {"weight_decay": 0.1})],
)
def test_pruned_weights_drop_out_of_the_kl(method, options):
    torch.manual_seed(0)
    dense = nn.Linear(6, 4)
    prune.random_unstructured(dense, "weight", 0.5)
    keep = dense.weight_mask.bool()
    layer = bs.convert.METHODS[method][nn.Linear].from_dense(dense, **options)
    kl = layer.kl()
    with torch.no_grad():
        for name in ("weight", *layer.per_weight_params):
            getattr(layer, name)[~keep] = 5.0
    assert torch.allclose(layer.kl(), kl, rtol=1e-6)


# --- Architectures beyond chains of Linear and Conv ------------------------------------


class Varied(nn.Module):
    """Grouped, dilated, strided and non-square convolutions (1-D and 2-D, circular
    padding), batch norms, and containers nested in a Sequential: a ModuleList and a
    ModuleDict."""

    def __init__(self) -> None:
        super().__init__()
        self.signal = nn.Sequential(
            nn.Conv1d(2, 4, 3, dilation=2, padding=2),
            nn.BatchNorm1d(4),
            nn.Conv1d(4, 6, 3, groups=2, stride=2),
        )
        self.image = nn.Sequential(
            nn.ModuleList([nn.Conv2d(3, 6, (3, 1), padding=(1, 0), groups=3)]),
            nn.ModuleDict(
                {
                    "wide": nn.Conv2d(
                        6, 4, (1, 3), dilation=(1, 2), padding_mode="circular", padding=(0, 2)
                    )
                }
            ),
            nn.BatchNorm2d(4),
        )
        self.head = nn.Linear(6 + 4, 3)

    def forward(self, signal, image):
        s = self.signal(signal).mean(-1)
        i = self.image[0][0](image).relu()
        i = self.image[2](self.image[1]["wide"](i)).mean((2, 3))
        return self.head(torch.cat([s, i], 1))


@pytest.mark.parametrize("method", sorted(bs.convert.METHODS))
def test_varied_convolutions_in_nested_containers_keep_their_options(method):
    torch.manual_seed(0)
    plain = Varied()
    net = bs.to_sparse_(Varied(), method)
    net.load_state_dict(plain.state_dict(), strict=False)
    sparse = dict(bs.sparse_modules(net))
    assert sorted(sparse) == [
        "head",
        "image.0.0",
        "image.1.wide",
        "signal.0",
        "signal.2",
    ]
    for name, layer in sparse.items():
        assert torch_layer_kwargs(layer) == torch_layer_kwargs(plain.get_submodule(name))
    norms = [net.signal[1], net.image[2]]
    assert all(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in norms)
    assert not any(isinstance(m, bs.SparseModule) for m in norms)
    x = (torch.randn(5, 2, 12), torch.randn(5, 3, 6, 7))
    if method == "sparse_vd":  # the posterior mean, nothing pruned: the plain function
        assert torch.allclose(bs.to_dense(net.eval(), 0.0)(*x), plain.eval()(*x), atol=1e-6)
    net.train()(*x)  # plain torch batch norms: they update their running statistics
    assert all(
        bs.convert.unwrap_pyro_type(type(m)) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in norms
    )
    assert all(m.num_batches_tracked == 1 and m.running_mean.abs().sum() > 0 for m in norms)


class Odd(nn.Module):
    """Layers with weights that no sparse layer replaces, and one ordinary Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.up = nn.ConvTranspose1d(4, 4, 2)
        self.own = type("OwnLinear", (nn.Linear,), {})(4, 4)
        self.cross = nn.MultiheadAttention(4, 2, kdim=3, vdim=3)
        self.head = nn.Linear(4, 2)


def test_layers_left_dense_are_listed_in_one_warning():
    with pytest.warns(UserWarning, match="leaves these weights dense") as record:
        net = bs.to_sparse_(Odd())
    assert len(record) == 1
    message = str(record[0].message)
    for name in ("embed (Embedding)", "up (ConvTranspose1d)", "own (OwnLinear)", "cross ("):
        assert name in message
    assert "cross.out_proj" not in message and "head (" not in message
    assert [name for name, _ in bs.sparse_modules(net)] == ["head"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # what include rejects is not listed
        bs.to_sparse_(Odd(), include=lambda name, m: name == "head")


def encoder(dropout: float = 0.0) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        16, 4, dim_feedforward=24, dropout=dropout, batch_first=True
    )
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


@pytest.mark.parametrize("method", sorted(bs.convert.METHODS))
def test_transformer_attention_and_feed_forward_become_sparse(method):
    torch.manual_seed(0)
    plain = encoder().eval()
    in_proj = plain.layers[0].self_attn.in_proj_weight
    options = {"log_sigma2_init": -20.0} if method == "sparse_vd" else {}  # nothing pruned
    net = bs.to_sparse_(copy.deepcopy(plain), method, **options)
    names = [name for name, _ in bs.sparse_modules(net)]
    per_layer = ["self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2"]
    assert names == [f"layers.{i}.{n}" for i in range(2) for n in per_layer]
    attention = net.layers[0].self_attn
    assert isinstance(attention, SparseMultiheadAttention)
    assert torch.equal(attention.in_proj.weight, in_proj)
    dense = bs.to_dense(net, threshold=0.0)
    assert type(dense.layers[0].self_attn) is nn.MultiheadAttention
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        expected = plain(x)
        assert dense(x).shape == expected.shape
        if method == "sparse_vd":  # the posterior mean, nothing pruned: the plain function
            assert torch.allclose(dense(x), expected, atol=1e-5)
            assert torch.allclose(net(x), expected, atol=1e-5)


def test_transformer_gates_and_masks_are_not_bypassed_by_the_fused_path():
    """In evaluation without gradients torch's fused encoder path reads the weights
    directly; with half the weights pruned it would differ from the masked network."""
    torch.manual_seed(0)
    net = bs.to_sparse_(encoder(), "sparse_vd").eval()
    with torch.no_grad():
        for _, layer in bs.sparse_modules(net):
            layer.weight_log_sigma2.copy_(torch.randn_like(layer.weight_log_sigma2) * 4 - 6)
        masks = bs.masks(net)
        kept = sum(m.sum() for m in masks.values()) / sum(m.numel() for m in masks.values())
        assert kept < 0.9
        x = torch.randn(3, 5, 16)
        dense = bs.to_dense(net)
        assert dense.layers[0].activation_relu_or_gelu == 1  # the plain copy may use it
        assert torch.allclose(net(x), dense(x), atol=1e-5)
        assert torch.allclose(net.layers[0](x), dense.layers[0](x), atol=1e-5)


def test_transformer_trains_by_svi():
    torch.manual_seed(0)
    net = bs.to_sparse_(encoder(dropout=0.1), "sparse_vd")
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    x, y = torch.randn(4, 5, 16), torch.randn(4, 5, 16)

    def model(x, y):
        out = net(x)
        pyro.factor("kl", -bs.kl(net))
        with pyro.plate("data", 100, subsample=torch.arange(len(x))):
            pyro.sample("y", dist.Normal(out, 1.0).to_event(2), obs=y)

    optim = bs.JointOptim(torch.optim.Adam, {"lr": 1e-2})
    svi = SVI(model, bs.SparseGuide(net), optim, Trace_ELBO())
    for _ in range(2):
        svi.step(x, y)
    store = dict(pyro.get_param_store().named_parameters())
    for name in (
        "layers.0.self_attn.in_proj.weight",
        "layers.1.self_attn.out_proj.weight_log_sigma2",
    ):
        assert store[name] is net.get_parameter(name)
        assert not torch.equal(net.get_parameter(name), before[name])
