"""Shared modules and tied weights: they stay shared through to_sparse_, training and to_dense."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn

import bayessparse as bs
from bayessparse.convert import METHODS
from bayessparse.training import Schedule, train

# Layer options per method for the tests below: L0's weight gates are per-weight parameters.
OPTIONS = {"l0": {"gate": "weight"}}


class Tied(nn.Module):
    """An encoder and a decoder that share one weight matrix, and a head."""

    def __init__(self, width: int = 20) -> None:
        super().__init__()
        self.enc = nn.Linear(width, width)
        self.dec = nn.Linear(width, width)
        self.dec.weight = self.enc.weight
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        return self.out(torch.relu(self.dec(torch.relu(self.enc(x)))))


def tied_net(method: str = "sparse_vd", seed: int = 0) -> Tied:
    torch.manual_seed(seed)
    net = Tied()
    bs.to_sparse_(net, method, **OPTIONS.get(method, {}))
    return net


def toy_problem(n: int = 200):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 20, generator=g)
    return x, x[:, :3].argmax(-1)


def assert_tied(net: Tied) -> None:
    enc, dec = net.enc, net.dec
    assert dec.weight is enc.weight
    for name in enc.per_weight_params:
        assert getattr(dec, name) is getattr(enc, name), name
    # Everything else (biases, per-unit gates and scales) stays per layer.
    for name, param in enc.named_parameters(recurse=False):
        if name not in ("weight", *enc.per_weight_params):
            assert getattr(dec, name) is not param, name


@pytest.mark.parametrize("method", sorted(METHODS))
def test_tied_weights_keep_one_parameter_and_share_the_weight_posterior(method):
    torch.manual_seed(0)
    net = Tied()
    weight = net.enc.weight
    bs.to_sparse_(net, method, **OPTIONS.get(method, {}))
    assert isinstance(net.dec, bs.SparseModule) and net.enc.weight is weight
    assert_tied(net)
    # Every family has a per-weight posterior here, but SBP: its weights are point estimates.
    assert bool(net.enc.per_weight_params) == (method != "sbp")


@pytest.mark.parametrize("gate", ["input", "output", "weight"])
def test_per_weight_params_lists_exactly_the_weight_shaped_posterior(gate):
    # The declaration, checked against the shapes (the code never guesses from shapes).
    for method, table in METHODS.items():
        for dense_cls, cls in table.items():
            dense = nn.Linear(4, 6) if dense_cls is nn.Linear else dense_cls(4, 6, 3)
            layer = cls.from_dense(dense, **({"gate": gate} if method == "l0" else {}))
            shaped = {
                name
                for name, p in layer.named_parameters()
                if p.shape == layer.weight.shape and name != "weight"
            }
            assert shaped == set(layer.per_weight_params), cls.__name__


@pytest.mark.parametrize("method", ["sparse_vd", "group_nj", "horseshoe"])
def test_tied_weights_train_as_one_parameter_under_svi(method):
    net = tied_net(method)
    x, y = toy_problem()
    before = net.enc.weight.detach().clone()

    def model(x, y):
        logits = net(x)
        pyro.factor("kl", -bs.kl(net))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Categorical(logits=logits), obs=y)

    optim = bs.JointOptim(torch.optim.Adam, {"lr": 1e-2})
    svi = SVI(model, bs.SparseGuide(net), optim, Trace_ELBO())
    for _ in range(3):
        svi.step(x, y)
    assert_tied(net)
    assert not torch.equal(net.enc.weight, before)
    stepped = [p for group in optim.optimizer.param_groups for p in group["params"]]
    assert sum(p is net.enc.weight for p in stepped) == 1
    assert sum(p is net.enc.weight_log_sigma2 for p in stepped) == 1
    store = dict(pyro.get_param_store().named_parameters())
    assert store["enc.weight"] is net.enc.weight and store["dec.weight"] is net.enc.weight


def test_tied_weights_stay_tied_through_train():
    net = tied_net()
    x, y = toy_problem()
    before = net.enc.weight.detach().clone()
    train(net, x, y, epochs=2, batch_size=50, lr=1e-2, schedule=Schedule(), progress=False)
    assert_tied(net)
    assert torch.equal(net.enc.weight, net.dec.weight)
    assert not torch.equal(net.enc.weight, before)


def test_state_dict_round_trip_keeps_the_tie():
    net = tied_net(seed=0)
    with torch.no_grad():
        net.enc.weight_log_sigma2.uniform_(-8, 2)
    fresh = tied_net(seed=1)
    fresh.load_state_dict(net.state_dict())
    assert_tied(fresh)
    x = torch.randn(4, 20)
    assert torch.equal(fresh.eval()(x), net.eval()(x))
    net.load_state_dict(net.state_dict())
    assert_tied(net)


def test_a_tie_with_a_layer_left_dense_holds_and_converting_it_later_shares_the_posterior():
    torch.manual_seed(0)
    net = Tied()
    bs.to_sparse_(net, include=lambda name, m: name == "enc")
    assert type(net.dec) is not type(net.enc) and net.dec.weight is net.enc.weight
    net(torch.randn(2, 20))
    bs.to_sparse_(net)
    assert_tied(net)


def test_tied_layers_must_get_the_same_family():
    torch.manual_seed(0)
    net = Tied()
    bs.to_sparse_(net, include=lambda name, m: name == "enc")
    with pytest.raises(ValueError, match="'dec' shares its weight with 'enc'"):
        bs.to_sparse_(net, "l0")
    assert isinstance(net.dec, nn.Linear) and not isinstance(net.dec, bs.SparseModule)


def test_share_weight_posterior_refuses_another_shape():
    a = bs.nn.VariationalLinear(3, 4)
    with pytest.raises(ValueError, match="same family and options"):
        a.share_weight_posterior_(bs.nn.VariationalLinear(4, 3))


class SharedModule(nn.Module):
    """One Linear under two names and twice in one Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = self.a
        self.seq = nn.Sequential(self.a, nn.ReLU(), self.a)

    def forward(self, x):
        return self.seq(self.b(x))


@pytest.mark.parametrize("bake", [False, True])
def test_to_dense_replaces_a_shared_module_in_all_its_places_by_one_plain_layer(bake):
    torch.manual_seed(0)
    net = bs.to_sparse_(SharedModule())
    with torch.no_grad():
        net.a.weight_log_sigma2.uniform_(-12, 0)
    dense = bs.to_dense(net.eval(), bake=bake)
    assert not any(isinstance(m, (bs.SparseModule, pyro.nn.PyroModule)) for m in dense.modules())
    assert dense.b is dense.a and dense.seq[0] is dense.a and dense.seq[2] is dense.a
    x = torch.randn(3, 6)
    assert torch.equal(dense(x), net(x))


@pytest.mark.parametrize("bake", [False, True])
def test_to_dense_keeps_a_tie_whose_masked_weights_agree(bake):
    net = tied_net()
    with torch.no_grad():
        net.enc.weight_log_sigma2.uniform_(-12, 0)
    net.dec.bias = net.enc.bias
    dense = bs.to_dense(net.eval(), bake=bake)
    names = ("weight", "bias") if bake else ("weight_orig", "weight_mask", "bias")
    for name in names:
        assert getattr(dense.dec, name) is getattr(dense.enc, name), name
    x = torch.randn(3, 20)
    assert torch.equal(dense(x), net(x))
    assert (dense.enc.weight == 0).any()


def test_to_dense_unties_where_the_layers_scale_a_shared_weight_differently():
    net = tied_net("group_nj")
    with torch.no_grad():
        net.dec.scale_loc.uniform_(0.5, 1.5)  # per-unit scales: the dense weights differ
    dense = bs.to_dense(net.eval())
    assert dense.dec.weight_orig is not dense.enc.weight_orig
    x = torch.randn(3, 20)
    assert torch.equal(dense(x), net(x))


@pytest.mark.parametrize("method", ["sparse_vd", "group_nj"])
def test_sparsity_report_counts_a_tied_weight_once(method):
    net = tied_net(method)
    with torch.no_grad():
        if method == "sparse_vd":
            net.enc.weight_log_sigma2.uniform_(-12, 0)
        else:  # each layer prunes other input units of the shared weight
            net.enc.scale_log_sigma2[:10] = 10.0
            net.dec.scale_log_sigma2[5:15] = 10.0
    report = bs.sparsity_report(net)
    assert set(report["layers"]) == {"enc", "dec", "out"}
    assert report["weights"] == 20 * 20 + 3 * 20
    kept = net.enc.mask() | net.dec.mask()  # a stored weight is kept if any layer uses it
    assert report["kept"] == int(kept.sum()) + int(net.out.mask().sum())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_shared_layer_trains_under_svi(method):
    torch.manual_seed(0)
    net = bs.to_sparse_(SharedModule(), method)
    x, y = torch.randn(8, 6), torch.randint(0, 6, (8,))

    def model(x, y):
        logits = net(x)
        pyro.factor("kl", -bs.kl(net))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Categorical(logits=logits), obs=y)

    svi = SVI(
        model, bs.SparseGuide(net), bs.JointOptim(torch.optim.Adam, {"lr": 1e-2}), Trace_ELBO()
    )
    before = net.a.weight.detach().clone()
    for _ in range(2):
        assert torch.isfinite(torch.tensor(svi.step(x, y)))
    assert not torch.equal(net.a.weight, before)
    if method == "horseshoe":  # one draw of the layer's scales per step, shared by its calls
        trace = pyro.poutine.trace(model).get_trace(x, y)
        sites = [n for n, site in trace.nodes.items() if site["type"] == "sample"]
        assert sites[:2] == ["a.global_scale", "a.local_scale"]
        assert not any(n.startswith(("b.", "seq.")) for n in sites)
