"""CPU inference time of a compacted LeNet-5-Caffe against the dense one, with FLOPs.

By default the network is LeNet-5-Caffe with L0 gates closed down to a given architecture
(``--arch``, default the BC-GHS 5-10-76-16); ``--run DIR`` uses a trained run of
``python -m bayessparse train --model lenet5 --method ...`` instead. Dense and compacted
forward passes are interleaved at batch 1 and batch 100 and the median times printed.
Both nets pool as the exported one does (``BlockMaxPool``; ``--torch-pools``: torch's
``nn.MaxPool2d``, whose CPU kernel is several times slower).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import bayessparse as bs
from bayessparse.compaction import block_max_pools_
from bayessparse.metrics import flops
from bayessparse.models import LeNet5Caffe
from bayessparse.recipes import build_net, kept_architecture


def gated_lenet5(arch: list[int]) -> nn.Module:
    """LeNet-5-Caffe with L0 gates open on the first units of each layer only."""
    net = bs.to_sparse_(LeNet5Caffe(), "l0")
    with torch.no_grad():
        for (_, layer), keep in zip(bs.sparse_modules(net), arch, strict=True):
            layer.gate_log_alpha.fill_(-10.0)
            layer.gate_log_alpha.view(-1)[:keep] = 10.0
    return net


def trained(run: Path) -> nn.Module:
    settings = json.loads((run / "report.json").read_text())["settings"]
    net = build_net("lenet5", settings["method"], settings["init"], **settings["layer"])
    net.load_state_dict(torch.load(run / "model.pt"))
    return net


def median_ms(fn, x: torch.Tensor, rounds: int, reps: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            fn(x)
        times.append((time.perf_counter() - start) / reps * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="5-10-76-16")
    parser.add_argument("--run", type=Path, help="a trained lenet5 run directory")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--torch-pools", action="store_true", help="keep nn.MaxPool2d")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = trained(args.run) if args.run else gated_lenet5([int(a) for a in args.arch.split("-")])
    net.eval()
    dense = bs.to_dense(net, bake=True).eval()
    small = bs.compact(net).eval()
    if not args.torch_pools:
        dense, small = block_max_pools_(dense), block_max_pools_(small)
    example = torch.randn(100, 1, 28, 28)
    assert torch.allclose(small(example), dense(example), atol=1e-4, rtol=1e-4)
    f_dense, f_small = flops(dense, example), flops(small, example)
    print(
        f"kept architecture {kept_architecture(net)}; compacted layers: "
        + ", ".join(
            f"{m.weight.shape[1]}->{m.weight.shape[0]}"
            for m in small
            if isinstance(m, (nn.Linear, nn.Conv2d))
        )
    )
    print(
        f"MACs per example: dense {f_dense['dense']:,}, compacted {f_small['dense']:,} "
        f"({f_dense['dense'] / f_small['dense']:.1f}x fewer)"
    )
    with torch.inference_mode():
        for batch, reps in ((1, 200), (100, 10)):
            x = torch.randn(batch, 1, 28, 28)
            for fn in (dense, small):  # warm-up
                median_ms(fn, x, 2, reps)
            t_dense: list[float] = []
            t_small: list[float] = []
            for _ in range(args.rounds):
                t_dense += median_ms(dense, x, 1, reps)
                t_small += median_ms(small, x, 1, reps)
            md, ms = statistics.median(t_dense), statistics.median(t_small)
            print(
                f"batch {batch:3d}: dense {md:.3f} ms, compacted {ms:.3f} ms, "
                f"speed-up {md / ms:.1f}x"
            )


if __name__ == "__main__":
    main()
