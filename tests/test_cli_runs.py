"""The command line as a user meets it: run folders, resuming, bad input, crashes.

Every test runs ``python -m bayessparse`` as a subprocess on a small MNIST subset written
by the test (600 training and 200 test images, LeNet-300-100: an epoch takes a fraction
of a second), and checks the exit code, the one-line message and the files left on disk.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mnist_subset import write_mnist_subset

from bayessparse.training import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mnist_subset(tmp_path_factory.mktemp("mnist"))


def command(*args: str | Path, data: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "bayessparse", "train", "--no-progress", "--threads", "1"]
    if data is not None:
        cmd += ["--data-dir", str(data)]
    return cmd + [str(a) for a in args]


def cli(*args: str | Path, data: Path | None = None, cwd: Path = REPO, **kw):
    return subprocess.run(
        command(*args, data=data), cwd=cwd, capture_output=True, text=True, timeout=300, **kw
    )


def evaluate_cli(run: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bayessparse", "evaluate", str(run), "--threads", "1", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_user_error(result, *fragments: str) -> str:
    """Exit code 2, a single line on stderr that contains every fragment, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def start(*args: str | Path, data: Path) -> subprocess.Popen:
    """A run in the background, its stdout and stderr captured as text."""
    return subprocess.Popen(
        command(*args, data=data),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    """Wait (at most two minutes) until ``path`` exists, the run still going."""
    deadline = time.monotonic() + 120
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


# Options are checked before any data is read: a missing data directory is never reached.
@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--epochs", "0"], "--epochs"),
        (["--threads", "0"], "--threads"),
        (["--batch-size", "0"], "--batch-size"),
        (["--seed", str(2**64)], "--seed"),
        (["--seed", "-1"], "--seed"),
        (["--lr", "inf"], "--lr"),
        (["--lr", "0"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--kl-warmup", "nan", "nan"], "--kl-warmup"),
        (["--kl-warmup", "5", "2"], "Swap them"),
        (["--lr-decay-start", "nan"], "--lr-decay-start"),
        (["--threshold", "1.5"], "--threshold"),
        (["--threshold", "nan"], "--threshold"),
        (["--resume", "--overwrite"], "not allowed with"),
        (["--resume"], "--resume needs --out"),
        (["--layer", "train_clip=False"], "train_clip expects true or false"),
        (["--layer", "train_clip=no"], "train_clip expects true or false"),
        (["--layer", 'train_clip="false"'], "train_clip expects true or false"),
        (["--layer", "log_sigma2_init=[1,2"], "log_sigma2_init expects a number"),
        (["--layer", "log_sigma2_init=[1,2]"], "has 2 values for 3 layers"),
        (["--layer", "bogus=1"], "Valid options: log_sigma2_init, train_clip"),
        (["--layer", "no-equals"], "KEY=VALUE"),
        (["--out", ""], "--out: expected a path"),
        (["--method", "l0", "--layer", "gate=foo"], "Expected gate to be one of"),
        (["--method", "l0", "--layer", "droprate_init=1.5"], "droprate_init in (0, 1)"),
    ],
)
def test_bad_options_end_in_one_line_and_exit_2_before_data_is_read(tmp_path, args, fragment):
    result = cli(*args, data=tmp_path / "no-such-dir", cwd=tmp_path)
    assert_user_error(result, fragment)
    assert not (tmp_path / "runs").exists()


def test_out_pointing_at_a_file_is_refused(tmp_path, mnist):
    (tmp_path / "file").write_text("mine")
    assert_user_error(cli("--out", tmp_path / "file", data=mnist), "is a file")
    assert (tmp_path / "file").read_text() == "mine"


def write_raw_mnist(root: Path, mnist: Path, images=None, labels=None) -> Path:
    """A copy of ``mnist`` whose training images or labels are replaced by raw arrays."""
    root.mkdir()
    names = {"images": "train-images-idx3-ubyte", "labels": "train-labels-idx1-ubyte"}
    sums = []
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        raw = gzip.decompress((mnist / f"{name}.gz").read_bytes())
        for key, array in (("images", images), ("labels", labels)):
            if array is not None and name == names[key]:
                header = bytes([0, 0, 8, array.ndim]) + b"".join(
                    int(d).to_bytes(4, "big") for d in array.shape
                )
                raw = header + array.astype(np.uint8).tobytes()
        (root / f"{name}.gz").write_bytes(gzip.compress(raw))
        sums.append(f"{hashlib.sha256(raw).hexdigest()}  {name}")
    (root / "SHA256SUMS.uncompressed").write_text("\n".join(sums) + "\n")
    return root


def test_wrong_image_shape_and_labels_out_of_range_are_user_errors(tmp_path, mnist):
    wide = write_raw_mnist(tmp_path / "wide", mnist, images=np.zeros((600, 32, 32)))
    assert_user_error(cli("--out", tmp_path / "a", data=wide), "(600, 32, 32)", "28, 28")
    labels = np.zeros(600)
    labels[[3, 7]] = 10
    bad = write_raw_mnist(tmp_path / "labels", mnist, labels=labels)
    assert_user_error(cli("--out", tmp_path / "b", data=bad), "0..9", "10")
    assert not (tmp_path / "a" / "checkpoint.pt").exists()


def test_resume_into_a_folder_that_does_not_exist_creates_it(tmp_path, mnist):
    out = tmp_path / "new" / "deep"
    result = cli("--epochs", "1", "--resume", "--out", out, data=mnist)
    assert result.returncode == 0, result.stderr
    assert "no checkpoint" in result.stderr
    assert {"checkpoint.pt", "report.json", "model.pt"} <= {p.name for p in out.iterdir()}


def test_a_finished_run_is_never_overwritten_without_resume_or_overwrite(tmp_path, mnist):
    out = tmp_path / "run"
    assert cli("--epochs", "1", "--out", out, data=mnist).returncode == 0
    (out / "checkpoint.pt").unlink()
    report, model = (out / "report.json").read_bytes(), (out / "model.pt").read_bytes()
    assert_user_error(cli("--epochs", "2", "--out", out, data=mnist), "--overwrite")
    assert_user_error(cli("--epochs", "2", "--resume", "--out", out, data=mnist), "no checkpoint")
    assert (out / "report.json").read_bytes() == report
    assert (out / "model.pt").read_bytes() == model
    result = cli("--epochs", "2", "--overwrite", "--out", out, data=mnist)
    assert result.returncode == 0, result.stderr
    assert len(json.loads((out / "report.json").read_text())["history"]) == 2


def test_default_run_folders_never_collide(tmp_path, mnist):
    for _ in range(2):
        assert cli("--epochs", "1", data=mnist, cwd=tmp_path).returncode == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "lenet300-sparse_vd-s0",
        "lenet300-sparse_vd-s0-2",
    ]


def test_resume_refuses_other_data_or_settings_naming_both_values(tmp_path, mnist):
    out = tmp_path / "run"
    assert cli("--epochs", "2", "--out", out, data=mnist).returncode == 0
    other = write_mnist_subset(tmp_path / "other", n_train=500)
    line = assert_user_error(
        cli("--epochs", "2", "--resume", "--out", out, data=other), "training_data"
    )
    assert "different run" in line
    line = assert_user_error(cli("--epochs", "1", "--resume", "--out", out, data=mnist))
    assert "epochs is 2 there and 1 here" in line
    line = assert_user_error(
        cli("--epochs", "2", "--lr", "0.01", "--resume", "--out", out, data=mnist)
    )
    assert "lr is 0.001 there and 0.01 here" in line


def test_damaged_checkpoint_is_refused(tmp_path, mnist):
    out = tmp_path / "run"
    assert cli("--epochs", "1", "--out", out, data=mnist).returncode == 0
    raw = bytearray((out / "checkpoint.pt").read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 4096] = bytes(4096)
    (out / "checkpoint.pt").write_bytes(bytes(raw))
    assert_user_error(cli("--epochs", "1", "--resume", "--out", out, data=mnist), "damaged")


def test_resumed_report_counts_the_whole_run(tmp_path, mnist):
    out = tmp_path / "run"
    assert cli("--epochs", "2", "--out", out, data=mnist).returncode == 0
    result = cli("--epochs", "2", "--resume", "--out", out, data=mnist)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["epochs"] == 2 and report["sessions"] == 2
    assert report["wall_seconds"] >= report["train_seconds"] > 0
    assert "2 epochs" in result.stdout and "over 2 sessions" in result.stdout


def test_short_trial_scales_the_recipe_schedule_and_says_so(tmp_path, mnist):
    out = tmp_path / "run"
    result = cli("--epochs", "4", "--out", out, data=mnist)
    assert result.returncode == 0, result.stderr
    assert "scaled from 40 to 4 epochs" in result.stderr
    settings = json.loads((out / "report.json").read_text())["settings"]
    # The recipe warms up over epochs 2..10 of 40, so over 0.2..1.0 of 4, and decays the lr
    # over the second half.
    assert settings["kl_warmup"] == [0.2, 1.0] and settings["lr_decay_start"] is None
    assert "layer 1 Linear 784->300" in result.stdout


def test_everything_pruned_gives_strict_json_and_a_plain_report(tmp_path, mnist):
    out = tmp_path / "run"
    result = cli("--epochs", "1", "--threshold", "1", "--out", out, data=mnist)
    assert result.returncode == 0, result.stderr
    assert "all 266200 weights pruned" in result.stdout

    def refuse(constant: str) -> None:
        raise AssertionError(f"report.json holds {constant}")

    report = json.loads((out / "report.json").read_text(), parse_constant=refuse)
    assert report["compression"] is None and report["kept"] == 0


@pytest.mark.parametrize("model", ["lenet300", "lenet5"])
def test_every_method_has_a_recipe_that_runs(tmp_path, mnist, model):
    from bayessparse.recipes import RECIPES, TRAINABLE

    assert {m for (mod, m) in RECIPES if mod == model} == set(TRAINABLE)
    if model == "lenet300":  # one epoch of the relaxed spike-and-slab, which had none
        for method in ("spike_slab", "dense"):
            result = cli(
                "--method", method, "--epochs", "1", "--out", tmp_path / method, data=mnist
            )
            assert result.returncode == 0, result.stderr


def test_help_is_plain_text_and_names_each_recipe_length():
    result = subprocess.run(command("--help"), capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and "``" not in result.stdout
    assert "lenet5/l0 150" in " ".join(result.stdout.split())


def test_divergence_stops_with_one_line_and_keeps_no_nan_checkpoint(tmp_path, mnist):
    out = tmp_path / "run"
    result = cli("--epochs", "2", "--lr", "1e30", "--out", out, data=mnist)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: Training stopped:") and "Traceback" not in result.stderr
    assert "learning rate" in lines[-1]
    assert not (out / "report.json").exists() and not (out / "model.pt").exists()
    if (out / "checkpoint.pt").exists():
        saved = load_checkpoint(out / "checkpoint.pt")
        assert all(torch.isfinite(t).all() for t in saved["net"].values())


def _limit_file_size() -> None:
    # Writes past 1 MB fail with EFBIG instead of killing the process with SIGXFSZ: a
    # disk that fills up as the checkpoint is written.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))


def test_failed_checkpoint_write_says_where_and_leaves_no_temporary_file(tmp_path, mnist):
    out = tmp_path / "run"
    result = cli("--epochs", "1", "--out", out, data=mnist, preexec_fn=_limit_file_size)
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: Could not write") and "checkpoint.pt" in line, line
    assert "Traceback" not in result.stderr
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_second_run_on_a_busy_folder_is_refused_and_the_first_finishes_intact(tmp_path, mnist):
    out = tmp_path / "run"
    first = start("--epochs", "50", "--out", out, data=mnist)
    try:
        wait_for(out / ".owner", first)
        # A new run and a resume, both while the first trains (it has seconds to go).
        others = [
            start(*args, "--out", out, data=mnist)
            for args in (["--epochs", "3"], ["--epochs", "50", "--resume"], ["--overwrite"])
        ]
        results = [finish(p) for p in others]
        assert first.poll() is None, "the first run ended before the others were refused"
        for result in results:
            assert_user_error(result, "in use by another run", f"pid {first.pid}")
    finally:
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    report = json.loads((out / "report.json").read_text())
    assert [r["epoch"] for r in report["history"]] == list(range(1, 51))
    assert report["sessions"] == 1


def until_training_or_exit(out: Path, proc: subprocess.Popen) -> None:
    """Wait until the run holds its folder (training is about to begin) or has ended."""
    deadline = time.monotonic() + 120
    while not (out / ".owner").exists() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def temporary_files(out: Path) -> list[Path]:
    return [p for p in out.glob(".*") if p.name.endswith(".tmp")]


def until_a_write_or_exit(out: Path, proc: subprocess.Popen) -> None:
    """Wait until a file write is under way (its temporary file exists) or the run ended."""
    deadline = time.monotonic() + 120
    while not temporary_files(out) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.0005)


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path, mnist):
    """Kill a run again and again, at random moments and in the middle of file writes,
    resuming it each time: it ends exactly where an uninterrupted run ends."""
    epochs = "6"
    straight = tmp_path / "straight"
    proc = start("--epochs", epochs, "--out", straight, data=mnist)
    until_training_or_exit(straight, proc)
    began = time.monotonic()
    assert finish(proc).returncode == 0
    # How long the run takes once it holds its folder (about 2 s on an idle machine: six
    # epochs of 600 images, each with a 6 MB checkpoint): random kills fall anywhere in it.
    span = time.monotonic() - began
    expected = state(straight / "model.pt")

    rng = random.Random(0)
    kills = {"random": 0, "in a write": 0}
    for trial in range(1, 10):
        if min(kills.values()) >= 4:
            break
        out = tmp_path / f"killed-{trial}"
        for attempt in itertools.count():  # kill this run until it finishes
            (out / ".owner").unlink(missing_ok=True)  # a killed run leaves its pid behind
            proc = start("--epochs", epochs, "--resume", "--out", out, data=mnist)
            until_training_or_exit(out, proc)
            mode = "in a write" if attempt % 2 else "random"
            if mode == "random":
                time.sleep(rng.uniform(0.0, span))
            else:
                until_a_write_or_exit(out, proc)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            result = finish(proc)
            if result.returncode == 0:
                break
            assert result.returncode == -signal.SIGKILL, result.stderr
            # A kill in a write leaves its temporary file; the next run removes it.
            kills[mode] += mode == "random" or bool(temporary_files(out))
        got = state(out / "model.pt")
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got), f"trial {trial}"
        history = json.loads((out / "report.json").read_text())["history"]
        assert [r["epoch"] for r in history] == list(range(1, 7))
        assert not temporary_files(out)
    assert min(kills.values()) >= 4, kills


def test_sigterm_ends_the_run_like_ctrl_c_and_the_run_resumes(tmp_path, mnist):
    out = tmp_path / "run"
    proc = start("--epochs", "40", "--out", out, data=mnist)
    wait_for(out / "checkpoint.pt", proc)
    proc.send_signal(signal.SIGTERM)  # as a scheduler ending a job
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"--resume --out {out}" in err and "Traceback" not in err
    done = len(load_checkpoint(out / "checkpoint.pt")["history"])
    assert 1 <= done < 40
    result = cli("--epochs", "40", "--resume", "--out", out, data=mnist)
    assert result.returncode == 0, result.stderr
    assert f"resuming after epoch {done}" in result.stderr


def test_evaluate_writes_sweep_metrics_ood_plots_and_the_exported_model(tmp_path, mnist):
    out = tmp_path / "run"
    result = cli(
        "--epochs", "2", "--val-size", "100", "--sparsity", "0.9", "--out", out, data=mnist
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert "prune the 90.00% of weights" in report["selection"]
    evaluate = evaluate_cli(out, "--ood-size", "100", "--num-samples", "3")
    assert evaluate.returncode == 0, evaluate.stderr
    assert "OOD AUROC, monte_carlo, inverted" in evaluate.stdout
    assert "CPU speed-up over the dense net: " in evaluate.stdout
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert set(evaluation["export"]["speedup"]) == {"1", "100"}
    assert all(x > 0 for x in evaluation["export"]["speedup"].values())
    assert set(evaluation["test"]) == {"deterministic", "monte_carlo"}
    # The run's own data: the subset's 200 test images, its first 100 for OOD detection.
    assert report["settings"]["data_dir"] == str(mnist.resolve())
    assert evaluation["data"] == {
        "data_dir": str(mnist.resolve()),
        "validation": 100,
        "test": 200,
        "ood": 100,
    }
    assert [r["target_sparsity"] for r in evaluation["sweep"]][:2] == [0.0, 0.5]
    assert evaluation["selection"] == {"sparsity": 0.9, "scope": "global"}
    assert {"rotated_90", "inverted", "shuffled", "gaussian_noise"} <= set(
        evaluation["ood"]["monte_carlo"]
    )
    assert {"sweep.png", "histograms.png", "reliability.png", "model.pt2"} <= {
        p.name for p in out.iterdir()
    }


def test_a_run_starts_from_a_dense_runs_weights_and_refuses_other_starts(tmp_path, mnist):
    dense = tmp_path / "dense"
    assert cli("--method", "dense", "--epochs", "1", "--out", dense, data=mnist).returncode == 0
    run = tmp_path / "sbp"
    result = cli(
        "--method", "sbp", "--epochs", "1", "--init-from", dense, "--out", run, data=mnist
    )
    assert result.returncode == 0, result.stderr
    assert f'init_from = "{dense.resolve()}"' in (run / "config.toml").read_text()
    again = cli("--config", run, "--out", tmp_path / "again", data=mnist)  # config reproduces
    assert again.returncode == 0, again.stderr
    assert torch.equal(
        torch.load(run / "model.pt")["1.weight"],
        torch.load(tmp_path / "again" / "model.pt")["1.weight"],
    )
    assert_user_error(
        cli("--method", "sbp", "--init-from", tmp_path / "none", data=mnist), "none does not exist"
    )
    assert_user_error(
        cli("--method", "l0", "--init-from", run / "model.pt", data=mnist),
        "not those of a dense lenet300",
    )


def test_a_run_folder_moved_with_its_data_resumes_without_its_start(tmp_path, mnist):
    # A run's folder and data copied elsewhere (another checkout, another machine); its
    # start's weights are not needed again: the checkpoint holds the run's own.
    dense, run = tmp_path / "dense", tmp_path / "sbp"
    assert cli("--method", "dense", "--epochs", "1", "--out", dense, data=mnist).returncode == 0
    options = ("--method", "sbp", "--epochs", "2")
    assert cli(*options, "--init-from", dense, "--out", run, data=mnist).returncode == 0
    moved = tmp_path / "elsewhere"
    for folder in (run, mnist):
        shutil.copytree(folder, moved / folder.name)
    result = cli(
        *options,
        "--init-from",
        moved / "dense",
        "--resume",
        "--out",
        moved / "sbp",
        data=moved / mnist.name,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((moved / "sbp" / "report.json").read_text())["sessions"] == 2


def test_parameter_average_is_a_recorded_setting_and_its_decay_is_checked(tmp_path, mnist):
    run = tmp_path / "l0"
    result = cli("--method", "l0", "--epochs", "1", "--ema", "0.999", "--out", run, data=mnist)
    assert result.returncode == 0, result.stderr
    assert "ema = 0.999" in (run / "config.toml").read_text()
    assert json.loads((run / "report.json").read_text())["settings"]["ema"] == 0.999
    result = cli("--ema", "1", data=mnist)
    assert result.returncode == 2 and "expected a number in (0, 1), got '1'" in result.stderr


@pytest.mark.parametrize("method", ["l0", "group_nj", "horseshoe", "spike_slab", "sbp", "dense"])
def test_evaluate_takes_every_methods_run(tmp_path, mnist, method):
    run = tmp_path / method  # LeNet-5: its convolutions prune whole channels, bias included
    result = cli(
        "--model", "lenet5", "--method", method, "--epochs", "1", "--out", run, data=mnist
    )
    assert result.returncode == 0, result.stderr
    evaluate = evaluate_cli(run, "--no-plots", "--num-samples", "2", "--ood-size", "50")
    assert evaluate.returncode == 0, evaluate.stderr
    export = json.loads((run / "evaluation.json").read_text())["export"]
    assert 0 < export["flops"]["nonzero"] <= export["dense_flops"]


def test_evaluate_refuses_an_unfinished_run_and_train_a_too_large_validation_set(tmp_path, mnist):
    (tmp_path / "empty").mkdir()
    assert_user_error(evaluate_cli(tmp_path / "empty"), "not a finished run", "--resume --out")
    assert_user_error(
        cli("--val-size", "600", "--out", tmp_path / "r", data=mnist),
        "validation size in [0, 599]",
    )
