"""The Bayesian nets of a bench at their own threshold rule (not a target sparsity).

A bench ranks every method at the same target sparsities; the Bayesian families also
have a sparsity of their own, the one their paper's rule gives (sparse VD: log α < 3;
L0: test gate > 0; group scales: log α < −3). This reads the bench's cached SVI nets and
prints that point next to the grid:

    python benchmarks/bayesian_natural.py BENCH_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bayessparse.bench.measure import measure
from bayessparse.data import load_mnist, preprocess
from bayessparse.masks import to_dense
from bayessparse.recipes import DENSE, build_net, recipe
from bayessparse.training import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", type=Path)
    args = parser.parse_args()
    settings = json.loads((args.bench / "bench.json").read_text())
    model = settings["model"]
    data = preprocess(load_mnist())
    test = data["test"]
    for path in sorted((args.bench / "cache").glob("*.pt")):
        method, _, seed = path.stem.rpartition("-")
        if method == DENSE:
            continue
        rec = recipe(model, method)
        net = build_net(model, method, rec.init, **rec.layer)
        net.load_state_dict(load_checkpoint(path)["net"])
        torch.manual_seed(0)
        plain = to_dense(net)  # each layer's own rule
        row = measure(plain, build_net(model, DENSE, "torch"), test.images, test.labels)
        print(
            f"{model} {method} seed {seed}: error {row['error']:.2%}, ECE {row['ece']:.4f}, "
            f"compression {row['compression']:.1f}x, kept {row['architecture']}, "
            f"compacted parameters {row['compact_params']}"
        )


if __name__ == "__main__":
    main()
