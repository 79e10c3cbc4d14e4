"""``train --config FILE``, the shipped recipe configs, and the files a run writes beside
its checkpoint: ``config.toml`` (which reproduces the run), ``epochs.csv`` and the plots.

Option parsing is tested in-process; two tiny CLI runs (600 MNIST images) check that a
run's config.toml reproduces it, and a short in-process training that the CSV survives
interruptions at any point between checkpoint and CSV.
"""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mnist_subset import write_mnist_subset

from bayessparse import cli
from bayessparse.configs import (
    CONFIG,
    dump_toml,
    recipe_text,
    shipped,
    tomllib,
    write_recipe_configs,
)
from bayessparse.recipes import RECIPES, build_net
from bayessparse.training import Callback, train
from bayessparse.training.logbook import EPOCHS_CSV, LOSS_PLOT, SPARSITY_PLOT, Logbook

REPO = Path(__file__).resolve().parents[1]
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def parse(*argv: str | Path):
    return cli._parse_args(["train", *map(str, argv)])


def settings(*argv: str | Path) -> dict:
    return cli._settings(parse(*argv), [])


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_config_sets_options_and_flags_given_override_it(tmp_path):
    path = write(
        tmp_path,
        'method = "l0"\nepochs = 3\nbatch-size = 50\nlr = 0.002\nkl_warmup = [1, 2]\n'
        "threshold = 0.2\nno_progress = true\n\n[layer]\nl0_lambda = 0.5\ndroprate_init = 0.3\n",
    )
    args = parse("--config", path)
    assert (args.method, args.epochs, args.batch_size, args.lr) == ("l0", 3, 50, 0.002)
    assert (args.kl_warmup, args.threshold, args.progress) == ([1.0, 2.0], 0.2, False)
    assert settings("--config", path)["layer"] == {"l0_lambda": 0.5, "droprate_init": 0.3}

    args = parse("--config", path, "--epochs", "5", "--sparsity", "0.9", "--layer", "l0_lambda=1")
    assert (args.epochs, args.batch_size, args.threshold, args.sparsity) == (5, 50, None, 0.9)
    layer = cli._settings(args, [])["layer"]
    assert layer == {"l0_lambda": 1, "droprate_init": 0.3}


def test_shipped_recipe_configs_agree_with_the_recipes():
    files = shipped()
    for model, method in RECIPES:
        name = f"{model}-{method}"
        assert files[name].read_text() == recipe_text(model, method), (
            f"{name}.toml differs from bayessparse/recipes.py; rewrite the shipped configs "
            "with bayessparse.configs.write_recipe_configs()"
        )
        by_name = settings("--config", name)
        assert by_name == settings("--model", model, "--method", method), name
        # A shorter run scales the recipe's schedule, as the flags alone do.
        short = settings("--config", name, "--epochs", "3")
        assert short == settings("--model", model, "--method", method, "--epochs", "3")


def test_write_recipe_configs_writes_what_ships(tmp_path):
    for path in write_recipe_configs(tmp_path):
        assert path.read_text() == shipped()[path.stem].read_text()


def test_the_official_200_epoch_sparse_vd_schedule_ships():
    official = settings("--config", "lenet300-sparse_vd-200")
    flags = ("--epochs", "200", "--kl-warmup", "5", "20", "--lr-decay-start", "100")
    assert official == settings(*flags)
    assert official["kl_warmup"] == [5.0, 20.0] and official["lr_decay_start"] == 100.0


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("epoch = 3", "unknown key 'epoch' (did you mean epochs?); the keys are"),
        ('config = "other.toml"', "unknown key 'config'"),
        ('epochs = "3"', 'epochs = "3": expected a number, without quotes'),
        ("epochs = 2.5", "epochs = 2.5: expected int"),
        ("epochs = 0", "epochs = 0: expected a finite number >= 1"),
        ("lr = true", "lr = true: expected a number"),
        ("model = 5", "model = 5: expected text, in quotes"),
        ('model = "lenet"', 'model = "lenet": choose from lenet300, lenet5'),
        ("kl_warmup = 3", "kl_warmup = 3: expected two values, e.g. [2, 10]"),
        ("kl_warmup = [1, 2, 3]", "expected two values"),
        ("layer = 3", "layer = 3: expected a table of layer options"),
        ("resume = 1", "resume = 1: expected true or false"),
        ("threshold = 0.1\nsparsity = 0.5", "threshold and sparsity exclude each other"),
        ("train_clip = false\nno_train_clip = true", "sets train_clip a second time"),
        ("epochs = [", "not valid TOML"),
    ],
)
def test_bad_config_values_exit_2_with_one_line_naming_key_and_fix(
    tmp_path, capsys, text, fragment
):
    path = write(tmp_path, text)
    with pytest.raises(SystemExit) as exit_:
        parse("--config", path)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --config {path}: "), lines
    assert fragment in lines[0], lines[0]


def test_missing_files_and_unknown_formats_are_refused_naming_the_shipped_configs(
    tmp_path, capsys
):
    (tmp_path / "empty").mkdir()
    for arg, fragment in [
        (tmp_path / "nope.toml", "no such file"),
        (tmp_path / "empty", "holds no config.toml"),
        (write(tmp_path, "{}", "run.json"), "unknown format .json"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            parse("--config", arg)
        assert exit_.value.code == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert fragment in line, line
        assert "lenet300-sparse_vd-200" in line or ".json" in line, line


def test_yaml_without_pyyaml_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml raises ImportError
    with pytest.raises(SystemExit):
        parse("--config", write(tmp_path, "epochs: 3\n", "run.yaml"))
    assert "pip install 'bayessparse[yaml]'" in capsys.readouterr().err


def test_yaml_config(tmp_path):
    pytest.importorskip("yaml")
    path = write(tmp_path, "epochs: 3\nkl-warmup: [1, 2]\nlayer:\n  train_clip: false\n", "r.yml")
    assert settings("--config", path)["layer"] == {"train_clip": False}
    assert parse("--config", path).kl_warmup == [1.0, 2.0]


def test_bad_layer_option_in_a_config_fails_before_data_is_read(tmp_path, capsys):
    path = write(tmp_path, '[layer]\ntrain_clip = "no"\n')
    code = cli.main(["train", "--config", str(path), "--data-dir", str(tmp_path / "none")])
    assert code == 2
    assert "train_clip expects true or false" in capsys.readouterr().err


def test_dump_toml_round_trips():
    values = {
        "text": 'a "quoted"\\ path\n\t\x7f é 😀',
        "float": 1e-05,
        "big": 1e300,
        "int": -3,
        "flag": False,
        "pair": [2.0, 10],
        "unset": None,
        "table": {"l0_lambda": [10.0, 0.5], "gate": "output"},
    }
    text = dump_toml(values, header=["a comment"])
    assert text.startswith("# a comment\n")
    loaded = tomllib.loads(text)
    assert loaded == {k: v for k, v in values.items() if v is not None}


def cli_run(*args: str | Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bayessparse", "train", "--no-progress", "--threads", "1"]
    return subprocess.run(
        [*cmd, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_a_runs_config_toml_reproduces_it_and_its_logbook_is_written(tmp_path):
    data = write_mnist_subset(tmp_path / "mnist")
    first, second = tmp_path / "first", tmp_path / "second"
    flags = ["--epochs", "2", "--lr", "0.002", "--seed", "3", "--val-size", "100"]
    flags += ["--threshold", "0.1", "--layer", "log_sigma2_init=-9", "--batch-size", "200"]
    result = cli_run(*flags, "--data-dir", data, "--out", first)
    assert result.returncode == 0, result.stderr
    config = tomllib.loads((first / CONFIG).read_text())
    assert config["lr"] == 0.002 and config["seed"] == 3 and config["threshold"] == 0.1
    assert config["layer"] == {"train_clip": True, "log_sigma2_init": -9}

    rows = read_csv(first / EPOCHS_CSV)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert list(rows[0])[:5] == ["epoch", "data_term", "kl", "kl_weight", "lr"]
    assert {"test_error", "sparsity", "sparsity_1", "sparsity_3", "sparsity_5"} <= set(rows[0])
    if HAS_MATPLOTLIB:
        assert (first / LOSS_PLOT).stat().st_size and (first / SPARSITY_PLOT).stat().st_size

    # The run folder names its config.toml; the data directory is in it.
    result = cli_run("--config", first, "--out", second)
    assert result.returncode == 0, result.stderr
    assert (second / CONFIG).read_text() == (first / CONFIG).read_text()
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (first, second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timeless = [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]
    again = [
        {k: v for k, v in r.items() if k != "train_seconds"} for r in read_csv(second / EPOCHS_CSV)
    ]
    assert again == timeless


class StopAfter(Callback):
    """Ctrl-C once epoch ``epoch`` is saved (before the callbacks after this one)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_saved(self, record: dict[str, float]) -> None:
        if record["epoch"] == self.epoch:
            raise KeyboardInterrupt


def test_epochs_csv_survives_interrupted_sessions_without_duplicate_rows(tmp_path):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(200, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (200,), generator=generator)

    def session(folder: Path, first: list[Callback], last: list[Callback]) -> None:
        torch.manual_seed(0)
        net = build_net("lenet300", "sparse_vd")
        logbook = Logbook(folder, epochs=4, selection={"threshold": 0.5}, plots=HAS_MATPLOTLIB)
        checkpoint = folder / "checkpoint.pt"
        train(
            net,
            images,
            labels,
            epochs=4,
            checkpoint=checkpoint,
            resume=checkpoint.exists(),
            progress=False,
            callbacks=[*first, logbook, *last],
        )

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    straight.mkdir()
    stopped.mkdir()
    session(straight, [], [])
    # Stopped after epoch 2's checkpoint and before its CSV row, then after epoch 3's row.
    with pytest.raises(KeyboardInterrupt):
        session(stopped, [StopAfter(2)], [])
    assert [r["epoch"] for r in read_csv(stopped / EPOCHS_CSV)] == ["1"]
    with pytest.raises(KeyboardInterrupt):
        session(stopped, [], [StopAfter(3)])
    assert [r["epoch"] for r in read_csv(stopped / EPOCHS_CSV)] == ["1", "2", "3"]
    session(stopped, [], [])

    def timeless(folder: Path) -> list[dict[str, str]]:
        return [
            {k: v for k, v in r.items() if k != "train_seconds"}
            for r in read_csv(folder / EPOCHS_CSV)
        ]

    assert [r["epoch"] for r in timeless(stopped)] == ["1", "2", "3", "4"]
    assert timeless(stopped) == timeless(straight)
    assert {"sparsity_1", "sparsity_3", "sparsity_5"} <= set(timeless(stopped)[0])
    if HAS_MATPLOTLIB:
        assert (stopped / LOSS_PLOT).exists() and (stopped / SPARSITY_PLOT).exists()
