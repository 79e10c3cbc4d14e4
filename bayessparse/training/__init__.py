"""Training sparse networks by SVI, with progress bars and checkpoints that survive crashes.

- :mod:`~bayessparse.training.objective`: what a step minimises: the ELBO of a Bayesian
  net by SVI (:class:`SVIObjective`), or a plain loss (:class:`SupervisedObjective`;
  :class:`DistillationObjective` learns from a :class:`Teacher`);
- :mod:`~bayessparse.training.loop`: :func:`train`, one epoch at a time, every step checked;
  :class:`Callback` hooks for what happens around it (evaluation, logging, a pruning
  method's per-step work);
- :mod:`~bayessparse.training.data`: the training set as the loop reads it (tensors, or
  a map-style ``Dataset`` read by index in the loop's seeded order);
- :mod:`~bayessparse.training.distributed`: data-parallel training over processes and
  machines (``torch.distributed``, started by ``torchrun``);
- :mod:`~bayessparse.training.storage`: atomic writes, verified checkpoints, and
  :class:`RunFolder`, a directory owned by one run at a time;
- :mod:`~bayessparse.training.allocator`: :func:`keep_freed_memory`, glibc's malloc set to
  reuse large freed blocks (a step's weight-sized tensors are not fresh pages each time).
"""

from bayessparse.training.allocator import keep_freed_memory
from bayessparse.training.loop import (
    Callback,
    CheckpointExists,
    Evaluate,
    History,
    Hooks,
    Schedule,
    TrainingDiverged,
    check_data,
    train,
)
from bayessparse.training.objective import (
    DistillationObjective,
    Objective,
    SparseClassifier,
    SupervisedObjective,
    SVIObjective,
    Teacher,
    make_objective,
)
from bayessparse.training.storage import (
    CheckpointError,
    RunFolder,
    RunFolderBusy,
    StorageError,
    atomic_write,
    fingerprint,
    load_checkpoint,
    save_checkpoint,
    to_strict_json,
)

__all__ = [
    "Callback",
    "CheckpointError",
    "CheckpointExists",
    "DistillationObjective",
    "Evaluate",
    "History",
    "Hooks",
    "Objective",
    "RunFolder",
    "RunFolderBusy",
    "SVIObjective",
    "Schedule",
    "SparseClassifier",
    "StorageError",
    "SupervisedObjective",
    "Teacher",
    "TrainingDiverged",
    "atomic_write",
    "check_data",
    "fingerprint",
    "keep_freed_memory",
    "load_checkpoint",
    "make_objective",
    "save_checkpoint",
    "to_strict_json",
    "train",
]
