"""Training recipes of the reference (model, method) pairs, and the networks they build.

A :class:`Recipe` holds the defaults of one pair (epochs, schedules, initialisation, layer
options), read from the papers' official code; :func:`resolve` turns it and a user's
overrides into the settings of a run, scaling the schedules when the run is shorter or
longer than the recipe. :func:`layer_options` lists the options a family's layers take, so
that option names and values can be checked before anything is built.
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from bayessparse.convert import METHODS, sparse_modules, to_sparse_
from bayessparse.masks import sparsity_report
from bayessparse.models import MODELS
from bayessparse.nn.base import SparseModule


@dataclass(frozen=True)
class Recipe:
    """Default training settings of one (model, method); command-line flags override them.

    Attributes:
        epochs, kl_warmup, lr_decay_start, init: as the flags of the same names.
        layer: sparse-layer options; a list holds one value per layer.
    """

    epochs: int
    kl_warmup: tuple[float, float] = (0.0, 0.0)
    lr_decay_start: float | None = None
    init: str = "paper"
    layer: dict[str, Any] = field(default_factory=dict)

    def scaled(self, epochs: int) -> tuple[tuple[float, float], float | None]:
        """``(kl_warmup, lr_decay_start)`` for a run of ``epochs`` epochs.

        The schedules are fractions of the recipe's run: a 3-epoch trial of a 40-epoch
        recipe warms the KL up over the same share of its epochs, rather than ending
        with the KL barely switched on. The recipe's own length gives its values exactly.
        """
        factor = epochs / self.epochs
        start, end = self.kl_warmup
        decay = None if self.lr_decay_start is None else self.lr_decay_start * factor
        return (start * factor, end * factor), decay


# The plain network, trained by cross-entropy: the baseline each Bayesian method is held to.
DENSE = "dense"
TRAINABLE = (*sorted(METHODS), DENSE)

RECIPES: dict[tuple[str, str], Recipe] = {
    # The official sparse-VD recipes (Molchanov et al. 2017, their code) compressed in time:
    # Adam 1e-3, batch 100, KL warm-up, lr constant then linear to 0 over the second half.
    ("lenet300", "sparse_vd"): Recipe(40, (2.0, 10.0), layer={"train_clip": True}),
    ("lenet5", "sparse_vd"): Recipe(15, (0.5, 5.0), layer={"train_clip": True}),
    # The official L0 recipes (Louizos et al. 2018, their code): Adam 1e-3, droprate_init
    # 0.2 on the input layer and 0.5 elsewhere, lambda = 0.1/N for the MLP (torch's init,
    # no schedule).
    # LeNet-5 uses the paper's per-layer "L0-sep" lambdas [10, 0.5, 0.1, 10]/N and He init as
    # the official code; with the shared 1/N our runs end near 1.9 % error (README), and
    # the schedule is cut to 150 epochs with a linear lr decay over the last 50.
    ("lenet300", "l0"): Recipe(
        200,
        lr_decay_start=200.0,
        init="torch",
        layer={"l0_lambda": 0.1, "droprate_init": [0.2, 0.5, 0.5]},
    ),
    ("lenet5", "l0"): Recipe(
        150,
        lr_decay_start=100.0,
        init="he",
        layer={"l0_lambda": [10.0, 0.5, 0.1, 10.0], "droprate_init": 0.5},
    ),
    # Bayesian Compression (Louizos et al. 2017, their code): Adam 1e-3, torch's init, no
    # warm-up; the paper's epoch count is unknown. The group scales drift slowly (20 epochs
    # of LeNet-5 prune little: 19-49-558-334), so LeNet-5 gets 60, the lr decaying over the
    # last 20.
    ("lenet300", "group_nj"): Recipe(40, lr_decay_start=20.0, init="torch"),
    ("lenet5", "group_nj"): Recipe(60, lr_decay_start=40.0, init="torch"),
    ("lenet300", "horseshoe"): Recipe(40, lr_decay_start=20.0, init="torch"),
    ("lenet5", "horseshoe"): Recipe(40, lr_decay_start=25.0, init="torch"),
    # The relaxed spike-and-slab has no paper recipe: the group families' settings.
    ("lenet300", "spike_slab"): Recipe(40, lr_decay_start=20.0, init="torch"),
    ("lenet5", "spike_slab"): Recipe(40, lr_decay_start=25.0, init="torch"),
    # Structured Bayesian Pruning (Neklyudov et al. 2017, their code): 200 epochs from a
    # dense net pretrained for 200, Adam 1e-3 (their beta1 is 0.95; ours is torch's 0.9),
    # the lr linear to 0 over the last 100, kl weight 1, Glorot convolutions and N(0, 0.01²)
    # dense weights ("paper"). Their start is a pretrained dense net (``--init-from``;
    # benchmarks/reproduce.py's sbp-5-pretrained starts from the dense LeNet-5 recipe's 15
    # epochs); without one, the pretraining is the run's first half with the KL off: the
    # noise starts near the identity (log sigma = -5, E[theta] = 0.995), so that half
    # trains the weights as a dense net does, but its lr does not decay, and mu and sigma
    # move with the data before the KL switches on.
    ("lenet300", "sbp"): Recipe(400, (200.0, 200.0), lr_decay_start=300.0, init="paper"),
    ("lenet5", "sbp"): Recipe(400, (200.0, 200.0), lr_decay_start=300.0, init="paper"),
    # The dense baselines, with the sparse-VD recipes' budgets (epochs, Adam 1e-3, lr
    # constant then linear to 0 over the second half) and torch's initialisation.
    ("lenet300", DENSE): Recipe(40, init="torch"),
    ("lenet5", DENSE): Recipe(15, init="torch"),
}


INITS = ("paper", "normal", "he", "torch")


def recipe(model: str, method: str) -> Recipe:
    """The recipe of ``(model, method)``.

    Raises:
        ValueError: for a model or method without a recipe (names the ones there are).
    """
    if (model, method) not in RECIPES:
        raise ValueError(
            f"No recipe for model {model!r} with method {method!r}. Models: {sorted(MODELS)}; "
            f"methods: {list(TRAINABLE)}."
        )
    return RECIPES[model, method]


def layer_options(method: str) -> dict[str, Any]:
    """``{option: type}`` of the keyword options that the layers of ``method`` take.

    Read from the signatures of the family's constructors, so that a new option is known
    here as soon as a layer accepts it.
    """
    options: dict[str, Any] = {}
    for layer_cls in METHODS.get(method, {}).values():  # the dense method has no options
        for klass in layer_cls.__mro__:
            if not issubclass(klass, SparseModule):
                continue
            for name, fn in vars(klass).items():
                if inspect.isfunction(fn) and (
                    name == "__init__" or name.startswith("_construct")
                ):
                    hints = typing.get_type_hints(fn)
                    for p in inspect.signature(fn).parameters.values():
                        if p.kind is p.KEYWORD_ONLY:
                            options[p.name] = hints.get(p.name, Any)
    return options


def check_layer_options(method: str, layer: dict[str, Any], num_layers: int) -> None:
    """Check option names against the layers of ``method`` and values against their types.

    A list gives one value per layer and must have ``num_layers`` items.

    Raises:
        ValueError: an unknown option (the message lists the valid ones), a value of the
            wrong type, a non-finite number, or a list of the wrong length.
    """
    known = layer_options(method)
    for key, value in layer.items():
        if key not in known:
            raise ValueError(
                f"Unknown layer option {key!r} for method {method!r}. Valid options: "
                f"{', '.join(sorted(known)) or 'none'}."
            )
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and len(value) != num_layers:
            raise ValueError(
                f"Layer option {key} has {len(value)} values for {num_layers} layers; give "
                "one value per layer or a single value for all."
            )
        for v in values:
            if not _has_type(v, known[key]):
                raise ValueError(
                    f"Layer option {key} expects {_type_name(known[key])} (or a JSON list of "
                    f"one per layer), got {v!r}. Booleans are true/false, numbers are finite, "
                    "text is quoted in JSON or bare."
                )


def _has_type(value: Any, hint: Any) -> bool:
    allowed = typing.get_args(hint) or (hint,)
    for t in allowed:
        if t is Any:
            return True
        if t is type(None) and value is None:
            return True
        if t is bool and isinstance(value, bool):
            return True
        if t in (int, float) and not isinstance(value, bool) and isinstance(value, (int, float)):
            return (t is float or isinstance(value, int)) and math.isfinite(value)
        if t is str and isinstance(value, str):
            return True
    return False


def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
    names[type(None)] = "null"
    return " or ".join(names.get(t, str(t)) for t in (typing.get_args(hint) or (hint,)))


def weighted_layers(net: nn.Module) -> list[str]:
    """Names of the Linear and Conv2d layers of a reference network, in order."""
    return [name for name, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def build_net(
    model: str,
    method: str,
    init: str = "paper",
    pretrained: Mapping[str, Tensor] | None = None,
    **layer_options: Any,
) -> nn.Module:
    """A reference network with its layers made sparse (plain for ``method="dense"``).

    A list value in ``layer_options`` gives one value per layer, in order (e.g.
    ``l0_lambda=[10, 0.5, 0.1, 10]``); any other value applies to every layer.

    ``init`` chooses the starting weights (biases 0 unless ``"torch"``):

    - ``"paper"``: what the official sparse-VD code effectively runs: dense weights from
      N(0, 0.01²) and Glorot-uniform convolutions (its ``W=init.Normal()`` never reaches the
      conv layers, whose argument is named ``Wconv``);
    - ``"normal"``: N(0, 0.01²) everywhere;
    - ``"he"``: He-normal, N(0, 2 / fan_in), what the official L0 code uses;
    - ``"torch"``: torch's default initialisation.

    ``pretrained``, the ``state_dict`` of a dense ``model`` (e.g. a ``method="dense"`` run's
    ``model.pt``), replaces those weights before the layers are made sparse: the
    posteriors' means start there (SBP's published recipe starts from a pretrained net).

    Raises:
        ValueError: an unknown ``init``, bad layer options, or a ``pretrained`` state that
            is not a dense ``model``'s.
    """
    if init not in INITS:
        raise ValueError(f"Unknown init {init!r}. Choose one of {INITS}.")
    net = MODELS[model]()
    if init != "torch":
        for module in net.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                if init == "he":
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                elif isinstance(module, nn.Conv2d) and init == "paper":
                    nn.init.xavier_uniform_(module.weight)
                else:
                    nn.init.normal_(module.weight, 0.0, 0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    if pretrained is not None:
        _load_dense(net, model, pretrained)
    names = weighted_layers(net)
    check_layer_options(method, layer_options, len(names))
    if method == DENSE:
        return net
    for i, layer_name in enumerate(names):
        options = {k: v[i] if isinstance(v, list) else v for k, v in layer_options.items()}
        to_sparse_(net, method, include=_named(layer_name), **options)
    return net


def _load_dense(net: nn.Module, model: str, state: Mapping[str, Tensor]) -> None:
    shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, Tensor)}
    wanted = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    if shapes != wanted:
        differ = sorted(set(shapes.items()) ^ set(wanted.items()))[:3]
        raise ValueError(
            f"the pretrained weights are not those of a dense {model} (first differences, "
            f"name and shape: {differ}); give the model.pt of a 'train --model {model} "
            "--method dense' run"
        )
    net.load_state_dict(state)


def _named(wanted: str) -> Callable[[str, nn.Module], bool]:
    return lambda name, _: name == wanted


def kept_architecture(net: nn.Module, threshold: Any = None, **selection: Any) -> str:
    """Kept units in the papers' notation: output channels of each convolution, then input
    units of each linear layer (e.g. 20-25-45-462 for LeNet-5-Caffe).

    ``threshold`` and ``selection`` (``sparsity``, ``scope``) choose the masks as for
    :func:`~bayessparse.masks`."""
    return kept_units(net, sparsity_report(net, threshold, **selection)["layers"])


def kept_units(net: nn.Module, layers: dict[str, dict[str, Any]]) -> str:
    """:func:`kept_architecture` from the ``"layers"`` of a :func:`sparsity_report`."""
    units = [
        layers[name]["inputs_kept" if isinstance(module, nn.Linear) else "outputs_kept"]
        for name, module in sparse_modules(net)
    ]
    return "-".join(str(u) for u in units)
