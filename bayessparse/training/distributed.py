"""Data-parallel training over processes and machines (``torch.distributed``, ``torchrun``).

:func:`~bayessparse.training.train` joins the process group that the caller (or
``torchrun``, through :func:`init_from_env`) initialised; with one process it trains
exactly as without one. Every rank then:

- builds the same global mini-batch order from the run's seed, and takes its own disjoint,
  contiguous share of every global batch (:meth:`DataParallel.shard`). Pyro's Horovod
  example warns that ``pyro.plate`` subsampling draws the *same* subsample on every
  worker; the loop does its own batching, so the ranks' shards differ and together are
  exactly the global batch of one process;
- all-reduces the gradients and the logged terms after each backward pass, each rank's
  weighted by its share ``b_r / B`` of the global batch (:meth:`DataParallel.reduce_`).
  A shard's data term is ``N * mean CE`` over its ``b_r`` examples, so the weighted sum
  is ``N / B`` times the global batch's summed CE plus the (shared) complexity term once:
  the single-process gradient of batch ``B``, even when ``B`` does not divide evenly;
- steps its optimiser on identical gradients, so the parameters stay identical;
- draws the local-reparameterisation noise of its shard from its own stream, seeded by
  ``(seed, rank)``: rank 0's stream is the single-process one. Parameters therefore
  match a single process up to that noise only (exactly, for a deterministic objective);
- runs the per-step hooks (pruning schedules) from a stream shared by all ranks, then
  takes rank 0's buffers (masks, batch-norm statistics), as ``DistributedDataParallel``
  does, so masks are identical on every rank.

Checkpoints are written by rank 0 alone, holding every rank's random state; the other
ranks wait at a barrier. On resume rank 0 reads the checkpoint and sends it to the
others, so only rank 0 needs the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

# Rank r's noise stream is seeded by seed + r * 2**32: distinct for every (seed, rank)
# with seed < 2**32, and the single-process seed for rank 0.
_RANK_SEED_STRIDE = 2**32


def is_distributed() -> bool:
    """Whether a process group of more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_from_env(device: str = "cpu") -> torch.device:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Uses NCCL for CUDA and gloo otherwise; each process takes the GPU of its
    ``LOCAL_RANK``. Without ``torchrun`` (no ``WORLD_SIZE``) nothing is initialised.

    Returns:
        The device this process trains on.
    """
    target = torch.device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return target
    if target.type == "cuda":
        target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(target)
    dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return target


class DataParallel:
    """This process's part in data-parallel training (see the module docstring).

    Args:
        device: where the collectives' tensors live (the network's device; NCCL needs CUDA).
    """

    def __init__(self, device: torch.device) -> None:
        self.rank, self.world, self.device = dist.get_rank(), dist.get_world_size(), device
        self.weight = 1.0  # this rank's share of the current global batch

    @classmethod
    def current(cls, device: torch.device) -> DataParallel | None:
        """This process's part when more than one process trains, else ``None``."""
        return cls(device) if is_distributed() else None

    def check_batches(self, num_data: int, batch_size: int) -> None:
        """Every global batch must give each rank at least one example.

        Raises:
            ValueError: ``batch_size`` or the last batch of an epoch is smaller than the
                number of processes.
        """
        last = num_data % batch_size or batch_size
        if min(batch_size, num_data, last) < self.world:
            raise ValueError(
                f"Expected every mini-batch to hold at least one example per process, got "
                f"batch_size={batch_size} for {num_data} examples (last batch: {last}) over "
                f"{self.world} processes. Choose a batch size of at least {self.world} that "
                f"divides {num_data} or leaves a last batch of at least {self.world}."
            )

    def shard(self, indices: Tensor) -> Tensor:
        """This rank's contiguous share of a global batch; sets :attr:`weight`."""
        mine = indices.tensor_split(self.world)[self.rank]
        self.weight = len(mine) / len(indices)
        return mine

    def stream_seed(self, seed: int) -> int:
        """The seed of this rank's noise stream: ``seed`` itself on rank 0."""
        return seed + self.rank * _RANK_SEED_STRIDE

    def reduce_(self, params: Sequence[Tensor], terms: Sequence[float]) -> list[float]:
        """Replace each gradient of ``params`` and each of ``terms`` by its sum over the
        ranks, each rank's weighted by :attr:`weight`; return the summed terms.

        ``params`` must come in the same order on every rank.
        """
        grads = [p.grad for p in params if p.grad is not None]
        for grad in grads:
            grad.mul_(self.weight)
        values = torch.tensor(terms, dtype=torch.float64, device=self.device) * self.weight
        _all_reduce_sum_([*grads, values])
        return values.tolist()

    def broadcast_(self, tensors: Sequence[Tensor]) -> None:
        """Overwrite ``tensors`` with rank 0's (same order on every rank)."""
        with torch.no_grad():
            for tensor in tensors:
                dist.broadcast(tensor.data, src=0)

    def broadcast_state_(self, net: nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers."""
        self.broadcast_([*net.parameters(), *net.buffers()])

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled; for small or occasional objects)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._object_device())
        return box[0]

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index or 0])
        else:
            dist.barrier()

    def _object_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None


def _all_reduce_sum_(tensors: Sequence[Tensor]) -> None:
    """Sum ``tensors`` over the ranks in place: one collective per dtype, not per tensor."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        for tensor, part in zip(group, flat.split([t.numel() for t in group]), strict=True):
            tensor.copy_(part.view_as(tensor))


def broadcast_masks(masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rank 0's masks on every rank (the same dict back without a process group).

    Computing masks on every rank gives the same result when the parameters are the same;
    broadcasting makes it so whatever each rank computed (e.g. a tie broken on a rounding
    difference between devices).
    """
    if not is_distributed():
        return masks
    device = next(iter(masks.values())).device if masks else torch.device("cpu")
    parallel = DataParallel(device)
    keys = parallel.broadcast_object(sorted(masks))
    if keys != sorted(masks):
        raise ValueError(
            f"Expected the same mask keys on every rank, got {sorted(masks)} here and {keys} "
            "on rank 0. Build the same network on every rank."
        )
    out = {key: masks[key].clone() for key in keys}
    parallel.broadcast_(list(out.values()))
    return out
