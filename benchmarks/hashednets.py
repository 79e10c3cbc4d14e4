"""HashedNets (Chen et al. 2015) on MNIST: a hashed 784-1000-10 net against a dense net of
the same stored size.

At each compression c, both layers of 784-1000-10 are :class:`HashedLinear` with
``K = weights / c`` real weights (and their biases); the equivalent dense net is
784-h-10 with h chosen so that it stores as many parameters (biases included). All are
trained by :func:`bayessparse.training.train` with the same epochs and seed (Adam 1e-3,
batch 100, lr constant then linear to 0 over the second half). Writes ``results.csv``
under ``--out`` (default ``benchmarks/results/hashednets``).

    OMP_NUM_THREADS=1 python benchmarks/hashednets.py --epochs 5
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
from torch import nn

from bayessparse.compression import HashedLinear
from bayessparse.data import load_mnist, preprocess
from bayessparse.metrics import error_rate, predict_logits
from bayessparse.training import train

HIDDEN = 1000


def hashed(compression: int) -> nn.Sequential:
    """784-1000-10 with both layers hashed to ``weights / compression`` real weights."""
    first = HashedLinear(784, HIDDEN, round(784 * HIDDEN / compression), seed=1)
    second = HashedLinear(HIDDEN, 10, round(HIDDEN * 10 / compression), seed=2)
    return nn.Sequential(nn.Flatten(), first, nn.ReLU(), second)


def dense(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def stored(net: nn.Module) -> int:
    """The parameters a net stores (hashed layers: their real weights and biases)."""
    return sum(p.numel() for p in net.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/hashednets"))
    parser.add_argument("--compressions", default="8,64")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = preprocess(load_mnist())
    test = data["test"]
    rows = []
    for compression in map(int, args.compressions.split(",")):
        torch.manual_seed(args.seed)
        net = hashed(compression)
        # 784-h-10 stores 795 h + 10 parameters.
        hidden = max(1, round((stored(net) - 10) / 795))
        for name, candidate in (("HashNet", net), ("equivalent NN", dense(hidden))):
            start = time.perf_counter()
            train(candidate, *data["train"], epochs=args.epochs, seed=args.seed, progress=False)
            error = error_rate(predict_logits(candidate, test.images), test.labels)
            rows.append(
                {
                    "compression": compression,
                    "net": name if name == "HashNet" else f"784-{hidden}-10",
                    "stored_parameters": stored(candidate),
                    "test_error": error,
                    "epochs": args.epochs,
                    "seed": args.seed,
                    "seconds": round(time.perf_counter() - start),
                }
            )
            print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
