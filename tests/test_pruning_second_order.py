"""Second-order pruning against explicit computations in float64.

OBD's curvature against ``torch.autograd.functional.hessian`` and per-example gradients
taken one at a time; layer-wise OBS against least squares on a quadratic whose optimum is
known; Kronecker OBD/OBS against an explicitly built F = S ⊗ A; EigenDamage's
reparameterisation against the network it rewrites. Both sides are exact in float64 and
agree to rounding: every check here passes at a relative 1e-13 on this machine; TIGHT
(1e-10) leaves a margin for other BLAS builds and summation orders.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

from bayessparse.pruning import OBD, KronOBS, LayerwiseOBS, prune
from bayessparse.pruning.second_order import (
    EigenDamage,
    KFEBottleneck,
    eigendamage,
    fisher_diagonal,
    hessian_diagonal,
    kfe_reparameterise,
    kron_factors,
    kron_obd_saliency,
    kron_obs_saliency,
    kron_obs_update,
)

TIGHT = {"rtol": 1e-10, "atol": 1e-12}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def tiny_data(n: int = 7, features: int = 3, classes: int = 2, seed: int = 1):
    generator = seeded(seed)
    x = torch.randn(n, features, dtype=torch.float64, generator=generator)
    y = torch.randint(0, classes, (n,), generator=generator)
    return x, y


def random_spd(size: int, seed: int) -> torch.Tensor:
    root = torch.randn(size, size, dtype=torch.float64, generator=seeded(seed))
    return root @ root.T + 0.5 * torch.eye(size, dtype=torch.float64)


# --- OBD ------------------------------------------------------------------------------


def test_hessian_diagonal_is_the_diagonal_of_the_explicit_hessian():
    net, (x, y) = tiny_mlp(), tiny_data()
    shapes = {"0.weight": (4, 3), "2.weight": (2, 4)}

    def loss(flat: torch.Tensor) -> torch.Tensor:
        w0, w2 = flat.split([12, 8])
        params = {"0.weight": w0.reshape(4, 3), "2.weight": w2.reshape(2, 4)}
        return F.cross_entropy(torch.func.functional_call(net, params, (x,)), y)

    flat = torch.cat([net[0].weight.detach().reshape(-1), net[2].weight.detach().reshape(-1)])
    expected = torch.autograd.functional.hessian(loss, flat).diagonal().split([12, 8])
    # Batches of 3, 3, 1 check the weighting by batch size; chunks of 5 basis vectors
    # check the chunking.
    found = hessian_diagonal(net, (x, y), batch_size=3, chunk_size=5)
    for (key, shape), diagonal in zip(shapes.items(), expected, strict=True):
        torch.testing.assert_close(found[key], diagonal.reshape(shape), **TIGHT)

    scores = OBD(curvature="hessian", batch_size=3).scores(net, (x, y))
    expected_score = 0.5 * net[2].weight.detach() ** 2 * expected[1].reshape(2, 4)
    torch.testing.assert_close(scores["2.weight"], expected_score, **TIGHT)


def per_example_squared_gradients(net: nn.Module, x, y) -> dict[str, torch.Tensor]:
    sums = {"0.weight": 0.0, "2.weight": 0.0}
    for xn, yn in zip(x, y, strict=True):
        loss = F.cross_entropy(net(xn[None]), yn[None])
        grads = torch.autograd.grad(loss, [net[0].weight, net[2].weight])
        for key, g in zip(sums, grads, strict=True):
            sums[key] = sums[key] + g**2
    return {key: value / len(x) for key, value in sums.items()}


def test_fisher_diagonal_is_the_mean_squared_per_example_gradient():
    net, (x, y) = tiny_mlp(), tiny_data()
    expected = per_example_squared_gradients(net, x, y)
    found = fisher_diagonal(net, (x, y), batch_size=3)
    for key in expected:
        torch.testing.assert_close(found[key], expected[key], **TIGHT)
    first_batch = fisher_diagonal(net, (x, y), batch_size=3, num_batches=1)
    expected_first = per_example_squared_gradients(net, x[:3], y[:3])["0.weight"]
    torch.testing.assert_close(first_batch["0.weight"], expected_first, **TIGHT)


def test_obd_on_a_pruned_net_uses_the_effective_weights():
    net, data = tiny_mlp(), tiny_data()
    mask = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    dense = tiny_mlp()
    with torch.no_grad():
        dense[0].weight.mul_(mask)
    torch_prune.custom_from_mask(net[0], "weight", mask)
    found = fisher_diagonal(net, data, batch_size=3)["0.weight"]
    expected = per_example_squared_gradients(dense, *data)["0.weight"]
    # Alive entries see the same loss; pruned ones get no gradient through the mask.
    torch.testing.assert_close(found, expected * mask, **TIGHT)
    scores = OBD().scores(net, data)["0.weight"]
    assert torch.equal(scores[~mask], torch.zeros(3, dtype=torch.float64))


def test_obd_scores_in_evaluation_mode_and_restores_the_training_flags():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double().train()
    data = tiny_data()
    first, second = OBD().scores(net, data), OBD().scores(net, data)
    assert all(torch.equal(first[k], second[k]) for k in first)  # no dropout noise
    assert net.training and net[1].training


def test_exact_hessian_is_refused_above_the_limit():
    with pytest.raises(ValueError, match=r"at most hessian_limit=10 .* got 20"):
        OBD(curvature="hessian", hessian_limit=10).scores(tiny_mlp(), tiny_data())


@pytest.mark.parametrize(
    "options", [{"curvature": "gauss"}, {"batch_size": 0}, {"num_batches": 1.5}]
)
def test_obd_refuses_bad_options(options):
    with pytest.raises(ValueError, match="Expected"):
        OBD(**options)


# --- Layer-wise OBS -------------------------------------------------------------------


def constrained_optimum(x: torch.Tensor, w: torch.Tensor, keep: torch.Tensor):
    """argmin and min over v with v[~keep] = 0 of ½‖x v − x w‖²/n, by least squares."""
    v = torch.zeros_like(w)
    v[keep] = torch.linalg.lstsq(x[:, keep], x @ w).solution
    return v, 0.5 * (x @ (v - w)).square().sum() / x.shape[0]


def linear_layer(inputs: int, outputs: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, outputs, bias=False)).double()


def test_obs_saliency_and_update_of_one_weight_are_the_constrained_optimum():
    # Loss ½‖X w − X w*‖²/n per row with w = w*: its Hessian is H = XᵀX/n exactly.
    net = linear_layer(5, 3)
    x, y = tiny_data(n=40, features=5)
    method = LayerwiseOBS(damping=0.0, allocation="saliency")
    scores = method.scores(net, (x, y))["0.weight"]
    weight = net[0].weight.detach().clone()
    for q in range(5):
        keep = torch.ones(5, dtype=torch.bool)
        keep[q] = False
        optima = [constrained_optimum(x, weight[i], keep) for i in range(3)]
        increases = torch.stack([increase for _, increase in optima])
        torch.testing.assert_close(scores[:, q], increases, **TIGHT)

        trial = linear_layer(5, 3)
        mask = keep.expand(3, 5).clone()
        method.update_(trial, {"0.weight": mask}, (x, y))
        expected = torch.stack([v for v, _ in optima])
        torch.testing.assert_close(trial[0].weight.detach(), expected, **TIGHT)


def test_obs_update_of_many_weights_is_least_squares():
    net = linear_layer(8, 4, seed=3)
    earlier = torch.ones(4, 8, dtype=torch.bool)
    earlier[1, 6] = False  # pruned in an earlier round: stays zero, counts as pruned
    torch_prune.custom_from_mask(net[0], "weight", earlier)
    x, y = tiny_data(n=30, features=8)
    # Rows with 0, 2, 5 and 7 pruned: both forms of the update (|K| ≤ |Q| and |K| > |Q|).
    mask = torch.ones(4, 8, dtype=torch.bool)
    mask[1, [0, 6]] = False
    mask[2, [1, 2, 4, 5, 7]] = False
    mask[3, :7] = False
    current = net[0].weight.detach().clone()
    LayerwiseOBS(damping=0.0).update_(net, {"0.weight": mask}, (x, y))
    expected = torch.stack([constrained_optimum(x, current[i], mask[i])[0] for i in range(4)])
    torch.testing.assert_close(net[0].weight.detach(), expected, **TIGHT)
    torch.testing.assert_close(net[0].weight_orig.detach() * earlier, expected, **TIGHT)


def test_obs_on_a_conv_is_least_squares_on_its_patches():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel_size=2, stride=2, padding=1).double()
    net = nn.Sequential(conv)
    x = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    padded = F.pad(x, (1, 1, 1, 1))
    patches = torch.cat(
        [padded[:, :, i : i + 2, j : j + 2].reshape(6, -1) for i in (0, 2, 4) for j in (0, 2, 4)]
    )  # one row per example and output position, channel then kernel position
    weight = conv.weight.detach().reshape(3, -1).clone()
    hessian = patches.T @ patches / patches.shape[0]
    obs = LayerwiseOBS(damping=0.0, allocation="saliency")
    scores = obs.scores(net, (x, torch.zeros(6)))["0.weight"]
    expected = weight**2 / (2 * torch.linalg.inv(hessian).diagonal())
    torch.testing.assert_close(scores.reshape(3, -1), expected, **TIGHT)

    mask = torch.rand(3, 8, generator=seeded(2)) > 0.4
    masks = {"0.weight": mask.reshape(3, 2, 2, 2)}
    LayerwiseOBS(damping=0.0).update_(net, masks, (x, torch.zeros(6)))
    optimum = torch.stack([constrained_optimum(patches, weight[i], mask[i])[0] for i in range(3)])
    torch.testing.assert_close(conv.weight.detach().reshape(3, -1), optimum, **TIGHT)


def test_obs_damping_makes_a_dead_input_free_to_remove():
    net = linear_layer(4, 2)
    x, y = tiny_data(n=20, features=4)
    x[:, 2] = 0.0  # a dead input: H is singular without damping
    scores = LayerwiseOBS(damping=1e-4, allocation="saliency").scores(net, (x, y))["0.weight"]
    hessian = x.T @ x / 20
    # Damped H is block diagonal with λ·mean(diag H) for the dead input: [H⁻¹]_qq = 1/that.
    expected = 0.5 * net[0].weight.detach()[:, 2] ** 2 * 1e-4 * hessian.diagonal().mean()
    torch.testing.assert_close(scores[:, 2], expected, **TIGHT)
    with pytest.raises(ValueError, match="positive definite.*damping > 0"):
        LayerwiseOBS(damping=0.0).scores(net, (x, y))


def test_obs_keeps_magnitude_s_count_per_layer_and_chooses_by_saliency():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x, y = tiny_data(n=40, features=6)
    magnitude = prune(copy.deepcopy(net), "magnitude", 0.6)
    masks = prune(copy.deepcopy(net), LayerwiseOBS(damping=1e-4), 0.6, data=(x, y))
    saliency = LayerwiseOBS(damping=1e-4, allocation="saliency").scores(net, (x, y))
    for key, mask in masks.items():
        assert int(mask.sum()) == int(magnitude[key].sum())
        kept, pruned = saliency[key][mask], saliency[key][~mask]
        assert kept.min() >= pruned.max()  # within a layer, the most salient are kept


def test_obs_refuses_negative_damping_and_unsupported_layers():
    with pytest.raises(ValueError, match="allocation"):
        LayerwiseOBS(allocation="layer")
    with pytest.raises(ValueError, match="damping to be a number >= 0"):
        LayerwiseOBS(damping=-1.0)
    grouped = nn.Sequential(nn.Conv2d(2, 2, 1, groups=2))
    with pytest.raises(ValueError, match="groups=1"):
        LayerwiseOBS().scores(grouped, (torch.randn(3, 2, 2, 2), torch.zeros(3)))


# --- Kronecker-factored OBD / OBS -----------------------------------------------------


def test_kron_saliencies_and_update_match_the_explicit_kronecker_fisher():
    # Rows of W̃ concatenated (row-major vec): entry (i, j) sits at i·d + j, so the Fisher
    # E[vec(g ãᵀ) vec(g ãᵀ)ᵀ] factors as kron(S, A).
    a, s = random_spd(4, seed=0), random_spd(3, seed=1)
    weight_bias = torch.randn(3, 4, dtype=torch.float64, generator=seeded(2))
    fisher, theta = torch.kron(s, a), weight_bias.reshape(-1)

    def constrained(rows: list[int]):
        """The least ½ δᵀFδ with the rows zeroed (δ = −θ there), and its δ."""
        removed = torch.zeros(3, 4, dtype=torch.bool)
        removed[rows] = True
        q, k = removed.reshape(-1), ~removed.reshape(-1)
        delta = torch.zeros_like(theta)
        delta[q] = -theta[q]
        delta[k] = -torch.linalg.solve(fisher[k][:, k], fisher[k][:, q] @ delta[q])
        return 0.5 * delta @ fisher @ delta, delta.reshape(3, 4), q

    obd, obs = kron_obd_saliency(weight_bias, a, s), kron_obs_saliency(weight_bias, a, s)
    for i in range(3):
        minimum, _, q = constrained([i])
        torch.testing.assert_close(obs[i], minimum, **TIGHT)
        torch.testing.assert_close(obd[i], 0.5 * theta[q] @ fisher[q][:, q] @ theta[q], **TIGHT)

    _, delta, _ = constrained([0, 2])
    pruned = torch.tensor([True, False, True])
    updated = kron_obs_update(weight_bias, s, pruned)
    torch.testing.assert_close(updated, weight_bias + delta, **TIGHT)


def test_kron_factors_of_a_linear_layer_match_per_example_gradients():
    net, (x, y) = tiny_mlp(), tiny_data()
    factors = kron_factors(net, (x, y), {"0": net[0]}, fisher="empirical", batch_size=3)
    a, s = factors["0"]
    inputs = torch.cat([x, torch.ones(7, 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(a, inputs.T @ inputs / 7, **TIGHT)
    expected = torch.zeros(4, 4, dtype=torch.float64)
    for xn, yn in zip(x, y, strict=True):
        pre = net[0](xn[None]).detach().requires_grad_()
        (g,) = torch.autograd.grad(F.cross_entropy(net[2](net[1](pre)), yn[None]), pre)
        expected += g.T @ g / 7
    torch.testing.assert_close(s, expected, **TIGHT)


def test_kron_factors_of_a_conv_average_patches_and_sum_gradients_over_positions():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)).double()
    x, y = torch.randn(5, 1, 3, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    a, s = kron_factors(net, (x, y), {"0": net[0]}, fisher="empirical", batch_size=2)["0"]
    corners = [(i, j) for i in (0, 1) for j in (0, 1)]
    patches = torch.cat([x[:, :, i : i + 2, j : j + 2].reshape(5, 4) for i, j in corners])
    patches = torch.cat([patches, torch.ones(20, 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(a, patches.T @ patches / 20, **TIGHT)
    expected = torch.zeros(2, 2, dtype=torch.float64)
    for xn, yn in zip(x, y, strict=True):
        pre = net[0](xn[None]).detach().requires_grad_()
        (g,) = torch.autograd.grad(F.cross_entropy(net[1:](pre), yn[None]), pre)
        rows = g[0].reshape(2, 4).T  # one row per position
        expected += rows.T @ rows / 5
    torch.testing.assert_close(s, expected, **TIGHT)


def test_true_fisher_samples_labels_from_the_model():
    net, (x, _) = tiny_mlp(), tiny_data()
    with torch.no_grad():
        net[2].bias.copy_(torch.tensor([0.0, 1e3]))  # the model says class 1, surely
    layers = {"0": net[0]}
    sampled = kron_factors(net, (x, torch.zeros(7, dtype=torch.long)), layers)["0"]
    labelled = kron_factors(net, (x, torch.ones(7, dtype=torch.long)), layers, "empirical")["0"]
    for found, expected in zip(sampled, labelled, strict=True):
        torch.testing.assert_close(found, expected, **TIGHT)


def test_kron_obs_prunes_hidden_units_and_applies_its_update():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    net = net.double()
    x, y = tiny_data(n=50, features=5, classes=3)
    method = KronOBS(damping=1e-3)
    damped = method._factors(net, (x, y))
    before = {name: torch.cat([net[int(name)].weight, net[int(name)].bias[:, None]], 1).detach()
              for name in ("0", "2")}  # fmt: skip
    masks = prune(net, method, 0.5, data=(x, y))
    assert sorted(masks) == ["0.bias", "0.weight", "2.bias", "2.weight"]  # not the classifier
    for name in ("0", "2"):
        mask = masks[f"{name}.weight"]
        pruned = ~mask.any(1)
        assert torch.equal(mask.all(1), ~pruned) and torch.equal(masks[f"{name}.bias"], ~pruned)
        expected = kron_obs_update(before[name], damped[name][1], pruned)
        layer = net[int(name)]
        torch.testing.assert_close(layer.weight.detach(), expected[:, :-1], **TIGHT)
        torch.testing.assert_close(layer.bias.detach(), expected[:, -1], **TIGHT)


def test_a_layer_the_loss_does_not_depend_on_costs_nothing_to_prune():
    net, data = tiny_mlp(), tiny_data()
    with torch.no_grad():
        net[2].weight.zero_()  # no gradient reaches layer 0: its S is zero
    before = net[0].weight.detach().clone()
    assert torch.equal(
        KronOBS().scores(net, data)["0.weight"], torch.zeros(4, 1, dtype=torch.float64)
    )
    masks = prune(net, KronOBS(), 0.5, data=data)
    kept = masks["0.weight"].all(1)
    assert torch.equal(net[0].weight.detach(), before * kept[:, None])  # no update

    layer = linear_layer(3, 2)
    silent = (torch.zeros(5, 3, dtype=torch.float64), torch.zeros(5))  # H is zero
    assert not LayerwiseOBS(allocation="saliency").scores(layer, silent)["0.weight"].any()


# --- EigenDamage ----------------------------------------------------------------------


def small_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(12, 5),
        nn.ReLU(), nn.Linear(5, 3),
    ).double()  # fmt: skip


def cnn_data(n: int = 20):
    return torch.randn(n, 1, 4, 4, dtype=torch.float64, generator=seeded(5)), torch.arange(n) % 3


def test_the_kfe_reparameterisation_computes_the_same_function():
    net, (x, y) = small_cnn(), cnn_data()
    rotated = kfe_reparameterise(net, (x, y))
    assert isinstance(rotated[0], KFEBottleneck) and isinstance(rotated[3], KFEBottleneck)
    assert isinstance(rotated[5], nn.Linear)  # the classifier stays
    torch.testing.assert_close(rotated(x), net(x), **TIGHT)
    torch.testing.assert_close(eigendamage(net, (x, y), 0.0)(x), net(x), **TIGHT)


def test_in_the_kfe_the_kfac_factors_are_diagonal_with_the_eigenvalues():
    net, (x, y) = small_cnn(), cnn_data()
    rotated = kfe_reparameterise(net, (x, y), fisher="empirical")
    for name in ("0", "3"):
        bottleneck = rotated.get_submodule(name)
        core = {name: bottleneck.core}
        a, s = kron_factors(rotated, (x, y), core, fisher="empirical")[name]
        torch.testing.assert_close(a, torch.diag(bottleneck.eigenvalues_a), **TIGHT)
        torch.testing.assert_close(s, torch.diag(bottleneck.eigenvalues_s), **TIGHT)


def test_eigendamage_scores_are_the_kfe_loss_increase_of_rows_and_columns():
    net, data = small_cnn(), cnn_data()
    rotated = kfe_reparameterise(net, data)
    bottleneck = rotated[3]
    core = bottleneck.core.weight.detach()  # (5, 13): W' of the Linear(12, 5)
    # ½ vec(Δ)ᵀ F vec(Δ) with F = diag(λ^S) ⊗ diag(λ^A) explicit, Δ one row or column.
    fisher = torch.kron(torch.diag(bottleneck.eigenvalues_s), torch.diag(bottleneck.eigenvalues_a))
    scores = EigenDamage().scores(rotated, None)
    for i in range(5):
        delta = torch.zeros_like(core)
        delta[i] = core[i]
        expected = 0.5 * delta.reshape(-1) @ fisher @ delta.reshape(-1)
        torch.testing.assert_close(scores["3.core.weight"][i, 0], expected, **TIGHT)
    for j in range(13):
        delta = torch.zeros_like(core)
        delta[:, j] = core[:, j]
        expected = 0.5 * delta.reshape(-1) @ fisher @ delta.reshape(-1)
        torch.testing.assert_close(scores["3.rotate_in.weight"][j, 0], expected, **TIGHT)
    assert scores["0.core.weight"].shape == (3, 1, 1, 1)
    assert scores["0.rotate_in.weight"].shape == (10, 1, 1, 1)  # 1·3·3 + 1 directions


def test_eigendamage_cuts_the_pruned_directions_and_keeps_the_masked_function():
    net, (x, y) = small_cnn(), cnn_data()
    rotated = kfe_reparameterise(net, (x, y))
    masks = prune(rotated, EigenDamage(), 0.6)
    small = eigendamage(net, (x, y), 0.6)
    torch.testing.assert_close(small(x), rotated(x), **TIGHT)
    for name in ("0", "3"):
        kept_in = int(masks[f"{name}.rotate_in.weight"].flatten(1).any(1).sum())
        kept_out = int(masks[f"{name}.core.weight"].flatten(1).any(1).sum())
        bottleneck = small.get_submodule(name)
        assert bottleneck.core.weight.shape[:2] == (kept_out, kept_in)
        assert bottleneck.rotate_out.weight.shape[1] == kept_out
    assert sum(p.numel() for p in small.parameters()) < sum(
        p.numel() for p in rotated.parameters()
    )


def test_eigendamage_scores_need_a_reparameterised_net():
    with pytest.raises(ValueError, match="kfe_reparameterise"):
        EigenDamage().scores(small_cnn(), None)
