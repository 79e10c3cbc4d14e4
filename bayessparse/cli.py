"""python -m bayessparse: train a sparse network on MNIST and report on it.

The only module that prints. A user's mistake (a bad option, bad data, a run folder in
use or holding another run) ends in one line on stderr naming the value and the fix, and
exit code 2; a run that fails while training (divergence, a full disk) ends in one line
and exit code 1, with the last checkpoint intact.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib.util
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bayessparse.bench import (
    Bench,
    check_budget,
    claim,
    expand,
    grid,
    merge,
    method_names,
    parse_shard,
    presets,
    run_grid,
    shard,
)
from bayessparse.bench.plots import plot_results
from bayessparse.bench.runner import RowFailed
from bayessparse.bench.store import RESULTS, ROWS, row_path
from bayessparse.configs import CONFIG, ConfigError, run_config_text, shipped, toml_value
from bayessparse.configs import find as find_config
from bayessparse.configs import read as read_config
from bayessparse.convert import sparse_modules
from bayessparse.data import DataError, Split, hold_out, load_mnist, preprocess
from bayessparse.evaluation import (
    CHECKPOINT,
    EVALUATION,
    MODEL,
    REPORT,
    RunError,
    evaluate_run,
    load_pretrained,
)
from bayessparse.infer import predict
from bayessparse.masks import masks, sparsity_report
from bayessparse.metrics import predict_logits, probability_report
from bayessparse.models import MODELS
from bayessparse.recipes import (
    DENSE,
    INITS,
    RECIPES,
    TRAINABLE,
    build_net,
    kept_units,
    recipe,
    weighted_layers,
)
from bayessparse.sparsity import check_sparsity
from bayessparse.training import (
    CheckpointError,
    RunFolder,
    RunFolderBusy,
    Schedule,
    StorageError,
    TrainingDiverged,
    atomic_write,
    check_data,
    fingerprint,
    to_strict_json,
    train,
)
from bayessparse.training.distributed import DataParallel, init_from_env, is_distributed, rank
from bayessparse.training.logbook import EPOCHS_CSV, LOGBOOK_FILES, Logbook
from bayessparse.training.loop import MAX_SEED
from bayessparse.training.objective import OPTIMIZERS
from bayessparse.training.storage import torch_bytes


class UsageError(ValueError):
    """A user's mistake on the command line; the message says how to fix it."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line (no usage block) and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _number(kind: type, low: float, high: float = math.inf) -> Callable[[str], Any]:
    """An argparse type: an int or finite float in [low, high]."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            bounds = f"in [{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"expected a finite number {bounds}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _decay(text: str) -> float:
    value = _number(float, 0.0, 1.0)(text)
    if value in (0.0, 1.0):
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _number(float, 0.0)(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return float(value)


def _path(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return Path(text)


def _layer_option(text: str) -> tuple[str, Any]:
    """``"key=value"`` → ``(key, value)``, the value read as JSON (numbers, true, "text").

    Text that is not JSON stays text (``gate=output``); the layer's option types are
    checked later, so ``train_clip=False`` is refused rather than read as a true string.
    """
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, e.g. l0_lambda=0.5, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _sparsity(text: str) -> float:
    try:  # the library's rule (bayessparse.sparsity.check_sparsity), one line here
        return check_sparsity(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a sparsity in [0, 1), got {text!r}") from None


def _methods(text: str) -> list[str]:
    try:
        return expand(part.strip() for part in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _shard(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _comma_list(item: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    """An argparse type: comma-separated values, each parsed by ``item``."""

    def parse(text: str) -> list[Any]:
        return [item(part.strip()) for part in text.split(",")]

    parse.__name__ = "comma-separated list"
    return parse


def _epochs_help() -> str:
    defaults = ", ".join(f"{m}/{meth} {r.epochs}" for (m, meth), r in sorted(RECIPES.items()))
    return f"training epochs (default: the recipe's: {defaults})"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m bayessparse",
        description="Train a Bayesian sparse network on MNIST and report on it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train_parser(sub)
    _add_evaluate_parser(sub)
    _add_bench_parser(sub)
    return parser


def _add_train_parser(sub: Any) -> None:
    t = sub.add_parser("train", help="train a sparse network on MNIST, threshold, report")
    t.add_argument(
        "--config",
        metavar="FILE",
        help="settings from a TOML file (option = value for any option below; flags given "
        "here override it), a run folder's config.toml, or a shipped config by name: "
        f"{', '.join(shipped())}",
    )
    t.add_argument("--model", choices=sorted(MODELS), default="lenet300")
    t.add_argument(
        "--method",
        choices=TRAINABLE,
        default="sparse_vd",
        help="Bayesian sparse family, or dense: the plain network (a baseline)",
    )
    t.add_argument("--epochs", type=_number(int, 1), help=_epochs_help())
    t.add_argument("--batch-size", type=_number(int, 1), default=100)
    t.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate")
    t.add_argument(
        "--kl-warmup",
        type=_number(float, 0.0),
        nargs=2,
        metavar=("START", "END"),
        help="KL weight 0 before epoch START, 1 from END (default: the recipe's, scaled "
        "to --epochs)",
    )
    t.add_argument(
        "--lr-decay-start",
        type=_number(float, 0.0),
        help="epoch from which the lr falls linearly to 0 (default: the recipe's, scaled)",
    )
    t.add_argument("--init", choices=INITS, help="initial weights (default: the recipe's)")
    t.add_argument(
        "--ema",
        type=_decay,
        metavar="DECAY",
        help="evaluate and keep an exponential moving average of the parameters with this "
        "decay (the official L0 MLP's: 0.999; default: none)",
    )
    t.add_argument(
        "--init-from",
        type=_path,
        metavar="RUN",
        help="start from the weights of a 'train --method dense' run (its folder or model.pt) "
        "instead of --init's: a pretrained start, as SBP's published recipe has",
    )
    t.add_argument(
        "--no-train-clip",
        dest="train_clip",
        action="store_false",
        help="sparse_vd: keep weights with log alpha >= 3 in the training mean",
    )
    t.add_argument(
        "--layer",
        action="append",
        default=[],
        type=_layer_option,
        metavar="KEY=VALUE",
        help="sparse-layer option overriding the recipe's, e.g. l0_lambda=0.5, or one value "
        "per layer: l0_lambda=[10,0.5,0.1,10] (JSON values; repeatable)",
    )
    select = t.add_mutually_exclusive_group()
    select.add_argument(
        "--threshold",
        type=_number(float, 0.0, 1.0),
        help="keep weights with keep-probability above this (default: each layer's own rule)",
    )
    select.add_argument(
        "--sparsity",
        type=_number(float, 0.0, 0.999999),
        help="prune this fraction of the weights, those of lowest keep-probability",
    )
    t.add_argument(
        "--scope",
        choices=("global", "layer"),
        default="global",
        help="with --sparsity: rank all weights together, or each layer's on its own",
    )
    t.add_argument(
        "--val-size",
        type=_number(int, 0),
        default=0,
        help="examples held out of the training set for choosing the cut (evaluate)",
    )
    t.add_argument("--seed", type=_number(int, 0, MAX_SEED), default=0)
    t.add_argument("--data-dir", type=_path, help="MNIST idx .gz directory (default: bundled)")
    t.add_argument(
        "--out", type=_path, help="run folder (default: a new runs/MODEL-METHOD-sSEED[-N])"
    )
    resume = t.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its checkpoint"
    )
    resume.add_argument(
        "--overwrite", action="store_true", help="replace the run already in --out"
    )
    t.add_argument("--threads", type=_number(int, 1), help="torch threads (default: torch's)")
    t.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="train on the CPU or a GPU (under torchrun: one process per GPU, NCCL)",
    )
    t.add_argument("--no-progress", dest="progress", action="store_false")


def _add_evaluate_parser(sub: Any) -> None:
    e = sub.add_parser(
        "evaluate",
        help="sweep, calibration, OOD detection and export of a finished run",
        description="Evaluate a finished run: the threshold sweep on its validation split, "
        "test metrics of the deterministic masked net and of the masked posterior, OOD "
        "detection, plots, and the exported model (model.pt2), next to its report.",
    )
    e.add_argument("run", type=_path, help="the run folder (--out of train)")
    e.add_argument(
        "--num-samples",
        type=_number(int, 0),
        default=20,
        help="Monte Carlo samples of the masked posterior (0: deterministic only)",
    )
    e.add_argument("--ood-size", type=_number(int, 1), default=2000)
    e.add_argument("--seed", type=_number(int, 0, MAX_SEED), default=0)
    e.add_argument("--no-plots", dest="plots", action="store_false")
    e.add_argument("--threads", type=_number(int, 1), help="torch threads (default: torch's)")


def _add_bench_parser(sub: Any) -> None:
    b = sub.add_parser(
        "bench",
        help="every method under one training budget: one CSV row per (method, sparsity, seed)",
        description="Train, prune and evaluate each (method, target sparsity, seed) of a "
        "grid under one budget of epochs: the dense reference, the Bayesian families and the "
        "pruning methods. Each finished row is stored in OUT/rows/; OUT/results.csv and the "
        "plots OUT/error.png and OUT/ece.png are rebuilt from them when the process ends. "
        "Running the same command again continues with the unfinished rows; --shard splits "
        "the grid between processes sharing OUT; --merge OUT only rebuilds the CSV and plots. "
        "A folder can grow: rerun with more methods, sparsities or seeds; settings that "
        "change results (model, budget, data) must stay the same.",
    )
    b.add_argument("--model", choices=sorted(MODELS), default="lenet300")
    b.add_argument(
        "--methods",
        type=_methods,
        help=f"comma-separated, from: {', '.join(method_names())}; or a group: "
        f"{', '.join(presets())}",
    )
    b.add_argument(
        "--sparsities",
        type=_comma_list(_sparsity),
        default=[0.9, 0.95, 0.98, 0.99],
        help="comma-separated target sparsities in [0, 1) (default: 0.9,0.95,0.98,0.99)",
    )
    b.add_argument(
        "--seeds",
        type=_comma_list(_number(int, 0, MAX_SEED)),
        default=[0],
        help="comma-separated seeds (default: 0)",
    )
    b.add_argument("--budget", type=_number(int, 1), help="training epochs of every method")
    b.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="adam",
        help="the plain networks' optimiser: adam (lr 1e-3, default) or sgd (lr 0.1, momentum "
        "0.9, weight decay 5e-4: the pruning papers' recipe); the Bayesian families use Adam",
    )
    b.add_argument("--out", type=_path, help="the bench folder (created; reused to continue)")
    b.add_argument(
        "--shard",
        type=_shard,
        default=(0, 1),
        metavar="I/N",
        help="run only the grid rows whose index is I mod N (0 <= I < N)",
    )
    b.add_argument("--data-dir", type=_path, help="MNIST idx .gz directory (default: bundled)")
    b.add_argument("--threads", type=_number(int, 1), help="torch threads (default: torch's)")
    b.add_argument("--no-progress", dest="progress", action="store_false")
    b.add_argument(
        "--merge",
        type=_path,
        metavar="DIR",
        help="only rebuild DIR/results.csv and the plots from DIR's row files",
    )


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line, with ``train --config FILE`` read in as the options' defaults.

    The file's values go through the flags' own types and choices; flags given on the
    command line override them. A bad file exits 2 with one line, as a bad flag does.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is None:
        return args
    train = _subparser(parser, "train")
    try:
        defaults = _config_defaults(train, read_config(find_config(args.config)))
    except ConfigError as err:
        parser.exit(2, f"error: --config {args.config}: {err}\n")
    # Of exclusive flags (--threshold / --sparsity), one given replaces the file's choice.
    exclusive = [group._group_actions for group in train._mutually_exclusive_groups]
    given = {a.dest for group in exclusive for a in group if getattr(args, a.dest) != a.default}
    unset = {a.dest: a.default for group in exclusive for a in group}
    train.set_defaults(**defaults)
    final = parser.parse_args(argv)
    for group in exclusive:
        if given & {a.dest for a in group}:
            for a in group:
                if a.dest not in given:
                    setattr(final, a.dest, unset[a.dest])
    return final


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise LookupError(f"no subcommand {name!r}")


def _config_keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """``{key: action}``: a config key is an option's name (``batch_size`` for
    ``--batch-size``, ``no_train_clip``) or its destination (``train_clip``)."""
    keys = {}
    for action in parser._actions:
        if action.dest in ("help", "config"):
            continue
        flags = (flag.lstrip("-").replace("-", "_") for flag in action.option_strings)
        for key in (action.dest, *flags):
            keys[key] = action
    return keys


def _config_defaults(parser: argparse.ArgumentParser, data: dict[str, Any]) -> dict[str, Any]:
    """``{dest: value}`` for ``parser.set_defaults`` from a config file's pairs, each
    checked as its flag is (type, range, choices).

    Raises:
        ConfigError: an unknown key (with the closest known one), a value of the wrong
            type or out of range, a destination set twice, or exclusive options together.
    """
    keys = _config_keys(parser)
    defaults: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in keys:
            close = difflib.get_close_matches(name, keys, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"unknown key {key!r}{hint}; the keys are train's options: "
                f"{', '.join(sorted(keys))}"
            )
        action = keys[name]
        if action.dest in defaults:
            raise ConfigError(f"{key} sets {action.dest} a second time; keep one of the keys")
        defaults[action.dest] = _config_value(action, name, value)
    for group in parser._mutually_exclusive_groups:
        chosen = [
            a.dest for a in group._group_actions if defaults.get(a.dest, a.default) != a.default
        ]
        if len(chosen) > 1:
            raise ConfigError(f"{' and '.join(chosen)} exclude each other; keep one")
    return defaults


def _config_value(action: argparse.Action, name: str, value: Any) -> Any:
    """A config file's value for ``action``, as its flag would set it."""
    if action.nargs == 0:  # a switch: resume = true, no_progress = true, train_clip = false
        if not isinstance(value, bool):
            raise ConfigError(f"{name} = {_shown(value)}: expected true or false")
        return value if name == action.dest else (action.const if value else action.default)
    if isinstance(action, argparse._AppendAction):  # --layer KEY=VALUE: a table
        if not isinstance(value, dict):
            raise ConfigError(
                f"{name} = {_shown(value)}: expected a table of layer options, e.g. [{name}] "
                "then l0_lambda = 0.5 on the next line"
            )
        return list(value.items())  # checked against the layers once the method is known
    if action.nargs == 2:  # --kl-warmup START END: a list
        if not isinstance(value, list) or len(value) != 2:
            raise ConfigError(f"{name} = {_shown(value)}: expected two values, e.g. [2, 10]")
        return [_config_scalar(action, name, v) for v in value]
    return _config_scalar(action, name, value)


def _config_scalar(action: argparse.Action, name: str, value: Any) -> Any:
    text = action.type in (None, _path) or action.choices is not None
    if isinstance(value, bool) or not isinstance(value, str if text else (int, float)):
        want = "text, in quotes" if text else "a number, without quotes"
        if isinstance(value, str) and _is_number(value):
            want += " (YAML reads 1e-3 as text: write 1.0e-3)"
        raise ConfigError(f"{name} = {_shown(value)}: expected {want}")
    try:
        parsed = action.type(str(value)) if callable(action.type) else value
    except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
        raise ConfigError(f"{name} = {_shown(value)}: {err}") from None
    if action.choices is not None and parsed not in action.choices:
        raise ConfigError(
            f"{name} = {_shown(value)}: choose from {', '.join(map(str, action.choices))}"
        )
    return parsed


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _shown(value: Any) -> str:
    try:
        return toml_value(value)
    except TypeError:
        return repr(value)


def _note(text: str) -> None:
    tqdm.write(f"note: {text}", file=sys.stderr)


def _settings(args: argparse.Namespace, notes: list[str]) -> dict[str, Any]:
    """The run's settings: the recipe, overridden by the flags, checked as a whole.

    What the user should know but need not fix is appended to ``notes``.
    """
    rec = recipe(args.model, args.method)
    epochs = args.epochs if args.epochs is not None else rec.epochs
    kl_warmup, lr_decay_start = rec.scaled(epochs)
    if epochs != rec.epochs and (args.kl_warmup is None or args.lr_decay_start is None):
        notes.append(
            f"the {args.model}/{args.method} recipe's schedule is scaled from {rec.epochs} to "
            f"{epochs} epochs (flags --kl-warmup and --lr-decay-start set it by hand)"
        )
    if args.kl_warmup is not None:
        kl_warmup = tuple(args.kl_warmup)
    if args.lr_decay_start is not None:
        lr_decay_start = args.lr_decay_start
    Schedule(kl_warmup, lr_decay_start)  # raises on a reversed warm-up
    if kl_warmup[1] > epochs:
        notes.append(f"the KL warm-up ends at epoch {kl_warmup[1]:g}, after the last ({epochs})")
    layer = dict(rec.layer)
    if "train_clip" in layer:
        layer["train_clip"] = args.train_clip
    layer.update(args.layer)
    init = args.init or rec.init
    return {
        "model": args.model,
        "method": args.method,
        "epochs": epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "kl_warmup": list(kl_warmup),
        "lr_decay_start": lr_decay_start,
        "init": init,
        "init_from": None if args.init_from is None else str(args.init_from.resolve()),
        "ema": args.ema,
        "layer": layer,
        "seed": args.seed,
        "val_size": args.val_size,
        # Where the data came from, for evaluate; the checkpoint checks the data itself.
        "data_dir": None if args.data_dir is None else str(args.data_dir.resolve()),
    }


def _check_out(args: argparse.Namespace) -> None:
    if args.out is None and args.resume:
        raise UsageError("--resume needs --out DIR, the run folder to continue")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file; give a directory for the run")


def _run_folder(args: argparse.Namespace) -> Path:
    """Create and return ``--out``, or a new ``runs/MODEL-METHOD-sSEED[-N]`` (never old)."""
    if args.out is None:
        base = Path("runs") / f"{args.model}-{args.method}-s{args.seed}"
        for n in range(1, 10**6):
            folder = base.with_name(f"{base.name}-{n}") if n > 1 else base
            try:
                folder.mkdir(parents=True)  # exclusive: two new runs never share a folder
                return folder
            except FileExistsError:
                continue
    folder = Path(args.out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the run folder --out {folder}: {err.strerror}") from err
    return folder


def _claim(folder: Path, args: argparse.Namespace) -> None:
    """Check what the folder holds against --resume / --overwrite (the folder is locked)."""
    existing = [name for name in (CHECKPOINT, REPORT, MODEL) if (folder / name).exists()]
    if args.overwrite:
        for name in (*existing, CONFIG, *LOGBOOK_FILES):
            (folder / name).unlink(missing_ok=True)
    elif args.resume:
        if existing and CHECKPOINT not in existing:
            raise UsageError(
                f"{folder} holds {', '.join(existing)} but no {CHECKPOINT} to resume; "
                "use --overwrite to start again there, or another --out"
            )
        if not existing:
            _note(f"no checkpoint in {folder} to resume; starting a new run there")
    elif existing:
        raise UsageError(
            f"{folder} already holds a run ({', '.join(existing)}); continue it with "
            "--resume, replace it with --overwrite, or choose another --out"
        )


def _load_data(data_dir: Path | None) -> dict[str, Split]:
    data = preprocess(load_mnist(data_dir))
    for name, split in data.items():
        if tuple(split.images.shape[1:]) != (1, 28, 28):
            raise DataError(
                f"MNIST {name} images must be 28x28, got shape {tuple(split.images.shape[1:])}"
            )
    return data


def _print_epoch(record: dict[str, float]) -> None:
    line = (
        f"epoch {record['epoch']:3d}  data {record['data_term']:10.1f}  kl {record['kl']:10.1f}"
        f"  kl_w {record['kl_weight']:.2f}  lr {record['lr']:.2e}"
    )
    if "test_error" in record:
        line += f"  test err {record['test_error']:.2%}"
    if "compression" in record:
        line += f"  comp {record['compression']:6.1f}x"
    # tqdm.write keeps the line clear of the progress bars.
    tqdm.write(line + f"  ({record['train_seconds']:.1f} s)", file=sys.stdout)


def _layer_names(net: nn.Module) -> dict[str, str]:
    """``{"1": "1 Linear 784->300", ...}``: a layer's name with its type and shape."""
    names = {}
    for name, m in sparse_modules(net):
        if isinstance(m, nn.Linear):
            shape = f"Linear {m.in_features}->{m.out_features}"
        else:
            conv: Any = m
            kernel = "x".join(str(k) for k in conv.kernel_size)
            shape = f"Conv {conv.in_channels}->{conv.out_channels} {kernel}"
        names[name] = f"{name} {shape}"
    return names


class Job:
    """A checked ``train`` command: its settings, run folder, data and network."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.created = time.perf_counter()
        self.args = args
        self.notes: list[str] = []  # printed once the run starts, after every check
        self.settings = _settings(args, self.notes)
        self.selection = _selection(args)
        self.plots = importlib.util.find_spec("matplotlib") is not None
        if not self.plots:
            self.notes.append(
                "no plots: matplotlib is not installed (pip install 'bayessparse[plots]')"
            )
        _check_out(args)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available; use --device cpu")
        self.device = init_from_env(args.device)  # joins torchrun's process group, if any
        # Built before the data is read, so that bad layer options fail first; loading the
        # data draws nothing from torch's RNG, so the initial weights depend on the seed only.
        torch.manual_seed(args.seed)
        # A resumed run's weights come from its checkpoint: its start is read when it begins.
        resuming = args.resume and args.out is not None and (args.out / CHECKPOINT).exists()
        pretrained = (
            None if args.init_from is None or resuming else load_pretrained(args.init_from)
        )
        self.net = build_net(
            args.model, args.method, self.settings["init"], pretrained, **self.settings["layer"]
        )
        data = _load_data(args.data_dir)
        self.train_split, self.val = hold_out(data["train"], args.val_size, args.seed)
        self.test = data["test"]
        check_data(self.net, *self.train_split)
        check_data(self.net, *self.test, what="test")
        self.net.to(self.device)
        # Rank 0 owns the run folder, the checkpoint and the report; the others only train.
        self.lead = rank() == 0
        if is_distributed():
            folder = _run_folder(args) if self.lead else None
            self.folder = DataParallel(self.device).broadcast_object(folder)
        else:
            self.folder = _run_folder(args)

    def _announce(self, history: Any) -> None:
        """Once train() has checked everything (a resumed checkpoint included)."""
        for note in self.notes:
            _note(note)
        config = run_config_text(self.settings, self.selection)
        atomic_write(self.folder / CONFIG, config.encode())
        done = f", resuming after epoch {history.completed}" if history.completed else ""
        tqdm.write(f"run folder {self.folder}{done}", file=sys.stderr)

    def run(self) -> dict[str, Any] | None:
        """Train (or resume), evaluate, and write the model and report; return the report
        (``None`` on the ranks other than 0 of a distributed run)."""
        settings, folder = self.settings, self.folder
        lead = self.lead
        with RunFolder(folder) if lead else contextlib.nullcontext():
            if lead:
                _claim(folder, self.args)
            train_start = time.perf_counter()
            history = train(
                self.net,
                *self.train_split,
                epochs=settings["epochs"],
                batch_size=settings["batch_size"],
                lr=settings["lr"],
                schedule=Schedule(tuple(settings["kl_warmup"]), settings["lr_decay_start"]),
                seed=settings["seed"],
                checkpoint=folder / CHECKPOINT,
                resume=(folder / CHECKPOINT).exists(),
                meta={
                    key: settings[key] for key in ("model", "method", "init", "layer", "val_size")
                },
                eval_data=(self.test.images.to(self.device), self.test.labels.to(self.device))
                if lead
                else None,
                on_epoch_end=_print_epoch if lead else None,
                on_start=self._announce if lead else None,
                progress=self.args.progress and lead,
                ema=settings["ema"],
                callbacks=[
                    Logbook(
                        folder,
                        epochs=settings["epochs"],
                        selection=self.selection,
                        plots=self.plots,
                    )
                ]
                if lead
                else [],
            )
            in_train = time.perf_counter() - train_start
            if not lead:
                return None
            self.net.cpu()
            report = _report(self.net, self.test, self.selection, settings, history)
            # train() counts its time over all sessions (earlier ones up to their last
            # checkpoint); add this session's time outside it.
            outside = time.perf_counter() - self.created - in_train
            report["wall_seconds"] = history.wall_seconds + outside
            atomic_write(folder / MODEL, torch_bytes(self.net.state_dict()))
            atomic_write(folder / REPORT, to_strict_json(report).encode())
        return report


def _selection(args: argparse.Namespace) -> dict[str, Any]:
    """The mask selection of the command: ``{}`` (each layer's rule), a threshold or a
    sparsity with its scope, as keyword arguments of :func:`bayessparse.masks`."""
    if args.threshold is not None:
        return {"threshold": args.threshold}
    if args.sparsity is not None:
        return {"sparsity": args.sparsity, "scope": args.scope}
    return {}


def _rule(selection: dict[str, Any]) -> str:
    if "threshold" in selection:
        return f"keep weights with keep-probability > {selection['threshold']:g}"
    if "sparsity" in selection:
        return (
            f"prune the {selection['sparsity']:.2%} of weights of lowest keep-probability "
            f"({selection['scope']} ranking)"
        )
    return "each layer's default rule (sparse VD: log alpha < 3; L0: test gate > 0; ...)"


def _report(
    net: nn.Module,
    test: Split,
    selection: dict[str, Any],
    settings: dict[str, Any],
    history: Any,
) -> dict[str, Any]:
    common = {
        "settings": {**settings, **selection},
        "selection": _rule(selection),
        "train_seconds": sum(r["train_seconds"] for r in history.epochs),
        "sessions": history.sessions,
        "history": history.epochs,
    }
    if settings["method"] == DENSE:
        layers: list[Any] = [net.get_submodule(name) for name in weighted_layers(net)]
        weights = sum(layer.weight.numel() for layer in layers)
        return {
            **_quality(predict_logits(net, test.images).softmax(-1), test.labels),
            "compression": 1.0,
            "architecture": "dense",
            "sparsity": 0.0,
            "weights": weights,
            "kept": weights,
            "layers": {},
            **common,
            "selection": "none (a dense network)",
        }
    probs = predict(net, test.images, num_samples=0, masks=masks(net, **selection)).probs
    sparsity = sparsity_report(net, **selection)
    names = _layer_names(net)
    return {
        **_quality(probs, test.labels),
        "compression": sparsity["compression"],
        "architecture": kept_units(net, sparsity["layers"]),
        "sparsity": sparsity["sparsity"],
        "weights": sparsity["weights"],
        "kept": sparsity["kept"],
        "layers": {
            name: {"layer": names[name], **layer} for name, layer in sparsity["layers"].items()
        },
        **common,
    }


def _quality(probs: Tensor, labels: Tensor) -> dict[str, float]:
    report = probability_report(probs, labels)
    return {key: report[key] for key in ("error", "nll", "ece", "brier")}


def _print_report(report: dict[str, Any], out: Path) -> None:
    s = report["settings"]
    sessions = f" over {report['sessions']} sessions" if report["sessions"] > 1 else ""
    compression = report["compression"]
    print(f"\n{s['model']} / {s['method']}, {s['epochs']} epochs, seed {s['seed']}")
    print(f"  test error   {report['error']:.2%}")
    print(
        f"  compression  {compression:.1f}x  ({report['kept']} of {report['weights']} "
        "weights kept)"
        if math.isfinite(compression)
        else f"  compression  all {report['weights']} weights pruned"
    )
    print(f"  kept units   {report['architecture']}")
    print(f"  selection    {report['selection']}")
    print(f"  test NLL     {report['nll']:.4f}")
    print(f"  ECE          {report['ece']:.4f}")
    for layer in report["layers"].values():
        print(f"  layer {layer['layer']:<24} sparsity {layer['sparsity']:6.1%}")
    print(
        f"  time         {report['wall_seconds']:.0f} s{sessions} (training "
        f"{report['train_seconds']:.0f} s)"
    )
    print(f"  report       {out / REPORT}")
    print(f"  per epoch    {out / EPOCHS_CSV} (settings: {out / CONFIG})")


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """A scheduler's SIGTERM ends the run like Ctrl-C: a message, exit code, no traceback."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 failed run, 2 user mistake)."""
    args = _parse_args(argv)
    with _sigterm_interrupts():
        if args.command == "evaluate":
            return _evaluate_command(args)
        if args.command == "bench":
            return _bench_command(args)
        return _train_command(args)


def _train_command(args: argparse.Namespace) -> int:
    """The ``train`` command: check everything, then train, evaluate and report."""
    try:
        return _train_job(args)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train_job(args: argparse.Namespace) -> int:
    try:
        job = Job(args)  # every check that needs no training happens here
    except (ValueError, TypeError) as err:  # bad options, layer options, data or network
        return _fail(str(err), 2)
    except KeyboardInterrupt:
        return 130
    try:
        report = job.run()
    except (UsageError, RunFolderBusy, CheckpointError) as err:
        return _fail(str(err), 2)
    except (TrainingDiverged, StorageError) as err:
        return _fail(str(err), 1)
    except KeyboardInterrupt:
        print(
            "\ninterrupted: the last completed epoch is in the checkpoint; continue with "
            f"--resume --out {job.folder}",
            file=sys.stderr,
        )
        return 130
    if report is None:  # a rank other than 0: rank 0 reports
        return 0
    _print_report(report, job.folder)
    return 0 if math.isfinite(report["error"]) else 1


def _evaluate_command(args: argparse.Namespace) -> int:
    """The ``evaluate`` command: evaluate a finished run and print a summary."""
    if not args.run.is_dir():
        return _fail(f"run folder {args.run} does not exist; give the --out of a train run", 2)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.plots and importlib.util.find_spec("matplotlib") is None:
        _note("no plots: matplotlib is not installed (pip install 'bayessparse[plots]')")
        args.plots = False
    try:
        with RunFolder(args.run):
            result = evaluate_run(
                args.run,
                num_samples=args.num_samples,
                ood_size=args.ood_size,
                seed=args.seed,
                plots=args.plots,
            )
    except (RunError, DataError, RunFolderBusy, NotADirectoryError) as err:
        return _fail(str(err), 2)
    except StorageError as err:
        return _fail(str(err), 1)
    except KeyboardInterrupt:
        return 130
    _print_evaluation(result, Path(args.run))
    return 0


def _print_evaluation(result: dict[str, Any], folder: Path) -> None:
    for mode, m in result["test"].items():
        print(
            f"test, {mode:13s}  error {m['error']:.2%}  NLL {m['nll']:.4f}  ECE {m['ece']:.4f}"
            f"  Brier {m['brier']:.4f}"
        )
    if "sweep" in result:
        print("validation sweep (target sparsity: error, ECE, compression)")
        for row in result["sweep"]:
            print(
                f"  {row['target_sparsity']:6.1%}: {row['error']:.2%}  {row['ece']:.4f}  "
                f"{row['compression']:.1f}x"
            )
    for mode, sets in result["ood"].items():
        for name, scores in sets.items():
            line = "  ".join(f"{score} {v['auroc']:.3f}" for score, v in scores.items())
            print(f"OOD AUROC, {mode}, {name:15s} {line}")
    exported = result["export"]
    print(
        f"exported {exported['path']} ({'compacted' if exported['compacted'] else 'baked'}, "
        f"{exported['size']['params']} parameters, {exported['flops']['nonzero']} of "
        f"{exported['dense_flops']} MACs)"
    )
    speed = ", ".join(f"{x:.2f}x at batch {batch}" for batch, x in exported["speedup"].items())
    print(f"CPU speed-up over the dense net: {speed}")
    print(f"evaluation {folder / EVALUATION}")


def _bench_command(args: argparse.Namespace) -> int:
    """The ``bench`` command: check everything, run this shard's rows, merge and plot."""
    if args.merge is not None:
        if not (args.merge / ROWS).is_dir():
            return _fail(
                f"{args.merge} holds no bench rows ({ROWS}/); give the --out of a bench", 2
            )
        return _merge_bench(args.merge, 0)
    missing = [flag for flag in ("methods", "budget", "out") if getattr(args, flag) is None]
    if missing:
        flags = ", ".join(f"--{flag}" for flag in missing)
        return _fail(f"bench needs {flags} (or --merge DIR to merge a bench's rows)", 2)
    try:
        check_budget(args.methods, args.budget)
        if args.out.exists() and not args.out.is_dir():
            raise UsageError(f"--out {args.out} is a file; give a directory for the bench")
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        data = _load_data(args.data_dir)
        bench = Bench(
            args.out,
            args.model,
            args.budget,
            data["train"],
            data["test"],
            optimizer=args.optimizer,
        )
        claim(args.out, _bench_settings(bench))
    except (ValueError, TypeError) as err:  # budget, data, a folder with other settings
        return _fail(str(err), 2)
    except KeyboardInterrupt:
        return 130
    items = shard(grid(args.model, args.methods, args.sparsities, args.seeds), *args.shard)
    done = sum(row_path(args.out, item).exists() for item in items)
    if done:
        _note(
            f"{done} of the {len(items)} rows are in {args.out / ROWS} already; running the rest"
        )
    try:
        run_grid(bench, items, progress=None if args.progress else False)
    except CheckpointError as err:
        return _merge_bench(args.out, _fail(str(err), 2))
    except (RowFailed, StorageError) as err:
        return _merge_bench(args.out, _fail(str(err), 1))
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished rows are kept; run the same command to continue",
            file=sys.stderr,
        )
        return _merge_bench(args.out, 130)
    return _merge_bench(args.out, 0)


def _bench_settings(bench: Bench) -> dict[str, Any]:
    """What changes a bench's results, recorded in its folder: model, budget, optimiser
    settings and the data's fingerprint."""
    return {
        "model": bench.model,
        "budget": bench.budget,
        "batch_size": bench.batch_size,
        "lr": bench.lr,
        "data": fingerprint(*bench.train_split, *bench.test_split),
        # Recorded only when not the default, so that Adam benches keep their settings.
        **({"optimizer": bench.optimizer} if bench.optimizer != "adam" else {}),
    }


def _merge_bench(folder: Path, code: int) -> int:
    """Rebuild the bench's CSV and plots from its row files; return ``code`` (1 if they
    could not be written, 130 if interrupted: each file is whole, old or new)."""
    try:
        rows = merge(folder)
        print(f"{len(rows)} rows in {folder / RESULTS}")
        if importlib.util.find_spec("matplotlib") is None:
            _note("no plots: matplotlib is not installed (pip install 'bayessparse[plots]')")
        elif rows:
            plots = plot_results(rows, folder)
            print(f"plots {', '.join(str(p) for p in plots)}")
    except StorageError as err:
        return _fail(str(err), 1)
    except KeyboardInterrupt:
        print(f"\ninterrupted while merging: run --merge {folder} to finish", file=sys.stderr)
        return 130
    return code
