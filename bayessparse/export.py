"""Export: a pruned network as a file that torch alone can load and run.

The exported file is a :func:`torch.export` program (an ``ExportedProgram`` saved with
:func:`torch.export.save`): a graph of ATen operations with the weights inside it. It
needs no Python class of the model and no bayessparse to load, only torch:

>>> program = torch.export.load("lenet5.pt2")  # doctest: +SKIP
>>> logits = program.module()(images)  # doctest: +SKIP

``torch.export`` was chosen over TorchScript, which PyTorch no longer develops, and
over a pickled module, which needs the model's classes (and so bayessparse) to load.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bayessparse.compaction import block_max_pools_, compact
from bayessparse.masks import to_dense
from bayessparse.training.storage import atomic_write


@dataclass(frozen=True)
class Exported:
    """What :func:`export` wrote.

    Attributes:
        path: the file.
        module: the plain torch network that was exported (compacted when possible).
        compacted: whether pruned units were physically removed (else masks are baked
            into zeros in a network of the original shape).
        parameters: parameter count of the exported network.
    """

    path: Path
    module: nn.Module
    compacted: bool
    parameters: int


def export(
    net: nn.Module,
    path: str | Path,
    example_inputs: Tensor | tuple[Any, ...],
    *,
    threshold: float | Mapping[str, float] | None = None,
    sparsity: float | None = None,
    scope: str = "global",
    compact_units: bool = True,
) -> Exported:
    """Write the pruned, deterministic ``net`` to ``path`` as a ``torch.export`` program.

    Sparse layers are thresholded (:func:`~bayessparse.to_dense` with the masks baked
    in); with ``compact_units`` the pruned neurons and channels are then removed
    (:func:`~bayessparse.compact`) where the network's structure allows, else the baked
    network of the original shape is exported (with a warning). Max-pools over
    non-overlapping windows become :class:`~bayessparse.compaction.BlockMaxPool` (the
    same values, several times faster on CPU). The file is written atomically. The
    batch dimension of the example is exported as dynamic.

    Args:
        net: a Bayesian sparse network, or a plain one (pruned or not).
        path: the output file (by convention ``.pt2``).
        example_inputs: an input batch (or a tuple of the forward's arguments).
        threshold, sparsity, scope: which weights of the sparse layers to keep, as for
            :func:`~bayessparse.masks` (default: each layer's own rule).
        compact_units: remove pruned units physically where possible.

    Returns:
        :class:`Exported`.

    Raises:
        ValueError: the example input does not fit the network (the message has torch's
            reason), or the network cannot be exported.
    """
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    selection = {"threshold": threshold, "sparsity": sparsity, "scope": scope}
    # Checked on the user's own network (its layers name the shape they expect), before
    # the work of compaction; its train/eval mode is left as it was.
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval()(*args)
    except (RuntimeError, ValueError, TypeError) as err:
        shapes = [tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__ for a in args]
        raise ValueError(
            f"The example input {shapes} does not fit the network: {err}. Pass a batch of "
            "the inputs the network is meant for."
        ) from err
    finally:
        net.train(was_training)
    module, compacted = _deterministic(net, selection, compact_units)
    block_max_pools_(module).eval()  # a copy: the user's network keeps its pools
    traced = tuple(_traced_example(a) for a in args)
    program = torch.export.export(module, traced, dynamic_shapes=_dynamic_batch(traced))
    buffer = _save_bytes(program)
    path = Path(path)
    atomic_write(path, buffer)
    count = sum(p.numel() for p in module.parameters())
    return Exported(path=path, module=module, compacted=compacted, parameters=count)


def _deterministic(
    net: nn.Module, selection: dict[str, Any], compact_units: bool
) -> tuple[nn.Module, bool]:
    if compact_units:
        try:
            return compact(net, **selection), True
        except TypeError as err:  # a structure compact() does not handle
            warnings.warn(
                f"Exporting without compaction (pruned weights are zeros in the original "
                f"shape): {err}",
                stacklevel=3,
            )
    return to_dense(net, **selection, bake=True), False


def _traced_example(a: Any) -> Any:
    """An example argument for tracing: a copy, since the program keeps its example inputs
    (a slice of a data set would save the whole set's storage with it); a batch of one is
    doubled, as it would specialise the traced graph to batch size 1."""
    if not isinstance(a, Tensor):
        return a
    return torch.cat([a, a]) if a.dim() > 0 and a.shape[0] == 1 else a.clone()


def _dynamic_batch(args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Mark dim 0 of every tensor argument as the (dynamic) batch, if all have one."""
    if not all(isinstance(a, Tensor) and a.dim() > 0 for a in args):
        return None
    batch = torch.export.Dim("batch", min=1)
    return tuple({0: batch} for _ in args)


def _save_bytes(program: Any) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()
