"""Quality, calibration, uncertainty, OOD and cost metrics of a classifier (torch only).

Two families of classification metrics:

* on logits (N, C): :func:`error_rate`, :func:`nll`, :func:`ece`, :func:`classification_report`,
  for a deterministic network;
* on probabilities (N, C): :func:`accuracy`, :func:`nll_of_probs`, :func:`brier_score`,
  :func:`ece_of_probs`, :func:`adaptive_ece`, :func:`reliability_diagram`,
  :func:`probability_report`, for a Bayesian network's predictive distribution, which is the
  mean of the Monte Carlo samples' probabilities (not of their logits).

Uncertainty scores per example (:func:`predictive_entropy`, :func:`mutual_information`) feed
:func:`ood_detection`. :func:`flops`, :func:`model_size` and :func:`speedup` measure the cost of
a network.

This module imports neither Pyro nor the rest of bayessparse, so it works on any torch model.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from matplotlib.axes import Axes

DEFAULT_BINS = 15  # Guo et al. (2017)'s bin count for ECE
_PLOTS_HINT = "pip install 'bayessparse[plots]'"
_COUNTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Interleaved timing: enough calls for a stable median, a few milliseconds for LeNets.
TIMING_REPS = 7


@torch.no_grad()
def predict_logits(net: nn.Module, inputs: Tensor, batch_size: int = 1000) -> Tensor:
    """Logits of ``net`` on ``inputs`` in evaluation mode, computed in batches.

    The network's train/eval mode is restored afterwards.
    """
    was_training = net.training
    net.eval()
    try:
        return torch.cat([net(chunk) for chunk in inputs.split(batch_size)])
    finally:
        net.train(was_training)


# --- Metrics on logits ------------------------------------------------------------------


def error_rate(logits: Tensor, labels: Tensor) -> float:
    """Fraction of examples whose arg-max class is wrong."""
    return float((logits.argmax(-1) != labels).double().mean())


def nll(logits: Tensor, labels: Tensor) -> float:
    """Mean negative log-likelihood (cross-entropy) in nats."""
    return float(F.cross_entropy(logits.double(), labels))


def ece(logits: Tensor, labels: Tensor, num_bins: int = DEFAULT_BINS) -> float:
    """Expected calibration error of ``softmax(logits)``: :func:`ece_of_probs`."""
    _check_num_bins(num_bins)
    return ece_of_probs(logits.double().softmax(-1), labels, num_bins)


def classification_report(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Test error, NLL, ECE (15 equal-width bins) and Brier score of ``logits``."""
    probs = logits.double().softmax(-1)
    return {
        "error": error_rate(logits, labels),
        "nll": nll(logits, labels),
        "ece": ece_of_probs(probs, labels, DEFAULT_BINS),
        "brier": brier_score(probs, labels),
    }


# --- Metrics on probabilities -----------------------------------------------------------


def accuracy(probs: Tensor, labels: Tensor) -> float:
    """Fraction of examples whose most probable class is the label.

    Args:
        probs: predictive probabilities (N, C), rows summing to 1.
        labels: true classes (N,), integers in ``0..C-1``.
    """
    probs, labels = _check_probs_and_labels(probs, labels)
    return float((probs.argmax(-1) == labels).double().mean())


def nll_of_probs(probs: Tensor, labels: Tensor, *, eps: float | None = None) -> float:
    """Mean negative log-likelihood ``-mean_i log p_i(y_i)`` in nats.

    A probability that underflowed to 0 would give an infinite mean, so probabilities are
    clamped below at ``eps``. The default, the smallest normal number of ``probs``' dtype,
    only touches values that underflowed (or are subnormal), so each clamped term is a
    finite lower bound of the true one (e.g. 87.3 nats in float32).

    Args:
        probs: predictive probabilities (N, C), rows summing to 1.
        labels: true classes (N,), integers in ``0..C-1``.
        eps: clamp floor in (0, 1); ``None`` uses ``torch.finfo(probs.dtype).tiny``.
    """
    checked, labels = _check_probs_and_labels(probs, labels)
    floor = torch.finfo(probs.dtype).tiny if eps is None else eps
    if not 0.0 < floor < 1.0:
        raise ValueError(f"Expected 0 < eps < 1, got {eps!r}. Pass e.g. 1e-12, or None.")
    picked = checked.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return float(-picked.clamp_min(floor).log().mean())


def brier_score(probs: Tensor, labels: Tensor) -> float:
    """Multi-class Brier score ``mean_i sum_c (p_ic - [y_i = c])^2`` (Brier 1950).

    Brier's original convention: summed over classes, averaged over examples, so it lies
    in [0, 2]. (Some libraries divide by the number of classes too, or score one class.)

    Args:
        probs: predictive probabilities (N, C), rows summing to 1.
        labels: true classes (N,), integers in ``0..C-1``.
    """
    probs, labels = _check_probs_and_labels(probs, labels)
    onehot = F.one_hot(labels, probs.shape[-1]).to(probs.dtype)
    return float((probs - onehot).square().sum(-1).mean())


def ece_of_probs(probs: Tensor, labels: Tensor, num_bins: int = DEFAULT_BINS) -> float:
    """Expected calibration error with equal-width bins (Naeini et al. 2015; Guo et al. 2017).

    ``sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)|`` of the top-class probability
    (confidence) in ``num_bins`` bins ``(b/B, (b+1)/B]`` (default 15, as Guo et al.; their
    code closes bins on the right, as here).

    Args:
        probs: predictive probabilities (N, C), rows summing to 1.
        labels: true classes (N,), integers in ``0..C-1``.
        num_bins: number of bins ``B >= 1``.
    """
    return _ece(probs, labels, num_bins, adaptive=False)


def adaptive_ece(probs: Tensor, labels: Tensor, num_bins: int = DEFAULT_BINS) -> float:
    """ECE with equal-mass bins: adaptive binning (Nixon et al. 2019, "Measuring calibration").

    Examples are sorted by confidence and split into ``num_bins`` bins whose sizes differ
    by at most one (ties are split in sorted order), so every bin holds about ``N / B``
    examples however the confidences cluster. This is the top-label form (as "AdaECE" of
    Mukhoti et al. 2020); Nixon et al.'s ACE also averages over all classes' probabilities.

    Args:
        probs: predictive probabilities (N, C), rows summing to 1.
        labels: true classes (N,), integers in ``0..C-1``.
        num_bins: number of bins ``B >= 1``; with ``N < B`` some bins stay empty.
    """
    return _ece(probs, labels, num_bins, adaptive=True)


def reliability_diagram(
    probs: Tensor, labels: Tensor, num_bins: int = DEFAULT_BINS, *, adaptive: bool = False
) -> dict[str, Tensor]:
    """Per-bin data of a reliability diagram (DeGroot & Fienberg 1983; Guo et al. 2017).

    Args:
        probs: predictive probabilities (N, C), rows summing to 1.
        labels: true classes (N,), integers in ``0..C-1``.
        num_bins: number of bins ``B >= 1``.
        adaptive: equal-mass bins as :func:`adaptive_ece`, else equal-width as
            :func:`ece_of_probs`.

    Returns:
        float64 tensors of shape (B,): ``lower`` and ``upper`` (the bin's edges; for
        adaptive bins its smallest and largest confidence), ``confidence`` (mean top-class
        probability), ``accuracy`` (fraction correct), and ``count`` (int64). Empty bins
        have NaN confidence, accuracy and (adaptive) edges.
    """
    confidence, correct, bins = _binned(probs, labels, num_bins, adaptive)
    count, conf_sum, correct_sum = _bin_sums(confidence, correct, bins, num_bins)
    if adaptive:
        empty = torch.full_like(count, torch.nan)
        lower = empty.scatter_reduce(0, bins, confidence, "amin", include_self=False)
        upper = empty.scatter_reduce(0, bins, confidence, "amax", include_self=False)
    else:
        edges = torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64, device=count.device)
        lower, upper = edges[:-1], edges[1:]
    return {
        "lower": lower,
        "upper": upper,
        # 0 / 0 is NaN in torch, without a warning: the documented value of an empty bin.
        "confidence": conf_sum / count,
        "accuracy": correct_sum / count,
        "count": count.long(),
    }


def plot_reliability(
    probs: Tensor,
    labels: Tensor,
    num_bins: int = DEFAULT_BINS,
    *,
    adaptive: bool = False,
    ax: Axes | None = None,
) -> Axes:
    """Draw a reliability diagram: accuracy per confidence bin against the diagonal.

    Bars span each bin and rise to its accuracy; a hatched bar marks the gap to the
    bin's mean confidence. The title gives the (adaptive) ECE and the bin count.
    Needs matplotlib (``pip install 'bayessparse[plots]'``).

    Args:
        probs: predictive probabilities (N, C), rows summing to 1.
        labels: true classes (N,), integers in ``0..C-1``.
        num_bins: number of bins ``B >= 1``.
        adaptive: equal-mass bins (:func:`adaptive_ece`) instead of equal-width ones.
        ax: axes to draw on; ``None`` makes a new figure (not registered with pyplot,
            so it is not shown; save it with ``ax.figure.savefig(path)``).

    Returns:
        The axes drawn on.

    Raises:
        ImportError: matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"plot_reliability needs matplotlib: {_PLOTS_HINT}.") from err
    diagram = reliability_diagram(probs, labels, num_bins, adaptive=adaptive)
    filled = diagram["count"] > 0
    diagram = {key: value[filled].cpu() for key, value in diagram.items()}
    lower, acc = diagram["lower"].numpy(), diagram["accuracy"].numpy()
    width = (diagram["upper"] - diagram["lower"]).numpy()
    gap = diagram["confidence"].numpy() - acc
    if ax is None:
        ax = Figure().add_subplot()
    ax.bar(lower, acc, width=width, align="edge", edgecolor="black", label="accuracy")
    ax.bar(lower, gap, bottom=acc, width=width, align="edge", fill=False, hatch="//", label="gap")
    ax.plot([0.0, 1.0], [0.0, 1.0], "--", color="grey", label="perfect calibration")
    score = _ece(probs, labels, num_bins, adaptive=adaptive)
    kind = "equal-mass" if adaptive else "equal-width"
    ax.set(xlim=(0.0, 1.0), ylim=(0.0, 1.0), xlabel="confidence", ylabel="accuracy")
    ax.set_title(f"{'adaptive ' if adaptive else ''}ECE {score:.4f} ({num_bins} {kind} bins)")
    ax.legend(loc="upper left")
    return ax


def probability_report(
    probs: Tensor, labels: Tensor, num_bins: int = DEFAULT_BINS
) -> dict[str, float]:
    """Accuracy, error, NLL, Brier score, ECE and adaptive ECE of probabilities (N, C).

    ``bins`` reports the bin count both ECEs used.
    """
    return {
        "accuracy": accuracy(probs, labels),
        "error": 1.0 - accuracy(probs, labels),
        "nll": nll_of_probs(probs, labels),
        "brier": brier_score(probs, labels),
        "ece": ece_of_probs(probs, labels, num_bins),
        "adaptive_ece": adaptive_ece(probs, labels, num_bins),
        "bins": num_bins,
    }


def predictive_entropy(probs: Tensor) -> Tensor:
    """Entropy ``H[p] = -sum_c p_c log p_c`` in nats of each distribution, ``0 log 0 = 0``.

    The total predictive uncertainty (Shannon 1948); pass the Monte Carlo mean of a
    Bayesian network's probabilities to include both its aleatoric and epistemic parts.

    Args:
        probs: probabilities (..., C) along the last dimension, e.g. (N, C).

    Returns:
        float64 tensor of shape (...), values in ``[0, log C]``.
    """
    return _entropy(_check_probs(probs, "probs", min_ndim=1))


def mutual_information(samples: Tensor) -> Tensor:
    """Mutual information between prediction and weights (BALD; Houlsby et al. 2011).

    ``I = H[E_w p(y|x,w)] - E_w H[p(y|x,w)]``, estimated from Monte Carlo samples of the
    weight posterior (Gal et al. 2017): the epistemic part of the predictive entropy.

    Args:
        samples: probabilities of shape (S, N, C), one (N, C) slice per posterior sample.

    Returns:
        float64 tensor (N,) in nats, in ``[0, log C]``; 0 where the samples agree.
    """
    _check_ndim(
        samples,
        3,
        "samples of shape (S, N, C)",
        "Stack the probabilities of S posterior samples with torch.stack(list_of_NxC_probs).",
    )
    samples = _check_probs(samples, "samples", min_ndim=3)
    info = _entropy(samples.mean(0)) - _entropy(samples).mean(0)
    # Jensen: I >= 0 exactly; rounding leaves tiny negatives (~1e-16) where samples agree.
    return info.clamp_min(0.0)


# --- OOD detection ----------------------------------------------------------------------


def ood_detection(in_scores: Tensor, out_scores: Tensor) -> dict[str, float]:
    """How well an uncertainty score separates in-distribution from OOD examples.

    Any score that is higher for more likely out-of-distribution (OOD) inputs works, e.g.
    ``1 - max prob`` (Hendrycks & Gimpel 2017), :func:`predictive_entropy` or
    :func:`mutual_information`. Conventions of Hendrycks & Gimpel (2017) and Liang et al.
    (2018, ODIN):

    * ``auroc``: area under the ROC curve; the probability that a random OOD example scores
      higher than a random in-distribution one, ties counting half.
    * ``aupr_in``: average precision with the in-distribution examples as the positive
      class, ranked by lowest score first.
    * ``aupr_out``: average precision with the OOD examples as the positive class.
    * ``fpr95``: FPR at 95 % TPR. The in-distribution examples are the positives: take the
      smallest threshold ``t`` such that at least 95 % of them have score ``<= t`` (so are
      accepted as in-distribution); ``fpr95`` is the fraction of OOD examples with score
      ``<= t``, wrongly accepted. Lower is better; ties count against the detector.

    AUROC and average precision come from torchmetrics.

    Args:
        in_scores: scores (N_in,) of in-distribution examples: 1-D, finite, non-empty.
        out_scores: scores (N_out,) of OOD examples: the same.

    Returns:
        ``{"auroc", "aupr_in", "aupr_out", "fpr95"}``, all in [0, 1].
    """
    # Imported here: torchmetrics adds about a second to every import of this module (and
    # so to every CLI start), and only this function needs it.
    from torchmetrics.functional.classification import (
        binary_auroc,
        binary_average_precision,
    )

    in_scores = _check_scores(in_scores, "in_scores")
    out_scores = _check_scores(out_scores, "out_scores")
    scores = torch.cat([in_scores, out_scores])
    # torchmetrics reads scores outside [0, 1] as logits and squashes them with a sigmoid,
    # which ties large scores together in float; dense ranks keep order and ties exactly.
    _, ranks = torch.unique(scores, sorted=True, return_inverse=True)
    top = max(int(ranks.max()), 1)
    is_out = torch.cat([torch.zeros_like(in_scores), torch.ones_like(out_scores)]).long()
    return {
        "auroc": float(binary_auroc(ranks.double() / top, is_out)),
        "aupr_in": float(binary_average_precision((top - ranks).double() / top, 1 - is_out)),
        "aupr_out": float(binary_average_precision(ranks.double() / top, is_out)),
        "fpr95": _fpr_at_95_tpr(in_scores, out_scores),
    }


def _fpr_at_95_tpr(in_scores: Tensor, out_scores: Tensor) -> float:
    # ceil(0.95 n) in integers: 0.95 * n in floats can land just above a whole number.
    k = -(-95 * in_scores.numel() // 100)
    threshold = in_scores.kthvalue(k).values
    return float((out_scores <= threshold).double().mean())


# --- Cost: FLOPs and storage ------------------------------------------------------------


@torch.no_grad()
def flops(
    net: nn.Module,
    example: Tensor,
    masks: Mapping[str, Tensor] | None = None,
    keep_probs: Mapping[str, Tensor] | None = None,
) -> dict[str, float]:
    """Multiply-accumulates (MACs) per example of the Linear and ConvNd layers of ``net``.

    Counted from each layer's output: an output element of ``nn.Linear`` costs
    ``in_features`` MACs, one of ``nn.Conv1d/2d/3d`` costs ``in_channels / groups *
    prod(kernel_size)``, which accounts for stride, padding, dilation and groups. A layer
    run twice counts twice. Biases, activations, pooling and other layers (transposed
    convolutions included) are not counted.

    Args:
        net: any network; it is run once in eval mode on ``example``.
        example: an input batch (counts are divided by its batch size).
        masks: ``{"<layer>.weight": mask}`` keyed like ``state_dict`` (as
            ``bayessparse.masks(net)`` returns), masks broadcastable to the weight; a
            weight counts where its mask is true. Layers without a mask count the
            non-zeros of their ``weight``, which covers nets pruned with
            ``torch.nn.utils.prune`` and baked ones. A Bayesian sparse layer's ``weight``
            is its posterior mean, so pass its masks explicitly. Bias masks (which
            ``bayessparse.masks`` gives the layers that prune whole units) are ignored:
            biases are not counted.
        keep_probs: ``{"<layer>.weight": probability}`` with the same keys, values in
            [0, 1] broadcastable to the weight: the chance each weight is kept, e.g. a
            layer's ``keep_prob()``. Layers without one keep their weights surely.

    Returns:
        ``dense`` (every weight), ``nonzero`` (weights non-zero after the mask) and
        ``expected`` (those weights weighted by their keep probability; equal to
        ``nonzero`` without ``keep_probs``), so ``expected <= nonzero <= dense``.
    """
    named = _named_layers(net)
    mask_of = _by_layer(named, masks, "masks")
    keep_of = _by_layer(named, keep_probs, "keep_probs")
    for name, keep in (keep_probs or {}).items():
        _check_keep_prob(name, keep)
    counts: dict[str, float] = {"dense": 0, "nonzero": 0, "expected": 0.0}
    batch = example.shape[0]

    def hook(module: nn.Module, _: Any, output: Tensor) -> None:
        weight: Tensor = module.weight  # type: ignore[assignment]
        kept = weight != 0
        if id(module) in mask_of:
            kept = kept & mask_of[id(module)].to(weight.device).bool()
        nonzero = int(kept.count_nonzero())
        keep = keep_of.get(id(module))
        expected = nonzero if keep is None else float((keep.to(weight.device) * kept).sum())
        # An output element reads one slice weight[o]: each weight is used once per output
        # position (per output element of its channel) and per example.
        positions = output.numel() // (batch * weight.shape[0])
        counts["dense"] += weight.numel() * positions
        counts["nonzero"] += nonzero * positions
        counts["expected"] += expected * positions

    # Once per layer: a layer under several names must not count once per name.
    layers = {id(module): module for module in named.values()}.values()
    handles = [module.register_forward_hook(hook) for module in layers]
    try:
        predict_logits(net, example, batch_size=batch)
    finally:
        for handle in handles:
            handle.remove()
    return counts


@torch.no_grad()
def speedup(
    dense: nn.Module,
    small: nn.Module,
    batch: Tensor,
    reps: int = TIMING_REPS,
    *,
    seconds: float | None = None,
) -> float:
    """Median forward time of ``dense`` over that of ``small`` on ``batch``.

    The two are timed alternately, after one warm-up call each, so that a change in the
    machine's load hits both alike: ``reps`` calls each, or with ``seconds`` as many as
    fit in about that time (at least ``reps``), for a steadier median on a busy machine.
    """
    times: dict[int, list[float]] = {id(dense): [], id(small): []}

    def timed_pair() -> None:
        for net in (dense, small):
            start = time.perf_counter()
            net(batch)
            times[id(net)].append(time.perf_counter() - start)

    timed_pair()  # the warm-up, not counted
    for kept in times.values():
        kept.clear()
    timed_pair()
    if seconds is not None:  # the first timed pair sets the count
        reps = max(reps, int(seconds / max(times[id(dense)][0] + times[id(small)][0], 1e-9)))
    while len(times[id(dense)]) < reps:
        timed_pair()
    return statistics.median(times[id(dense)]) / statistics.median(times[id(small)])


def _named_layers(net: nn.Module) -> dict[str, nn.Module]:
    """Counted layers by weight key (``"0.weight"``), under every name they have."""
    return {
        f"{name}.weight" if name else "weight": module
        for name, module in net.named_modules(remove_duplicate=False)
        if isinstance(module, _COUNTED_LAYERS)
    }


def _by_layer(
    named: Mapping[str, nn.Module], values: Mapping[str, Tensor] | None, what: str
) -> dict[int, Tensor]:
    """``values`` re-keyed by layer identity, checked against the layers' weight shapes."""
    by_layer: dict[int, Tensor] = {}
    for key, value in (values or {}).items():
        if key.endswith(".bias") and f"{key.removesuffix('.bias')}.weight" in named:
            continue  # a layer's bias mask (some families prune a unit's bias): no MACs
        _check_key(key, named, f"{what} keyed by a Linear/ConvNd layer's weight")
        weight: Tensor = named[key].weight  # type: ignore[assignment]
        _check_broadcastable(value, weight.shape, f"{what}[{key!r}]")
        by_layer[id(named[key])] = value
    return by_layer


def model_size(
    net: nn.Module,
    masks: Mapping[str, Tensor] | None = None,
    *,
    index_dtype: torch.dtype = torch.int64,
) -> dict[str, int]:
    """Parameter count and storage of ``net``, dense and in sparse CSR and COO formats.

    Every parameter counts once (tied ones too); buffers (BatchNorm statistics, prune
    masks) do not. For a layer pruned with ``torch.nn.utils.prune`` the pruned tensor
    counts, not ``weight_orig``. A Bayesian net's posterior parameters all count: measure
    its deployable size on ``bayessparse.to_dense(net)`` or a compacted net.

    Sparse formats store each tensor of 2 or more dimensions as a matrix flattened to
    (out, rest) = (shape[0], numel / shape[0]) (Saad 2003, ch. 3):

    * CSR: ``nnz`` values, ``nnz`` column indices and ``rows + 1`` row pointers;
    * COO: ``nnz`` values and ``2 * nnz`` (row, column) indices.

    Indices are int64 by default, what ``Tensor.to_sparse_csr()`` and ``to_sparse()`` use,
    so the counts are the bytes torch's sparse tensors take; int32 (as scipy and cuSPARSE
    use for matrices under 2**31 entries) halves them. Vectors and scalars (biases) stay
    dense in both formats: a vector of mostly non-zeros gains nothing from indices.

    Args:
        net: any network.
        masks: ``{"<module>.<param>": mask}`` keyed like ``state_dict``, broadcastable to
            the parameter; entries are non-zero where the parameter is and the mask is true.
        index_dtype: ``torch.int64`` or ``torch.int32``.

    Returns:
        ``params`` and ``dense_bytes``, ``nonzero``, ``csr_bytes`` and ``coo_bytes``.
    """
    if index_dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"Expected index_dtype torch.int32 or torch.int64, got {index_dtype!r}. "
            "Sparse formats index with 32- or 64-bit integers."
        )
    tensors = _parameters(net)
    for key, mask in (masks or {}).items():
        _check_key(key, tensors, "masks keyed by a parameter of the net")
        _check_broadcastable(mask, tensors[key].shape, f"masks[{key!r}]")
    index_bytes = torch.empty((), dtype=index_dtype).element_size()
    size = dict.fromkeys(("params", "dense_bytes", "nonzero", "csr_bytes", "coo_bytes"), 0)
    for key, tensor in tensors.items():
        kept = tensor != 0
        if masks is not None and key in masks:
            kept = kept & masks[key].to(tensor.device).bool()
        nnz, value_bytes = int(kept.count_nonzero()), tensor.element_size()
        dense_bytes = tensor.numel() * value_bytes
        size["params"] += tensor.numel()
        size["dense_bytes"] += dense_bytes
        size["nonzero"] += nnz
        if tensor.ndim < 2:
            size["csr_bytes"] += dense_bytes
            size["coo_bytes"] += dense_bytes
            continue
        rows = tensor.shape[0]
        size["csr_bytes"] += nnz * (value_bytes + index_bytes) + (rows + 1) * index_bytes
        size["coo_bytes"] += nnz * (value_bytes + 2 * index_bytes)
    return size


def _parameters(net: nn.Module) -> dict[str, Tensor]:
    """Each parameter once by its first ``state_dict``-style name, pruned ones as pruned."""
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for prefix, module in net.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            tensor: Tensor = param
            # torch.nn.utils.prune keeps the dense tensor as `<name>_orig`, a `<name>_mask`
            # buffer, and the pruned tensor as the plain attribute `<name>`.
            base = name.removesuffix("_orig")
            pruned = getattr(module, base, None)
            if base != name and hasattr(module, f"{base}_mask") and isinstance(pruned, Tensor):
                name, tensor = base, pruned
            tensors[f"{prefix}.{name}" if prefix else name] = tensor.detach()
    return tensors


# --- Checks and shared pieces -----------------------------------------------------------


def _check_num_bins(num_bins: int) -> None:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"Expected num_bins >= 1, got {num_bins!r}. Pass e.g. 15.")


def _check_probs(probs: Tensor, what: str, min_ndim: int) -> Tensor:
    """``probs`` as float64 after checking it holds distributions along its last dim."""
    if not isinstance(probs, Tensor) or not probs.is_floating_point():
        kind = probs.dtype if isinstance(probs, Tensor) else type(probs).__name__
        raise TypeError(
            f"Expected {what} as a floating-point torch.Tensor, got {kind!r}. "
            "Pass probabilities, e.g. logits.softmax(-1)."
        )
    if probs.ndim < min_ndim or probs.numel() == 0:
        raise ValueError(
            f"Expected non-empty {what} with at least {min_ndim} dimension(s) and classes "
            f"last, got shape {tuple(probs.shape)!r}."
        )
    # Rounding of a (possibly averaged) softmax stays far below sqrt(eps) of its dtype
    # (3e-4 in float32); logits or unnormalised scores miss by order 1.
    tolerance = torch.finfo(probs.dtype).eps ** 0.5
    probs = probs.double()
    sums = probs.sum(-1)
    if not (
        torch.isfinite(probs).all()
        and ((probs >= 0) & (probs <= 1)).all()
        and ((sums - 1).abs() <= tolerance).all()
    ):
        raise ValueError(
            f"Expected {what} to hold probabilities in [0, 1] summing to 1 over the last "
            f"dimension, got values in [{float(probs.min())}, {float(probs.max())}] and sums "
            f"in [{float(sums.min())}, {float(sums.max())}]. Apply softmax(-1) to logits."
        )
    return probs


def _check_key(key: str, known: Mapping[str, Any], expected: str) -> None:
    if key not in known:
        examples = ", ".join(repr(k) for k in list(known)[:8])
        raise ValueError(
            f"Expected {expected}, got {key!r}. Use state_dict-style keys such as {examples}."
        )


def _check_ndim(value: Any, ndim: int, expected: str, fix: str) -> None:
    if not isinstance(value, Tensor) or value.ndim != ndim:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"Expected {expected}, got {shape!r}. {fix}")


def _check_probs_and_labels(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    _check_ndim(
        probs,
        2,
        "probs of shape (N, C)",
        "Average Monte Carlo samples (S, N, C) over their first dimension first.",
    )
    probs = _check_probs(probs, "probs", min_ndim=2)
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex():
        kind = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise TypeError(
            f"Expected labels as an integer torch.Tensor, got {kind!r}. Pass class indices."
        )
    if labels.dtype == torch.bool or labels.shape != probs.shape[:1]:
        raise ValueError(
            f"Expected labels of shape ({probs.shape[0]},) with an integer dtype, got shape "
            f"{tuple(labels.shape)!r} and dtype {labels.dtype}. Pass one class index per row."
        )
    num_classes = probs.shape[1]
    if ((labels < 0) | (labels >= num_classes)).any():
        raise ValueError(
            f"Expected labels in 0..{num_classes - 1}, got values in "
            f"[{int(labels.min())}, {int(labels.max())}]. Labels index the columns of probs."
        )
    return probs, labels.long()


def _check_scores(scores: Tensor, what: str) -> Tensor:
    if not isinstance(scores, Tensor) or scores.is_complex() or scores.dtype == torch.bool:
        kind = scores.dtype if isinstance(scores, Tensor) else type(scores).__name__
        raise TypeError(
            f"Expected {what} as a real torch.Tensor, got {kind!r}. Pass one score per "
            "example, higher for likely OOD inputs."
        )
    if scores.ndim != 1 or scores.numel() == 0:
        raise ValueError(
            f"Expected {what} of shape (N,) with N >= 1, got {tuple(scores.shape)!r}. "
            "Pass one score per example."
        )
    scores = scores.double()
    if not torch.isfinite(scores).all():
        raise ValueError(
            f"Expected finite {what}, got {int((~torch.isfinite(scores)).sum())} NaN or "
            "infinite values. Fix the score (e.g. clamp probabilities before logs)."
        )
    return scores


def _check_broadcastable(value: Tensor, shape: torch.Size, what: str) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"Expected {what} as a torch.Tensor, got {type(value).__name__}.")
    try:
        fits = torch.broadcast_shapes(value.shape, shape) == shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"Expected {what} broadcastable to shape {tuple(shape)}, got "
            f"{tuple(value.shape)}. Give one entry per weight (or per output unit)."
        )


def _check_keep_prob(key: str, keep: Tensor) -> None:
    if not (torch.isfinite(keep).all() and ((keep >= 0) & (keep <= 1)).all()):
        raise ValueError(
            f"Expected keep_probs[{key!r}] in [0, 1], got values in "
            f"[{float(keep.min())}, {float(keep.max())}]. Pass probabilities, not log-alphas."
        )


def _binned(
    probs: Tensor, labels: Tensor, num_bins: int, adaptive: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-class confidence, correctness (float64) and bin index ``0..B-1`` per example."""
    _check_num_bins(num_bins)
    probs, labels = _check_probs_and_labels(probs, labels)
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).double()
    if adaptive:
        # The example of rank r (by confidence) goes to bin floor(r B / N): sizes differ <= 1.
        n = confidence.numel()
        bins = torch.empty(n, dtype=torch.long, device=confidence.device)
        ranks = torch.arange(n, device=confidence.device)
        bins[confidence.argsort(stable=True)] = ranks * num_bins // n
    else:
        # Bin b holds (b/B, (b+1)/B]; the top-class confidence is >= 1/C > 0.
        bins = (confidence * num_bins).ceil().long().clamp(1, num_bins) - 1
    return confidence, correct, bins


def _bin_sums(
    confidence: Tensor, correct: Tensor, bins: Tensor, num_bins: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Count, confidence sum and correct count per bin (float64)."""
    zeros = confidence.new_zeros(num_bins)
    return (
        zeros.index_add(0, bins, torch.ones_like(confidence)),
        zeros.index_add(0, bins, confidence),
        zeros.index_add(0, bins, correct),
    )


def _ece(probs: Tensor, labels: Tensor, num_bins: int, adaptive: bool) -> float:
    confidence, correct, bins = _binned(probs, labels, num_bins, adaptive)
    _, conf_sum, correct_sum = _bin_sums(confidence, correct, bins, num_bins)
    # sum_b |B_b|/N |acc_b - conf_b| = sum_b |sum_{i in b} correct_i - confidence_i| / N,
    # which needs no division by empty bins.
    return float((correct_sum - conf_sum).abs().sum() / confidence.numel())


def _entropy(probs: Tensor) -> Tensor:
    # xlogy(0, 0) = 0: the limit p log p -> 0, where log(0) would give NaN.
    return -torch.special.xlogy(probs, probs).sum(-1)
