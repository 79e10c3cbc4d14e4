"""Threshold sweeps on held-out data, keep-probability histograms and the suggested cut."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import bayessparse as bs
from bayessparse.sweep import (
    bimodality,
    keep_prob_histograms,
    plot_keep_prob_histograms,
    plot_sweep,
    suggest_threshold,
    sweep,
)
from bayessparse.training import Schedule, train


def trained_toy():
    """A sparse-VD MLP trained on a 3-class problem that only 3 of 20 inputs decide."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1200, 20, generator=g)
    y = x[:, :3].argmax(-1)
    torch.manual_seed(0)
    net = bs.to_sparse_(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3)))
    train(
        net,
        x[:1000],
        y[:1000],
        epochs=15,
        batch_size=50,
        lr=1e-2,
        schedule=Schedule((0.0, 5.0)),
        progress=False,
    )
    return net, x[1000:], y[1000:]


@pytest.fixture(scope="module")
def toy():
    return trained_toy()


def test_sparsity_sweep_hits_its_targets_and_starts_at_the_full_net(toy):
    net, x, y = toy
    rows = sweep(net, x, y, sparsities=[0.0, 0.5, 0.9, 0.99])
    assert [r["target_sparsity"] for r in rows] == [0.0, 0.5, 0.9, 0.99]
    weights = sum(m.weight.numel() for _, m in bs.sparse_modules(net))
    for r in rows:  # exact up to one weight (a tie)
        assert abs(r["sparsity"] - r["target_sparsity"]) <= 1 / weights
    full = bs.predict(net, x, num_samples=0, masks=bs.masks(net, sparsity=0.0)).probs
    assert rows[0]["error"] == pytest.approx(float((full.argmax(-1) != y).double().mean()))
    compressions = [r["compression"] for r in rows]
    assert compressions == sorted(compressions)
    assert rows[-1]["error"] > rows[1]["error"]  # 99 % pruned hurts, 50 % does not
    assert {"nll", "ece", "adaptive_ece", "brier", "bins"} <= set(rows[0])


def test_threshold_sweep_and_monte_carlo_rows(toy):
    net, x, y = toy
    rows = sweep(net, x, y, thresholds=[0.01, 0.05, 0.5], num_samples=8)
    assert [r["threshold"] for r in rows] == [0.01, 0.05, 0.5]
    sparsities = [r["sparsity"] for r in rows]
    assert sparsities == sorted(sparsities)  # a higher cut prunes more
    assert all(0 <= r["ece"] <= 1 and r["nll"] > 0 for r in rows)


def test_bad_sweeps_are_refused(toy):
    net, x, y = toy
    with pytest.raises(ValueError, match="not both"):
        sweep(net, x, y, thresholds=[0.1], sparsities=[0.5])
    with pytest.raises(ValueError, match="non-empty validation data"):
        sweep(net, x[:0], y[:0])
    with pytest.raises(ValueError, match="200 images and 199 labels"):
        sweep(net, x, y[:-1])
    with pytest.raises(ValueError, match="at least one"):
        sweep(net, x, y, thresholds=[])
    with pytest.raises(ValueError):
        sweep(net, x, y, thresholds=[math.nan])
    with pytest.raises(ValueError):
        sweep(net, x, y, sparsities=[1.0])


def test_bimodality_coefficient_of_known_shapes():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    # Normal: 1/3; uniform: 5/9; two far-apart modes: near 1. The sampling error of the
    # coefficient at n = 200,000 is far below the 0.02 margin (a few 1e-3).
    assert bimodality(torch.randn(n, generator=g)) == pytest.approx(1 / 3, abs=0.02)
    assert bimodality(torch.rand(n, generator=g)) == pytest.approx(5 / 9, abs=0.02)
    two = torch.cat([torch.randn(n, generator=g) - 6, torch.randn(n, generator=g) + 6])
    assert bimodality(two) > 0.85
    assert math.isnan(bimodality(torch.ones(10)))


def test_suggested_cut_falls_in_the_valley():
    g = torch.Generator().manual_seed(0)
    pruned = torch.randn(30_000, generator=g) - 6  # log-odds of weights to drop
    kept = torch.randn(3_000, generator=g) + 4
    cut = suggest_threshold(torch.cat([pruned, kept]))
    assert -3.5 < math.log(cut / (1 - cut)) < 1.5


def test_histograms_per_layer(toy):
    net, _, _ = toy
    hist = keep_prob_histograms(net, bins=30)
    assert set(hist) == {"0", "2"}
    for name, h in hist.items():
        layer = net.get_submodule(name)
        assert sum(h["counts"]) == layer.keep_prob().numel()
        assert len(h["edges"]) == 31
        assert h["bimodal"] == (h["bimodality"] > 5 / 9)
        if h["bimodal"]:
            assert 0 < h["suggested_threshold"] < 1
    with pytest.raises(ValueError, match="no sparse layers"):
        keep_prob_histograms(nn.Linear(2, 2))


def test_plots_are_written(toy, tmp_path):
    pytest.importorskip("matplotlib")
    net, x, y = toy
    plot_sweep(sweep(net, x, y, sparsities=[0.0, 0.9]), tmp_path / "sweep.png")
    plot_keep_prob_histograms(keep_prob_histograms(net), tmp_path / "hist.png")
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert (tmp_path / "hist.png").stat().st_size > 1000
