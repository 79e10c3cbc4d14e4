"""The sparsification literature's pruning methods behind one interface.

A method scores weights (:class:`PruningMethod`); the shared selector of
:mod:`bayessparse.sparsity` makes the masks; :func:`prune` applies them in
:mod:`torch.nn.utils.prune` format and returns them keyed like ``state_dict``.
:func:`methods` lists the registered names.
"""

from bayessparse.pruning import magnitude  # noqa: F401  (registers the methods)
from bayessparse.pruning.at_init import SNIP, GraSP, SNIPOrthogonal
from bayessparse.pruning.base import (
    POLICIES,
    STAGES,
    PruningMethod,
    apply_masks_,
    compute_masks,
    prunable_layers,
    prune,
    set_masks_,
)
from bayessparse.pruning.dynamic import DSR, SET, DeepR, RigL, layer_counts
from bayessparse.pruning.magnitude import (
    GradualMagnitude,
    LotteryTicket,
    LotteryTicketIterative,
    Magnitude,
    MagnitudeIterative,
    MagnitudeReinit,
    Random,
    cubic_sparsity,
)
from bayessparse.pruning.policies import reinit_, rewind_, round_sparsities, snapshot
from bayessparse.pruning.registry import get_method, methods, register
from bayessparse.pruning.regularisation import L1, L2, Decorrelation, GroupLasso, SensitivityDriven
from bayessparse.pruning.second_order import OBD, KronOBD, KronOBS, LayerwiseOBS, eigendamage
from bayessparse.pruning.structured import FilterL1, NetworkSlimming, SparseStructureSelection
from bayessparse.pruning.supermask import (
    FilterL2,
    RandomUnit,
    Supermask,
    paganini_forde_grid,
    rewind_to_sign_,
    zero_pruned_,
)

__all__ = [
    "DSR",
    "L1",
    "L2",
    "OBD",
    "POLICIES",
    "SET",
    "SNIP",
    "STAGES",
    "Decorrelation",
    "DeepR",
    "FilterL1",
    "FilterL2",
    "GraSP",
    "GradualMagnitude",
    "GroupLasso",
    "KronOBD",
    "KronOBS",
    "LayerwiseOBS",
    "LotteryTicket",
    "LotteryTicketIterative",
    "Magnitude",
    "MagnitudeIterative",
    "MagnitudeReinit",
    "NetworkSlimming",
    "PruningMethod",
    "Random",
    "RandomUnit",
    "RigL",
    "SNIPOrthogonal",
    "SensitivityDriven",
    "SparseStructureSelection",
    "Supermask",
    "apply_masks_",
    "compute_masks",
    "cubic_sparsity",
    "eigendamage",
    "get_method",
    "layer_counts",
    "methods",
    "paganini_forde_grid",
    "prunable_layers",
    "prune",
    "register",
    "reinit_",
    "rewind_",
    "rewind_to_sign_",
    "round_sparsities",
    "set_masks_",
    "snapshot",
    "zero_pruned_",
]
