"""to_sparse_: which layers become sparse, and how the network becomes a PyroModule."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.nn import PyroModule
from torch import nn

import bayessparse as bs
from bayessparse.models import LeNet5Caffe, LeNet300100
from bayessparse.nn import (
    VariationalConv1d,
    VariationalConv2d,
    VariationalConv3d,
    VariationalLinear,
)


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


@pytest.mark.parametrize("method", ["group_nj", "horseshoe", "spike_slab"])
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
