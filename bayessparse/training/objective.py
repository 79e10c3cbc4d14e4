"""The Pyro model of a sparse classifier: what SVI optimises."""

from __future__ import annotations

import math
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import Tensor, nn

from bayessparse.infer import SparseGuide, kl


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
