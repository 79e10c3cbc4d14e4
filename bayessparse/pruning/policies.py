"""How the survivors of a prune are trained on: retain, rewind or reinitialise; and the
per-round targets of iterative pruning.

The benchmark harness applies a method's ``policy`` (:data:`~bayessparse.pruning.POLICIES`)
after each prune: ``"retain"`` keeps the trained values (nothing to do here),
``"rewind"`` resets them to a :func:`snapshot` taken earlier (:func:`rewind_`) and
``"reinit"`` draws them afresh (:func:`reinit_`). Masks are never touched: the pruned
weights stay pruned, only the values under the masks change.

Pruned tensors are stored by :mod:`torch.nn.utils.prune` as ``weight_orig`` (a parameter)
and ``weight_mask`` (a buffer), with ``weight = weight_orig * weight_mask`` recomputed
before every forward. Snapshots name ``weight_orig`` plain ``weight``, so that one taken
before pruning restores the pruned net.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.utils.prune import BasePruningMethod

from bayessparse.pruning.base import param_key, recompute_pruned_
from bayessparse.sparsity import check_sparsity


def snapshot(net: nn.Module) -> dict[str, Tensor]:
    """A detached copy of ``net``'s state, masks aside, to rewind to later.

    Keys are those of ``state_dict`` with a pruned tensor's ``<name>_orig`` stored as
    ``<name>`` and its ``<name>_mask`` left out, so snapshots of a net before and after
    pruning have the same keys. Buffers (e.g. BatchNorm statistics) are included: like
    OpenLTH, rewinding restores the whole state of the saved iterate.

    Args:
        net: any module, pruned in :mod:`torch.nn.utils.prune` format or not.

    Returns:
        ``{key: tensor}``, clones that later training leaves unchanged.
    """
    return {key: tensor.detach().clone() for key, tensor in _live_state(net).items()}


def rewind_(net: nn.Module, saved: dict[str, Tensor]) -> None:
    """Reset every parameter and buffer of ``net`` to ``saved``, bit for bit, keeping masks.

    The lottery ticket's reset of the survivors to their initial values θ0 (Frankle &
    Carbin 2019) or, for deeper nets, to an early iterate θk (Frankle et al. 2020):
    take ``saved = snapshot(net)`` at that step, prune later, then rewind. Pruned layers
    get ``weight_orig`` restored and ``weight = weight_orig * weight_mask`` recomputed.
    Optimiser state is not part of the net: start a new optimiser after rewinding.

    Args:
        net: the (pruned) network, changed in place.
        saved: a :func:`snapshot` of the same architecture, on any device.

    Raises:
        ValueError: the keys differ (the message names the missing and the extra ones), or
            a tensor's shape or dtype differs from the net's.

    References:
        Frankle, Carbin. The lottery ticket hypothesis: finding sparse, trainable neural
        networks. ICLR 2019.
        Frankle, Dziugaite, Roy, Carbin. Linear mode connectivity and the lottery ticket
        hypothesis. ICML 2020.
    """
    live = _live_state(net)
    _check_matches(live, saved)
    with torch.no_grad():
        for key, tensor in live.items():
            tensor.copy_(saved[key])
    recompute_pruned_(net)


def reinit_(net: nn.Module, seed: int) -> None:
    """Draw fresh values for ``net`` with torch's default initialisation, keeping masks.

    Every module that defines ``reset_parameters`` (Linear and Conv layers, and also
    BatchNorm, LayerNorm, …) is reset in ``named_modules`` order, as training the pruned
    architecture from scratch requires (Liu et al. 2019). A pruned tensor's
    ``weight_orig`` is redrawn and its mask kept; the values drawn do not depend on the
    masks, so a pruned net gets the values its dense twin would. The caller's random
    state (CPU, and the CUDA devices the net is on) is left as it was.

    Args:
        net: the (pruned) network, changed in place.
        seed: the seed of the draw: one seed, one initialisation (per device type).

    Raises:
        TypeError: ``seed`` is not an integer.

    References:
        Liu, Sun, Zhou, Huang, Darrell. Rethinking the value of network pruning. ICLR 2019.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"Expected an integer seed, got {seed!r}. Pass e.g. seed=0.")
    cuda = sorted({t.device.index or 0 for t in _live_state(net).values() if t.is_cuda})
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.default_generator.manual_seed(int(seed))
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(int(seed))
        with _originals_exposed(net):
            for module in net.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()


def round_sparsities(sparsity: float, rounds: int) -> list[float]:
    """The target sparsity after each round of iterative pruning.

    Each round prunes the same fraction p of the weights that survived the last one, so
    that ``(1 − p)^rounds = 1 − sparsity``: after round k the sparsity is
    ``s_k = 1 − (1 − s)^(k / rounds)``. Frankle & Carbin (2019) prune p = 20 % per round.

    Args:
        sparsity: the final target s, in [0, 1).
        rounds: the number of rounds, at least 1.

    Returns:
        ``[s_1, …, s_rounds]``, non-decreasing; the last is exactly ``sparsity``.

    Raises:
        ValueError: ``sparsity`` outside [0, 1) or ``rounds`` < 1.
        TypeError: ``sparsity`` is not a number or ``rounds`` not an integer.

    Example:
        >>> [round(s, 4) for s in round_sparsities(0.75, 2)]
        [0.5, 0.75]
    """
    target = check_sparsity(sparsity)
    if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral):
        raise TypeError(f"Expected rounds to be an integer, got {rounds!r}. Pass e.g. 5.")
    if rounds < 1:
        raise ValueError(f"Expected rounds ≥ 1, got {rounds!r}. One round prunes in one shot.")
    # The power leaves the last value a rounding error off the target: set it exactly.
    return [1.0 - (1.0 - target) ** (k / rounds) for k in range(1, rounds)] + [target]


def _pruned(net: nn.Module) -> Iterator[tuple[str, nn.Module, str, BasePruningMethod]]:
    """``(layer name, layer, tensor name, pruning hook)`` of every pruned tensor."""
    for layer_name, module in net.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, BasePruningMethod) and hook._tensor_name is not None:
                yield layer_name, module, hook._tensor_name, hook


def _live_state(net: nn.Module) -> dict[str, Tensor]:
    """The net's parameters and buffers themselves, keyed as :func:`snapshot` keys them."""
    state = net.state_dict(keep_vars=True)
    for layer_name, _, tensor, _ in _pruned(net):
        key = param_key(layer_name, tensor)
        state[key] = state.pop(f"{key}_orig")
        del state[f"{key}_mask"]
    return state


def _check_matches(live: dict[str, Tensor], saved: dict[str, Tensor]) -> None:
    missing, extra = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    if missing or extra:
        raise ValueError(
            f"Expected a snapshot of this net's architecture, got one missing {missing} and "
            f"with extra {extra}. Take the snapshot with snapshot(net) on the same network."
        )
    for key, tensor in live.items():
        other = saved[key]
        if other.shape != tensor.shape or other.dtype != tensor.dtype:
            raise ValueError(
                f"Expected {key!r} of shape {tuple(tensor.shape)} and dtype {tensor.dtype} "
                f"as in the net, got shape {tuple(other.shape)} and dtype {other.dtype} in "
                "the snapshot. Rewind only to a snapshot of this network, before any cast."
            )


@contextmanager
def _originals_exposed(net: nn.Module) -> Iterator[None]:
    """Let ``layer.weight`` name ``weight_orig`` for a while, so that a layer's own
    ``reset_parameters`` redraws the parameter rather than the masked copy."""
    for _, module, tensor, _ in _pruned(net):
        # The masked copy is a plain attribute; replacing it in __dict__ bypasses
        # Module.__setattr__, which would register the parameter under a second name.
        module.__dict__[tensor] = getattr(module, f"{tensor}_orig")
    try:
        yield
    finally:
        recompute_pruned_(net)
