"""Pruning selection shared by every method: scores in, boolean keep masks out.

The Bayesian layers score weights by ``keep_prob()`` (:mod:`bayessparse.masks`); classical
methods score them by importance. Both end in :func:`select`, which needs only torch.
"""

from bayessparse.sparsity.selection import (
    SCOPES,
    Scores,
    check_selection,
    check_sparsity,
    check_threshold,
    select,
    weight_mask,
)

__all__ = [
    "SCOPES",
    "Scores",
    "check_selection",
    "check_sparsity",
    "check_threshold",
    "select",
    "weight_mask",
]
