"""Sparse-matrix (CSR, COO) against dense inference of pruned LeNet-300-100 layers, on CPU.

Each weight matrix of LeNet-300-100 is pruned to ``--sparsity`` (random masks, or the masks
of a trained run with ``--run DIR``), then ``y = x W^T`` is timed three ways, interleaved
in rounds at batch 1 and 100: a dense matmul of the zero-filled matrix, ``torch.sparse.mm``
with ``W`` in CSR and in COO. Prints median milliseconds per layer and per network, and
the speed-up over dense. bayessparse uses a sparse path by default only where it wins.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from bayessparse.recipes import build_net

SHAPES = [(300, 784), (100, 300), (10, 100)]


def random_weights(sparsity: float, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    weights = []
    for out_f, in_f in SHAPES:
        w = torch.randn(out_f, in_f, generator=g)
        keep = torch.rand(out_f, in_f, generator=g) >= sparsity
        weights.append(w * keep)
    return weights


def trained_weights(run: Path) -> list[Tensor]:
    import bayessparse as bs

    settings = json.loads((run / "report.json").read_text())["settings"]
    net = build_net("lenet300", settings["method"], settings["init"], **settings["layer"])
    net.load_state_dict(torch.load(run / "model.pt"))
    dense = bs.to_dense(net, bake=True)
    return [m.weight.detach().clone() for m in dense.modules() if isinstance(m, torch.nn.Linear)]


def forward(weights: list[Tensor], layout: str) -> Callable[[Tensor], Tensor]:
    if layout == "dense":
        mats = weights
    elif layout == "csr":
        mats = [w.to_sparse_csr() for w in weights]
    else:
        mats = [w.to_sparse().coalesce() for w in weights]

    def run(x: Tensor) -> Tensor:
        for i, w in enumerate(mats):
            # (W x^T)^T: the sparse operand must come first in torch.sparse.mm.
            x = x @ w.T if layout == "dense" else torch.sparse.mm(w, x.T).T
            if i < len(mats) - 1:
                x = torch.relu(x)
        return x

    return run


def time_ms(fn: Callable[[Tensor], Tensor], x: Tensor, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn(x)
    return (time.perf_counter() - start) / reps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.98)
    parser.add_argument("--run", type=Path, help="a trained lenet300 run directory")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weights = trained_weights(args.run) if args.run else random_weights(args.sparsity)
    kept = sum(int(w.count_nonzero()) for w in weights)
    total = sum(w.numel() for w in weights)
    print(f"weights kept {kept} of {total} (sparsity {1 - kept / total:.2%})")
    layouts = ("dense", "csr", "coo")
    fns = {layout: forward(weights, layout) for layout in layouts}
    for batch in (1, 100):
        x = torch.randn(batch, 784)
        reference = fns["dense"](x)
        for layout in layouts[1:]:
            assert torch.allclose(fns[layout](x), reference, atol=1e-4), layout
        reps = 200 if batch == 1 else 50
        times: dict[str, list[float]] = {layout: [] for layout in layouts}
        for _ in range(args.rounds):  # interleaved, so drifts of the machine hit all alike
            for layout in layouts:
                times[layout].append(time_ms(fns[layout], x, reps))
        medians = {layout: statistics.median(ts) for layout, ts in times.items()}
        dense = medians["dense"]
        line = "  ".join(f"{k} {ms:.4f} ms ({dense / ms:.2f}x)" for k, ms in medians.items())
        print(f"batch {batch:3d}: {line}")


if __name__ == "__main__":
    main()
