"""CPU inference time of compacted networks against the dense masked ones.

Three networks, each dense (the masks baked into zeros, original shape) against compacted
(:func:`bayessparse.compact`):

* ``lenet300``: LeNet-300-100 with sparse VD, from a trained run (``--run DIR``, a folder of
  ``python -m bayessparse train --model lenet300 --method sparse_vd``, only read) or else
  with weights kept on a 437-113-90 architecture (the size such a run reaches); batches
  of 1 and 100 images.
* ``small_resnet`` and ``resnet18`` (tests/resnets.py, as torchvision defines ResNet-18,
  10 classes): L0 output gates on every convolution, a fraction ``--closed`` of them
  closed at random, random batch-norm statistics; batches of 1 and 16 images of 32x32.

Forward passes are interleaved (dense, compacted, dense, ...) for ``--rounds`` rounds, each
round timing enough calls to last about 20 ms, and the medians and their ratio printed,
with parameter counts and multiply-accumulates (MACs) per example. Run with ``--threads 1``
on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import bayessparse as bs
from bayessparse.metrics import flops
from bayessparse.models import LeNet300100

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from resnets import SmallResNet, gate_convs_, resnet18


def lenet300(run: Path | None) -> nn.Module:
    """A trained sparse VD LeNet-300-100, or one whose kept weights connect 437 random
    inputs to 113 units, those to 90, those to the 10 outputs."""
    if run is not None:
        from bayessparse.evaluation import load_run

        return load_run(run)[1]
    torch.manual_seed(0)
    net = bs.to_sparse_(LeNet300100())
    kept_in = torch.randperm(784)[:437]
    kept_1, kept_2 = torch.randperm(300)[:113], torch.randperm(100)[:90]
    with torch.no_grad():
        for layer, rows, cols in (
            (net[1], kept_1, kept_in),
            (net[3], kept_2, kept_1),
            (net[5], torch.arange(10), kept_2),
        ):
            layer.weight_log_sigma2.fill_(10.0)
            layer.weight_log_sigma2[rows[:, None], cols] = -20.0
    return net


def times_ms(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn(x)
    return (time.perf_counter() - start) / reps * 1e3


def compare(
    name: str, net: nn.Module, shape: tuple[int, ...], batches: tuple[int, ...], rounds: int
):
    net.eval()
    dense = bs.to_dense(net, bake=True).eval()
    small = bs.compact(net).eval()
    example = torch.randn(batches[-1], *shape)
    with torch.no_grad():
        error = float((small(example) - dense(example)).abs().max())
    params = [sum(p.numel() for p in m.parameters()) for m in (dense, small)]
    macs = [flops(m, example)["dense"] for m in (dense, small)]
    print(
        f"{name}: parameters {params[0]:,} -> {params[1]:,}, MACs per example "
        f"{macs[0]:,} -> {macs[1]:,} ({macs[0] / macs[1]:.1f}x fewer); max |difference| "
        f"{error:.1e}"
    )
    with torch.inference_mode():
        for batch in batches:
            x = torch.randn(batch, *shape)
            reps = max(1, round(20.0 / times_ms(dense, x, 3)))
            for fn in (dense, small):  # warm-up
                times_ms(fn, x, reps)
            t_dense, t_small = [], []
            for _ in range(rounds):
                t_dense.append(times_ms(dense, x, reps))
                t_small.append(times_ms(small, x, reps))
            md, ms = statistics.median(t_dense), statistics.median(t_small)
            print(
                f"  batch {batch:3d}: dense {md:8.3f} ms, compacted {ms:8.3f} ms, "
                f"speed-up {md / ms:.2f}x"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=["lenet300", "small_resnet", "resnet18"])
    parser.add_argument("--run", type=Path, help="a trained sparse VD lenet300 run (read only)")
    parser.add_argument("--closed", type=float, default=0.5, help="closed gates of the ResNets")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    builders = {
        "lenet300": lambda: (lenet300(args.run), (1, 28, 28), (1, 100)),
        "small_resnet": lambda: (gate_convs_(SmallResNet(16), args.closed), (3, 32, 32), (1, 16)),
        "resnet18": lambda: (gate_convs_(resnet18(10), args.closed), (3, 32, 32), (1, 16)),
    }
    for name in args.nets:
        net, shape, batches = builders[name]()
        compare(name, net, shape, batches, args.rounds)


if __name__ == "__main__":
    main()
