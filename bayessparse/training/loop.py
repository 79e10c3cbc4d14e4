"""The SVI training loop: one epoch at a time, checked after every step, checkpointed."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from bayessparse.convert import sparse_modules
from bayessparse.infer import linear_decay, linear_warmup
from bayessparse.masks import sparsity_report
from bayessparse.metrics import error_rate, predict_logits
from bayessparse.training.allocator import keep_freed_memory
from bayessparse.training.averaging import ParameterAverage, check_decay
from bayessparse.training.data import (
    DatasetData,
    TensorData,
    check_dataset,
    dataset_tensors,
)
from bayessparse.training.distributed import DataParallel
from bayessparse.training.objective import Objective, Teacher, make_objective
from bayessparse.training.storage import (
    CheckpointError,
    RunFolder,
    RunFolderBusy,
    fingerprint,
    load_checkpoint,
    save_checkpoint,
)

CHECKPOINT_VERSION = 2
MAX_SEED = 2**32 - 1


# A method's hook after every optimiser step: (net, torch optimiser or None, global step).
AfterStep = Callable[[nn.Module, "torch.optim.Optimizer | None", int], None]


class TrainingDiverged(FloatingPointError):
    """The loss or a parameter became NaN or infinite; the last checkpoint is intact."""


class CheckpointExists(FileExistsError):
    """A checkpoint exists and resuming was not asked for (it would be overwritten)."""


def _check_finite(name: str, value: float, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expected {name} to be a number, got {value!r}.")
    if not math.isfinite(value) or value < low:
        raise ValueError(f"Expected {name} to be a finite number >= {low:g}, got {value!r}.")
    return float(value)


@dataclass
class Schedule:
    """Per-step schedules, as functions of the fractional epoch.

    Attributes:
        kl_warmup: ``(start, end)``: KL weight 0 before ``start``, linear to 1 at ``end``.
        lr_decay_start: epoch from which the learning rate falls linearly to 0 at the last
            epoch (``None``: halfway).

    Raises:
        ValueError: a value is NaN, infinite or negative, or the warm-up ends before it
            starts.
    """

    kl_warmup: tuple[float, float] = (0.0, 0.0)
    lr_decay_start: float | None = None

    def __post_init__(self) -> None:
        if len(self.kl_warmup) != 2:
            raise ValueError(f"Expected kl_warmup = (start, end), got {self.kl_warmup!r}.")
        start = _check_finite("the KL warm-up start", self.kl_warmup[0])
        end = _check_finite("the KL warm-up end", self.kl_warmup[1])
        if end < start:
            raise ValueError(
                f"Expected a KL warm-up that ends after it starts, got start {start:g} and "
                f"end {end:g}. Swap them."
            )
        self.kl_warmup = (start, end)
        if self.lr_decay_start is not None:
            self.lr_decay_start = _check_finite("lr_decay_start", self.lr_decay_start)

    def kl_weight(self, epoch: float) -> float:
        return linear_warmup(epoch, *self.kl_warmup)

    def lr_factor(self, epoch: float, epochs: int) -> float:
        start = epochs / 2 if self.lr_decay_start is None else self.lr_decay_start
        return linear_decay(epoch, epochs, start)


@dataclass
class History:
    """What :func:`train` records.

    Attributes:
        epochs: one dict per completed epoch.
        wall_seconds: time spent in :func:`train`, over every session of the run (each
            session counted up to its last checkpoint, the current one to its end).
        sessions: how many calls of :func:`train` the run took (1 + the resumes).
    """

    epochs: list[dict[str, float]] = field(default_factory=list)
    wall_seconds: float = 0.0
    sessions: int = 0

    @property
    def completed(self) -> int:
        return len(self.epochs)


class Callback:
    """Hooks the loop calls; subclass and override the ones you need (all do nothing).

    The loop itself only trains, checks and checkpoints; evaluation, logging and a
    pruning method's per-step work are callbacks. :func:`train`'s ``eval_data``,
    ``on_start``, ``on_epoch_end`` and ``after_step`` arguments are shorthands for them.
    """

    def on_start(self, history: History) -> None:
        """Once every check has passed, before the first epoch (history may be restored)."""

    def on_step(self, net: nn.Module, optimizer: torch.optim.Optimizer | None, step: int) -> None:
        """After every optimiser step; ``step`` counts from the run's start."""

    def on_epoch_end(self, net: nn.Module, record: dict[str, float]) -> None:
        """After each epoch, before its checkpoint: may add entries to ``record``."""

    def on_epoch_saved(self, record: dict[str, float]) -> None:
        """After the epoch's checkpoint is written (stopping here loses nothing)."""


class Evaluate(Callback):
    """Adds the test error (and the compression of a Bayesian net) to each epoch's record."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def on_epoch_end(self, net: nn.Module, record: dict[str, float]) -> None:
        record["test_error"] = error_rate(predict_logits(net, self.images), self.labels)
        if any(True for _ in sparse_modules(net)):
            record["compression"] = sparsity_report(net)["compression"]


@dataclass
class Hooks(Callback):
    """Plain functions as a callback (``train``'s shorthand arguments)."""

    start: Callable[[History], None] | None = None
    epoch_end: Callable[[dict[str, float]], None] | None = None
    step: AfterStep | None = None

    def on_start(self, history: History) -> None:
        if self.start is not None:
            self.start(history)

    def on_step(self, net: nn.Module, optimizer: torch.optim.Optimizer | None, step: int) -> None:
        if self.step is not None:
            self.step(net, optimizer, step)

    def on_epoch_saved(self, record: dict[str, float]) -> None:
        if self.epoch_end is not None:
            self.epoch_end(record)


def _bar(iterable: range, progress: bool | None, **kwargs: Any) -> Any:
    """A tqdm bar over ``iterable`` (only on a terminal when ``progress`` is None), or none."""
    if progress is False:
        return iterable
    return tqdm(iterable, disable=None if progress is None else False, **kwargs)


def _as_tensor(name: str, value: Any) -> Tensor:
    if isinstance(value, np.ndarray):  # numpy data is welcome; it shares memory
        return torch.from_numpy(value)
    if not isinstance(value, Tensor):
        raise TypeError(f"Expected {name} as a torch.Tensor, got {type(value).__name__}.")
    return value


def check_data(net: nn.Module, images: Any, labels: Any, what: str = "training") -> tuple:
    """``(images, labels)`` as tensors, after checking that ``net`` can learn from them.

    One forward pass on two examples (no gradient, the RNG untouched) checks the input
    shape and finds the number of classes that the labels must index.

    Raises:
        TypeError: not tensors (or numpy arrays), or labels that are not integers.
        ValueError: sizes that differ, inputs the network cannot take, labels outside
            ``[0, classes)``, or a network without sparse layers.
    """
    images, labels = _as_tensor(f"{what} images", images), _as_tensor(f"{what} labels", labels)
    if images.shape[0] != labels.shape[0] or labels.dim() != 1:
        raise ValueError(
            f"Expected one label per {what} image, got {tuple(images.shape)} images and "
            f"{tuple(labels.shape)} labels."
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(
            f"Expected integer class labels, got {what} labels of dtype {labels.dtype}. "
            "Convert them with labels.long()."
        )
    if images.shape[0] == 0:
        raise ValueError(f"Expected at least one {what} example, got none.")
    if images.is_floating_point() and not bool(torch.isfinite(images).all()):
        bad = int((~torch.isfinite(images.flatten(1))).any(1).sum())
        raise ValueError(
            f"{bad} {what} images hold NaN or infinite values. Clean or drop them first."
        )
    classes = _num_outputs(net, images[:2], what)
    bad = labels[(labels < 0) | (labels >= classes)]
    if bad.numel():
        raise ValueError(
            f"{what.capitalize()} labels must be class indices 0..{classes - 1} for a "
            f"network with {classes} outputs; {bad.numel()} labels are outside, e.g. "
            f"{sorted(set(bad.tolist()))[:5]}. Fix the labels or the network's output size."
        )
    return images, labels.long()


def _num_outputs(net: nn.Module, example: Tensor, what: str) -> int:
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = net(example.to(_device(net)))
    except (RuntimeError, ValueError) as err:
        raise ValueError(
            f"The network cannot take the {what} images of shape {tuple(example.shape[1:])}: {err}"
        ) from err
    finally:
        net.train(was_training)
    if out.dim() != 2:
        raise ValueError(
            f"Expected the network to output logits of shape (N, classes), got "
            f"{tuple(out.shape)} for {what} images of shape {tuple(example.shape)}."
        )
    return out.shape[1]


def _device(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


def _training_data(net: nn.Module, images: Any, labels: Any) -> TensorData | DatasetData:
    """The training set as the loop reads it, after :func:`check_data`'s checks (for a
    dataset: of its first examples, and of each batch's labels as it is read)."""
    if isinstance(images, (Dataset, DataLoader)):
        dataset = check_dataset(images, labels)
        tensors = dataset_tensors(dataset)
        if tensors is not None:
            return TensorData(*check_data(net, *tensors))
        first = DatasetData(dataset, classes=0)
        examples = [first.example(i) for i in range(min(2, len(first)))]
        x = torch.utils.data.default_collate([x for x, _ in examples])
        data = DatasetData(dataset, _num_outputs(net, torch.as_tensor(x), "training"))
        data.batch(torch.arange(len(examples)))  # checks the labels
        return data
    if labels is None:
        raise TypeError(
            f"Expected labels with the training images, got images of type "
            f"{type(images).__name__} and no labels. Pass train(net, images, labels), or a "
            "torch.utils.data.Dataset of (input, label) pairs in place of the images."
        )
    return TensorData(*check_data(net, images, labels))


def _first_nonfinite(net: nn.Module) -> str | None:
    """The name of a NaN/inf parameter of ``net``, if any.

    One sum per tensor (a read pass, far cheaper than the step) flags a problem; only
    then is each tensor checked, since a sum of large finite values can overflow.
    """
    named = list(net.named_parameters())
    total = torch.stack([p.detach().sum() for _, p in named]).sum()
    if bool(torch.isfinite(total)):
        return None
    return next((n for n, p in named if not bool(torch.isfinite(p).all())), None)


def _mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    def show(value: Any) -> str:  # fingerprints are long; their first digits tell them apart
        return f"{value[:12]}..." if isinstance(value, str) and len(value) == 64 else repr(value)

    keys = sorted(set(saved) | set(current))
    return [
        f"{k} is {show(saved.get(k))} there and {show(current.get(k))} here"
        for k in keys
        if saved.get(k) != current.get(k)
    ]


class _Trainer:
    """The state of one training run: network, objective, optimiser, history."""

    def __init__(
        self,
        net: nn.Module,
        data: TensorData | DatasetData,
        *,
        epochs: int,
        batch_size: int,
        lr: float,
        schedule: Schedule,
        seed: int,
        settings: dict[str, Any],
        objective: Objective,
        callbacks: Sequence[Callback] = (),
        ema: float | None = None,
    ) -> None:
        self.net, self.data, self.device = net, data, _device(net)
        self.parallel = DataParallel.current(self.device)
        objective.parallel = self.parallel
        self.callbacks = list(callbacks)
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.schedule, self.seed, self.settings = schedule, seed, settings
        self.objective = objective
        self.history = History()
        self.start = time.perf_counter()
        self.earlier_wall = 0.0  # seconds of the sessions before this one
        self.kl_weight, self.lr_factor = 0.0, 1.0  # of the current step
        self.checkpoint: Path | None = None
        self.average = None if ema is None else ParameterAverage(net, ema)

    def restore(self, path: Path, state: dict[str, Any]) -> None:
        if state.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(
                f"Checkpoint {str(path)!r} has format version {state.get('version')!r}; "
                f"this version of bayessparse reads {CHECKPOINT_VERSION}. Start a new run."
            )
        different = _mismatches(state["settings"], self.settings)
        if different:
            raise CheckpointError(
                f"Checkpoint {str(path)!r} is from a different run: "
                + "; ".join(different)
                + ". Resume with the same settings and data, or start a new run elsewhere."
            )
        self.net.load_state_dict(state["net"])
        self.objective.load_state_dict(state["optim"])
        if self.parallel is not None:
            self._set_rng_state(state["rank_rngs"][self.parallel.rank])
        else:
            self._set_rng_state([state["rng"], *state.get("device_rng", [])])
        if self.average is not None:
            self.average.load_state_dict(state["average"])
        self.history.epochs = state["history"]
        self.history.sessions = state["sessions"]
        self.earlier_wall = state["wall_seconds"]

    def save(self, path: Path) -> None:
        """Write the checkpoint (rank 0 only; every rank must call, for their RNG states)."""
        rngs = self._rng_state()
        state = {
            "version": CHECKPOINT_VERSION,
            "settings": self.settings,
            "net": self.net.state_dict(),
            "optim": self.objective.state_dict(),
            "rng": rngs[0],
            **({"device_rng": rngs[1:]} if len(rngs) > 1 else {}),
            "history": self.history.epochs,
            "sessions": self.history.sessions,
            "wall_seconds": self.wall_seconds(),
        }
        if self.average is not None:
            state["average"] = self.average.state_dict()
        if self.parallel is None:
            save_checkpoint(state, path)
            return
        state["rank_rngs"] = self.parallel.gather_object(rngs)
        if self.parallel.rank == 0:
            save_checkpoint(state, path)
        self.parallel.barrier()

    def _rng_state(self) -> list[Tensor]:
        """The run's random state: the CPU generator's, and the GPU's when training on one."""
        if self.device.type == "cuda":
            return [torch.get_rng_state(), torch.cuda.get_rng_state(self.device)]
        return [torch.get_rng_state()]

    def _set_rng_state(self, states: list[Tensor]) -> None:
        torch.set_rng_state(states[0])
        if self.device.type == "cuda" and len(states) > 1:
            torch.cuda.set_rng_state(states[1], self.device)

    def wall_seconds(self) -> float:
        return self.earlier_wall + time.perf_counter() - self.start

    def batches(self, epoch: int) -> Iterator[Tensor]:
        """The example indices of each batch (this rank's share of each global batch)."""
        # The order depends on (seed, epoch) only, so a resumed run sees the same batches.
        epoch_rng = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.data), generator=epoch_rng)
        if self.parallel is None:
            return iter(order.split(self.batch_size))
        return map(self.parallel.shard, order.split(self.batch_size))

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        x, y = self.data.batch(indices)
        return x.to(self.device), y.to(self.device)

    def after_step(self, step: int) -> None:
        """Call the step hooks; with several processes, from one random stream shared by
        all ranks, then with rank 0's buffers (masks) on every rank."""
        if self.parallel is None:
            for callback in self.callbacks:
                callback.on_step(self.net, self.objective.optimizer, step)
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed((self.seed * 1_000_003 + step) % 2**63)
            for callback in self.callbacks:
                callback.on_step(self.net, self.objective.optimizer, step)
        buffers = list(self.net.buffers())
        if buffers:
            self.parallel.broadcast_(buffers)

    def run_epoch(self, epoch: int, progress: bool | None) -> dict[str, float]:
        self.net.train()
        start = time.perf_counter()
        num_batches = math.ceil(len(self.data) / self.batch_size)
        data_sum = kl_sum = 0.0
        bar = _bar(range(num_batches), progress, desc=f"epoch {epoch + 1}", leave=False)
        for i, idx in zip(bar, self.batches(epoch), strict=True):
            now = epoch + i / num_batches
            self.kl_weight = self.schedule.kl_weight(now)
            self.lr_factor = self.schedule.lr_factor(now, self.epochs)
            # Pyro's checks run on the first step; after that the data and model are known.
            x, y = self.batch(idx)
            with pyro.validation_enabled(epoch == 0 and i == 0):
                loss = self.objective.step(x, y, self.kl_weight, self.lr_factor)
            self._check_step(loss, epoch, i, x)
            self.after_step(epoch * num_batches + i)
            if self.average is not None:
                self.average.update()
            data_term, complexity = self.objective.last_terms
            data_sum += data_term
            kl_sum += complexity
            if isinstance(bar, tqdm) and i % 50 == 0:
                bar.set_postfix(data=f"{data_term:.4g}", kl=f"{complexity:.4g}")
        return {
            "epoch": epoch + 1,
            "data_term": data_sum / num_batches,
            "kl": kl_sum / num_batches,
            "kl_weight": self.kl_weight,
            "lr": self.lr * self.lr_factor,
            "train_seconds": time.perf_counter() - start,
        }

    def _check_step(self, loss: float, epoch: int, batch: int, x: Tensor) -> None:
        bad = _first_nonfinite(self.net)
        if bad is None and math.isfinite(loss):
            return
        where = f"at epoch {epoch + 1}, batch {batch + 1}"
        lr = self.lr * self.lr_factor
        data_term, complexity = self.objective.last_terms
        dtype = next(self.net.parameters()).dtype
        if not bool(torch.isfinite(x).all()):
            reason = f"the training images of the batch {where} hold NaN or inf values"
            fix = "Clean the data"
        elif dtype in (torch.float16, torch.bfloat16):
            reason = (
                f"the loss overflowed in {dtype} {where} (data term {data_term:.4g}, "
                f"KL {complexity:.4g}: the KL of a large network exceeds float16)"
            )
            fix = "Train in float32 (net.float() and float32 images)"
        elif bad is not None:
            reason = f"parameter {bad!r} became NaN or inf {where} (learning rate {lr:g})"
            fix = "Lower the learning rate"
        else:
            reason = (
                f"the loss became {loss} {where} with finite parameters (data term "
                f"{data_term:.4g}, KL {complexity:.4g})"
            )
            fix = "Lower the learning rate or check the model"
        if self.checkpoint is None:
            kept = ""
        elif self.history.completed:
            kept = f"; the checkpoint of epoch {self.history.completed} is intact"
        else:
            kept = "; no epoch was completed, so there is no checkpoint"
        raise TrainingDiverged(f"Training stopped: {reason}. {fix}{kept}.")


def train(
    net: nn.Module,
    images: Tensor | Dataset,
    labels: Tensor | None = None,
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
    on_start: Callable[[History], None] | None = None,
    progress: bool | None = None,
    objective: str = "auto",
    penalty: Callable[[nn.Module], Tensor | None] | None = None,
    teacher: Teacher | None = None,
    optimizer: str = "adam",
    after_step: AfterStep | None = None,
    callbacks: Sequence[Callback] = (),
    ema: float | None = None,
) -> History:
    """Train a classifier, one epoch at a time: a Bayesian sparse one by SVI
    (``Trace_ELBO``, Adam), a plain one by Adam on the cross-entropy (plus a penalty).

    After every epoch the full training state (network, optimizer, RNG, history) is
    written atomically to ``checkpoint``, with a checksum; with ``resume=True`` training
    continues from the last completed epoch there, with the same result as an
    uninterrupted run. The checkpoint's folder belongs to this run while it trains
    (:class:`~bayessparse.training.RunFolder`). Each epoch's record holds the mean data
    term (``N * mean CE``), the mean KL, the KL weight, the learning rate and, given
    ``eval_data``, the test error and compression.

    Every step is checked: a NaN or infinite loss or parameter stops training with
    :class:`TrainingDiverged`, leaving the last checkpoint as it was.

    Under an initialised ``torch.distributed`` process group of several processes (e.g.
    started by ``torchrun``), each process trains on its own share of every global batch
    and the gradients are all-reduced: see :mod:`bayessparse.training.distributed`.
    ``batch_size`` is then the global batch size; checkpoints are written by rank 0.

    Args:
        net: a network with sparse layers; trained in place (batches are moved to its
            device).
        images, labels: the training set (tensors or numpy arrays), or a map-style
            ``torch.utils.data.Dataset`` of ``(input, label)`` pairs in place of
            ``images`` (``labels`` left out), read by index in the loop's own order.
        epochs: total number of epochs (including those already done when resuming).
        batch_size: mini-batch size.
        lr: Adam learning rate before the schedule's factor.
        schedule: KL warm-up and learning-rate decay (default: no warm-up, linear decay
            over the second half).
        seed: seeds the mini-batch order of each epoch and the noise, in [0, 2**32).
        checkpoint: file for the per-epoch checkpoints (``None``: no checkpoints).
        resume: continue from ``checkpoint`` if it exists.
        meta: further settings that change the result (e.g. the model), stored in the
            checkpoint and checked on resume together with ``epochs``, ``batch_size``,
            ``lr``, ``schedule``, ``seed`` and a fingerprint of the training data.
        eval_data: ``(images, labels)`` evaluated after every epoch.
        on_epoch_end: called with each epoch's record.
        on_start: called with the history (empty, or restored from the checkpoint) once
            every check has passed, before the first epoch.
        progress: show tqdm bars (``None``: only on a terminal).
        objective: ``"svi"`` (:class:`~bayessparse.training.SVIObjective`),
            ``"supervised"`` (:class:`~bayessparse.training.SupervisedObjective`), or
            ``"auto"``: SVI when ``net`` has Bayesian sparse layers, else supervised.
        penalty: the supervised objective's complexity term, ``penalty(net)``, weighted
            by the schedule's KL weight (e.g. an L1 norm).
        teacher: distil from a trained network (:class:`~bayessparse.training.Teacher`,
            supervised objective only); its temperature, alpha and weights are settings.
        optimizer: the supervised objective's optimiser: ``"adam"``, or ``"sgd"`` with
            momentum 0.9 and weight decay 5e-4 (the pruning papers' recipe; give it
            ``lr=0.1``). SVI trains with Adam.
        after_step: called after every optimiser step as ``after_step(net, optimizer,
            step)`` with the torch optimiser (``None`` under SVI) and the step counted
            from the run's start (e.g. a pruning schedule, or a proximal update).
        callbacks: further :class:`Callback` objects, called after the shorthands above
            in the order given.
        ema: keep an exponential moving average of the parameters with this decay (e.g.
            0.999, the official L0 MLP's): the epochs' evaluations and callbacks see the
            averaged parameters, and the network ends with them.

    The run draws its random numbers (batch noise, dropout) from its own stream, seeded
    by ``seed`` and saved in checkpoints: the caller's global torch RNG is left as it was.

    Returns:
        The :class:`History` of all completed epochs.

    Raises:
        CheckpointExists: ``checkpoint`` exists and ``resume`` is false.
        CheckpointError: the checkpoint is damaged or from a run with other settings or data.
        RunFolderBusy: another process is training into the same folder.
        StorageError: a checkpoint could not be written (e.g. the disk is full).
        TrainingDiverged: the loss or a parameter became NaN or infinite.
        ValueError, TypeError: bad options or data (before any training).
    """
    _check_numbers(epochs, batch_size, lr, seed)
    ema = check_decay(ema)
    keep_freed_memory()  # large tensors reused, not faulted in afresh every step
    data = _training_data(net, images, labels)
    chosen = make_objective(objective, net, len(data), float(lr), penalty, teacher, optimizer)
    if eval_data is not None:
        eval_data = check_data(net, *eval_data, what="evaluation")
    schedule = schedule or Schedule()
    settings = {
        **(meta or {}),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": float(lr),
        "kl_warmup": list(schedule.kl_warmup),
        "lr_decay_start": schedule.lr_decay_start,
        "seed": seed,
        "training_data": data.fingerprint(),
        "objective": type(chosen).__name__,
        **({"ema": ema} if ema is not None else {}),
        **({"teacher": _teacher_settings(teacher)} if teacher is not None else {}),
    }
    trainer = _Trainer(
        net,
        data,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        schedule=schedule,
        seed=seed,
        settings=settings,
        objective=chosen,
        ema=ema,
        callbacks=[
            *([Evaluate(*eval_data)] if eval_data is not None else []),
            Hooks(on_start, on_epoch_end, after_step),
            *callbacks,
        ],
    )
    if trainer.parallel is not None:
        trainer.parallel.check_batches(len(data), batch_size)
        settings["world_size"] = trainer.parallel.world
    if checkpoint is None:
        return _fit(trainer, None, progress)
    path = trainer.checkpoint = Path(checkpoint)
    parallel = trainer.parallel
    with ExitStack() as folder:
        state: dict[str, Any] | None = None
        failure: Exception | None = None
        if parallel is None or parallel.rank == 0:  # rank 0 owns the folder and the file
            try:
                folder.enter_context(RunFolder(path.parent))
                state = _checkpoint_to_resume(path, resume)
            except (RunFolderBusy, CheckpointError, CheckpointExists) as err:
                failure = err
        if parallel is not None:  # the other ranks resume from rank 0's copy, or fail alike
            state, failure = parallel.broadcast_object((state, failure))
        if failure is not None:
            raise failure
        if state is not None:
            trainer.restore(path, state)
        return _fit(trainer, path, progress)


def _check_numbers(epochs: Any, batch_size: Any, lr: Any, seed: Any) -> None:
    """Refuse counts, learning rates and seeds out of range, naming the value."""
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Expected {name} to be a positive integer, got {value!r}.")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ValueError(f"Expected a finite, positive learning rate, got lr={lr!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"Expected seed to be an integer in [0, 2**32), got {seed!r}.")


def _teacher_settings(teacher: Teacher) -> dict[str, Any]:
    """What of a teacher changes the result: checked on resume like the other settings."""
    return {
        "temperature": teacher.temperature,
        "alpha": teacher.alpha,
        "weights": fingerprint(*teacher.net.state_dict().values()),
    }


def _checkpoint_to_resume(path: Path, resume: bool) -> dict[str, Any] | None:
    if not path.exists():
        if resume:
            warnings.warn(
                f"No checkpoint at {str(path)!r} to resume; starting from scratch.",
                stacklevel=3,
            )
        return None
    if not resume:
        raise CheckpointExists(
            f"Checkpoint {str(path)!r} already exists. Pass resume=True to continue "
            "it, or choose another checkpoint path."
        )
    return load_checkpoint(path)


def _fit(trainer: _Trainer, path: Path | None, progress: bool | None) -> History:
    # The run's own random stream: restored from the checkpoint or seeded, never the caller's.
    devices = [trainer.device] if trainer.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return _fit_epochs(trainer, path, progress)


def _fit_epochs(trainer: _Trainer, path: Path | None, progress: bool | None) -> History:
    history, net = trainer.history, trainer.net
    for callback in trainer.callbacks:
        callback.on_start(history)
    history.sessions += 1
    parallel = trainer.parallel
    if parallel is not None:
        parallel.broadcast_state_(net)  # one starting point, whatever each rank built
    if history.completed == 0:
        torch.manual_seed(trainer.seed if parallel is None else parallel.stream_seed(trainer.seed))
    epoch_bar = _bar(
        range(history.completed, trainer.epochs),
        progress,
        initial=history.completed,
        total=trainer.epochs,
        desc="epochs",
        unit="ep",
    )
    for epoch in epoch_bar:
        record = trainer.run_epoch(epoch, progress)
        with trainer.average.applied() if trainer.average else nullcontext():
            for callback in trainer.callbacks:
                callback.on_epoch_end(net, record)
        history.epochs.append(record)
        if path is not None:
            trainer.save(path)
        if isinstance(epoch_bar, tqdm) and "test_error" in record:
            epoch_bar.set_postfix(
                err=f"{record['test_error']:.2%}", comp=f"{record.get('compression', 1):.1f}x"
            )
        for callback in trainer.callbacks:
            callback.on_epoch_saved(record)
    if trainer.average is not None:
        trainer.average.apply_()
    history.wall_seconds = trainer.wall_seconds()
    return history
