"""Deep Compression's three stages on a pruned network: share, fine-tune, Huffman-code.

Given a network pruned in :mod:`torch.nn.utils.prune` format (stage one, any pruning
method), :func:`deep_compression` shares the kept weights of every Linear and Conv layer
by k-means (:func:`~bayessparse.compression.share_`), lets a caller-given function
fine-tune the codebooks, bakes the shared values back into the layers and reports the
bytes of each stage, as the paper's Table 1 does: pruned (float32 values and relative
indices), shared (fixed-width codes and the codebook), Huffman-coded (both streams).
The caller measures the error of the compressed network.

References:
    Han, Mao, Dally. Deep compression: compressing deep neural networks with pruning,
    trained quantization and Huffman coding. ICLR 2016.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.utils import parametrize

from bayessparse.compression.sharing import MAX_ITERATIONS, SharedWeights, bake_, share_
from bayessparse.compression.storage import LayerStorage, paper_bits, storage_bytes
from bayessparse.pruning.base import param_key, prunable_layers

STAGES = ("pruned", "shared", "huffman")


@dataclass(frozen=True)
class CompressionReport:
    """Bytes per layer and stage of a network compressed by :func:`deep_compression`.

    Attributes:
        layers: ``{weight key: {stage: LayerStorage}}`` for the stages in ``STAGES``.
    """

    layers: dict[str, dict[str, LayerStorage]]

    @property
    def dense_bytes(self) -> int:
        """The dense float32 weights and biases of the reported layers."""
        return sum(stages["pruned"].dense_bytes for stages in self.layers.values())

    def bytes(self, stage: str) -> int:
        """The bytes of all reported layers at ``stage`` (each padded to whole bytes)."""
        if stage not in STAGES:
            raise ValueError(f"Expected a stage in {STAGES}, got {stage!r}.")
        return sum(stages[stage].bytes for stages in self.layers.values())

    def ratio(self, stage: str) -> float:
        """``dense_bytes / bytes(stage)``: the compression rate at ``stage``."""
        size = self.bytes(stage)
        return self.dense_bytes / size if size else math.inf

    def rows(self) -> list[dict[str, float | int | str]]:
        """One row per layer: its dense bytes, and its bytes and ratio at each stage."""
        rows: list[dict[str, float | int | str]] = []
        for key, stages in self.layers.items():
            row: dict[str, float | int | str] = {
                "layer": key,
                "dense_bytes": stages["pruned"].dense_bytes,
            }
            for stage in STAGES:
                row[f"{stage}_bytes"] = stages[stage].bytes
                row[f"{stage}_ratio"] = stages[stage].compression_ratio
            rows.append(row)
        return rows


def deep_compression(
    net: nn.Module,
    *,
    bits: int | Mapping[str, int] | None = None,
    index_bits: int | Mapping[str, int] | None = None,
    finetune: Callable[[nn.Module], None] | None = None,
    max_iterations: int = MAX_ITERATIONS,
) -> CompressionReport:
    """Share the weights of a pruned ``net`` in place, fine-tune, and report its bytes.

    Every Linear and Conv layer is shared: its kept weights (all, if not pruned) become
    ``2^bits − 1`` k-means centroids. ``finetune(net)``, if given, then trains the
    network with the codebooks as the layers' weight parameters; afterwards each layer
    is plain again (in prune format if it was) and holds the shared values.

    Args:
        net: a network pruned in :mod:`torch.nn.utils.prune` format, or dense.
        bits: bits per code, for all layers or by layer name (``"0"``, ``"features.3"``);
            default (and for layers a mapping leaves out) 8 for convolutions, 5 for fully
            connected layers.
        index_bits: bits per relative index, the same way; layers with no pruned weight
            are stored dense, without indices.
        finetune: trains ``net`` in place (e.g. a few epochs of the caller's loop); the
            codebooks are ``module.parametrizations.weight.original``.
        max_iterations: Lloyd iterations at most per layer.

    Returns:
        A :class:`CompressionReport` keyed by weight (``"1.weight"``).

    Raises:
        ValueError: a net without Linear or Conv layers, a name in ``bits`` or
            ``index_bits`` that is not one of its layers, or bits outside 1..16.
    """
    layers = prunable_layers(net)
    if not layers:
        raise ValueError(
            f"Expected a network with Linear or Conv layers, got {type(net).__name__} with "
            "none. Deep Compression shares the weights of those layers."
        )
    for option in (bits, index_bits):
        _check_names(option, layers)
    layer_bits = {name: _bits(bits, name, m) for name, m in layers.items()}
    try:
        for name, module in layers.items():
            share_(module, layer_bits[name], max_iterations)
        if finetune is not None:
            finetune(net)
    finally:  # plain layers again, even if fine-tuning fails
        shared = {
            name: bake_(m)
            for name, m in layers.items()
            if parametrize.is_parametrized(m, "weight")
        }
    report = {}
    for name, module in layers.items():
        dense = bool(shared[name].mask.all())
        per_index = 0 if dense else _bits(index_bits, name, module)  # dense: no index
        report[param_key(name)] = _stages(module, shared[name], layer_bits[name], per_index)
    return CompressionReport(report)


def _stages(
    module: nn.Module, shared: SharedWeights, bits: int, per_index: int
) -> dict[str, LayerStorage]:
    """The storage of one layer at each stage of Deep Compression."""
    bias = getattr(module, "bias", None)
    biases = bias.numel() if isinstance(bias, Tensor) else 0

    def coded(huffman: bool) -> LayerStorage:
        return storage_bytes(
            shared.mask,
            bits_per_index=per_index,
            bits_per_value=bits,
            codes=shared.index,
            codebook_size=shared.num_centroids,
            biases=biases,
            huffman=huffman,
        )

    pruned = storage_bytes(shared.mask, bits_per_index=per_index, biases=biases)
    return {"pruned": pruned, "shared": coded(False), "huffman": coded(True)}


def _bits(option: int | Mapping[str, int] | None, name: str, module: nn.Module) -> int:
    """The option's bits for a layer, or the paper's (8 conv, 5 fc)."""
    if isinstance(option, Mapping):
        return option.get(name, paper_bits(module))
    return paper_bits(module) if option is None else option


def _check_names(option: int | Mapping[str, int] | None, layers: Mapping[str, nn.Module]) -> None:
    unknown = sorted(set(option) - set(layers)) if isinstance(option, Mapping) else []
    if unknown:
        raise ValueError(
            f"Expected layer names among {sorted(layers)}, got {unknown}. Name layers as "
            "net.named_modules() does."
        )
