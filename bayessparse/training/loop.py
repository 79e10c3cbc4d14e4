"""Training a sparse network by SVI, with progress bars and resumable checkpoints."""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from torch import Tensor, nn
from tqdm.auto import tqdm

from bayessparse.convert import sparse_modules
from bayessparse.infer import (
    JointOptim,
    SparseGuide,
    kl,
    linear_decay,
    linear_warmup,
    project_,
)
from bayessparse.masks import sparsity_report
from bayessparse.metrics import error_rate, predict_logits

CHECKPOINT_VERSION = 1


class SparseClassifier:
    """The Pyro model of a sparse classifier: ``y ~ Categorical(logits=net(x))`` plus KL.

    The layers' analytic KL enters once per step, outside the data plate, through
    ``pyro.factor("kl", -kl(net))``; latent sites of the layers (horseshoe scales) are
    sampled inside ``net`` and matched by :meth:`guide`. Both are scaled by
    :attr:`kl_weight` (KL warm-up). The data plate has ``size=num_data`` so that the
    mini-batch log-likelihood is scaled up to the full data set. With ``Trace_ELBO`` the
    loss is the un-normalised negative ELBO ``N * mean CE + kl_weight * KL``.

    Args:
        net: a network with sparse layers (see :func:`~bayessparse.to_sparse_`).
        num_data: size of the full training set.
        kl_weight: initial weight of the KL term, in [0, 1].
    """

    def __init__(self, net: nn.Module, num_data: int, kl_weight: float = 1.0) -> None:
        if num_data < 1:
            raise ValueError(f"Expected num_data >= 1, got {num_data!r}.")
        self.net = net
        self.num_data = num_data
        self.kl_weight = kl_weight
        self.sparse_guide = SparseGuide(net)
        self.last_kl = self.last_data = math.nan

    def _complexity_scale(self) -> Any:
        # poutine.scale rejects a zero scale; a zero weight masks the terms out instead.
        if self.kl_weight > 0:
            return poutine.scale(scale=self.kl_weight)
        return poutine.mask(mask=False)

    def __call__(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        with self._complexity_scale():
            logits = self.net(x)
            complexity = kl(self.net)
            pyro.factor("kl", -complexity)
        self.last_kl = float(complexity.detach())
        if y is not None:
            ce = F.cross_entropy(logits.detach(), y, reduction="sum")
            self.last_data = float(ce) * self.num_data / x.shape[0]
        with pyro.plate("data", size=self.num_data, subsample=torch.arange(x.shape[0])):
            pyro.sample("y", dist.Categorical(logits=logits), obs=y)
        return logits

    def guide(self, x: Tensor, y: Tensor | None = None) -> None:
        """The posterior of the layers' latent sites, scaled like them (see the class)."""
        with self._complexity_scale():
            self.sparse_guide()


@dataclass
class Schedule:
    """Per-step schedules, as functions of the fractional epoch.

    Attributes:
        kl_warmup: ``(start, end)``: KL weight 0 before ``start``, linear to 1 at ``end``.
        lr_decay_start: epoch from which the learning rate falls linearly to 0 at the last
            epoch (``None``: halfway).
    """

    kl_warmup: tuple[float, float] = (0.0, 0.0)
    lr_decay_start: float | None = None

    def kl_weight(self, epoch: float) -> float:
        return linear_warmup(epoch, *self.kl_warmup)

    def lr_factor(self, epoch: float, epochs: int) -> float:
        start = epochs / 2 if self.lr_decay_start is None else self.lr_decay_start
        return linear_decay(epoch, epochs, start)


@dataclass
class History:
    """What :func:`train` records: one dict per completed epoch."""

    epochs: list[dict[str, float]] = field(default_factory=list)

    @property
    def completed(self) -> int:
        return len(self.epochs)


def _bar(iterable: range, progress: bool | None, **kwargs: Any) -> Any:
    """A tqdm bar over ``iterable`` (only on a terminal when ``progress`` is None), or none."""
    if progress is False:
        return iterable
    return tqdm(iterable, disable=None if progress is None else False, **kwargs)


def _atomic_save(obj: Any, path: Path) -> None:
    """Write ``obj`` to ``path`` so that a crash leaves the old file or the new one, intact."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _release_stale_params(net: nn.Module) -> None:
    """Drop param-store entries that share a name with ``net``'s parameters but are others.

    PyroModule registers parameters in Pyro's global param store by name; a stale entry
    from an earlier network (same names, other tensors) would otherwise be trained instead.
    """
    store = pyro.get_param_store()
    stored = dict(store.named_parameters())
    for name, param in net.named_parameters():
        if name in stored and stored[name] is not param:
            del store[name]


def _check_training_data(net: nn.Module, images: Tensor, labels: Tensor) -> None:
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Expected as many labels as images, got {images.shape[0]} images and "
            f"{labels.shape[0]} labels."
        )
    if labels.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise TypeError(f"Expected integer class labels, got dtype {labels.dtype}.")
    if not any(True for _ in sparse_modules(net)):
        raise ValueError(
            f"{type(net).__name__} has no sparse layers to train. Convert it first with "
            "bayessparse.to_sparse_(net)."
        )


def train(
    net: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    batch_size: int = 100,
    lr: float = 1e-3,
    schedule: Schedule | None = None,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    meta: dict[str, Any] | None = None,
    eval_data: tuple[Tensor, Tensor] | None = None,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
    progress: bool | None = None,
) -> History:
    """Train a sparse classifier by SVI (``Trace_ELBO``, Adam), one epoch at a time.

    After every epoch the full training state (network, optimizer, RNG, history) is
    written atomically to ``checkpoint``; with ``resume=True`` training continues from the
    last completed epoch there, with the same result as an uninterrupted run. Each epoch's
    record holds the mean data term (``N * mean CE``), the mean KL, the KL weight, the
    learning rate and, given ``eval_data``, the test error and compression.

    Args:
        net: a network with sparse layers; trained in place.
        images, labels: the training set.
        epochs: total number of epochs (including those already done when resuming).
        batch_size: mini-batch size.
        lr: Adam learning rate before the schedule's factor.
        schedule: KL warm-up and learning-rate decay (default: no warm-up, linear decay
            over the second half).
        seed: seeds the mini-batch order of each epoch and the noise.
        checkpoint: file for the per-epoch checkpoints (``None``: no checkpoints).
        resume: continue from ``checkpoint`` if it exists.
        meta: settings stored in the checkpoint and checked on resume (e.g. the model).
        eval_data: ``(images, labels)`` evaluated after every epoch.
        on_epoch_end: called with each epoch's record.
        progress: show tqdm bars (``None``: only on a terminal).

    Returns:
        The :class:`History` of all completed epochs.

    Raises:
        FileExistsError: if ``checkpoint`` exists and ``resume`` is false (it would be
            overwritten).
        ValueError: bad sizes, or a checkpoint from a different run.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Expected {name} to be a positive integer, got {value!r}.")
    if not lr > 0:
        raise ValueError(f"Expected a positive learning rate, got lr={lr!r}.")
    _check_training_data(net, images, labels)
    schedule = schedule or Schedule()
    meta = dict(meta or {})
    num_data = images.shape[0]
    num_batches = math.ceil(num_data / batch_size)

    model = SparseClassifier(net, num_data)
    optim = JointOptim(torch.optim.Adam, {"lr": lr})
    history = History()
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        if not resume:
            raise FileExistsError(
                f"Checkpoint {str(path)!r} already exists. Resume it (resume=True, or --resume "
                "on the command line) or choose another output directory."
            )
        state = torch.load(path, weights_only=False)
        if state.get("version") != CHECKPOINT_VERSION or state.get("meta") != meta:
            raise ValueError(
                f"Checkpoint {str(path)!r} is from a different run: it has settings "
                f"{state.get('meta')}, this run has {meta}. Use the same settings or another "
                "output directory."
            )
        net.load_state_dict(state["net"])
        optim.set_state(state["optim"])
        torch.set_rng_state(state["rng"])
        history.epochs = state["history"]
    elif resume and path is not None:
        warnings.warn(
            f"No checkpoint at {str(path)!r} to resume; starting from scratch.", stacklevel=2
        )
    elif path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)

    if history.completed == 0:
        torch.manual_seed(seed)
    _release_stale_params(net)
    svi = SVI(model, model.guide, optim, Trace_ELBO())

    epoch_bar = _bar(
        range(history.completed, epochs),
        progress,
        initial=history.completed,
        total=epochs,
        desc="epochs",
        unit="ep",
    )
    for epoch in epoch_bar:
        net.train()
        start = time.perf_counter()
        # The order depends on (seed, epoch) only, so a resumed run sees the same batches.
        epoch_rng = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(num_data, generator=epoch_rng)
        data_sum = kl_sum = 0.0
        batches = _bar(range(num_batches), progress, desc=f"epoch {epoch + 1}", leave=False)
        for i in batches:
            idx = order[i * batch_size : (i + 1) * batch_size]
            now = epoch + i / num_batches
            model.kl_weight = schedule.kl_weight(now)
            optim.lr_factor = schedule.lr_factor(now, epochs)
            # Pyro's checks run on the first step; after that the data and model are known.
            with pyro.validation_enabled(epoch == 0 and i == 0):
                loss = svi.step(images[idx], labels[idx])
            project_(net)
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"The loss became {loss} at epoch {epoch + 1}, batch {i + 1}. Lower the "
                    "learning rate or check the inputs for NaN/inf."
                )
            data_term = model.last_data
            data_sum += data_term
            kl_sum += model.last_kl
            if isinstance(batches, tqdm) and i % 50 == 0:
                batches.set_postfix(data=f"{data_term:.4g}", kl=f"{model.last_kl:.4g}")
        record = {
            "epoch": epoch + 1,
            "data_term": data_sum / num_batches,
            "kl": kl_sum / num_batches,
            "kl_weight": model.kl_weight,
            "lr": lr * optim.lr_factor,
            "train_seconds": time.perf_counter() - start,
        }
        if eval_data is not None:
            record["test_error"] = error_rate(predict_logits(net, eval_data[0]), eval_data[1])
            record["compression"] = sparsity_report(net)["compression"]
        history.epochs.append(record)
        if path is not None:
            _atomic_save(
                {
                    "version": CHECKPOINT_VERSION,
                    "meta": meta,
                    "net": net.state_dict(),
                    "optim": optim.get_state(),
                    "rng": torch.get_rng_state(),
                    "history": history.epochs,
                },
                path,
            )
        if isinstance(epoch_bar, tqdm) and "test_error" in record:
            epoch_bar.set_postfix(
                err=f"{record['test_error']:.2%}", comp=f"{record['compression']:.1f}x"
            )
        if on_epoch_end is not None:
            on_epoch_end(record)
    return history
