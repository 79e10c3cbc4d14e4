"""Multi-head attention whose input and output projections are Bayesian sparse layers.

``nn.MultiheadAttention`` holds its input projection as a bare Parameter
(``in_proj_weight``) and reads ``out_proj.weight`` directly, never calling ``out_proj``:
a sparse layer put in its place would be bypassed (no noise, no gates, no masks). Here
both projections are sparse ``Linear`` layers that are *called*, and the attention
itself is torch's own (``F.multi_head_attention_forward``) with identity projections, so
masks, dropout, ``bias_k``/``bias_v``, ``add_zero_attn`` and ``is_causal`` behave as in
``nn.MultiheadAttention``. :meth:`SparseMultiheadAttention.to_torch` gives the plain
``nn.MultiheadAttention`` back (what :func:`~bayessparse.to_dense` and export use).

torch's fused inference paths (``nn.MultiheadAttention``'s and
``nn.TransformerEncoderLayer``'s "fast path") read the weights directly too, so they are
turned off in encoder layers holding sparse layers (:func:`disable_fused_paths_`) and
turned back on in their plain copies (:func:`restore_fused_paths_`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import prune

from bayessparse.nn.base import SparseModule

# The instance attribute nn.TransformerEncoderLayer (and nn.TransformerEncoder, through its
# first layer) checks before taking the fused path: 0 means "not ReLU or GELU", no fast path.
_FUSED_FLAG = "activation_relu_or_gelu"
_SAVED_FLAG = "_bayessparse_activation_relu_or_gelu"


class SparseMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (``kdim == vdim == embed_dim``) with sparse projections.

    ``in_proj`` is a sparse ``Linear(embed_dim, 3 * embed_dim)`` holding the old
    ``in_proj_weight`` and ``in_proj_bias`` (the same Parameter objects), ``out_proj`` the
    sparse ``out_proj``. For self-attention (``query is key is value``) the input
    projection is one call; otherwise query, key and value are projected by separate
    calls, each keeping its third of the output. The identity projections given to
    torch's attention cost two extra products of size embed_dim² per token in training and
    evaluation; the plain network from :meth:`to_torch` has none.
    """

    def __init__(
        self, attention: nn.MultiheadAttention, in_proj: SparseModule, out_proj: SparseModule
    ):
        super().__init__()
        self.embed_dim, self.num_heads = attention.embed_dim, attention.num_heads
        self.head_dim, self.dropout = attention.head_dim, attention.dropout
        self.batch_first, self.add_zero_attn = attention.batch_first, attention.add_zero_attn
        self.kdim, self.vdim = attention.kdim, attention.vdim
        self._qkv_same_embed_dim = True
        self.bias_k, self.bias_v = attention.bias_k, attention.bias_v
        self.in_proj, self.out_proj = in_proj, out_proj
        self.train(attention.training)

    @property
    def in_proj_weight(self) -> Tensor:
        """The input projection's posterior mean θ (read by torch's fast-path checks)."""
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> Tensor | None:
        return self.in_proj.bias

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> list[Tensor]:
        if query is key and key is value:
            return list(self.in_proj(query).chunk(3, dim=-1))
        return [self.in_proj(x).chunk(3, dim=-1)[i] for i, x in enumerate((query, key, value))]

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """As :meth:`torch.nn.MultiheadAttention.forward`."""
        q, k, v = self._project(query, key, value)
        batched_first = self.batch_first and query.dim() == 3
        if batched_first:  # torch's functional attention takes (L, N, E)
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        eye = torch.eye(self.embed_dim, dtype=q.dtype, device=q.device)
        output, weights = F.multi_head_attention_forward(
            q,
            k,
            v,
            self.embed_dim,
            self.num_heads,
            None,  # in_proj_weight: the separate identity projections below
            None,
            self.bias_k,
            self.bias_v,
            self.add_zero_attn,
            self.dropout,
            eye,  # out_proj_weight: out_proj is applied after, as a layer
            None,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            use_separate_proj_weight=True,
            q_proj_weight=eye,
            k_proj_weight=eye,
            v_proj_weight=eye,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        output = self.out_proj(output)
        return (output.transpose(0, 1) if batched_first else output), weights

    def to_torch(self) -> nn.MultiheadAttention:
        """The plain ``nn.MultiheadAttention`` once ``in_proj`` and ``out_proj`` are plain
        ``nn.Linear`` layers (masks in :mod:`torch.nn.utils.prune` format are carried over).

        Raises:
            TypeError: if a projection is still a sparse layer.
        """
        for layer in (self.in_proj, self.out_proj):
            if isinstance(layer, SparseModule) or not isinstance(layer, nn.Linear):
                raise TypeError(
                    f"Expected plain nn.Linear projections, got {type(layer).__name__}. Call "
                    "bayessparse.to_dense(net) to turn the whole network plain."
                )
        weight = self.in_proj.weight
        attention = nn.MultiheadAttention(
            self.embed_dim,
            self.num_heads,
            dropout=self.dropout,
            bias=self.in_proj.bias is not None,
            add_bias_kv=self.bias_k is not None,
            add_zero_attn=self.add_zero_attn,
            batch_first=self.batch_first,
            device=weight.device,
            dtype=weight.dtype,
        )
        attention.bias_k, attention.bias_v = self.bias_k, self.bias_v
        _copy_linear(self.in_proj, attention, "in_proj_weight", "in_proj_bias")
        _copy_linear(self.out_proj, attention.out_proj, "weight", "bias")
        return attention.train(self.training)


def _copy_linear(source: nn.Module, target: nn.Module, weight_name: str, bias_name: str) -> None:
    """Copy a plain Linear's weight and bias into ``target``'s parameters of those names,
    with their :mod:`torch.nn.utils.prune` masks when ``source`` has them."""
    for name, target_name in (("weight", weight_name), ("bias", bias_name)):
        mask = source._buffers.get(f"{name}_mask")
        orig = source._parameters.get(f"{name}_orig")
        value: Tensor | None = source._parameters.get(name)
        if orig is not None and mask is not None:
            value = orig.detach() * mask
        if value is None:
            continue
        with torch.no_grad():
            getattr(target, target_name).copy_(value)
        if orig is not None and mask is not None:
            prune.custom_from_mask(target, target_name, mask)


def in_proj_shell(attention: nn.MultiheadAttention) -> nn.Linear:
    """An ``nn.Linear(embed_dim, 3 * embed_dim)`` holding ``attention``'s input projection
    Parameters (the objects, so ties and references hold), to convert like any Linear."""
    e = attention.embed_dim
    shell = nn.Linear(e, 3 * e, bias=attention.in_proj_bias is not None, device="meta")
    shell.weight = attention.in_proj_weight
    if attention.in_proj_bias is not None:
        shell.bias = attention.in_proj_bias
    return shell


def convertible(attention: nn.MultiheadAttention) -> bool:
    """Whether :class:`SparseMultiheadAttention` can take ``attention``'s place: one packed
    input projection (``kdim == vdim == embed_dim``), not pruned by torch's prune."""
    return attention._qkv_same_embed_dim and "in_proj_weight" in attention._parameters


def disable_fused_paths_(net: nn.Module) -> None:
    """Turn off torch's fused inference path in every ``nn.TransformerEncoderLayer`` of
    ``net`` that holds sparse layers: it reads ``linear1.weight`` and the attention's
    weights directly, bypassing the sparse layers' gates and masks."""
    for module in net.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and any(
            isinstance(m, (SparseModule, SparseMultiheadAttention)) for m in module.modules()
        ):
            if _SAVED_FLAG not in module.__dict__:
                module.__dict__[_SAVED_FLAG] = getattr(module, _FUSED_FLAG, 0)
            setattr(module, _FUSED_FLAG, 0)


def restore_fused_paths_(net: nn.Module) -> None:
    """Undo :func:`disable_fused_paths_` in a network whose layers are plain again."""
    for module in net.modules():
        saved: Any = module.__dict__.pop(_SAVED_FLAG, None)
        if saved is not None:
            setattr(module, _FUSED_FLAG, saved)
