"""Knowledge distillation (Hinton, Vinyals, Dean 2015) on MNIST: test errors out of 10,000.

A teacher 784-1200-1200-10 with dropout (0.2 on the inputs, 0.5 on the hidden units, as
the paper's teacher; without its jitter), a student 784-800-800-10 trained on the labels
alone, and the same student distilled from the teacher
(:class:`bayessparse.training.Teacher`: ``α T² KL + (1 − α) CE`` at T = 20). Each is
trained by :func:`bayessparse.training.train` with the same epochs, seed and schedule
(Adam 1e-3, batch 100, lr constant then linear to 0 over the second half). Writes
``results.csv`` under ``--out`` (default ``benchmarks/results/distillation``).

    OMP_NUM_THREADS=1 python benchmarks/distillation.py --epochs 10
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
from torch import nn

from bayessparse.data import load_mnist, preprocess
from bayessparse.metrics import predict_logits
from bayessparse.training import Teacher, train


def mlp(hidden: int, dropout: tuple[float, float] = (0.0, 0.0)) -> nn.Sequential:
    """784-hidden-hidden-10 with ReLUs, dropout ``(inputs, hidden units)``."""
    inputs, units = dropout
    return nn.Sequential(
        nn.Flatten(),
        nn.Dropout(inputs),
        nn.Linear(784, hidden),
        nn.ReLU(),
        nn.Dropout(units),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Dropout(units),
        nn.Linear(hidden, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/distillation"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--temperature", type=float, default=20.0)
    parser.add_argument("--alpha", type=float, default=0.9, help="weight of the soft term")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = preprocess(load_mnist())
    test = data["test"]
    paper = {"teacher": 67, "student, labels only": 146, "student, distilled": 74}
    specs = {  # hidden units, dropout, temperature
        "teacher": (1200, (0.2, 0.5), None),
        "student, labels only": (800, (0.0, 0.0), None),
        "student, distilled": (800, (0.0, 0.0), args.temperature),
    }
    rows: list[dict[str, object]] = []
    teacher_net: nn.Module | None = None
    for name, (hidden, dropout, temperature) in specs.items():
        torch.manual_seed(args.seed)  # the two students start from the same weights
        net = mlp(hidden, dropout)
        teacher = None
        if temperature is not None and teacher_net is not None:
            teacher = Teacher(teacher_net, temperature, args.alpha)
        start = time.perf_counter()
        train(
            net,
            *data["train"],
            epochs=args.epochs,
            seed=args.seed,
            teacher=teacher,
            progress=False,
        )
        errors = int((predict_logits(net, test.images).argmax(-1) != test.labels).sum())
        rows.append(
            {
                "net": name,
                "test_errors": errors,
                "paper_errors": paper[name],
                "temperature": temperature or "",
                "alpha": args.alpha if temperature else "",
                "epochs": args.epochs,
                "seed": args.seed,
                "seconds": round(time.perf_counter() - start),
            }
        )
        print(rows[-1], flush=True)
        if teacher_net is None:
            teacher_net = net
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
