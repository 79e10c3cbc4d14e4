"""The reproduction runner's bookkeeping: finished runs are skipped, the table is theirs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce.py"


@pytest.fixture
def reproduce(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "reproduce", module)  # dataclasses look it up
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(module, "README", tmp_path / "README.md")
    return module


def _report(folder: Path, error: float, compression: float, architecture: str) -> None:
    folder.mkdir(parents=True)
    report = {
        "error": error,
        "compression": compression,
        "architecture": architecture,
        "nll": 0.05,
        "ece": 0.002,
        "train_seconds": 600.0,
    }
    (folder / "report.json").write_text(json.dumps(report))


def test_table_gives_mean_and_spread_over_seeds_with_the_paper(reproduce):
    _report(reproduce.run_folder("svd300-40ep", 0), 0.0168, 62.0, "400-100-50")
    _report(reproduce.run_folder("svd300-40ep", 1), 0.0172, 64.0, "410-101-52")
    lines = reproduce.table().splitlines()
    assert len(lines) == 3  # header, rule, the one row with runs
    row = lines[2]
    assert "`--model lenet300`" in row and "| 2 |" in row
    assert "1.70 ± 0.03 %" in row and "63.0 ± 1.4×" in row
    assert "400-100-50, 410-101-52" in row and "1.92 % at 68×" in row


def test_finished_runs_are_evaluated_once_and_not_run_again(reproduce, monkeypatch):
    calls = []
    monkeypatch.setattr(reproduce, "cli_main", lambda argv: calls.append(argv) or 0)
    folder = reproduce.run_folder("gnj-5", 0)
    _report(folder, 0.01, 5.0, "10-20-100-50")
    assert reproduce.run("gnj-5", 0, threads=1) == 0
    assert calls == [["evaluate", str(folder), "--no-plots", "--threads", "1"]]
    (folder / "evaluation.json").write_text("{}")
    calls.clear()
    assert reproduce.run("gnj-5", 0, threads=1) == 0
    assert calls == []
    reproduce.run("gnj-5", 1, threads=1)
    train, evaluate = calls
    assert train[:5] == ["train", "--model", "lenet5", "--method", "group_nj"]
    assert "--resume" in train and str(reproduce.run_folder("gnj-5", 1)) in train
    assert evaluate[:2] == ["evaluate", str(reproduce.run_folder("gnj-5", 1))]


def test_a_row_with_a_start_trains_from_its_start_rows_run_of_the_same_seed(
    reproduce, monkeypatch
):
    calls = []
    monkeypatch.setattr(reproduce, "cli_main", lambda argv: calls.append(argv) or 0)
    reproduce.run("sbp-5-pretrained", 1, threads=1)
    start = str(reproduce.run_folder("dense5", 1))
    assert [argv[0] for argv in calls] == ["train", "evaluate", "train", "evaluate"]
    assert calls[0][:5] == ["train", "--model", "lenet5", "--method", "dense"]
    assert calls[1][1] == start
    assert calls[2][calls[2].index("--init-from") + 1] == start
    _report(reproduce.run_folder("sbp-5-pretrained", 1), 0.009, 5.0, "3-18-284-283")
    assert "--init-from (dense5 run)` | 1 |" in reproduce.table()


def test_a_finished_start_without_its_weights_is_trained_again(reproduce, monkeypatch):
    # model.pt is not in git: a fresh checkout has the start's report but not its weights.
    calls = []
    monkeypatch.setattr(reproduce, "cli_main", lambda argv: calls.append(argv) or 0)
    start = reproduce.run_folder("dense5", 0)
    _report(start, 0.0064, 1.0, "dense")
    (start / "evaluation.json").write_text("{}")
    reproduce.run("sbp-5-pretrained", 0, threads=1)
    assert [argv[0] for argv in calls] == ["train", "evaluate", "train", "evaluate"]
    assert calls[0][:5] == ["train", "--model", "lenet5", "--method", "dense"]
    assert "--overwrite" in calls[0] and "--resume" not in calls[0]
    assert calls[1][1] == str(start)  # its old evaluation was of the old weights
    calls.clear()
    (start / "model.pt").write_bytes(b"")
    (start / "evaluation.json").write_text("{}")
    reproduce.run("sbp-5-pretrained", 0, threads=1)
    assert [argv[0] for argv in calls] == ["train", "evaluate"]  # only the row itself
    assert "--resume" in calls[0]


def test_a_started_row_resumes_without_running_its_start_again(reproduce, monkeypatch):
    calls = []
    monkeypatch.setattr(reproduce, "cli_main", lambda argv: calls.append(argv) or 0)
    folder = reproduce.run_folder("sbp-5-pretrained", 0)
    folder.mkdir(parents=True)
    (folder / "checkpoint.pt").write_bytes(b"")
    reproduce.run("sbp-5-pretrained", 0, threads=1)
    assert [argv[0] for argv in calls] == ["train", "evaluate"]
    assert "--resume" in calls[0] and "--init-from" in calls[0]


def test_failed_training_is_not_evaluated(reproduce, monkeypatch):
    calls = []
    monkeypatch.setattr(reproduce, "cli_main", lambda argv: calls.append(argv) or 1)
    assert reproduce.run("gnj-5", 0, threads=1) == 1
    assert [argv[0] for argv in calls] == ["train"]


def test_table_gives_the_evaluated_runs_mean_speedup(reproduce):
    for seed, (one, hundred) in enumerate([(1.5, 2.0), (1.7, 2.4)]):
        folder = reproduce.run_folder("gnj-5", seed)
        _report(folder, 0.01, 5.0, "10-20-100-50")
        evaluation = {"export": {"speedup": {"1": one, "100": hundred}}}
        (folder / "evaluation.json").write_text(json.dumps(evaluation))
    _report(reproduce.run_folder("gnj-5", 2), 0.01, 5.0, "10-20-100-50")  # not evaluated yet
    _report(reproduce.run_folder("l0-300", 0), 0.0169, 3.2, "192-242-99")
    rows = {line.split("|")[1].strip(): line for line in reproduce.table().splitlines()[2:]}
    assert "| 1.6× / 2.2× |" in rows["`--model lenet5 --method group_nj`"]
    assert "| – |" in rows["`--model lenet300 --method l0`"]


def test_readme_table_is_replaced_between_markers_only(reproduce):
    reproduce.README.write_text(f"intro\n{reproduce.BEGIN}\nold table\n{reproduce.END}\noutro\n")
    _report(reproduce.run_folder("l0-300", 0), 0.0169, 3.2, "192-242-99")
    reproduce.write_table()
    text = reproduce.README.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{reproduce.END}\noutro\n")
    assert "old table" not in text and "192-242-99" in text


def test_unknown_row_is_a_usage_error(reproduce, capsys):
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["no-such-row"])
    assert exit_info.value.code == 2
    assert "unknown rows no-such-row" in capsys.readouterr().err
