from __future__ import annotations

import math

import pytest
import torch

from bayessparse.metrics import ece, error_rate, nll


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


def test_ece_is_zero_for_a_calibrated_predictor():
    # Confidence 0.75 everywhere and exactly 3 of 4 right.
    logits = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64).repeat(4, 1)
    labels = torch.tensor([0, 0, 0, 1])
    assert ece(logits, labels) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="num_bins"):
        ece(logits, labels, num_bins=0)
