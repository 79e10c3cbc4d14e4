"""``python -m bayessparse bench`` as a user meets it: killed and restarted, split in shards,
given bad input.

Each bench runs as a subprocess on a small MNIST subset (600 training, 200 test images)
with a budget of 2 epochs: the dense reference, magnitude and random pruning and sparse VD
at two sparsities and two seeds, 14 rows of a fraction of a second each.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mnist_subset import write_mnist_subset

from bayessparse.bench import TIMING

REPO = Path(__file__).resolve().parents[1]
GRID = [
    "--methods",
    "dense,magnitude,random,sparse_vd",
    "--sparsities",
    "0.5,0.9",
    "--seeds",
    "0,1",
    "--budget",
    "2",
]
# dense: one row per seed; the others: one per (sparsity, seed), and sparse VD one more
# per seed at its own threshold.
ROWS = 2 + 3 * 2 * 2 + 2


@pytest.fixture(scope="module")
def mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mnist_subset(tmp_path_factory.mktemp("mnist"))


def command(*args: str | Path, data: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "bayessparse", "bench", "--threads", "1"]
    if data is not None:
        cmd += ["--data-dir", str(data)]
    return cmd + [str(a) for a in args]


def bench(*args: str | Path, data: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(*args, data=data), cwd=REPO, capture_output=True, text=True, timeout=300
    )


def start(*args: str | Path, data: Path) -> subprocess.Popen:
    return subprocess.Popen(
        command(*args, data=data), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def files(folder: Path) -> dict[str, tuple[int, bytes]]:
    """``{name: (mtime in ns, contents)}`` of the files in ``folder``."""
    return {
        p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.glob("*") if p.is_file()
    }


def read_csv(path: Path, drop: tuple[str, ...] = ()) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def killed_and_restarted(tmp_path_factory: pytest.TempPathFactory, mnist: Path) -> dict:
    """A bench killed by SIGKILL once two rows are stored, then run again to the end."""
    out = tmp_path_factory.mktemp("bench") / "out"
    proc = start(*GRID, "--out", out, data=mnist)
    deadline = time.monotonic() + 120
    while len(list((out / "rows").glob("*.json"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    before = {"rows": files(out / "rows"), "cache": files(out / "cache")}
    again = bench(*GRID, "--out", out, data=mnist)
    return {"out": out, "killed": proc.returncode, "before": before, "again": again}


def test_a_killed_bench_restarted_keeps_every_finished_row_and_recomputes_none(
    killed_and_restarted,
):
    run = killed_and_restarted
    out = run["out"]
    assert run["killed"] == -signal.SIGKILL
    assert run["again"].returncode == 0, run["again"].stderr
    before = run["before"]
    assert 2 <= len(before["rows"]) < ROWS  # killed mid-grid
    assert f"note: {len(before['rows'])} of the {ROWS} rows are in" in run["again"].stderr
    after = {"rows": files(out / "rows"), "cache": files(out / "cache")}
    # Rows and caches finished before the kill are untouched: same bytes, never rewritten.
    for kind in ("rows", "cache"):
        assert {k: after[kind][k] for k in before[kind]} == before[kind]
    assert len(after["rows"]) == ROWS
    rows = read_csv(out / "results.csv")
    assert len(rows) == ROWS
    keys = [(r["method"], float(r["sparsity"]), int(r["seed"])) for r in rows]
    # Grid order: the dense reference, Bayesian families, pruning methods by name.
    methods = ("sparse_vd", "magnitude", "random")
    own = [(m, 0.0, seed) for m in ("dense", "sparse_vd") for seed in (0, 1)]
    assert keys == [*own, *[(m, s, seed) for m in methods for s in (0.5, 0.9) for seed in (0, 1)]]
    assert not list(out.glob("**/.*.tmp"))  # the killed writer's temporary file is gone


def test_two_concurrent_shards_then_merge_equal_one_process(killed_and_restarted, mnist, tmp_path):
    out = tmp_path / "sharded"
    shards = [start(*GRID, "--out", out, "--shard", f"{i}/2", data=mnist) for i in range(2)]
    for proc in shards:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    merged = bench("--merge", out)
    assert merged.returncode == 0, merged.stderr
    assert f"{ROWS} rows" in merged.stdout
    # Every column but the timings is reproducible: same seed, one thread.
    one = read_csv(killed_and_restarted["out"] / "results.csv", drop=TIMING)
    assert read_csv(out / "results.csv", drop=TIMING) == one
    # Each cached net was trained once, by whichever shard got its lock first.
    assert sorted(p.name for p in (out / "cache").iterdir()) == [
        "dense-0.pt",
        "dense-1.pt",
        "sparse_vd-0.pt",
        "sparse_vd-1.pt",
    ]
    assert (out / "error.png").stat().st_size > 0 and (out / "ece.png").stat().st_size > 0


def test_bad_input_ends_in_one_line_and_exit_2(tmp_path):
    # The other bad inputs are checked in-process (test_bench.py); this one through a real
    # process: exit code 2, one line, no traceback, nothing written.
    result = bench("--methods", "dense,magnitude", "--budget", "1", "--out", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "error: Expected a budget of at least 2 epochs for method 'magnitude' (its protocol "
        "has phases of whole epochs), got 1. Raise --budget."
    ]
    assert not (tmp_path / "out").exists()


def test_a_folder_with_other_settings_is_refused_naming_the_difference(
    killed_and_restarted, mnist
):
    out = killed_and_restarted["out"]
    result = bench(*GRID[:-1], "3", "--out", out, data=mnist)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {out / 'bench.json'} records a bench with other settings (budget 2 there, "
        "3 here). Rows with different settings do not compare: use another --out, or the "
        "same settings."
    ]


def test_sgd_benches_train_the_plain_nets_with_sgd_and_record_it(mnist, tmp_path):
    out = tmp_path / "sgd"
    args = ("--methods", "dense,magnitude", "--sparsities", "0.9", "--budget", "2")
    result = bench(*args, "--optimizer", "sgd", "--out", out, data=mnist)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "bench.json").read_text())["optimizer"] == "sgd"
    rows = read_csv(out / "results.csv")
    assert [row["method"] for row in rows] == ["dense", "magnitude"]
    assert float(rows[0]["error"]) < 0.8  # it learns: chance is 0.9 (12 steps on 600 images)
    adam = bench(*args, "--out", out, data=mnist)  # the folder is an SGD bench
    assert adam.returncode == 2
    assert "(optimizer 'sgd' there, None here)" in adam.stderr
