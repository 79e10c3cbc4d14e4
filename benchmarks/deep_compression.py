"""Deep Compression (Han, Mao, Dally 2016) of LeNet-300-100 on MNIST: error and bytes.

Dense training, magnitude pruning to the per-layer kept fractions of Han et al. (2015),
8 % - 9 % - 26 %, fine-tuning, then :func:`bayessparse.compression.deep_compression`:
k-means sharing (6-bit codes, the paper's for LeNet-300-100), codebook fine-tuning and
Huffman coding of the codes and 5-bit relative indices. Every training phase is
:func:`bayessparse.training.train` (batch 100, lr constant then linear to 0 over each
phase's second half) with Adam, or with ``--optimizer sgd`` the pruning papers' SGD
(momentum 0.9, weight decay 5e-4): the decay also empties the weights of MNIST's blank
border, which Adam leaves at their initial values, so fewer of them survive pruning and
the relative indices cluster. Writes ``summary.csv`` (error per stage; bytes and
ratio of each code width) and ``layers.csv`` (bytes per layer and stage) under ``--out``
(default ``benchmarks/results/deep_compression``).

    OMP_NUM_THREADS=1 python benchmarks/deep_compression.py
    OMP_NUM_THREADS=1 python benchmarks/deep_compression.py --optimizer sgd \
        --dense-epochs 60 --finetune-epochs 40 --finetune-lr 0.01 \
        --out benchmarks/results/deep_compression_sgd

The second (the pruning papers' SGD) gives 1.56 % error at 40.2x with 5-bit codes.
"""

from __future__ import annotations

import argparse
import copy
import csv
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from bayessparse.compression import deep_compression
from bayessparse.compression.sharing import MAX_ITERATIONS
from bayessparse.data import load_mnist, preprocess
from bayessparse.metrics import error_rate, predict_logits
from bayessparse.pruning import apply_masks_, prunable_layers
from bayessparse.pruning.base import trained_weight
from bayessparse.recipes import build_net
from bayessparse.training import train

KEPT = {"1": 0.08, "3": 0.09, "5": 0.26}  # Han et al. 2015, LeNet-300-100: 8 % - 9 % - 26 % kept


def largest(weight: Tensor, fraction: float) -> Tensor:
    """A mask of the ``fraction`` of ``weight``'s entries of largest magnitude."""
    count = round(fraction * weight.numel())
    cut = weight.abs().flatten().topk(count).values[-1]
    return weight.abs() >= cut


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/deep_compression"))
    parser.add_argument("--dense-epochs", type=int, default=20)
    parser.add_argument("--finetune-epochs", type=int, default=20)
    parser.add_argument("--codebook-epochs", type=int, default=5)
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-3 Adam, 0.1 SGD")
    parser.add_argument("--finetune-lr", type=float, default=None, help="default: --lr")
    parser.add_argument("--codebook-lr", type=float, default=1e-4, help="Adam, always")
    parser.add_argument("--bits", default="6,5", help="code bits to try, comma-separated")
    parser.add_argument("--index-bits", type=int, default=5)
    parser.add_argument("--kmeans-iterations", type=int, default=MAX_ITERATIONS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = preprocess(load_mnist())
    train_set, test = data["train"], data["test"]

    def error(net: nn.Module) -> float:
        return error_rate(predict_logits(net, test.images), test.labels)

    lr = args.lr or (0.1 if args.optimizer == "sgd" else 1e-3)
    finetune_lr = args.finetune_lr or lr

    def fit(net: nn.Module, epochs: int, lr: float, optimizer: str = args.optimizer) -> None:
        train(
            net,
            *train_set,
            epochs=epochs,
            lr=lr,
            optimizer=optimizer,
            seed=args.seed,
            progress=False,
        )

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    net = build_net("lenet300", "dense", init="torch")
    fit(net, args.dense_epochs, lr)
    rows = [{"stage": "dense", "error": error(net)}]
    with torch.no_grad():
        masks = {
            f"{n}.weight": largest(trained_weight(m), KEPT[n])
            for n, m in prunable_layers(net).items()
        }
        apply_masks_(net, masks)
    rows.append({"stage": "pruned", "error": error(net)})
    fit(net, args.finetune_epochs, finetune_lr)
    rows.append({"stage": "pruned + fine-tuned", "error": error(net)})
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    layer_rows = []
    for bits in map(int, args.bits.split(",")):
        shared = copy.deepcopy(net)

        def finetune(shared: nn.Module, bits: int = bits) -> None:
            rows.append({"stage": f"shared, {bits}-bit codes", "error": error(shared)})
            fit(shared, args.codebook_epochs, args.codebook_lr, "adam")

        report = deep_compression(
            shared,
            bits=bits,
            index_bits=args.index_bits,
            finetune=finetune,
            max_iterations=args.kmeans_iterations,
        )
        rows.append({"stage": f"+ codebook fine-tuned, {bits}-bit codes", "error": error(shared)})
        for stage in ("pruned", "shared", "huffman"):
            rows[-1][f"{stage}_bytes"] = report.bytes(stage)
            rows[-1][f"{stage}_ratio"] = round(report.ratio(stage), 2)
        layer_rows += [{"bits": bits, **row} for row in report.rows()]
    for row in rows:
        row |= {"kept": kept if row["stage"] != "dense" else 1.0, "seed": args.seed}
        row["dense_bytes"] = report.dense_bytes
        row["run_seconds"] = round(time.perf_counter() - start)
    args.out.mkdir(parents=True, exist_ok=True)
    write(args.out / "summary.csv", rows)
    write(args.out / "layers.csv", layer_rows)
    for row in rows:
        print(row)


def write(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
