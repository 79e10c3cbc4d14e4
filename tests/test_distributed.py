"""Data-parallel training: 2 gloo processes take the steps of one process on the same
global batches; masks are identical on every rank; rank 0's checkpoints resume exactly."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mnist_subset import write_mnist_subset
from torch import Tensor, nn

import bayessparse as bs
from bayessparse.cli import main
from bayessparse.nn.base import SparseModule
from bayessparse.training import CheckpointError, Schedule, load_checkpoint, train
from bayessparse.training.distributed import DataParallel, broadcast_masks, rank

WORLD = 2


def toy_problem(n: int = 300):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 20, generator=g)
    return x, x[:, :3].argmax(-1)


def toy_net(sparse: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))
    return bs.to_sparse_(net) if sparse else net


def run(net, **kwargs):
    x, y = toy_problem()
    defaults = dict(epochs=2, batch_size=50, lr=1e-2, schedule=Schedule((0.0, 1.0)))
    return train(net, x, y, progress=False, **{**defaults, **kwargs})


def quiet_sample(self, mean: Tensor, var: Tensor) -> Tensor:
    """The local reparameterisation without its noise: a deterministic ELBO step."""
    return mean + 0.0 * var


def comparable_runs(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Tensor]]:
    """Runs whose parameters one process and several must agree on (float tolerance)."""
    # An odd batch size: shards of 23 and 22 examples, weighted by their share.
    plain = toy_net(sparse=False, seed=rank())  # each rank builds its own; rank 0's is used
    run(plain, batch_size=45, objective="supervised")
    with monkeypatch.context() as patch:
        patch.setattr(SparseModule, "_gaussian_sample", quiet_sample)
        quiet = toy_net(sparse=True)
        run(quiet)
    return {
        "supervised": plain.state_dict(),
        "svi_without_noise": quiet.state_dict(),
        "masks": bs.masks(quiet),
    }


def _worker(this_rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=this_rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        seen: list[Tensor] = []
        shard = DataParallel.shard

        def recorded_shard(self, indices):
            seen.append(shard(self, indices))
            return seen[-1]

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(DataParallel, "shard", recorded_shard)
            results: dict = comparable_runs(patch)
        results["seen"] = torch.cat(seen)
        results["broadcast_masks"] = broadcast_masks(
            {"0.weight": torch.full((2, 2), this_rank == 0)}
        )
        folder = Path(out)
        straight = toy_net(sparse=True)
        run(straight, epochs=3, checkpoint=folder / "straight" / "checkpoint.pt")

        def interrupt(record):
            if record["epoch"] == 1:
                raise KeyboardInterrupt

        ckpt = folder / "resumed" / "checkpoint.pt"
        with pytest.raises(KeyboardInterrupt):
            run(toy_net(sparse=True), epochs=3, checkpoint=ckpt, on_epoch_end=interrupt)
        resumed = toy_net(sparse=True, seed=9)
        run(resumed, epochs=3, checkpoint=ckpt, resume=True)
        results["straight"], results["resumed"] = straight.state_dict(), resumed.state_dict()
        torch.save(results, folder / f"rank{this_rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_take_the_steps_of_one_on_the_same_global_batches(tmp_path, monkeypatch):
    context = mp.start_processes(
        _worker,
        args=(str(tmp_path / "init"), str(tmp_path)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    while not context.join(timeout=120):
        pass
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single = comparable_runs(monkeypatch)
    for run_name in ("supervised", "svi_without_noise"):
        for key, value in single[run_name].items():
            for results in ranks:
                torch.testing.assert_close(results[run_name][key], value, msg=key)
    # Each rank read its own half of every global batch: together, each example once per
    # epoch of each of the two comparable runs.
    first, second = (results["seen"] for results in ranks)
    assert len(first) + len(second) == 2 * 2 * 300
    both = torch.cat([first, second]).bincount(minlength=300)
    assert bool((both == 4).all())
    assert not set(first[:23].tolist()) & set(second[:22].tolist())
    for results in ranks:
        assert results["masks"].keys() == single["masks"].keys()
        for key, mask in single["masks"].items():
            assert torch.equal(results["masks"][key], mask), key
        assert bool(results["broadcast_masks"]["0.weight"].all())  # rank 0's
        # Each rank resumed from rank 0's checkpoint with its own noise stream: exact.
        for key, value in results["straight"].items():
            assert torch.equal(results["resumed"][key], value), key
    # The ranks drew different noise, so the noisy run is not the single process's,
    # and a checkpoint of 2 processes is refused by 1.
    assert not (tmp_path / "straight" / ".owner").exists()
    with pytest.raises(CheckpointError, match="world_size"):
        run(
            toy_net(sparse=True),
            epochs=3,
            checkpoint=tmp_path / "straight" / "checkpoint.pt",
            resume=True,
        )


def test_torchrun_trains_the_cli_on_two_processes(tmp_path):
    data = write_mnist_subset(tmp_path / "mnist", n_train=400, n_test=100)
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
        "2", "-m", "bayessparse", "train", "--epochs", "1", "--data-dir", str(data),
        "--out", str(out), "--threads", "1", "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("test error") == 1  # rank 0 alone reports
    report = json.loads((out / "report.json").read_text())
    assert report["history"][0]["epoch"] == 1
    assert load_checkpoint(out / "checkpoint.pt")["settings"]["world_size"] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_the_cli_refuses_cuda_where_there_is_none(tmp_path, capsys):
    assert main(["train", "--device", "cuda", "--out", str(tmp_path / "run")]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err
