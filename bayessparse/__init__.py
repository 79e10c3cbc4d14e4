"""bayessparse: Bayesian sparsification of neural networks with PyTorch and Pyro.

Swap a network's layers for Bayesian sparse ones (:func:`to_sparse_`), train them by SVI
with the KL of :func:`kl` and a :class:`SparseGuide` (empty unless a layer has latent
sites, like the horseshoe scales), then threshold the posterior into a
deterministic pruned network (:func:`masks`, :func:`to_dense`, :func:`sparsity_report`)
or a physically smaller one (:func:`compact`), by threshold or to a target sparsity
(:mod:`bayessparse.sparsity`). :func:`predict` samples the masked posterior, and
:func:`export` writes the pruned network as a file that torch alone can run.
"""

from bayessparse import distributions, nn, sparsity
from bayessparse.compaction import compact
from bayessparse.convert import sparse_modules, to_sparse_
from bayessparse.export import export
from bayessparse.infer import (
    EmptyGuide,
    JointOptim,
    Prediction,
    SparseGuide,
    kl,
    predict,
    project_,
)
from bayessparse.masks import keep_probs, masks, sparsity_report, to_dense
from bayessparse.nn import SparseModule

__version__ = "0.1.0"

__all__ = [
    "EmptyGuide",
    "JointOptim",
    "Prediction",
    "SparseGuide",
    "SparseModule",
    "__version__",
    "compact",
    "distributions",
    "export",
    "keep_probs",
    "kl",
    "masks",
    "nn",
    "predict",
    "project_",
    "sparse_modules",
    "sparsity",
    "sparsity_report",
    "to_dense",
    "to_sparse_",
]
