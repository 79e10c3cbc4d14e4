"""Evaluating a finished run: what to prune, how well the pruned net knows what it knows.

:func:`evaluate_run` reads a run folder written by ``python -m bayessparse train`` and
writes, next to its report: ``evaluation.json`` (the threshold sweep on the validation
split, the keep-probability histograms' summary, test metrics of the deterministic masked
network and of the masked posterior, OOD detection on offline OOD sets, the exported
model's size, FLOPs and CPU speed-up over the dense net at batch 1 and 100), the plots
(``sweep.png``, ``histograms.png``, ``reliability.png``, when matplotlib is installed) and
``model.pt2``, the pruned and compacted network as a ``torch.export`` program.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bayessparse.compaction import block_max_pools_
from bayessparse.data import Split, hold_out, load_mnist, preprocess
from bayessparse.data.ood import ood_sets
from bayessparse.export import export
from bayessparse.infer import Prediction, predict
from bayessparse.masks import keep_probs, masks
from bayessparse.metrics import (
    flops,
    model_size,
    ood_detection,
    plot_reliability,
    predict_logits,
    predictive_entropy,
    probability_report,
    speedup,
)
from bayessparse.recipes import DENSE, build_net
from bayessparse.sweep import keep_prob_histograms, plot_keep_prob_histograms, plot_sweep, sweep
from bayessparse.training.storage import atomic_write, to_strict_json

# A run folder: what train writes, and what evaluate adds.
CHECKPOINT, REPORT, MODEL = "checkpoint.pt", "report.json", "model.pt"
EVALUATION = "evaluation.json"
EXPORTED = "model.pt2"
SPEEDUP_BATCHES = (1, 100)  # one request at a time, and a throughput batch
SPEEDUP_SECONDS = 1.0  # of timing per batch size: a steady median on a shared machine


class RunError(ValueError):
    """A run folder that cannot be evaluated (missing files, or not a finished run)."""


def load_run(folder: str | Path) -> tuple[dict[str, Any], nn.Module]:
    """The settings and trained network of a finished run.

    Raises:
        RunError: the folder has no report or model (the run has not finished).
    """
    folder = Path(folder)
    for name in (REPORT, MODEL):
        if not (folder / name).is_file():
            raise RunError(
                f"{folder} holds no {name}: not a finished run. Finish it with "
                f"'python -m bayessparse train --resume --out {folder}'."
            )
    settings = json.loads((folder / REPORT).read_text())["settings"]
    net = build_net(settings["model"], settings["method"], settings["init"], **settings["layer"])
    net.load_state_dict(torch.load(folder / MODEL, weights_only=True))
    return settings, net.eval()


def load_pretrained(path: str | Path) -> dict[str, Tensor]:
    """The weights saved by a finished run (its folder or its ``model.pt``), for
    :func:`~bayessparse.recipes.build_net`'s ``pretrained``.

    Raises:
        RunError: no such file, or not a saved ``state_dict``.
    """
    path = Path(path)
    file = path / MODEL if path.is_dir() else path
    if not file.is_file():
        missing = f"holds no {MODEL}" if path.is_dir() else "does not exist"
        raise RunError(
            f"--init-from {path} {missing}; give a finished 'train --method dense' run "
            f"folder or its {MODEL}"
        )
    try:
        state = torch.load(file, weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises pickle, zip and runtime errors alike
        raise RunError(f"--init-from {file}: not a saved state_dict ({err})") from None
    if not isinstance(state, dict):
        raise RunError(f"--init-from {file}: holds a {type(state).__name__}, not a state_dict")
    return state


def selection_of(settings: dict[str, Any]) -> dict[str, Any]:
    """The mask selection a run was reported with (``{}``: each layer's own rule)."""
    return {
        k: settings[k]
        for k in ("threshold", "sparsity", "scope")
        if settings.get(k) is not None and (k != "scope" or settings.get("sparsity") is not None)
    }


def evaluate_run(
    folder: str | Path,
    *,
    num_samples: int = 20,
    ood_size: int = 2000,
    seed: int = 0,
    plots: bool = True,
) -> dict[str, Any]:
    """Evaluate a finished run and write the results next to it (module docstring).

    Args:
        folder: the run folder.
        num_samples: Monte Carlo samples of the masked posterior (0: deterministic only).
        ood_size: test images (and images of each OOD set) used for OOD detection.
        seed: seeds the Monte Carlo samples and the OOD sets.
        plots: write the plots (needs matplotlib).

    Returns:
        The contents of ``evaluation.json``.
    """
    folder = Path(folder)
    settings, net = load_run(folder)
    raw = load_mnist(settings.get("data_dir"))
    ood_size = min(ood_size, raw["test"].images.shape[0])
    ood = ood_sets(raw["test"].images[:ood_size], seed=seed)
    # One preprocessing for all (pixels / 256 minus the mean training image); the OOD sets
    # have no labels.
    unlabelled = torch.zeros(ood_size, dtype=torch.long)
    data = preprocess({**raw, **{name: Split(x, unlabelled) for name, x in ood.items()}})
    _, val = hold_out(data["train"], settings.get("val_size", 0), settings["seed"])
    test = data["test"]
    bayesian = settings["method"] != DENSE
    selection = selection_of(settings)
    chosen = masks(net, **selection) if bayesian else None
    result: dict[str, Any] = {
        "run": str(folder),
        "selection": selection or "default rule",
        "data": {
            "data_dir": settings.get("data_dir"),
            "validation": val.images.shape[0],
            "test": test.images.shape[0],
            "ood": ood_size,
        },
    }

    if bayesian and val.images.shape[0] > 0:
        result["sweep"] = sweep(net, *val)
    if bayesian:
        histograms = keep_prob_histograms(net)
        result["histograms"] = {
            name: {k: h[k] for k in ("bimodality", "bimodal", "suggested_threshold")}
            for name, h in histograms.items()
        }

    predictions = _predictions(net, test.images, chosen, num_samples, seed)
    result["test"] = {
        mode: probability_report(p.probs, test.labels) for mode, p in predictions.items()
    }
    ood_images = {name: data[name].images for name in ood}
    result["ood"] = _ood(net, ood_images, predictions, chosen, num_samples, seed)

    exported = export(net, folder / EXPORTED, test.images[:2], **selection)
    example = test.images[:1]
    # Timed with the pools export() wrote, so that the speed-up is the pruning's alone.
    dense = block_max_pools_(build_net(settings["model"], DENSE)).eval()
    result["export"] = {
        "path": str(exported.path),
        "compacted": exported.compacted,
        "flops": flops(exported.module, example),
        "size": model_size(exported.module),
        "dense_flops": flops(dense, example)["dense"],
        # CPU forward time of the dense net over the exported one's, interleaved.
        "speedup": {
            str(batch): speedup(
                dense, exported.module.eval(), test.images[:batch], seconds=SPEEDUP_SECONDS
            )
            for batch in SPEEDUP_BATCHES
        },
    }
    if bayesian:  # multiply-adds of the masked net, and expected ones from keep-probabilities
        result["export"]["expected_flops"] = flops(
            net, example, masks=chosen, keep_probs=keep_probs(net)
        )["expected"]
    atomic_write(folder / EVALUATION, to_strict_json(result).encode())
    if plots:
        result["plots"] = _plots(
            folder, result, histograms if bayesian else None, predictions, test.labels
        )
    return result


def _predict(
    net: nn.Module, images: Tensor, chosen: dict[str, Tensor] | None, num_samples: int, seed: int
) -> Prediction:
    """The masked posterior's predictive (``num_samples=0``: the deterministic masked net);
    for a dense network (``chosen`` is ``None``), its softmax."""
    if chosen is not None:
        return predict(net, images, num_samples=num_samples, masks=chosen, seed=seed)
    probs = predict_logits(net, images).softmax(-1)
    zero = torch.zeros(probs.shape[0], dtype=torch.float64)
    return Prediction(probs, predictive_entropy(probs), zero, 0)


def _predictions(
    net: nn.Module,
    images: Tensor,
    chosen: dict[str, Tensor] | None,
    num_samples: int,
    seed: int,
) -> dict[str, Prediction]:
    """The deterministic masked network's predictive, and the masked posterior's."""
    out = {"deterministic": _predict(net, images, chosen, 0, seed)}
    if chosen is not None and num_samples > 0:
        out["monte_carlo"] = _predict(net, images, chosen, num_samples, seed)
    return out


def _scores(prediction: Prediction) -> dict[str, Tensor]:
    """Uncertainty scores, higher meaning more likely out of distribution."""
    scores = {
        "max_prob": 1 - prediction.probs.max(-1).values.double(),
        "entropy": prediction.entropy.double(),
    }
    if prediction.num_samples > 1:
        scores["mutual_information"] = prediction.mutual_information.double()
    return scores


def _ood(
    net: nn.Module,
    ood: dict[str, Tensor],
    predictions: dict[str, Prediction],
    chosen: dict[str, Tensor] | None,
    num_samples: int,
    seed: int,
) -> dict[str, Any]:
    """OOD detection (AUROC, AUPR, FPR at 95 % TPR) of every score on every OOD set,
    against as many test images as each set has."""
    out: dict[str, Any] = {}
    for mode, in_pred in predictions.items():
        samples = num_samples if mode == "monte_carlo" else 0
        for name, x in ood.items():
            inside = _scores(_head(in_pred, x.shape[0]))
            outside = _scores(_predict(net, x, chosen, samples, seed))
            out.setdefault(mode, {})[name] = {
                score: ood_detection(inside[score], outside[score]) for score in outside
            }
    return out


def _head(prediction: Prediction, n: int) -> Prediction:
    return Prediction(
        prediction.probs[:n],
        prediction.entropy[:n],
        prediction.mutual_information[:n],
        prediction.num_samples,
    )


def _plots(
    folder: Path,
    result: dict[str, Any],
    histograms: dict[str, Any] | None,
    predictions: dict[str, Prediction],
    labels: Tensor,
) -> list[str]:
    written = []
    if "sweep" in result:
        plot_sweep(result["sweep"], folder / "sweep.png")
        written.append("sweep.png")
    if histograms is not None:
        plot_keep_prob_histograms(histograms, folder / "histograms.png")
        written.append("histograms.png")
    best = predictions.get("monte_carlo", predictions["deterministic"])
    figure: Any = plot_reliability(best.probs, labels).figure
    figure.savefig(folder / "reliability.png", dpi=120)
    written.append("reliability.png")
    return written
