"""Bench protocols of compression beyond pruning: codes, factors, hashes, smaller students.

A row's target sparsity ``s`` keeps its meaning: the result stores at most a fraction
``1 − s`` of the dense net's weights as parameters (for the coding methods, the pruned
net they code). Each row also reports ``storage_bytes``, what the result really stores
(codes, codebooks, indices, biases), and ``storage_compression``, the dense float32
net's bytes over it. With a budget of ``B`` epochs (the pruning protocols' phases):

- ``weight_sharing`` and ``deep_compression`` (Han et al. 2016): the ``magnitude``
  row's net (dense ``B/2`` epochs, pruned to ``s``, fine-tuned ``B/2``), its survivors
  shared by k-means (Deep Compression's code widths: 8 bits conv, 5 fc), one epoch of
  codebook fine-tuning (Adam, lr 1e-4), then stored with fixed-width codes, or
  Huffman-coded (codes and relative indices);
- ``quantise8``, ``quantise4``, ``binarise``: the same pruned net, its survivors
  quantised uniformly (one scale per layer) without further training;
- ``sparse_vd_bits``, ``group_nj_bits`` (Louizos et al. 2017): the Bayesian family's
  row (its SVI net, masked at ``s``), each layer's kept weights rounded to the
  significand bits that their posterior variances allow, stored at that width;
- ``low_rank``: the dense net after ``B/2`` epochs, every layer factorised by
  truncated SVD at the largest rank common to all layers that meets ``1 − s``, and
  the factors fine-tuned ``B/2`` epochs;
- ``hashed`` (Chen et al. 2015): every Linear layer a :class:`HashedLinear` with a
  fraction ``1 − s`` of its weights as real parameters, trained ``B`` epochs;
- ``distillation`` (Hinton et al. 2015): a student with every hidden layer narrowed by
  one factor to meet ``1 − s``, trained ``B`` epochs on the softened predictions
  (T = 20, α = 0.9) of the dense net trained ``B`` epochs (the teacher, cached).

The nets are measured like the pruning methods' (test metrics, FLOPs, CPU speed-up
against the dense net), without compaction for those that are not masked nets.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bayessparse.bench.measure import architecture, measure, parameter_count, speedup
from bayessparse.compression import (
    HashedLinear,
    bayesian_bits,
    deep_compression,
    factorise_,
    paper_bits,
    quantise_,
    round_to_bits,
    storage_bytes,
)
from bayessparse.metrics import classification_report, flops, predict_logits
from bayessparse.pruning import apply_masks_, get_method, prunable_layers
from bayessparse.pruning.base import current_mask, recompute_pruned_, trained_weight
from bayessparse.training import Teacher

if TYPE_CHECKING:
    from bayessparse.bench.grid import Item
    from bayessparse.bench.runner import Bench

FLOAT_BYTES, FLOAT_BITS = 4, 32
CODEBOOK_EPOCHS = 1
CODEBOOK_LR = 1e-4
TEMPERATURE, ALPHA = 20.0, 0.9  # Hinton et al.'s MNIST temperature; mostly soft targets
CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
GEOMETRY = ("kernel_size", "stride", "padding", "dilation")


@dataclass
class Compressed:
    """A compression row's result: the net, its training seconds, what it stores.

    Attributes:
        net: the final network (plain torch layers).
        seconds: all its training, cached phases included.
        storage_bytes: the bytes it stores.
        stored_weights: the weights it stores as parameters (codes count as weights).
        cost_net: the net whose multiply-accumulates it runs (hashed layers expand to
            the dense weights); ``net`` if None.
        masked: whether ``net`` is a masked dense net (measured as a pruned one).
    """

    net: nn.Module
    seconds: float
    storage_bytes: int
    stored_weights: int
    cost_net: nn.Module | None = None
    masked: bool = False


@dataclass(frozen=True)
class Protocol:
    """How a compression method runs in the bench, and how its row is labelled."""

    family: str
    stage: str
    run: Callable[[Bench, Item], Compressed]


def min_budget(method: str) -> int:
    """The shortest budget of ``method``'s protocol: 2 for those that pretrain (one
    epoch of pretraining, one of fine-tuning), else 1."""
    return 2 if PROTOCOLS[method].stage == "after_training" else 1


def run(bench: Bench, item: Item) -> tuple[dict[str, Any], str, str]:
    """Compute one compression row: its measurements, family and stage."""
    protocol = PROTOCOLS[item.method]
    result = protocol.run(bench, item)
    dense = bench.initial_net(item.seed)
    test = bench.test_split
    if result.masked:
        measured = measure(result.net, dense, test.images, test.labels)
    else:
        measured = _measure_unmasked(result, dense, test.images, test.labels)
    dense_bytes = FLOAT_BYTES * parameter_count(dense)
    measured |= {
        "storage_bytes": result.storage_bytes,
        "storage_compression": dense_bytes / result.storage_bytes,
        "train_seconds": result.seconds,
    }
    return measured, protocol.family, protocol.stage


def _measure_unmasked(
    result: Compressed, dense: nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> dict[str, Any]:
    """:func:`~bayessparse.bench.measure.measure`'s columns for a net of other layers:
    ``nonzero`` are the stored weights, the architecture that of the net's own layers."""
    net = result.net.eval()
    report = classification_report(predict_logits(net, images), labels)
    total = sum(trained_weight(m).numel() for m in prunable_layers(dense).values())
    cost = flops(result.cost_net or net, images[:1])
    stored = result.stored_weights
    return {
        **report,
        "weights": total,
        "nonzero": stored,
        "achieved_sparsity": 1 - stored / total,
        "compression": total / stored,
        "flops_dense": int(flops(dense, images[:1])["dense"]),
        "flops_nonzero": int(cost["nonzero"]),
        "architecture": architecture(result.cost_net or net),
        "params": parameter_count(dense),
        "compact_params": parameter_count(net),
        "speedup": speedup(dense.eval(), net, images[:100]),
    }


# --- coding the magnitude-pruned net ------------------------------------------------------


def _magnitude_pruned(bench: Bench, item: Item) -> tuple[nn.Module, float]:
    """The ``magnitude`` row's net at ``item``'s sparsity and seed (cached: the coding
    methods all start from it)."""

    def make() -> dict[str, Any]:
        net, seconds = bench.after_training(item, get_method("magnitude"))
        layers = prunable_layers(net).items()
        masks = {
            f"{name}.weight": mask for name, m in layers if (mask := current_mask(m)) is not None
        }
        return {"net": net.state_dict(), "masks": masks, "train_seconds": seconds}

    state = bench.cached(f"magnitude-{item.sparsity!r}-{item.seed}", make)
    net = bench.initial_net(item.seed)
    apply_masks_(net, state["masks"])
    net.load_state_dict(state["net"])
    return net, state["train_seconds"]


def _shared(stage: str) -> Callable[[Bench, Item], Compressed]:
    def protocol(bench: Bench, item: Item) -> Compressed:
        net, seconds = _magnitude_pruned(bench, item)
        spent = []

        def finetune(shared: nn.Module) -> None:
            epochs, lr = CODEBOOK_EPOCHS, CODEBOOK_LR
            spent.append(bench.fit(shared, epochs, item.seed, lr=lr, optimizer="adam"))

        report = deep_compression(net, finetune=finetune)
        return Compressed(net, seconds + sum(spent), report.bytes(stage), _kept(net), masked=True)

    return protocol


def _quantised(bits: int) -> Callable[[Bench, Item], Compressed]:
    def protocol(bench: Bench, item: Item) -> Compressed:
        net, seconds = _magnitude_pruned(bench, item)
        storage = quantise_(net, bits)
        size = sum(layer.bytes for layer in storage.values())
        return Compressed(net, seconds, size, _kept(net), masked=True)

    return protocol


def _kept(net: nn.Module) -> int:
    """The kept weights of ``net``'s layers (all of an unpruned layer's)."""
    total = 0
    for layer in prunable_layers(net).values():
        mask = current_mask(layer)
        total += trained_weight(layer).numel() if mask is None else int(mask.sum())
    return total


def _posterior_bits(family: str) -> Callable[[Bench, Item], Compressed]:
    """Bayesian compression's last step (Louizos et al. 2017): the ``family`` row's
    masked net, each layer's kept weights rounded to the significand bits its posterior
    variances allow (:func:`bayesian_bits`, one exponent width for the net) and stored
    at that width with relative indices."""

    def protocol(bench: Bench, item: Item) -> Compressed:
        bayesian = item._replace(method=family)
        net, seconds = bench.bayesian(bayesian)
        sparse, _ = bench.bayesian_net(bayesian)
        variances = {
            name: layer.weight_variance().detach()
            for name, layer in sparse.named_modules()
            if hasattr(layer, "weight_variance")
        }
        layers = prunable_layers(net)
        kept = {name: _mask(layer) for name, layer in layers.items()}
        largest = max(
            float(trained_weight(layer).detach().abs().max()) for layer in layers.values()
        )  # the net's largest kept |mean|: pruned weights are zeros
        size = 0
        for name, layer in layers.items():
            bits = FLOAT_BITS
            if kept[name].any():
                orig = getattr(layer, "weight_orig", None)
                orig = trained_weight(layer) if orig is None else orig
                precision = bayesian_bits(
                    orig.detach(), variances[name], kept[name], largest_mean=largest
                )
                with torch.no_grad():
                    orig.copy_(round_to_bits(orig, precision.significant_bits))
                bits = precision.bits_per_weight
            bias = getattr(layer, "bias", None)
            size += storage_bytes(
                kept[name],
                bits_per_index=0 if kept[name].all() else paper_bits(layer),
                bits_per_value=bits,
                biases=bias.numel() if isinstance(bias, torch.Tensor) else 0,
            ).bytes
        recompute_pruned_(net)
        return Compressed(net, seconds, size, _kept(net), masked=True)

    return protocol


def _mask(layer: nn.Module) -> torch.Tensor:
    mask = current_mask(layer)
    return torch.ones_like(trained_weight(layer), dtype=torch.bool) if mask is None else mask


# --- fewer parameters ---------------------------------------------------------------------


def _low_rank(bench: Bench, item: Item) -> Compressed:
    state = bench.pretrained(item.seed)
    net = bench.initial_net(item.seed)
    net.load_state_dict(state["trained"])
    budget = (1 - item.sparsity) * _weights(net)
    ranks = range(1, _full_rank(net) + 1)
    rank = max([1] + [r for r in ranks if _factor_weights(net, r) <= budget])
    factorise_(net, rank=rank)
    from bayessparse.bench.runner import pretrain_epochs  # runner imports this module

    epochs = bench.budget - pretrain_epochs(bench.budget)
    seconds = state["train_seconds"] + bench.fit(net, epochs, item.seed)
    return Compressed(net, seconds, FLOAT_BYTES * parameter_count(net), _weights(net))


def _matrices(net: nn.Module) -> list[tuple[int, int]]:
    """``(rows, columns)`` of each Linear and Conv weight flattened as SVD sees it."""
    return [
        (m.weight.shape[0], m.weight[0].numel())
        for m in net.modules()
        if isinstance(m, (nn.Linear, *CONV))
    ]


def _full_rank(net: nn.Module) -> int:
    return max(min(shape) for shape in _matrices(net))


def _factor_weights(net: nn.Module, rank: int) -> int:
    """Weights after :func:`factorise_` at ``rank`` (capped per layer; a layer is
    factorised only where that saves weights)."""
    return sum(
        min(rows * cols, min(rank, rows, cols) * (rows + cols)) for rows, cols in _matrices(net)
    )


def _weights(net: nn.Module) -> int:
    return sum(m.weight.numel() for m in net.modules() if isinstance(m, (nn.Linear, *CONV)))


def _hashed(bench: Bench, item: Item) -> Compressed:
    dense = bench.initial_net(item.seed)
    net = copy.deepcopy(dense)
    for name, layer in list(net.named_modules()):
        if isinstance(layer, nn.Linear):
            size = max(1, round((1 - item.sparsity) * layer.weight.numel()))
            hashed = HashedLinear(layer.in_features, layer.out_features, size, seed=item.seed)
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, hashed)
    seconds = bench.fit(net, bench.budget, item.seed)
    stored = sum(m.weight.numel() for m in net.modules() if isinstance(m, (HashedLinear, *CONV)))
    return Compressed(net, seconds, FLOAT_BYTES * parameter_count(net), stored, cost_net=dense)


def _distilled(bench: Bench, item: Item) -> Compressed:
    teacher = bench.initial_net(item.seed)
    state = bench.cached(f"teacher-{item.seed}", lambda: _trained_teacher(bench, item.seed))
    teacher.load_state_dict(state["net"])
    target = (1 - item.sparsity) * _weights(teacher)
    width = _largest_width(teacher, target)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(item.seed)
        student = narrowed(teacher, width)
    seconds = bench.fit(
        student, bench.budget, item.seed, teacher=Teacher(teacher.eval(), TEMPERATURE, ALPHA)
    )
    seconds += state["train_seconds"]
    return Compressed(student, seconds, FLOAT_BYTES * parameter_count(student), _weights(student))


def _trained_teacher(bench: Bench, seed: int) -> dict[str, Any]:
    net = bench.initial_net(seed)
    seconds = bench.fit(net, bench.budget, seed)
    return {"net": net.state_dict(), "train_seconds": seconds}


def _largest_width(net: nn.Module, target: float) -> float:
    """The largest width factor (bisection on [0, 1]) whose :func:`narrowed` net has at
    most ``target`` weights; the narrowest net if none has."""
    low, high = 0.0, 1.0
    for _ in range(30):
        middle = (low + high) / 2
        low, high = (middle, high) if _weights(narrowed(net, middle)) <= target else (low, middle)
    return low


def narrowed(net: nn.Module, width: float) -> nn.Sequential:
    """A fresh copy of a sequential ``net`` with every hidden Linear and Conv layer's
    outputs scaled by ``width`` (at least one unit each); the last layer keeps its
    outputs, and the layer after a narrowed one its matching inputs.

    Raises:
        ValueError: ``net`` is not an ``nn.Sequential``.
    """
    if not isinstance(net, nn.Sequential):
        raise ValueError(
            f"Expected an nn.Sequential to narrow, got {type(net).__name__}. Distillation's "
            "bench protocol builds its student from the model's layer sequence."
        )
    layers = list(net)
    last = max(i for i, m in enumerate(layers) if isinstance(m, (nn.Linear, *CONV)))
    built: list[nn.Module] = []
    channels: tuple[int, int] | None = None  # the previous layer's (old, new) outputs
    for index, layer in enumerate(layers):
        if not isinstance(layer, (nn.Linear, *CONV)):
            built.append(copy.deepcopy(layer))
            continue
        old_out = layer.weight.shape[0]
        new_out = old_out if index == last else max(1, round(width * old_out))
        old_in = layer.weight.shape[1]
        new_in = old_in if channels is None else old_in // channels[0] * channels[1]
        bias = layer.bias is not None
        if isinstance(layer, nn.Linear):
            built.append(nn.Linear(new_in, new_out, bias=bias))
        else:
            geometry = {
                k: getattr(layer, k) for k in ("kernel_size", "stride", "padding", "dilation")
            }
            conv: Any = type(layer)
            built.append(conv(new_in, new_out, bias=bias, **geometry))
        channels = (old_out, new_out)
    return nn.Sequential(*built)


PROTOCOLS: dict[str, Protocol] = {
    "weight_sharing": Protocol("weight_sharing", "after_training", _shared("shared")),
    "deep_compression": Protocol("weight_sharing", "after_training", _shared("huffman")),
    "quantise8": Protocol("quantisation", "after_training", _quantised(8)),
    "quantise4": Protocol("quantisation", "after_training", _quantised(4)),
    "binarise": Protocol("quantisation", "after_training", _quantised(1)),
    "sparse_vd_bits": Protocol("bayesian", "during_training", _posterior_bits("sparse_vd")),
    "group_nj_bits": Protocol("bayesian", "during_training", _posterior_bits("group_nj")),
    "low_rank": Protocol("low_rank", "after_training", _low_rank),
    "hashed": Protocol("hashing", "at_init", _hashed),
    "distillation": Protocol("distillation", "during_training", _distilled),
}
