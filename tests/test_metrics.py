from __future__ import annotations

import ast
import math
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import bayessparse.metrics as metrics_module
from bayessparse.metrics import (
    accuracy,
    adaptive_ece,
    brier_score,
    classification_report,
    ece,
    ece_of_probs,
    error_rate,
    flops,
    model_size,
    mutual_information,
    nll,
    nll_of_probs,
    ood_detection,
    plot_reliability,
    predictive_entropy,
    probability_report,
    reliability_diagram,
)
from bayessparse.models import LeNet5Caffe

# Hand-checkable probabilities: arg-max classes 0, 2, 2, so examples 0 and 2 are right.
PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.25, 0.25, 0.5]], dtype=torch.float64)
LABELS = torch.tensor([0, 1, 2])
# LeNet-5-Caffe on one 28x28 image: conv1 20@5x5 on 24x24 outputs, conv2 50@20x5x5 on 8x8.
LENET5_MACS = {
    "0": 20 * 1 * 25 * 24 * 24,
    "3": 50 * 20 * 25 * 8 * 8,
    "7": 800 * 500,
    "9": 500 * 10,
}


def random_probs(n: int, c: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(n, c, generator=generator, dtype=torch.float64)
    return logits.softmax(-1), torch.randint(c, (n,), generator=generator)


# --- Logits-based metrics (unchanged behaviour) -------------------------------------------


def test_error_and_nll():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    assert error_rate(logits, labels) == pytest.approx(1 / 3)
    expected = -(torch.log_softmax(logits, -1)[torch.arange(3), labels].double().mean())
    assert nll(logits, labels) == pytest.approx(float(expected))


def test_ece_of_hand_computed_bins():
    # Two examples at confidence 0.9 (one right), two at 0.6 (both right), 15 bins:
    # |0.5 - 0.9| * 2/4 + |1.0 - 0.6| * 2/4 = 0.4.
    p = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1])
    assert ece(p.log(), labels) == pytest.approx(0.4, abs=1e-12)
    assert ece_of_probs(p, labels) == pytest.approx(0.4, abs=1e-12)


def test_ece_is_zero_for_a_calibrated_predictor():
    # Confidence 0.75 everywhere and exactly 3 of 4 right.
    logits = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64).repeat(4, 1)
    labels = torch.tensor([0, 0, 0, 1])
    assert ece(logits, labels) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="num_bins"):
        ece(logits, labels, num_bins=0)


def test_logits_and_probability_metrics_agree():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(200, 4, generator=generator, dtype=torch.float64)
    labels = torch.randint(4, (200,), generator=generator)
    probs = logits.softmax(-1)
    # Same quantities by two routes in float64: only rounding (~1e-15) separates them.
    assert nll_of_probs(probs, labels) == pytest.approx(nll(logits, labels), abs=1e-12)
    assert 1.0 - accuracy(probs, labels) == pytest.approx(error_rate(logits, labels))
    assert ece_of_probs(probs, labels) == pytest.approx(ece(logits, labels), abs=1e-12)
    report = classification_report(logits, labels)
    assert set(report) == {"error", "nll", "ece", "brier"}
    assert report["brier"] == pytest.approx(brier_score(probs, labels), abs=1e-12)


# --- Probability-based metrics ------------------------------------------------------------


def test_accuracy_nll_and_brier_by_hand():
    assert accuracy(PROBS, LABELS) == pytest.approx(2 / 3)
    expected_nll = -(math.log(0.7) + math.log(0.3) + math.log(0.5)) / 3
    assert nll_of_probs(PROBS, LABELS) == pytest.approx(expected_nll, abs=1e-12)
    # Squared errors summed over classes: 0.3²+0.2²+0.1² = 0.14, 0.1²+0.7²+0.6² = 0.86,
    # 0.25²+0.25²+0.5² = 0.375; their mean is 1.375 / 3.
    assert brier_score(PROBS, LABELS) == pytest.approx(1.375 / 3, abs=1e-12)
    perfect = torch.eye(3, dtype=torch.float64)
    assert brier_score(perfect, LABELS) == 0.0
    # Confidently wrong on every example: the maximum, 2.
    assert brier_score(perfect, torch.tensor([1, 2, 0])) == pytest.approx(2.0)


def test_nll_clamps_probabilities_that_underflowed():
    probs = torch.tensor([[1.0, 0.0]])  # float32: the true class got probability 0
    labels = torch.tensor([1])
    # The smallest normal float32 is 2**-126: -log(2**-126) = 126 log 2 = 87.34 nats.
    assert nll_of_probs(probs, labels) == pytest.approx(126 * math.log(2.0), rel=1e-12)
    assert nll_of_probs(probs, labels, eps=1e-12) == pytest.approx(-math.log(1e-12))
    with pytest.raises(ValueError, match="eps"):
        nll_of_probs(probs, labels, eps=0.0)


def test_ece_matches_torchmetrics():
    from torchmetrics.classification import MulticlassCalibrationError

    probs, labels = random_probs(5000, 10)
    metric = MulticlassCalibrationError(num_classes=10, n_bins=15, norm="l1")
    theirs = float(metric(probs, labels))
    # torchmetrics bins in float32 (confidences are cast with .float()), so the two agree
    # to float32 rounding of the per-bin sums (~1e-7); random confidences never sit on a
    # bin edge, where the conventions differ ((a, b] here, [a, b) in torchmetrics).
    assert ece_of_probs(probs, labels, num_bins=15) == pytest.approx(theirs, abs=1e-6)


def test_adaptive_ece_by_hand():
    # Confidences 0.55, 0.6, 0.8, 0.9; the one at 0.6 is wrong.
    probs = torch.tensor([[0.55, 0.45], [0.6, 0.4], [0.8, 0.2], [0.9, 0.1]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 0])
    # Equal mass, 2 bins: {0.55, 0.6} has accuracy 0.5 against confidence 0.575 and
    # {0.8, 0.9} accuracy 1 against 0.85: 0.075 * 2/4 + 0.15 * 2/4 = 0.1125.
    assert adaptive_ece(probs, labels, num_bins=2) == pytest.approx(0.1125, abs=1e-12)
    # Equal width, 2 bins: all four in (0.5, 1]: |0.75 - 0.7125| = 0.0375.
    assert ece_of_probs(probs, labels, num_bins=2) == pytest.approx(0.0375, abs=1e-12)


def test_adaptive_bins_hold_equal_mass():
    probs, labels = random_probs(10, 3)
    diagram = reliability_diagram(probs, labels, num_bins=3, adaptive=True)
    # Ranks 0..9 go to bin floor(3 r / 10): 4, 3 and 3 examples.
    assert diagram["count"].tolist() == [4, 3, 3]
    # Bins are confidence-ordered and do not overlap.
    assert (diagram["lower"] <= diagram["upper"]).all()
    assert (diagram["upper"][:-1] <= diagram["lower"][1:]).all()
    confidence = probs.max(-1).values.sort().values
    assert diagram["confidence"][0] == pytest.approx(float(confidence[:4].mean()))


def test_reliability_diagram_by_hand():
    p = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1])
    diagram = reliability_diagram(p, labels)
    # 15 bins (b/15, (b+1)/15]: 0.9 falls in bin 13 = (0.867, 0.933], 0.6 in bin 8 =
    # (0.533, 0.6], right-closed.
    expected_counts = [0] * 15
    expected_counts[13] = expected_counts[8] = 2
    assert diagram["count"].tolist() == expected_counts
    assert diagram["accuracy"][[8, 13]].tolist() == [1.0, 0.5]
    assert diagram["confidence"][[8, 13]].tolist() == pytest.approx([0.6, 0.9])
    assert diagram["lower"][8] == pytest.approx(8 / 15) and diagram["upper"][8] == 0.6
    empty = diagram["count"] == 0
    assert diagram["accuracy"][empty].isnan().all()


def test_plot_reliability(tmp_path):
    pytest.importorskip("matplotlib")
    probs, labels = random_probs(300, 4)
    ax = plot_reliability(probs, labels, num_bins=10)
    assert "10 equal-width bins" in ax.get_title()
    assert f"{ece_of_probs(probs, labels, 10):.4f}" in ax.get_title()
    filled = int((reliability_diagram(probs, labels, 10)["count"] > 0).sum())
    assert len(ax.patches) == 2 * filled  # an accuracy bar and a gap bar per filled bin
    ax.figure.savefig(tmp_path / "reliability.png")
    assert (tmp_path / "reliability.png").stat().st_size > 0
    adaptive = plot_reliability(probs, labels, num_bins=5, adaptive=True)
    assert "5 equal-mass bins" in adaptive.get_title()


def test_plot_reliability_names_the_extra_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"bayessparse\[plots\]"):
        plot_reliability(PROBS, LABELS)


def test_probability_report():
    report = probability_report(PROBS, LABELS, num_bins=5)
    assert report["bins"] == 5
    assert report["accuracy"] + report["error"] == pytest.approx(1.0)
    assert report["brier"] == pytest.approx(1.375 / 3)
    assert report["adaptive_ece"] == pytest.approx(adaptive_ece(PROBS, LABELS, 5))


def test_predictive_entropy_by_hand():
    probs = torch.tensor([[0.25] * 4, [1.0, 0.0, 0.0, 0.0], [0.5, 0.25, 0.25, 0.0]])
    # log 4; 0 (0 log 0 = 0, not NaN); 0.5 log 2 + 2 * 0.25 log 4 = 1.5 log 2.
    expected = [math.log(4.0), 0.0, 1.5 * math.log(2.0)]
    assert predictive_entropy(probs).tolist() == pytest.approx(expected, abs=1e-7)
    # Any leading shape, e.g. per Monte Carlo sample (S, N, C).
    assert predictive_entropy(probs.expand(2, 3, 4)).shape == (2, 3)


def test_mutual_information_by_hand_and_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    agree = PROBS.expand(5, 3, 3)
    assert mutual_information(agree).tolist() == [0.0, 0.0, 0.0]  # clamped at 0, never < 0
    # Two confident samples that disagree: H[mean] = log 2 and each H = 0.
    disagree = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert mutual_information(disagree).tolist() == pytest.approx([math.log(2.0)])
    generator = torch.Generator().manual_seed(2)
    samples = torch.randn(7, 20, 5, generator=generator, dtype=torch.float64).softmax(-1)
    mean = samples.mean(0).numpy()
    expected = stats.entropy(mean, axis=-1) - stats.entropy(samples.numpy(), axis=-1).mean(0)
    assert mutual_information(samples).numpy() == pytest.approx(expected, abs=1e-12)
    assert (mutual_information(samples) <= predictive_entropy(samples.mean(0))).all()


@pytest.mark.parametrize(
    ("probs", "labels", "error", "match"),
    [
        (torch.randn(3, 3, dtype=torch.float64), LABELS, ValueError, "softmax"),
        (PROBS, torch.tensor([0, 1, 3]), ValueError, "0..2"),
        (PROBS, torch.tensor([0, 1]), ValueError, r"shape \(3,\)"),
        (PROBS, LABELS.double(), TypeError, "integer"),
        (PROBS.expand(2, 3, 3), LABELS, ValueError, r"\(N, C\)"),
        (PROBS.long(), LABELS, TypeError, "floating-point"),
        (torch.full((3, 3), math.nan, dtype=torch.float64), LABELS, ValueError, "probabilities"),
    ],
)
def test_probability_metrics_reject_bad_inputs(probs, labels, error, match):
    with pytest.raises(error, match=match):
        brier_score(probs, labels)


def test_mutual_information_needs_a_sample_dimension():
    with pytest.raises(ValueError, match=r"\(S, N, C\)"):
        mutual_information(PROBS)


# --- OOD detection ------------------------------------------------------------------------


def test_ood_detection_by_hand():
    in_scores = torch.tensor([0.1, 0.2, 0.3, 0.4])
    out_scores = torch.tensor([0.35, 0.5, 0.6])
    result = ood_detection(in_scores, out_scores)
    # OOD beats in-distribution in 3 + 4 + 4 of the 12 pairs.
    assert result["auroc"] == pytest.approx(11 / 12)
    # OOD positive, highest score first: out, out, in, out -> precisions 1, 1, 3/4.
    assert result["aupr_out"] == pytest.approx((1 + 1 + 0.75) / 3)
    # In-distribution positive, lowest score first: in, in, in, out, in -> 1, 1, 1, 4/5.
    assert result["aupr_in"] == pytest.approx((3 + 0.8) / 4)
    # 95 % of 4 in-distribution examples rounds up to all 4: threshold 0.4 accepts the
    # OOD example at 0.35, one of three.
    assert result["fpr95"] == pytest.approx(1 / 3)


def test_ood_detection_extremes_and_large_scores():
    low, high = torch.arange(0.0, 50.0), torch.arange(100.0, 150.0)
    assert ood_detection(low, high) == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0}
    assert ood_detection(high, low)["auroc"] == 0.0
    assert ood_detection(high, low)["fpr95"] == 1.0
    # A sigmoid of these scores is 1.0 in float32 for all: ranks keep them apart.
    assert ood_detection(low + 1e4, high + 1e4)["auroc"] == 1.0


def test_ood_detection_against_scipy_and_torchmetrics_roc():
    stats = pytest.importorskip("scipy.stats")
    from torchmetrics.functional.classification import binary_roc

    generator = torch.Generator().manual_seed(3)
    # Integer scores: many ties, which AUROC counts as half.
    in_scores = torch.randint(0, 20, (201,), generator=generator).double()
    out_scores = torch.randint(5, 30, (150,), generator=generator).double()
    result = ood_detection(in_scores, out_scores)
    # Mann-Whitney U / (n_out n_in) is the AUROC with ties counted half; torchmetrics
    # returns float32, so they agree to ~1e-7.
    u = stats.mannwhitneyu(out_scores.numpy(), in_scores.numpy()).statistic
    assert result["auroc"] == pytest.approx(u / (150 * 201), abs=1e-6)
    # FPR at the first ROC point with TPR >= 95 %, in-distribution positive. With 201
    # examples no TPR k/201 is within float32 rounding of 0.95, so the float test is safe.
    scores = torch.cat([in_scores, out_scores])
    is_in = torch.cat([torch.ones(201), torch.zeros(150)]).long()
    fpr, tpr, _ = binary_roc(-scores / 100, is_in)  # in [0, 1]: no sigmoid
    assert result["fpr95"] == pytest.approx(float(fpr[tpr >= 0.95][0]), abs=1e-6)


def test_ood_detection_depends_only_on_the_ranking():
    generator = torch.Generator().manual_seed(4)
    in_scores, out_scores = (
        torch.rand(100, generator=generator),
        torch.rand(80, generator=generator),
    )
    before = ood_detection(in_scores, out_scores)
    after = ood_detection(10 * in_scores.exp() - 3, 10 * out_scores.exp() - 3)
    assert after == pytest.approx(before, abs=1e-12)


@pytest.mark.parametrize(
    ("scores", "error"),
    [
        (torch.tensor([]), ValueError),
        (torch.tensor([[0.1, 0.2]]), ValueError),
        (torch.tensor([0.1, math.nan]), ValueError),
        (torch.tensor([0.1, math.inf]), ValueError),
        (torch.tensor([True, False]), TypeError),
        ([0.1, 0.2], TypeError),
    ],
)
def test_ood_detection_rejects_bad_scores(scores, error):
    with pytest.raises(error, match="Expected"):
        ood_detection(torch.tensor([0.1, 0.2]), scores)


# --- FLOPs --------------------------------------------------------------------------------


def test_flops_of_lenet5_by_hand():
    net = LeNet5Caffe().double()
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    total = sum(LENET5_MACS.values())
    assert total == 2_293_000
    assert flops(net, x) == {"dense": total, "nonzero": total, "expected": total}
    # Masks keyed like state_dict: conv1 keeps its first 10 filters, fc2 one output row.
    conv1 = torch.zeros(20, 1, 1, 1, dtype=torch.bool)  # broadcast over a filter
    conv1[:10] = True
    fc2 = torch.zeros(10, 500, dtype=torch.bool)
    fc2[0] = True
    keep = {"7.weight": torch.full((500, 1), 0.25)}  # fc1: every weight kept w.p. 1/4
    counts = flops(net, x, masks={"0.weight": conv1, "9.weight": fc2}, keep_probs=keep)
    nonzero = total - LENET5_MACS["0"] // 2 - LENET5_MACS["9"] * 9 // 10
    assert counts == {
        "dense": total,
        "nonzero": nonzero,
        "expected": pytest.approx(nonzero - 0.75 * LENET5_MACS["7"]),
    }


def test_flops_count_zero_weights_of_pruned_and_baked_nets():
    torch.manual_seed(0)
    net = LeNet5Caffe()
    prune.l1_unstructured(net[0], "weight", amount=100)  # 100 of conv1's 500 weights
    x = torch.zeros(1, 1, 28, 28)
    counts = flops(net, x)
    assert counts["nonzero"] == sum(LENET5_MACS.values()) - 100 * 24 * 24
    prune.remove(net[0], "weight")  # baked: plain zeros in a plain parameter
    assert flops(net, x) == counts


@pytest.mark.parametrize(
    ("layer", "shape", "macs"),
    [
        # Output 5x5: floor((11 + 2 - 2 * (3 - 1) - 1) / 2) + 1 = 5; each of its 6 * 25
        # elements reads 4 / 2 input channels x 3 x 3 taps.
        (nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), (4, 11, 11), 6 * 25 * 18),
        # Output length floor((20 - 5) / 2) + 1 = 8.
        (nn.Conv1d(3, 4, 5, stride=2), (3, 20), 4 * 8 * 3 * 5),
        # Output 4x4x4, each element 2 x 1x2x3 taps.
        (nn.Conv3d(2, 3, (1, 2, 3)), (2, 4, 5, 6), 3 * 64 * 2 * 6),
        # Depthwise: 8 channels, groups=8, each output element reads 1 x 3 x 3.
        (nn.Conv2d(8, 8, 3, padding=1, groups=8), (8, 6, 6), 8 * 36 * 9),
        # A Linear on a sequence: 3 positions of 7 outputs, 5 MACs each.
        (nn.Linear(5, 7), (3, 5), 3 * 7 * 5),
    ],
)
def test_flops_of_conv_and_linear_layers(layer, shape, macs):
    x = torch.randn(2, *shape)
    assert flops(layer, x) == {"dense": macs, "nonzero": macs, "expected": macs}
    out = layer.weight.shape[0]
    mask = torch.ones_like(layer.weight, dtype=torch.bool)
    mask[: out // 2] = False  # drop the first half of the output units
    assert flops(layer, x, masks={"weight": mask})["nonzero"] == macs // out * (out - out // 2)


def test_flops_of_a_layer_under_two_names():
    shared = nn.Linear(4, 4)
    net = nn.Sequential(shared, nn.ReLU(), shared)  # run twice, registered as "0" and "2"
    x = torch.randn(1, 4)
    assert flops(net, x)["dense"] == 2 * 16
    mask = torch.eye(4, dtype=torch.bool)
    assert flops(net, x, masks={"2.weight": mask})["nonzero"] == 2 * 4


def test_flops_ignore_the_bias_masks_of_unit_pruning():
    net = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(1, 4)
    closed = torch.tensor([[True], [False], [True]]).expand(3, 4)  # unit 1 is pruned
    masks = {"0.weight": closed, "0.bias": torch.tensor([True, False, True])}
    assert flops(net, x, masks=masks)["nonzero"] == 8
    with pytest.raises(ValueError, match="keyed"):  # a bias without its layer is an error
        flops(net, x, masks={"1.bias": torch.ones(3)})


@pytest.mark.parametrize(
    ("masks", "keep_probs", "match"),
    [
        ({"0.weight_orig": torch.ones(20, 1, 5, 5)}, None, "keyed"),
        ({"0.weight": torch.ones(20, 5)}, None, "broadcastable"),
        (None, {"0.weight": torch.full((20, 1, 1, 1), 1.5)}, r"\[0, 1\]"),
    ],
)
def test_flops_reject_bad_masks(masks, keep_probs, match):
    with pytest.raises(ValueError, match=match):
        flops(LeNet5Caffe(), torch.zeros(1, 1, 28, 28), masks=masks, keep_probs=keep_probs)


def test_metrics_module_imports_only_torch():
    # The design rule: no Pyro and no other bayessparse module (so no SparseModule).
    tree = ast.parse(Path(metrics_module.__file__).read_text(encoding="utf-8"))
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not {name for name in imported if name.split(".")[0] in {"pyro", "bayessparse"}}


# --- Model size ---------------------------------------------------------------------------

# Five non-zeros in 3 rows of 4.
MATRIX = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 5.0], [3.0, 0.0, 4.0, 0.0]])


def linear_with_matrix() -> nn.Linear:
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.copy_(MATRIX)
        layer.bias.copy_(torch.tensor([1.0, 0.0, 2.0]))
    return layer


def test_model_size_of_a_3x4_matrix_by_hand():
    size = model_size(linear_with_matrix())
    # Weight: 12 float32 = 48 bytes; CSR 5 values (20) + 5 int64 columns (40) + 4 int64 row
    # pointers (32) = 92; COO 20 + 2 * 5 * 8 = 100. The bias (3 floats, 12 bytes) stays dense.
    assert size == {
        "params": 15,
        "dense_bytes": 60,
        "nonzero": 7,
        "csr_bytes": 92 + 12,
        "coo_bytes": 100 + 12,
    }
    # int32 indices: CSR 20 + 20 + 16, COO 20 + 40.
    small = model_size(linear_with_matrix(), index_dtype=torch.int32)
    assert (small["csr_bytes"], small["coo_bytes"]) == (56 + 12, 60 + 12)
    # Masking out the row [0, 0, 0, 5] and the zero bias entry changes nothing else.
    mask = torch.tensor([[True], [False], [True]])
    masked = model_size(linear_with_matrix(), masks={"weight": mask})
    assert masked["nonzero"] == 6 and masked["csr_bytes"] == 4 * 12 + 4 * 8 + 12


# torch warns that its CSR tensors are in beta; only their sizes are read here.
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta:UserWarning")
def test_model_size_matches_torch_sparse_tensors():
    weight = MATRIX.double().reshape(3, 2, 2)  # a conv-like tensor: flattened to (3, 4)
    net = nn.Module()
    net.weight = nn.Parameter(weight)

    def nbytes(*tensors: torch.Tensor) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    csr = weight.reshape(3, -1).to_sparse_csr()
    coo = weight.reshape(3, -1).to_sparse().coalesce()
    size = model_size(net)
    assert size["csr_bytes"] == nbytes(csr.values(), csr.col_indices(), csr.crow_indices())
    assert size["coo_bytes"] == nbytes(coo.values(), coo.indices())


def test_model_size_counts_tied_parameters_once_and_pruned_tensors():
    shared = linear_with_matrix()
    net = nn.Sequential(shared, nn.ReLU(), shared)
    assert model_size(net) == model_size(shared)
    prune.l1_unstructured(shared, "weight", amount=9)  # the 7 zeros, then 1.0 and 2.0
    size = model_size(shared)
    assert size["params"] == 15 and size["nonzero"] == 5  # weight_orig does not count
    with pytest.raises(ValueError, match="keyed"):
        model_size(shared, masks={"weight_orig": torch.ones(3, 4)})
    with pytest.raises(TypeError, match="index_dtype"):
        model_size(shared, index_dtype=torch.int16)


def test_speedup_of_a_net_over_itself_is_near_one():
    net = nn.Sequential(nn.Linear(64, 64))
    ratio = metrics_module.speedup(net, net, torch.randn(100, 64), reps=21)
    assert 0.2 < ratio < 5  # same work; the bounds only catch a swapped or broken ratio


class Counted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(0.002)
        return x


def test_speedup_with_seconds_times_as_many_calls_as_fit_and_never_fewer_than_reps():
    dense, small = Counted(), Counted()
    metrics_module.speedup(dense, small, torch.zeros(1), reps=3, seconds=0.2)
    # 0.2 s over pairs of at least 4 ms: at most 50 timed pairs, plus the warm-up.
    assert 10 < dense.calls == small.calls <= 50 + 1
    slow, quick = Counted(), Counted()
    metrics_module.speedup(slow, quick, torch.zeros(1), reps=7, seconds=1e-6)
    assert slow.calls == 1 + 7  # the warm-up, then 7 timed (the first sets the count)
