"""Run settings as files, for ``python -m bayessparse train --config FILE``.

A config file holds ``option = value`` pairs named as the ``train`` options (TOML; YAML
with the ``yaml`` extra). This package ships one file per recipe of
:mod:`bayessparse.recipes` (``lenet300-sparse_vd.toml``, ...: :func:`recipe_text` writes
them, and a test checks that they agree with the recipes) and
``lenet300-sparse_vd-200.toml``, the official 200-epoch sparse VD schedule. Each run
writes its resolved settings to ``config.toml`` (:func:`run_config_text`), which
``--config`` reads back to reproduce it.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from bayessparse.recipes import recipe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG = "config.toml"  # a run's resolved settings, in its run folder
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the value and the fix."""


def shipped() -> dict[str, Path]:
    """``{name: path}`` of the config files that ship with bayessparse."""
    folder = Path(str(resources.files(__name__)))
    return {path.stem: path for path in sorted(folder.glob("*.toml"))}


def find(text: str) -> Path:
    """The config file that ``--config text`` names: a file, a run folder (its
    ``config.toml``), or the name of a shipped config (``lenet300-sparse_vd``)."""
    path = Path(text)
    names = ", ".join(shipped())
    if path.is_dir():
        if (path / CONFIG).is_file():
            return path / CONFIG
        raise ConfigError(
            f"folder {text} holds no {CONFIG}; give a config file, a run folder or a shipped "
            f"config ({names})"
        )
    if path.is_file():
        return path
    if text in shipped():
        return shipped()[text]
    raise ConfigError(
        f"no such file {text!r}; give a TOML file, a run folder or a shipped config ({names})"
    )


def read(path: Path) -> dict[str, Any]:
    """The ``{key: value}`` pairs of a TOML (or YAML) file.

    Raises:
        ConfigError: an unreadable file, a syntax error (with its line), an unknown
            format, or YAML without PyYAML installed.
    """
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(
            f"unknown format {suffix or '(no suffix)'}; write a .toml file "
            "(or .yaml with pip install 'bayessparse[yaml]')"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from err
    if suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"not valid TOML: {err}") from err
    return _read_yaml(text)


def _read_yaml(text: str) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:
        raise ConfigError(
            "YAML needs PyYAML: pip install 'bayessparse[yaml]', or write the file as TOML"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"not valid YAML: {' '.join(str(err).split())}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected option: value pairs, got a YAML {type(data).__name__}")
    return {str(key): value for key, value in data.items()}


def toml_value(value: Any) -> str:
    """``value`` (a bool, number, text or list of them) written as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        # JSON's escapes are TOML's; TOML also wants DEL escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"Cannot write {value!r} ({type(value).__name__}) as a TOML value.")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else toml_value(key)


def dump_toml(
    values: Mapping[str, Any],
    header: Sequence[str] = (),
    notes: Mapping[str, str] | None = None,
) -> str:
    """TOML text of ``values``: comment lines ``header``, then ``key = value`` lines, then a
    table per dict value. A ``None`` value (TOML has no null) becomes the comment
    ``notes[key]``, or is left out; so is an empty table."""
    notes = notes or {}
    lines = [f"# {line}" if line else "#" for line in header]
    tables = []
    for key, value in values.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        elif value is not None:
            lines.append(f"{_toml_key(key)} = {toml_value(value)}")
        elif key in notes:
            lines.append(f"# {notes[key]}")
    for key, table in tables:
        if not table:
            continue
        lines += ["", f"[{_toml_key(key)}]"]
        lines += [f"{_toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def recipe_text(model: str, method: str) -> str:
    """The shipped config file of a recipe: the recipe of :mod:`bayessparse.recipes`, with
    its schedule as comments (it is scaled to ``epochs`` unless set by hand)."""
    rec = recipe(model, method)
    (start, end), decay = rec.kl_warmup, rec.lr_decay_start
    warmup = "no KL warm-up" if end == 0 else f"KL weight 0 before epoch {start:g}, 1 from {end:g}"
    decay_text = "over the second half" if decay is None else f"from epoch {decay:g}"
    header = [
        f"The {model}/{method} recipe (bayessparse/recipes.py), run with",
        f"    python -m bayessparse train --config {model}-{method}",
        "Every train option can be set here (its name, with dashes or underscores); flags",
        "given on the command line override the file.",
        f"Schedule: {warmup}; lr linear to 0 {decay_text}.",
        "It is scaled to epochs unless set here, e.g.",
        f"    kl_warmup = [{start:g}, {end:g}]",
        f"    lr_decay_start = {rec.epochs / 2 if decay is None else decay:g}",
    ]
    values = {"model": model, "method": method, "epochs": rec.epochs, "init": rec.init}
    return dump_toml({**values, "layer": dict(rec.layer)}, header)


def write_recipe_configs(folder: Path | None = None) -> list[Path]:
    """(Re)write the shipped recipe configs from :mod:`bayessparse.recipes`."""
    from bayessparse.recipes import RECIPES

    folder = folder or Path(str(resources.files(__name__)))
    written = []
    for model, method in sorted(RECIPES):
        path = folder / f"{model}-{method}.toml"
        path.write_text(recipe_text(model, method), encoding="utf-8")
        written.append(path)
    return written


# The settings of a run that change its result, in the order config.toml lists them.
RUN_KEYS = (
    "model",
    "method",
    "epochs",
    "batch_size",
    "lr",
    "kl_warmup",
    "lr_decay_start",
    "init",
    "init_from",
    "ema",
    "seed",
    "val_size",
    "data_dir",
)


def run_config_text(settings: Mapping[str, Any], selection: Mapping[str, Any]) -> str:
    """``config.toml`` of a run: its resolved ``settings`` (the recipe and the flags, as
    the CLI's settings) and mask ``selection`` (threshold, or sparsity and scope)."""
    values = {key: settings.get(key) for key in RUN_KEYS}
    values.update(selection)
    values["layer"] = dict(settings.get("layer", {}))
    header = [
        "The resolved settings of this run; this reproduces it (same seed, same result):",
        "    python -m bayessparse train --config THIS_FILE --out NEW_FOLDER",
    ]
    notes = {
        "lr_decay_start": "lr_decay_start not set: the lr falls linearly to 0 over the second "
        "half",
        "data_dir": "data_dir not set: the MNIST copy bundled with bayessparse",
    }
    return dump_toml(values, header, notes)
