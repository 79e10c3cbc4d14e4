"""The torch-only selector: scores in, keep masks out, by threshold or to a target sparsity."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from bayessparse.sparsity import Scores, select, weight_mask
from bayessparse.sparsity import selection as select_module


def test_the_selector_imports_neither_pyro_nor_the_bayesian_layers():
    tree = ast.parse(Path(select_module.__file__).read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {m for m in imported if m.startswith(("pyro", "bayessparse"))}


def test_classical_scores_prune_the_smallest_magnitudes():
    torch.manual_seed(0)
    w = torch.randn(30, 40)
    scores = {"w": Scores(w.abs(), tuple(w.shape))}
    kept = select(scores, sparsity=0.75)["w"]
    assert int((~kept).sum()) == round(0.75 * w.numel())
    assert w.abs()[~kept].max() <= w.abs()[kept].min()
    cut = float(w.abs().median())
    by_cut = select(scores, threshold=cut, bounds=(0.0, math.inf))["w"]
    assert torch.equal(by_cut, w.abs() > cut)


def test_unit_scores_prune_whole_units_until_the_target_is_reached():
    # 4 output units of 10 weights each; unit 2 has 5 weights pruned for good.
    fixed = torch.ones(4, 10, dtype=torch.bool)
    fixed[2, :5] = False
    scores = Scores(torch.tensor([[0.4], [0.1], [0.2], [0.3]]), (4, 10), fixed)
    assert scores.alive().flatten().tolist() == [10, 10, 5, 10]
    # Target round(0.3 * 40) = 12 weights, 5 pruned already: unit 1 (10 weights) reaches 7.
    kept = select({"a": scores}, sparsity=0.3)["a"]
    assert kept.flatten().tolist() == [True, False, True, True]
    assert int((~weight_mask(scores, kept)).sum()) == 15  # whole units: overshoots by 3
    # Target 18, so 13 more: units 1 and 2 (10 + 5).
    kept = select({"a": scores}, sparsity=0.45)["a"]
    assert kept.flatten().tolist() == [True, False, False, True]
    mask = weight_mask(scores, kept)
    assert mask.shape == (4, 10) and int((~mask).sum()) == 20
    # Fixed pruning beyond the target: nothing more is pruned.
    assert select({"a": scores}, sparsity=0.1)["a"].all()


def test_ties_go_to_the_first_position():
    scores = {
        "a": Scores(torch.full((2, 3), 0.5), (2, 3)),
        "b": Scores(torch.full((1, 4), 0.5), (5, 4)),  # 4 input units of 5 weights
    }
    kept = select(scores, sparsity=0.25)  # round(0.25 * 26) = 6 weights: all of "a"
    assert not kept["a"].any() and kept["b"].all()
    # 13: "a" (6), then units of "b" reach 11 or 16; 11 is nearer the target.
    kept = select(scores, sparsity=0.5)
    assert kept["b"].tolist() == [[False, True, True, True]]
    per_layer = select(scores, sparsity=0.5, scope="layer")
    assert per_layer["a"].flatten().tolist() == [False] * 3 + [True] * 3
    assert per_layer["b"].tolist() == [[False, False, True, True]]  # 10 of 20: exact


def test_target_sparsity_is_exact_with_one_score_per_weight():
    torch.manual_seed(0)
    scores = {
        "a": Scores(torch.rand(7, 11).round(decimals=1), (7, 11)),  # many ties
        "b": Scores(torch.rand(13, 1, 3, 3), (13, 1, 3, 3)),
    }
    n = 7 * 11 + 13 * 9
    for sparsity in (0.0, 0.01, 0.5, 0.93, 0.999):
        kept = select(scores, sparsity=sparsity)
        assert sum(int((~k).sum()) for k in kept.values()) == round(sparsity * n)
        for name, k in select(scores, sparsity=sparsity, scope="layer").items():
            assert int((~k).sum()) == round(sparsity * k.numel()), name


def test_thresholds_use_defaults_for_the_tensors_not_named():
    scores = {
        "a": Scores(torch.tensor([0.1, 0.6]), (2,), default_threshold=0.5),
        "b": Scores(torch.tensor([0.1, 0.6]), (2,), default_threshold=0.05),
    }
    assert select(scores)["b"].tolist() == [True, True]
    kept = select(scores, threshold={"b": 0.5})
    assert kept["a"].tolist() == kept["b"].tolist() == [False, True]
    with pytest.raises(ValueError, match=r"unknown \['c'\]"):
        select(scores, threshold={"c": 0.5})
    with pytest.raises(ValueError, match="no default"):
        select({"c": Scores(torch.zeros(2), (2,))})


def test_scores_are_checked():
    with pytest.raises(ValueError, match="broadcast"):
        Scores(torch.zeros(3, 1), (4, 5))
    with pytest.raises(ValueError, match="boolean mask"):
        Scores(torch.zeros(4, 5), (4, 5), fixed=torch.ones(4, 5))
    nan = {"a": Scores(torch.tensor([0.2, math.nan]), (2,), default_threshold=0.1)}
    with pytest.raises(ValueError, match="NaN"):
        select(nan, sparsity=0.5)
    assert select(nan)["a"].tolist() == [True, False]  # NaN > cut is false: pruned
