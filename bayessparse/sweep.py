"""Choosing what to prune on held-out data: threshold sweeps and keep-probability histograms.

The posterior ranks the weights (``keep_prob()``); how many to drop is a choice of
accuracy, calibration and size. :func:`sweep` measures that choice on validation data
(never the test set) over a grid of thresholds or target sparsities, from the
deterministic masked network or the masked posterior. :func:`keep_prob_histograms`
shows, per layer, how the scores split: where they are bimodal, the valley between the
two modes is a natural cut, which :func:`suggest_threshold` finds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bayessparse.convert import sparse_modules
from bayessparse.infer import predict
from bayessparse.masks import masks, sparsity_report
from bayessparse.metrics import probability_report

DEFAULT_SPARSITIES = (0.0, 0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.985, 0.99, 0.995)
# Sarle's bimodality coefficient of a uniform distribution; above it, two modes are likely.
BIMODAL = 5 / 9
# keep_prob is 1/(1+alpha) for Gaussian layers; log-odds beyond +-16 are numerically flat.
_LOGIT_CLAMP = 16.0


def sweep(
    net: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    thresholds: Sequence[float] | None = None,
    sparsities: Sequence[float] | None = None,
    scope: str = "global",
    num_samples: int = 0,
    batch_size: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Quality of the pruned network on held-out data, one row per selection.

    Args:
        net: a network with sparse layers.
        images, labels: validation data (keep the test set out of every choice).
        thresholds: keep-probability cuts to try; or
        sparsities: target fractions of pruned weights (default: 0 to 99 %), ranked
            ``scope="global"`` or ``"layer"``.
        num_samples: 0 for the deterministic masked network, else Monte Carlo samples of
            the masked posterior (:func:`~bayessparse.predict`).
        batch_size: prediction batch size.
        seed: seeds the Monte Carlo samples.

    Returns:
        Rows with ``threshold`` (or ``None``), ``target_sparsity`` (or ``None``),
        ``sparsity`` (achieved, over weight tensors), ``compression``, ``error``, ``nll``,
        ``ece``, ``adaptive_ece``, ``brier`` and ``bins`` (the ECE bin count).

    Raises:
        ValueError: empty or mismatched data, both or neither grid empty, values out of
            range (as :func:`~bayessparse.masks`).
    """
    if thresholds is not None and sparsities is not None:
        raise ValueError("Expected thresholds or sparsities to sweep, not both. Pick one.")
    _check_data(images, labels)
    grid: list[dict[str, Any]]
    if thresholds is not None:
        grid = [{"threshold": float(t)} for t in thresholds]
    else:
        grid = [{"sparsity": float(s), "scope": scope} for s in sparsities or DEFAULT_SPARSITIES]
    if not grid:
        raise ValueError("Expected at least one threshold or sparsity to sweep, got none.")
    rows = []
    for selection in grid:
        chosen = masks(net, **selection)
        report = sparsity_report(net, **selection)
        probs = predict(
            net, images, num_samples=num_samples, masks=chosen, batch_size=batch_size, seed=seed
        ).probs
        quality = probability_report(probs, labels)
        rows.append(
            {
                "threshold": selection.get("threshold"),
                "target_sparsity": selection.get("sparsity"),
                "sparsity": report["sparsity"],
                "compression": report["compression"],
                **{k: quality[k] for k in ("error", "nll", "ece", "adaptive_ece", "brier")},
                "bins": quality["bins"],
            }
        )
    return rows


def _check_data(images: Any, labels: Any) -> None:
    if not isinstance(images, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(
            f"Expected validation images and labels as tensors, got "
            f"{type(images).__name__} and {type(labels).__name__}."
        )
    if images.shape[0] == 0 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Expected non-empty validation data with one label per image, got "
            f"{images.shape[0]} images and {labels.shape[0]} labels. Hold out examples of "
            "the training set (e.g. the CLI's --val-size)."
        )


def keep_prob_histograms(net: nn.Module, bins: int = 60) -> dict[str, dict[str, Any]]:
    """Per sparse layer, the histogram of its scores' log-odds, ``logit(keep_prob)``.

    For Gaussian layers ``logit(keep_prob) = -log alpha``; for L0 gates it is the log-odds
    of a gate being non-zero. Each layer's entry has ``counts``, ``edges`` (log-odds),
    ``bimodality`` (Sarle's coefficient), ``bimodal`` (coefficient above 5/9),
    ``suggested_threshold`` (the keep-probability at the valley, or ``None``) and
    ``default_threshold`` (the layer's own rule).
    """
    if bins < 2:
        raise ValueError(f"Expected at least 2 bins, got {bins!r}.")
    out = {}
    for name, layer in sparse_modules(net):
        scores = _log_odds(layer.keep_prob())
        lo, hi = float(scores.min()), float(scores.max())
        counts = torch.histc(scores, bins=bins, min=lo, max=hi if hi > lo else lo + 1)
        edges = torch.linspace(lo, hi if hi > lo else lo + 1, bins + 1, dtype=torch.float64)
        coefficient = bimodality(scores)
        out[name] = {
            "counts": counts.tolist(),
            "edges": edges.tolist(),
            "bimodality": coefficient,
            "bimodal": coefficient > BIMODAL,
            "suggested_threshold": suggest_threshold(scores) if coefficient > BIMODAL else None,
            "default_threshold": float(layer.default_threshold),
        }
    if not out:
        raise ValueError(
            f"{type(net).__name__} has no sparse layers. Convert it with bayessparse.to_sparse_."
        )
    return out


def _log_odds(keep_prob: Tensor) -> Tensor:
    p = keep_prob.detach().double().flatten()
    return torch.logit(p).clamp(-_LOGIT_CLAMP, _LOGIT_CLAMP)


def bimodality(values: Tensor) -> float:
    """Sarle's bimodality coefficient (skew² + 1) / (excess kurtosis + 3 (n−1)² / ((n−2)(n−3))).

    5/9 for a uniform distribution, 1/3 for a normal one, towards 1 for two separated modes
    (SAS Institute 1990; Pfister et al. 2013). ``nan`` for fewer than 4 values or no spread.
    """
    x = values.double().flatten()
    n = x.numel()
    if n < 4 or float(x.std()) == 0.0:
        return math.nan
    z = (x - x.mean()) / x.std(unbiased=False)
    skew = float((z**3).mean()) * math.sqrt(n * (n - 1)) / (n - 2)
    excess = float((z**4).mean()) - 3.0
    kurt = ((n + 1) * excess + 6) * (n - 1) / ((n - 2) * (n - 3))  # sample excess kurtosis
    return (skew**2 + 1) / (kurt + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3)))


def suggest_threshold(log_odds: Tensor, bins: int = 256) -> float:
    """The keep-probability at Otsu's cut of ``log_odds`` (Otsu 1979).

    Otsu's cut maximises the between-class variance of the two groups it makes: for a
    bimodal distribution it falls in the valley between the modes.
    """
    x = log_odds.double().flatten()
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return float(torch.sigmoid(torch.tensor(lo)))
    counts = torch.histc(x, bins=bins, min=lo, max=hi)
    centres = lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * (hi - lo) / bins
    weight = counts.cumsum(0)  # examples at or below each cut
    mass = (counts * centres).cumsum(0)
    total, total_mass = weight[-1], mass[-1]
    below, above = weight[:-1], total - weight[:-1]
    mean_below = mass[:-1] / below.clamp_min(1)
    mean_above = (total_mass - mass[:-1]) / above.clamp_min(1)
    between = below * above * (mean_below - mean_above) ** 2
    cut = int(between.argmax())
    edge = lo + (cut + 1) * (hi - lo) / bins  # the upper edge of the last bin below
    return float(torch.sigmoid(torch.tensor(edge)))


def plot_sweep(rows: list[dict[str, Any]], path: str | Path | None = None) -> Any:
    """Error, NLL and ECE against compression; saved to ``path`` if given. Needs matplotlib
    (``pip install 'bayessparse[plots]'``). Returns the figure."""
    figure = _figure(1, 3, width=12)
    axes = figure.axes
    x = [r["compression"] if math.isfinite(r["compression"]) else math.nan for r in rows]
    for ax, key, label in zip(
        axes, ("error", "nll", "ece"), ("error", "NLL (nats)", "ECE"), strict=True
    ):
        ax.plot(x, [r[key] for r in rows], marker="o")
        ax.set_xscale("log")
        ax.set_xlabel("compression |W| / |W≠0|")
        ax.set_ylabel(label)
    figure.tight_layout()
    return _save(figure, path)


def plot_keep_prob_histograms(
    histograms: dict[str, dict[str, Any]], path: str | Path | None = None
) -> Any:
    """One panel per layer from :func:`keep_prob_histograms`, with the default cut and the
    suggested one; saved to ``path`` if given. Needs matplotlib. Returns the figure."""
    figure = _figure(1, len(histograms), width=4 * len(histograms))
    for ax, (name, h) in zip(figure.axes, histograms.items(), strict=True):
        edges = h["edges"]
        ax.stairs(h["counts"], edges, fill=True)
        ax.set_yscale("log")
        ax.set_title(f"layer {name} (bimodality {h['bimodality']:.2f})")
        ax.set_xlabel("logit keep_prob (= -log alpha for Gaussian layers)")
        for cut, style, label in (
            (h["default_threshold"], "--", "default"),
            (h["suggested_threshold"], ":", "suggested"),
        ):
            if cut is not None and 0 < cut < 1:
                ax.axvline(math.log(cut / (1 - cut)), linestyle=style, color="k", label=label)
        ax.legend()
    figure.tight_layout()
    return _save(figure, path)


def _figure(rows: int, cols: int, width: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # an optional extra
        raise ImportError("Plots need matplotlib: pip install 'bayessparse[plots]'.") from err
    figure = Figure(figsize=(width, 3.5))
    figure.subplots(rows, cols, squeeze=False)
    return figure


def _save(figure: Any, path: str | Path | None) -> Any:
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure
