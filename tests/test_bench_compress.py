"""The bench protocols of compression beyond pruning (bayessparse.bench.compress)."""

from __future__ import annotations

import pytest
import torch
from test_bench import Recording
from torch import nn

from bayessparse.bench import COLUMNS, method_names
from bayessparse.bench.compress import (
    FLOAT_BYTES,
    PROTOCOLS,
    _factor_weights,
    _largest_width,
    _weights,
    narrowed,
)
from bayessparse.bench.grid import COMPRESSION, Item, grid, kind
from bayessparse.bench.runner import min_budget
from bayessparse.compression import HashedLinear
from bayessparse.models import MODELS

CODING = ("weight_sharing", "deep_compression", "quantise8", "quantise4", "binarise")


def test_compression_methods_are_bench_methods_after_the_pruning_ones():
    assert set(COMPRESSION) == set(PROTOCOLS)
    assert method_names()[-len(COMPRESSION) :] == list(COMPRESSION)
    assert {kind(name) for name in COMPRESSION} == {"compression"}
    items = grid("lenet300", ["hashed", "magnitude", "dense"], [0.5], [0])
    assert [item.method for item in items] == ["dense", "magnitude", "hashed"]
    assert min_budget("low_rank") == 2 and min_budget("hashed") == 1


@pytest.mark.parametrize("method", COMPRESSION)
def test_every_compression_row_has_every_column_and_stores_what_it_counts(tmp_path, method):
    bench = Recording(tmp_path, budget=2)
    row = bench.run(Item("lenet300", method, 0.9, 0))
    assert set(row) == set(COLUMNS)
    assert row["family"] == PROTOCOLS[method].family
    dense_bytes = FLOAT_BYTES * row["params"]
    assert row["storage_compression"] == pytest.approx(dense_bytes / row["storage_bytes"])
    # At most a tenth of the weights is stored (hashed: rounding per layer).
    assert row["nonzero"] <= 0.1 * row["weights"] + 3
    assert row["compression"] == pytest.approx(row["weights"] / row["nonzero"])
    if method in CODING:  # codes are narrower than float32 values
        assert row["storage_bytes"] < FLOAT_BYTES * row["nonzero"]


def test_the_coding_methods_share_one_magnitude_pruned_net(tmp_path):
    bench = Recording(tmp_path, budget=4)
    rows = {m: bench.run(Item("lenet300", m, 0.9, 0)) for m in CODING}
    # 2 epochs pretrained, 2 fine-tuned after pruning: once; then one codebook epoch
    # (Adam, lr 1e-4) for each of the two sharing methods; quantisation does not train.
    plain, codebook = set(), {"lr", "optimizer"}
    assert bench.phases == [(2, plain), (2, plain), (1, codebook), (1, codebook)]
    assert all(o["lr"] == 1e-4 and o["optimizer"] == "adam" for o in bench.options[2:])
    assert len({r["nonzero"] for r in rows.values()}) == 1
    # Huffman coding only shortens the same shared net's streams.
    assert rows["deep_compression"]["storage_bytes"] < rows["weight_sharing"]["storage_bytes"]
    assert rows["deep_compression"]["error"] == rows["weight_sharing"]["error"]
    sizes = [rows[m]["storage_bytes"] for m in ("quantise8", "quantise4", "binarise")]
    assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
def test_low_rank_takes_the_largest_common_rank_within_the_target(tmp_path, sparsity):
    bench = Recording(tmp_path, budget=2)
    row = bench.run(Item("lenet300", "low_rank", sparsity, 0))
    budget = (1 - sparsity) * row["weights"]
    assert row["nonzero"] <= budget
    net = MODELS["lenet300"]()
    rank = next(r for r in range(300, 0, -1) if _factor_weights(net, r) <= budget)
    assert row["nonzero"] == _factor_weights(net, rank)
    assert _factor_weights(net, rank + 1) > budget


def test_factor_weights_counts_what_factorise_leaves():
    net = MODELS["lenet300"]()
    # Rank 20: 784x300 -> 20 (784 + 300); 300x100 -> 20 (400); 100x10 stays (1000 < 2200).
    assert _factor_weights(net, 20) == 20 * 1084 + 20 * 400 + 1000


def test_hashed_layers_store_their_share_and_run_the_dense_multiply_adds(tmp_path):
    bench = Recording(tmp_path, budget=1)
    row = bench.run(Item("lenet300", "hashed", 0.875, 0))
    assert row["nonzero"] == 235200 // 8 + 30000 // 8 + 1000 // 8
    assert row["flops_nonzero"] == row["flops_dense"]
    assert row["storage_bytes"] == FLOAT_BYTES * (row["nonzero"] + 300 + 100 + 10)


@pytest.mark.parametrize("model", ["lenet300", "lenet5"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_the_student_is_the_widest_narrowed_net_within_the_target(model, sparsity):
    net = MODELS[model]()
    target = (1 - sparsity) * _weights(net)
    width = _largest_width(net, target)
    student = narrowed(net, width)
    assert _weights(student) <= target < _weights(narrowed(net, width + 1e-3)) + 1
    assert student(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_narrowed_scales_hidden_outputs_and_matching_inputs_keeping_the_last_layer():
    student = narrowed(MODELS["lenet5"](), 0.5)
    shapes = [tuple(m.weight.shape) for m in student if hasattr(m, "weight")]
    assert shapes == [(10, 1, 5, 5), (25, 10, 5, 5), (250, 400), (10, 250)]
    with pytest.raises(ValueError, match="nn.Sequential"):
        narrowed(HashedLinear(4, 3, 2), 0.5)


def test_distillation_trains_the_teacher_once_per_seed_and_the_student_on_it(tmp_path):
    bench = Recording(tmp_path, budget=2)
    for sparsity in (0.5, 0.9):
        bench.run(Item("lenet300", "distillation", sparsity, 0))
    assert bench.phases == [(2, set()), (2, {"teacher"}), (2, {"teacher"})]
    teacher = bench.options[1]["teacher"]
    assert (teacher.temperature, teacher.alpha) == (20.0, 0.9)
    assert not teacher.net.training
    assert isinstance(teacher.net, nn.Sequential)


@pytest.mark.parametrize("family", ["sparse_vd", "group_nj"])
def test_posterior_bits_round_the_bayesian_row_to_its_layers_precision(tmp_path, family):
    bench = Recording(tmp_path, budget=1)
    item = Item("lenet300", f"{family}_bits", 0.9, 0)
    row = bench.run(item)
    plain = bench.run(item._replace(method=family))
    assert bench.phases == [(1, {"schedule", "objective"})]  # one SVI run, cached
    # Rounding may zero a few kept weights of a short run: never more are non-zero.
    assert row["nonzero"] <= plain["nonzero"]
    assert row["error"] <= plain["error"] + 0.05
    # Fewer bits than float32 values with 5-bit indices, and at most 1 + e + 23 bits.
    assert row["storage_bytes"] < (32 + 5) / 8 * row["nonzero"] + 4 * 410
    assert row["family"] == "bayesian"


def test_weight_variance_of_the_gaussian_families():
    from bayessparse.nn import GroupNJLinear, VariationalLinear

    vd = VariationalLinear(3, 2)
    assert torch.allclose(vd.weight_variance(), vd.weight_log_sigma2.exp())
    gnj = GroupNJLinear(3, 2)
    with torch.no_grad():
        gnj.scale_loc.copy_(torch.tensor([1.0, 2.0, 0.5]))
        gnj.scale_log_sigma2.copy_(torch.log(torch.tensor([0.1, 0.2, 0.3])))
    z_mean, z_var = gnj.scale_loc, gnj.scale_log_sigma2.exp()
    w_mean, w_var = gnj.weight, gnj.weight_log_sigma2.exp()
    # Var(z w) for independent z and w, by the moments: E[z²]E[w²] − (E z E w)².
    expected = (z_mean**2 + z_var) * (w_mean**2 + w_var) - (z_mean * w_mean) ** 2
    assert torch.allclose(gnj.weight_variance(), expected)
