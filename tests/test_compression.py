"""Compression beyond pruning: each rule on a case small enough to check by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

from bayessparse.compression import (
    STAGES,
    HashedLinear,
    bake_,
    bayesian_bits,
    binarise,
    choose_rank,
    deep_compression,
    distillation_loss,
    factorise,
    factorise_,
    huffman_bits,
    huffman_lengths,
    kmeans_1d,
    paper_bits,
    quantise,
    quantise_,
    relative_indices,
    round_to_bits,
    share_,
    share_weights,
    storage_bytes,
)
from bayessparse.compression.hashing import hash32
from bayessparse.compression.precision import significant_bits

PACKAGE = Path(__file__).resolve().parents[1] / "bayessparse"
EXACT = 1e-12  # float64 results of a few exact operations


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = EXACT) -> bool:
    """Equal within ``atol``, with no relative slack."""
    return torch.allclose(actual, expected, rtol=0.0, atol=atol)


def ends_mask(size: int = 8) -> torch.Tensor:
    """Keeps the first and last of ``size`` positions."""
    mask = torch.zeros(size, dtype=torch.bool)
    mask[[0, size - 1]] = True
    return mask


# --- Huffman -------------------------------------------------------------------------------


def test_huffman_lengths_and_bits_by_hand():
    # Merges: 1+1 -> 2, 2+2 -> 4, 4+5 -> 9: depths 1, 2, 3, 3.
    assert huffman_lengths([5, 2, 1, 1]).tolist() == [1, 2, 3, 3]
    assert huffman_bits([5, 2, 1, 1]) == 5 * 1 + 2 * 2 + 1 * 3 + 1 * 3 == 15
    # Unused symbols get no codeword; a lone symbol still needs one bit.
    assert huffman_lengths([0, 3, 0, 1]).tolist() == [0, 1, 0, 1]
    assert huffman_bits([0, 7]) == 7
    assert huffman_bits([]) == 0
    with pytest.raises(ValueError, match="non-negative"):
        huffman_lengths([1, -1])


def test_huffman_code_is_complete_and_within_a_bit_of_the_entropy():
    counts = torch.randint(1, 50, (40,), generator=torch.Generator().manual_seed(0))
    lengths = huffman_lengths(counts).double()
    assert float((2.0**-lengths).sum()) == 1.0  # Kraft equality: a full binary tree
    p = counts.double() / counts.sum()
    entropy, mean_length = float(-(p * p.log2()).sum()), float((p * lengths).sum())
    assert entropy <= mean_length < entropy + 1


# --- Storage -------------------------------------------------------------------------------


def test_relative_indices_insert_fillers_as_the_papers_figure_2():
    mask = torch.zeros(16, dtype=torch.bool)
    mask[[1, 4, 15]] = True
    gaps, filler = relative_indices(mask, 3)
    # Gaps 2, 3, 11 from position -1; 11 > 2^3 takes a filler 8 positions on.
    assert gaps.tolist() == [2, 3, 8, 3]
    assert filler.tolist() == [False, False, True, False]
    gaps, filler = relative_indices(mask.reshape(4, 4), 0)  # dense: every position
    assert gaps.tolist() == [1] * 16 and int((~filler).sum()) == 3


def test_storage_of_a_tiny_layer_by_hand():
    mask = ends_mask().reshape(2, 4)  # positions 0 and 7: gaps 1 and 7
    codes = torch.zeros(2, 4, dtype=torch.int64)
    codes[0, 0], codes[1, 3] = 5, 5
    fixed = storage_bytes(
        mask, bits_per_index=2, bits_per_value=3, codes=codes, codebook_size=7, biases=2
    )
    # 2-bit indices span 4: gap 7 takes ⌈7/4⌉ = 2 entries, so 3 entries, 1 filler.
    assert (fixed.nonzero, fixed.fillers) == (2, 1)
    assert (fixed.index_bits, fixed.value_bits) == (3 * 2, 3 * 3)
    assert (fixed.codebook_bits, fixed.bias_bits) == (7 * 32, 2 * 32)
    assert fixed.bits == 303 and fixed.bytes == 38  # ⌈303 / 8⌉
    assert fixed.dense_bytes == (8 + 2) * 4 == 40
    assert fixed.compression_ratio == 40 / 38
    coded = storage_bytes(
        mask,
        bits_per_index=2,
        bits_per_value=3,
        codes=codes,
        codebook_size=7,
        biases=2,
        huffman=True,
    )
    # Index symbols gap−1: 0, 3 (filler), 2, once each: lengths 1, 2, 2 -> 5 bits.
    # Codes: 5, 0 (the filler's zero), 5: lengths 1, 1 -> 3 bits.
    assert (coded.index_bits, coded.value_bits) == (5, 3)
    assert coded.bits == 5 + 3 + 224 + 64
    plain = storage_bytes(mask, bits_per_index=2)  # float32 survivors
    assert plain.bits == 3 * (2 + 32)


def test_storage_checks_its_arguments():
    with pytest.raises(ValueError, match="bits_per_index"):
        storage_bytes(ends_mask(), bits_per_index=-1)
    with pytest.raises(ValueError, match="codes of the mask's shape"):
        storage_bytes(ends_mask(), bits_per_index=2, codes=torch.zeros(3), huffman=True)


def test_paper_bits_are_8_for_convolutions_and_5_for_linear_layers():
    assert paper_bits(nn.Conv2d(1, 1, 3)) == 8
    assert paper_bits(nn.Linear(2, 2)) == 5


# --- Weight sharing ------------------------------------------------------------------------

CLUSTERS = torch.tensor([-2.1, -2.0, -1.9, 0.9, 1.0, 1.1, 4.9, 5.0, 5.1], dtype=torch.float64)


def test_kmeans_finds_three_known_clusters_from_the_linear_start():
    # Start linspace(-2.1, 5.1, 3) = -2.1, 1.5, 5.1: midpoints -0.3, 3.3 split the
    # clusters at once; the means are -2, 1, 5.
    centroids, assignment = kmeans_1d(CLUSTERS, 3)
    assert close(centroids, torch.tensor([-2.0, 1.0, 5.0], dtype=torch.float64))
    assert assignment.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_kmeans_converges_from_a_start_that_splits_a_cluster():
    values = torch.tensor([0.0, 0.1, 0.2, 10.0], dtype=torch.float64)
    # Start 0, 5, 10: nothing near 5, so its centroid stays; the means are 0.1 and 10.
    centroids, assignment = kmeans_1d(values, 3)
    assert centroids.tolist() == pytest.approx([0.1, 5.0, 10.0], abs=EXACT)
    assert assignment.tolist() == [0, 0, 0, 2]


def test_share_weights_ignores_pruned_entries_and_reserves_code_0_for_zero():
    weight = CLUSTERS.reshape(3, 3).clone()
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[0, 0] = False
    weight[0, 0] = 100.0  # pruned: must not move any centroid
    shared = share_weights(weight, mask, bits=2)  # 2^2 − 1 = 3 centroids and the zero
    expected = torch.tensor([0.0, -1.95, 1.0, 5.0], dtype=torch.float64)
    assert close(shared.codebook, expected)
    assert shared.index.tolist() == [[0, 1, 1], [2, 2, 2], [3, 3, 3]]
    assert shared.weight()[0, 0] == 0 and shared.num_centroids == 3


def pruned_linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(4, 3).double()
    mask = torch.rand(3, 4) > 0.3
    torch_prune.custom_from_mask(layer, "weight", mask)
    return layer


def test_centroid_gradients_are_the_sums_of_their_weights_gradients():
    layer = pruned_linear()
    shared = share_(layer, bits=2)
    x = torch.randn(5, 4, dtype=torch.float64)
    target = torch.randn(5, 3, dtype=torch.float64)
    F.mse_loss(layer(x), target).backward()
    codebook = layer.parametrizations.weight.original
    # The same loss as a function of a free weight matrix V = codebook[index] · mask.
    free = shared.weight().detach().requires_grad_()
    F.mse_loss(F.linear(x, free, layer.bias), target).backward()
    assert free.grad is not None
    expected = torch.zeros(4, dtype=torch.float64).index_add_(
        0, shared.index.reshape(-1), (free.grad * shared.mask).reshape(-1)
    )
    assert codebook.grad is not None
    assert close(codebook.grad, expected)
    assert codebook.grad[0] == 0  # the zero code gets nothing: it stays zero


def test_fine_tuning_moves_shared_weights_together_and_bake_restores_prune_format():
    layer = pruned_linear()
    keys = sorted(layer.state_dict())
    shared = share_(layer, bits=2)
    layer(torch.randn(5, 4, dtype=torch.float64)).pow(2).sum().backward()
    with torch.no_grad():  # an SGD step on the layer's parameters: codebook and bias
        for parameter in layer.parameters():
            parameter -= 0.1 * parameter.grad
    baked = bake_(layer)
    assert sorted(layer.state_dict()) == keys  # weight_orig, weight_mask, bias
    assert torch.equal(layer.weight_mask.bool(), shared.mask)
    assert torch.equal(layer.weight, baked.codebook[shared.index] * shared.mask)
    assert layer.weight[~shared.mask].eq(0).all()
    assert not torch.equal(baked.codebook, shared.codebook)  # the step moved them
    with pytest.raises(ValueError, match="share_"):
        bake_(layer)


def test_share_reads_weight_orig_not_the_stale_cached_weight():
    layer = pruned_linear()
    with torch.no_grad():
        layer.weight_orig.fill_(2.0)  # torch prune's cached layer.weight is now stale
    assert share_(layer, bits=1).codebook.tolist() == [0.0, 2.0]


# --- Deep Compression ----------------------------------------------------------------------


def tiny_pruned_net() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 1)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.arange(1.0, 9.0).reshape(2, 4))
        net[2].weight.copy_(torch.tensor([[1.0, 3.0]]))
    torch_prune.custom_from_mask(net[0], "weight", ends_mask().reshape(2, 4))
    return net


def test_deep_compression_report_of_a_tiny_net_by_hand():
    net = tiny_pruned_net()
    report = deep_compression(net, bits=1, index_bits=2)  # one centroid per layer
    # Layer 0 keeps w = 1 and 8 (positions 0, 7): centroid 4.5; layer 2 is dense: 2.
    assert torch.equal(net[0].weight, torch.tensor([[4.5, 0, 0, 0], [0, 0, 0, 4.5]]).double())
    assert hasattr(net[0], "weight_mask") and not hasattr(net[2], "weight_mask")
    assert torch.equal(net[2].weight, torch.tensor([[2.0, 2.0]]).double())
    first, second = report.layers["0.weight"], report.layers["2.weight"]
    # Layer 0: 3 entries (1 filler) x 2-bit indices = 6 bits, biases 2 x 32 = 64.
    #   pruned:  6 + 3 x 32 values = 166 bits -> 21 bytes
    #   shared:  6 + 3 x 1 codes + 1 x 32 codebook + 64 = 105 bits -> 14 bytes
    #   huffman: indices 0, 3, 2 -> 5 bits; codes 1, 0, 1 -> 3 bits: 104 bits -> 13 bytes
    assert [first[stage].bytes for stage in STAGES] == [21, 14, 13]
    # Layer 2, dense (no index): pruned 2 x 32 + 32 = 96 bits -> 12 bytes;
    # shared 2 x 1 + 32 + 32 = 66 -> 9; Huffman: one symbol, 1 bit each: 66 -> 9.
    assert [second[stage].bytes for stage in STAGES] == [12, 9, 9]
    assert report.dense_bytes == (8 + 2) * 4 + (2 + 1) * 4 == 52
    assert [report.bytes(stage) for stage in STAGES] == [33, 23, 22]
    assert report.ratio("huffman") == 52 / 22
    row = report.rows()[0]
    assert row["layer"] == "0.weight" and row["shared_bytes"] == 14
    assert row["huffman_ratio"] == 40 / 13


def test_deep_compression_fine_tunes_the_codebooks_with_the_callers_function():
    seen = []

    def finetune(net: nn.Module) -> None:
        codebook = net[0].parametrizations.weight.original
        seen.append(codebook.detach().clone())
        with torch.no_grad():
            codebook[1:] += 1.0  # stands in for training: every centroid moves by 1

    net = tiny_pruned_net()
    deep_compression(net, bits=1, index_bits=2, finetune=finetune)
    assert seen[0].tolist() == [0.0, 4.5]
    assert net[0].weight[0, 0] == 5.5 and net[0].weight[0, 1] == 0


def test_a_failing_fine_tuning_leaves_the_layers_as_they_were():
    def fail(net: nn.Module) -> None:
        raise RuntimeError("interrupted")

    net = tiny_pruned_net()
    keys = sorted(net.state_dict())
    with pytest.raises(RuntimeError, match="interrupted"):
        deep_compression(net, bits=1, finetune=fail)
    assert sorted(net.state_dict()) == keys  # no codebook parametrisation left


def test_deep_compression_stages_shrink_a_larger_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 16, 3), nn.Flatten(), nn.Linear(16 * 6 * 6, 50))
    for layer in (net[0], net[2]):
        torch_prune.l1_unstructured(layer, "weight", amount=0.8)
    report = deep_compression(net)  # the paper's 8 bits for the conv, 5 for the fc
    assert report.dense_bytes > report.bytes("pruned") > report.bytes("shared")
    for stages in report.layers.values():  # an optimal prefix code is never longer
        assert stages["shared"].value_bits >= stages["huffman"].value_bits
        assert stages["shared"].index_bits >= stages["huffman"].index_bits
    assert report.layers["0.weight"]["shared"].codebook_bits == (2**8 - 1) * 32
    assert report.layers["2.weight"]["shared"].codebook_bits == (2**5 - 1) * 32


def test_deep_compression_refuses_unknown_layer_names():
    with pytest.raises(ValueError, match="layer names"):
        deep_compression(tiny_pruned_net(), bits={"5": 3})


# --- Quantisation --------------------------------------------------------------------------


def test_uniform_quantisation_levels_and_scale_are_exact():
    weight = torch.tensor([-1.0, -0.5, 0.2, 0.26, 0.9, 10.0], dtype=torch.float64)
    mask = torch.tensor([True, True, True, True, True, False])
    # 3 bits: Q = 3, s = max|w| / Q = 1/3 (the pruned 10 does not count);
    # w/s = -3, -1.5, 0.6, 0.78, 2.7 -> -3, -2 (ties to even), 1, 1, 3.
    expected = torch.tensor([-3.0, -2.0, 1.0, 1.0, 3.0, 0.0], dtype=torch.float64) / 3
    assert close(quantise(weight, 3, mask), expected)
    levels = quantise(torch.linspace(-1, 1, 1001, dtype=torch.float64), 8).unique()
    assert levels.numel() == 2**8 - 1  # ±127 steps of 1/127, zero among them
    assert close(levels * 127, (levels * 127).round(), atol=1e-9)
    with pytest.raises(ValueError, match="binarise"):
        quantise(weight, 1)


def test_binarisation_keeps_signs_and_the_mean_magnitude():
    weight = torch.tensor([-3.0, 1.0, 2.0, 0.0, 100.0])
    mask = torch.tensor([True, True, True, True, False])
    # α = mean(3, 1, 2, 0) = 1.5; a kept zero takes +α; the pruned entry stays 0.
    assert binarise(weight, mask).tolist() == [-1.5, 1.5, 1.5, 1.5, 0.0]


def test_quantise_net_in_place_and_its_storage():
    net = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(8, 1))
    torch_prune.custom_from_mask(net[2], "weight", ends_mask().reshape(1, 8))
    storage = quantise_(net, 4, index_bits=2)
    # Dense layer: 6 x 4 bits + a 32-bit scale + 2 biases x 32 = 120 bits.
    assert storage["0.weight"].bits == 6 * 4 + 32 + 64
    # Pruned layer: 3 entries (1 filler) x (2 index + 4 value) bits + scale + bias.
    assert storage["2.weight"].bits == 3 * (2 + 4) + 32 + 32
    scale = net[0].weight.abs().max() / 7
    assert close(net[0].weight / scale, (net[0].weight / scale).round(), atol=1e-5)
    binary = quantise_(net, 1, index_bits=2)
    # One bit has no zero for the filler: a third symbol, so 2 bits per value.
    assert binary["2.weight"].value_bits == 3 * 2 and binary["0.weight"].value_bits == 6
    assert net[2].weight[0, 1:7].eq(0).all() and hasattr(net[2], "weight_mask")


# --- Bayesian bit precision ----------------------------------------------------------------


def official_significant_bits(variance: float) -> int:
    """The authors' float_precision(2σ²): Σ_t [2σ² < 0.5 · 2^(1−t)], t = 1..23."""
    return sum(2 * variance < 0.5 * 2.0 ** (1 - t) for t in range(1, 24))


def test_significant_bits_follow_the_authors_formula():
    variances = torch.tensor([0.0, 2.0**-7, 2.0**-6.5, 1e-3, 0.3, 2.0**-30])
    expected = [official_significant_bits(float(v)) for v in variances]
    assert significant_bits(variances).tolist() == expected
    # 2σ² = 2^-6: s < 6 strictly -> 5 bits; 2σ² = 2^-5.5 -> s ≤ 5 -> 5; zero -> all 23.
    assert expected[:3] == [23, 5, 5]


def test_bayesian_bits_of_a_layer_by_hand():
    means = torch.tensor([6.0, -1.0, 0.1])
    # 2σ² = 2^-5.5 -> 5 bits, 2^-10.5 -> 10 bits; the third weight is pruned.
    variances = torch.tensor([2.0**-6.5, 2.0**-11.5, 0.0])
    mask = torch.tensor([True, True, False])
    precision = bayesian_bits(means, variances, mask)
    # t = ⌈(5 + 10) / 2⌉ = 8; e = ⌈log2(log2 6 + 1) + 1⌉ = ⌈2.84⌉ = 3.
    assert (precision.significant_bits, precision.exponent_bits) == (8, 3)
    assert precision.bits_per_weight == 12 and precision.bits == 24
    # Small means: the authors' formula is undefined; one exponent bit.
    assert bayesian_bits(means / 100, variances, mask).exponent_bits == 1
    assert bayesian_bits(means, variances, mask, largest_mean=1000.0).exponent_bits == 5
    with pytest.raises(ValueError, match="non-negative variances"):
        bayesian_bits(means, -variances - 1, mask)


def test_round_to_bits_is_fixed_point_rounding():
    means = torch.tensor([0.3, -0.3, 0.125])
    # δ = 1/4: 0.3 -> 0.25, -0.3 -> -0.25, 0.125 -> ⌊0.5 + 0.5⌋/4 = 0.25.
    assert round_to_bits(means, 2).tolist() == [0.25, -0.25, 0.25]


# --- HashedNets ----------------------------------------------------------------------------


def test_hashed_linear_is_a_linear_layer_with_its_virtual_weights():
    torch.manual_seed(0)
    layer = HashedLinear(6, 5, num_weights=7, seed=3).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    virtual = layer.expanded_weight()
    assert virtual.shape == (5, 6) and layer.weight.numel() == 7
    assert torch.equal(virtual, layer.sign * layer.weight[layer.bucket])
    assert close(layer(x), F.linear(x, virtual, layer.bias))
    assert set(layer.sign.unique().tolist()) <= {-1.0, 1.0}
    assert int(layer.bucket.min()) >= 0 and int(layer.bucket.max()) < 7


def test_hashed_weight_gradient_is_the_signed_sum_over_its_bucket():
    torch.manual_seed(0)
    layer = HashedLinear(6, 5, num_weights=7, seed=3).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    virtual = layer.expanded_weight().detach().requires_grad_()
    F.linear(x, virtual, layer.bias).pow(2).sum().backward()
    assert virtual.grad is not None and layer.weight.grad is not None
    expected = torch.zeros(7, dtype=torch.float64).index_add_(
        0, layer.bucket.reshape(-1), (layer.sign * virtual.grad).reshape(-1)
    )
    assert close(layer.weight.grad, expected)


def test_hashes_are_seeded_and_deterministic():
    first, again = HashedLinear(8, 8, 5, seed=1), HashedLinear(8, 8, 5, seed=1)
    other = HashedLinear(8, 8, 5, seed=2)
    assert torch.equal(first.bucket, again.bucket) and torch.equal(first.sign, again.sign)
    assert not torch.equal(first.bucket, other.bucket)
    keys = torch.arange(1000).numpy()
    assert len(set(hash32(keys, 0).tolist())) == 1000  # fmix32 is a bijection


# --- Low rank ------------------------------------------------------------------------------


def test_choose_rank_by_energy():
    singular = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 13, 14 of 14
    assert [choose_rank(singular, e) for e in (0.5, 0.9, 13 / 14, 1.0)] == [1, 2, 2, 3]
    with pytest.raises(ValueError, match="energy"):
        choose_rank(singular, 0.0)


def test_linear_svd_is_exact_at_full_rank_and_optimal_below_it():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    full = factorise(layer, rank=4)
    assert close(full.module(x), layer(x))
    low = factorise(layer, rank=2)
    product = low.module[1].weight @ low.module[0].weight
    error = layer.weight.detach() - product
    s = low.singular_values
    # Eckart–Young: the discarded singular values are the error, Frobenius and spectral.
    assert close(error.pow(2).sum(), s[2:].pow(2).sum())
    assert close(torch.linalg.matrix_norm(error, ord=2), s[2])
    assert (low.params_before, low.params_after) == (6 * 4 + 4, 2 * 6 + 4 * 2 + 4)


def test_conv_svd_is_exact_at_full_rank_and_optimal_below_it():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=2).double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    full = factorise(conv, rank=5)  # min(5, 3·3·3)
    assert close(full.module(x), conv(x))
    low = factorise(conv, rank=2)
    first, second = low.module[0].weight, low.module[1].weight
    assert first.shape == (2, 3, 3, 3) and second.shape == (5, 2, 1, 1)
    error = conv.weight.detach().reshape(5, -1) - second.reshape(5, 2) @ first.reshape(2, -1)
    assert close(error.pow(2).sum(), low.singular_values[2:].pow(2).sum())
    assert (low.params_before, low.params_after) == (5 * 27 + 5, 2 * 27 + 5 * 2 + 5)


def test_factorise_replaces_only_the_layers_it_shrinks():
    net = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))
    replaced = factorise_(net, rank=2)
    # 10x10: 110 -> 2·10 + 10·2 + 10 = 50 parameters; 10x2 at rank 2: 22 -> 26, kept.
    assert list(replaced) == ["0"] and replaced["0"].params_after == 50
    assert isinstance(net[0], nn.Sequential) and isinstance(net[2], nn.Linear)
    with pytest.raises(ValueError, match="exactly one"):
        factorise(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="groups=1"):
        factorise(nn.Conv2d(2, 2, 3, groups=2), rank=1)


# --- Distillation --------------------------------------------------------------------------


def test_distillation_loss_equals_its_formula():
    torch.manual_seed(0)
    student, teacher = (
        torch.randn(4, 3, dtype=torch.float64),
        torch.randn(4, 3, dtype=torch.float64),
    )
    labels = torch.tensor([0, 2, 1, 1])
    temperature, alpha = 3.0, 0.7
    p = torch.softmax(teacher / temperature, dim=1)
    q = torch.softmax(student / temperature, dim=1)
    kl = (p * (p.log() - q.log())).sum(dim=1).mean()
    ce = -torch.log_softmax(student, dim=1)[torch.arange(4), labels].mean()
    expected = alpha * temperature**2 * kl + (1 - alpha) * ce
    loss = distillation_loss(student, teacher, labels, temperature=temperature, alpha=alpha)
    assert close(loss, expected)
    hard = distillation_loss(student, teacher, labels, temperature=temperature, alpha=0.0)
    assert close(hard, F.cross_entropy(student, labels))


@pytest.mark.parametrize("temperature", [1.0, 4.0, 1000.0])
def test_soft_gradient_is_t_times_q_minus_p_and_matches_logits_at_high_t(temperature):
    torch.manual_seed(0)
    batch, classes = 4, 5
    student = (torch.rand(batch, classes, dtype=torch.float64) * 2 - 1).requires_grad_()
    teacher = torch.rand(batch, classes, dtype=torch.float64) * 2 - 1
    labels = torch.zeros(batch, dtype=torch.int64)
    distillation_loss(student, teacher, labels, temperature=temperature, alpha=1.0).backward()
    assert student.grad is not None
    p = torch.softmax(teacher / temperature, dim=1)
    q = torch.softmax(student.detach() / temperature, dim=1)
    # d/ds of T²·KL, batch mean: T·(q − p) / batch (Hinton et al. 2015, Eq. 2 times T²).
    assert close(student.grad, temperature * (q - p) / batch)
    if temperature == 1000.0:
        # High T, zero-mean logits: T·(q − p) -> (s − t)/N. The next term of the
        # expansion is ((s_i² − mean s²) − (t_i² − mean t²)) / (2NT); centred logits
        # drawn in [−1, 1] lie in [−2, 2], so each bracket is within ±4 and the term
        # within 8 / (2NT) = 4 / (NT) (later terms are O(1/T²), about 1e-6 here).
        s = student.detach() - student.detach().mean(dim=1, keepdim=True)
        t = teacher - teacher.mean(dim=1, keepdim=True)
        q, p = torch.softmax(s / temperature, dim=1), torch.softmax(t / temperature, dim=1)
        limit = (s - t) / classes
        assert close(temperature * (q - p), limit, atol=4 / (classes * temperature))


def test_distillation_checks_its_arguments():
    logits = torch.zeros(2, 3)
    labels = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(logits, logits, labels, temperature=0.0, alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(logits, logits, labels, temperature=1.0, alpha=1.5)
