"""One bench row: train, prune and evaluate a method under the bench's training budget.

The protocol for a budget of ``B`` epochs (Adam, the loop's default schedule in every
training phase: lr constant, then linear to 0 over the phase's second half):

- ``dense``: the plain network trained ``B`` epochs (the reference, sparsity 0);
- Bayesian families: SVI for ``B`` epochs with the recipe's schedule scaled to ``B``,
  trained once per (method, seed) and cached; each sparsity keeps the weights of highest
  keep-probability in the deterministic masked net, without fine-tuning, and the row
  at sparsity 0 masks it by the family's own threshold (the sparsity the prior chose);
- pruning methods, by their ``stage``:

  - ``"at_init"``: prune the initial net (``prepare_`` first), train ``B`` epochs;
  - ``"after_training"``: the dense net trained ``P = B // 2`` epochs (cached per seed,
    shared by all such methods), then ``rounds`` rounds of: prune to
    ``1 - (1 - s)^(k / rounds)``, apply the ``policy``, train ``(B - P) / rounds``
    epochs (the remainder in the last round);
  - ``"during_training"``: ``prepare_``, ``start_``, train ``B - F`` epochs with the
    method's penalty and ``after_step`` hook (``F = B // 4``), prune to ``s``,
    ``finalize_``, fine-tune ``F`` epochs.

Weights are ranked across all layers; whole units (unit pruning methods, and the
Bayesian families that gate units) are pruned by each layer's share (:func:`scope_of`).

Every row starts from the same initial weights for a seed (torch's initialisation
after ``torch.manual_seed(seed)``) and depends on nothing but its own settings, so a
row computes the same in any process, shard or order. Pruned weights stay masked in
:mod:`torch.nn.utils.prune` format while the survivors train.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bayessparse.bench import compress
from bayessparse.bench.grid import OWN, Item, kind
from bayessparse.bench.measure import measure
from bayessparse.bench.store import row_path, write_row
from bayessparse.data import Split
from bayessparse.masks import keep_probs, to_dense
from bayessparse.pruning import (
    PruningMethod,
    get_method,
    methods,
    prune,
    reinit_,
    rewind_,
    round_sparsities,
    snapshot,
)
from bayessparse.recipes import DENSE, build_net, recipe
from bayessparse.training import (
    CheckpointError,
    Schedule,
    StorageError,
    load_checkpoint,
    save_checkpoint,
    train,
)

CACHE = "cache"
LOCKS = "locks"
# Examples that data-driven methods score with: ten batches at initialisation (SNIP,
# GraSP), a few thousand after training (second-order methods' curvature estimates).
# SGD's learning rate in the pruning papers' recipe (SNIP; sparse_learning's DST runs).
SGD_LR = 0.1
AT_INIT_EXAMPLES = 1000
AFTER_TRAINING_EXAMPLES = 2000


def pretrain_epochs(budget: int) -> int:
    """Epochs of dense training before an after-training method prunes: half the budget."""
    return budget // 2


def finetune_epochs(budget: int) -> int:
    """Epochs a during-training method fine-tunes after its final prune: a quarter."""
    return budget // 4


def round_epochs(budget: int, rounds: int) -> list[int]:
    """Fine-tuning epochs of each pruning round: the budget left after pretraining, split
    evenly, the remainder going to the last round."""
    rest = budget - pretrain_epochs(budget)
    share = rest // rounds
    return [share] * (rounds - 1) + [rest - share * (rounds - 1)]


def min_budget(method: str) -> int:
    """The shortest budget the protocol of ``method`` runs with: one epoch, or for an
    after-training method one of pretraining and one per pruning round."""
    if kind(method) == "compression":
        return compress.min_budget(method)
    if kind(method) != "pruning":
        return 1
    cls = methods()[method]
    if cls.stage != "after_training":
        return 1
    return max(2, 2 * cls.rounds - 1)  # pretrain_epochs >= 1 and round_epochs all >= 1


def check_budget(names: Iterable[str], budget: int) -> None:
    """Check that every method's protocol fits in ``budget`` epochs.

    Raises:
        ValueError: a budget too short for a method (names the shortest it takes).
    """
    for name in names:
        needed = min_budget(name)
        if budget < needed:
            raise ValueError(
                f"Expected a budget of at least {needed} epochs for method {name!r} (its "
                f"protocol has phases of whole epochs), got {budget}. Raise --budget."
            )


def make_method(name: str, seed: int) -> PruningMethod:
    """The pruning method ``name``, seeded with the row's seed when it takes a seed."""
    cls = methods()[name]
    return get_method(name, seed=seed) if "seed" in _init_parameters(cls) else get_method(name)


def _init_parameters(cls: type) -> set[str]:
    return set(inspect.signature(cls).parameters)


@dataclass
class Bench:
    """The fixed settings of a bench and its data; :meth:`run` computes one row.

    Attributes:
        directory: the bench folder (rows, caches, results).
        model: ``"lenet300"`` or ``"lenet5"``.
        budget: training epochs of every method.
        train_split, test_split: preprocessed MNIST.
        batch_size, lr: Adam's mini-batch size and learning rate.
        optimizer: the plain networks' optimiser: ``"adam"`` (at ``lr``), or ``"sgd"``
            (momentum 0.9, weight decay 5e-4, at :data:`SGD_LR`), the pruning papers'
            recipe. The Bayesian families train by SVI with Adam either way.
    """

    directory: Path
    model: str
    budget: int
    train_split: Split
    test_split: Split
    batch_size: int = 100
    lr: float = 1e-3
    optimizer: str = "adam"

    def run(self, item: Item) -> dict[str, Any]:
        """Train, prune and evaluate one row; returns its record (see ``COLUMNS``)."""
        torch.manual_seed(item.seed)  # whatever a method draws, the row alone decides it
        head = {**item._asdict(), "budget": self.budget}
        if kind(item.method) == "compression":
            measured, family, stage = compress.run(self, item)
            return {**head, "family": family, "stage": stage, **measured}
        family, stage = "dense", "none"
        if item.method == DENSE:
            net, seconds = self._dense(item.seed)
        elif kind(item.method) == "bayesian":
            family, stage = "bayesian", "during_training"
            net, seconds = self.bayesian(item)
        else:
            method = make_method(item.method, item.seed)
            family, stage = method.family, method.stage
            net, seconds = self._pruned(item, method)
        test = self.test_split
        return {
            **head,
            "family": family,
            "stage": stage,
            **measure(net, self.initial_net(item.seed), test.images, test.labels),
            "storage_bytes": None,  # counted only where a method codes its weights
            "storage_compression": None,
            "train_seconds": seconds,
        }

    # --- building blocks ----------------------------------------------------------------

    def initial_net(self, seed: int) -> nn.Module:
        """The plain network at torch's initialisation for ``seed`` (the RNG is forked)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_net(self.model, DENSE, "torch")

    def fit(self, net: nn.Module, epochs: int, seed: int, **options: Any) -> float:
        """Train ``net`` for ``epochs`` with the bench's settings (``options`` override
        them, e.g. ``lr`` and ``optimizer``, or add to them); returns the seconds."""
        start = time.perf_counter()
        if options.get("objective") != "svi":
            options.setdefault("optimizer", self.optimizer)
        sgd = options.get("optimizer") == "sgd"
        options.setdefault("lr", SGD_LR if sgd else self.lr)
        train(
            net,
            *self.train_split,
            epochs=epochs,
            batch_size=self.batch_size,
            seed=seed,
            progress=False,
            **options,
        )
        return time.perf_counter() - start

    def score_data(self, count: int, seed: int) -> tuple[Tensor, Tensor]:
        """``count`` training examples drawn at random for ``seed`` (all if fewer)."""
        images, labels = self.train_split
        order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
        chosen = order[:count]
        return images[chosen], labels[chosen]

    def cached(self, name: str, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The state saved as ``cache/NAME.pt``, made by ``make()`` the first time.

        A lock per cache makes concurrent shards wait for the one computing it rather
        than compute it twice; the file is a verified checkpoint written atomically.
        """
        path = self.directory / CACHE / f"{name}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        (self.directory / LOCKS).mkdir(exist_ok=True)
        with filelock.FileLock(self.directory / LOCKS / f"cache-{name}.lock"):
            if path.exists():
                return load_checkpoint(path)
            state = make()
            save_checkpoint(state, path)
        return state

    # --- the protocols ------------------------------------------------------------------

    def _dense(self, seed: int) -> tuple[nn.Module, float]:
        net = self.initial_net(seed)
        return net, self.fit(net, self.budget, seed)

    def bayesian(self, item: Item) -> tuple[nn.Module, float]:
        """A Bayesian family's row: its trained net as a plain net masked at the row's
        sparsity (units by each layer's share where the family gates units), or by its
        own threshold at sparsity 0."""
        net, seconds = self.bayesian_net(item)
        if item.sparsity == OWN:
            return to_dense(net), seconds
        scope = "layer" if _scores_units(net) else "global"
        return to_dense(net, sparsity=item.sparsity, scope=scope), seconds

    def bayesian_net(self, item: Item) -> tuple[nn.Module, float]:
        """The Bayesian net of ``item``'s family and seed, trained once by SVI for the
        budget with the recipe's schedule scaled to it (cached), and its seconds."""
        rec = recipe(self.model, item.method)

        def build() -> nn.Module:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item.seed)
                return build_net(self.model, item.method, rec.init, **rec.layer)

        def make() -> dict[str, Any]:
            net = build()
            schedule = Schedule(*rec.scaled(self.budget))
            seconds = self.fit(net, self.budget, item.seed, schedule=schedule, objective="svi")
            return {"net": net.state_dict(), "train_seconds": seconds}

        state = self.cached(f"{item.method}-{item.seed}", make)
        net = build()
        net.load_state_dict(state["net"])
        return net, state["train_seconds"]

    def _pruned(self, item: Item, method: PruningMethod) -> tuple[nn.Module, float]:
        if method.stage == "at_init":
            return self._at_init(item, method)
        if method.stage == "after_training":
            return self.after_training(item, method)
        if method.stage == "during_training":
            return self._during_training(item, method)
        raise ValueError(
            f"Method {method.name!r} has stage {method.stage!r}; the bench runs 'at_init', "
            "'after_training' and 'during_training'."
        )

    def _at_init(self, item: Item, method: PruningMethod) -> tuple[nn.Module, float]:
        net = method.prepare_(self.initial_net(item.seed))
        data = self.score_data(AT_INIT_EXAMPLES, item.seed)
        prune(net, method, item.sparsity, data=data, scope=scope_of(method))
        seconds = self.fit(net, self.budget, item.seed)
        return method.finalize_(net), seconds

    def pretrained(self, seed: int) -> dict[str, Any]:
        """The dense net trained :func:`pretrain_epochs` (cached) and its initial state."""

        def make() -> dict[str, Any]:
            net = self.initial_net(seed)
            init = snapshot(net)
            seconds = self.fit(net, pretrain_epochs(self.budget), seed)
            return {"init": init, "trained": net.state_dict(), "train_seconds": seconds}

        return self.cached(f"dense-{seed}", make)

    def after_training(self, item: Item, method: PruningMethod) -> tuple[nn.Module, float]:
        """The ``after_training`` protocol: prune the pretrained net in rounds, each
        followed by its policy and fine-tuning; returns the net and all its seconds."""
        state = self.pretrained(item.seed)
        net = self.initial_net(item.seed)
        net.load_state_dict(state["trained"])
        seconds = state["train_seconds"]
        data = self.score_data(AFTER_TRAINING_EXAMPLES, item.seed)
        targets = round_sparsities(item.sparsity, method.rounds)
        for target, epochs in zip(targets, round_epochs(self.budget, method.rounds), strict=True):
            prune(net, method, target, data=data, scope=scope_of(method))
            self._apply_policy(net, method.policy, state["init"], item.seed)
            seconds += self.fit(net, epochs, item.seed)
        return net, seconds

    def _apply_policy(
        self, net: nn.Module, policy: str, init: dict[str, Tensor], seed: int
    ) -> None:
        """Set the survivors' starting values for fine-tuning: trained ones (retain), the
        initial ones (rewind) or a fresh initialisation (reinit)."""
        if policy == "rewind":
            rewind_(net, init)
        elif policy == "reinit":
            reinit_(net, reinit_seed(seed))
        elif policy != "retain":
            raise ValueError(
                f"Unknown policy {policy!r}; the bench applies 'retain', 'rewind', 'reinit'."
            )

    def _during_training(self, item: Item, method: PruningMethod) -> tuple[nn.Module, float]:
        net = method.prepare_(self.initial_net(item.seed))
        num_data = self.train_split.images.shape[0]
        epochs = self.budget - finetune_epochs(self.budget)
        method.start_(net, item.sparsity, epochs * math.ceil(num_data / self.batch_size))

        def penalty(net: nn.Module) -> Tensor | None:
            # The method's penalty is per example; the loop's data term sums over the data.
            term = method.penalty(net)
            return None if term is None else num_data * term

        seconds = self.fit(net, epochs, item.seed, penalty=penalty, after_step=method.after_step)
        data = self.score_data(AFTER_TRAINING_EXAMPLES, item.seed)
        prune(net, method, item.sparsity, data=data, scope=scope_of(method))
        net = method.finalize_(net)
        if finetune_epochs(self.budget):
            seconds += self.fit(net, finetune_epochs(self.budget), item.seed)
        return net, seconds


def scope_of(method: PruningMethod) -> str:
    """The method's own scope if it has one; else weight methods rank all layers together
    and unit methods prune each layer's share.

    Counted in weights, a global target forces a unit method to prune whole layers: in
    LeNet-300-100 the first layer holds 88 % of the weights, and pruning a hidden unit
    removes its row there but not its column in the next layer (that goes only with
    compaction), so 90 % cannot be reached without emptying the first layer. Per layer,
    every hidden layer keeps its share of units (as Li et al. 2017 rank filters).
    """
    return method.scope or ("layer" if method.structure == "unit" else "global")


def _scores_units(net: nn.Module) -> bool:
    """Whether a Bayesian net keeps whole units (group scales, L0 unit gates): then, as for
    the unit pruning methods (:func:`scope_of`), each layer prunes its share."""
    layers = dict(net.named_modules())
    return any(
        keep.numel() < layers[key.rpartition(".")[0]].weight.numel()
        for key, keep in keep_probs(net).items()
    )


def reinit_seed(seed: int) -> int:
    """The seed of a fresh initialisation for a row of ``seed``: not ``seed`` itself,
    which would draw the initial values again. A hash, since torch's CPU generator keeps
    only the low 32 bits of a seed (``seed + 2**32`` draws what ``seed`` does)."""
    digest = hashlib.sha256(f"reinit {seed}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class RowFailed(RuntimeError):
    """A row's training, pruning or evaluation failed; the rows finished before are kept."""


def run_grid(bench: Bench, items: list[Item], progress: bool | None = None) -> int:
    """Compute every row of ``items`` that has no row file yet, storing each as it ends.

    A row held by another process (its lock taken) is left to that process. A tqdm bar
    counts the rows done (shown only on a terminal when ``progress`` is None).

    Returns:
        The number of rows this call computed.

    Raises:
        RowFailed: a row failed (the message names it and the error).
        CheckpointError: a cache file is damaged.
        StorageError: a file could not be written.
    """
    todo = [item for item in items if not row_path(bench.directory, item).exists()]
    (bench.directory / LOCKS).mkdir(parents=True, exist_ok=True)
    computed = 0
    with tqdm(
        total=len(items),
        initial=len(items) - len(todo),
        unit="row",
        disable=None if progress is None else not progress,
    ) as bar:
        for item in todo:
            bar.set_description(item.name)
            computed += _run_once(bench, item)
            bar.update()
    return computed


def _run_once(bench: Bench, item: Item) -> bool:
    """Compute and store ``item`` unless it is stored or another process holds it."""
    lock = filelock.FileLock(bench.directory / LOCKS / f"row-{item.name}.lock", timeout=0)
    try:
        with lock:
            if row_path(bench.directory, item).exists():
                return False
            try:
                row = bench.run(item)
            except (CheckpointError, StorageError):
                raise
            except Exception as err:
                raise RowFailed(f"row {item.name} failed: {type(err).__name__}: {err}") from err
            write_row(bench.directory, item, row)
            return True
    except filelock.Timeout:
        return False  # another process is computing this row
