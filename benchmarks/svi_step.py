"""Time the sparse-VD SVI training step against hand-written PyTorch and a dense step.

    python benchmarks/svi_step.py [--threads 1] [--scaling]

**LeNet-300-100** (batch 100, N = 60000): the library's step as ``train`` takes it
(``SVIObjective``: Trace_ELBO on SparseClassifier, Adam, ``project_``) against a step
written by hand from the paper in plain PyTorch (local reparameterisation with
``train_clip``, the Molchanov KL by autograd through its formula, N * mean CE + KL,
``torch.optim.Adam``), and that hand-written step with the library's fused KL.

**Scaling** (``--scaling``): on 784-H-H-10 MLPs of 0.3 M to 19 M weights, the SVI step
over the dense step of the same net (``SupervisedObjective``: cross-entropy and the same
Adam), which the local reparameterisation's two matmuls put near 2x at best.

Steps are interleaved (``--rounds`` alternating blocks of ``--steps``) so machine noise
hits all alike; the medians' ratios are printed. Run on idle cores. Both steps run with
glibc's malloc set as ``train`` sets it (:func:`bayessparse.training.keep_freed_memory`);
``--glibc-defaults`` leaves it as it is.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import pyro
import torch
import torch.nn.functional as F
from torch import nn

import bayessparse as bs
from bayessparse.distributions import sparse_vd_kl
from bayessparse.distributions.kl import sparse_vd_kl_sum
from bayessparse.models import LeNet300100
from bayessparse.training import keep_freed_memory
from bayessparse.training.objective import SupervisedObjective, SVIObjective

NUM_DATA, BATCH = 60000, 100
Step = Callable[[], None]


def svi_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Step:
    """The library's SVI step on ``net`` converted by ``to_sparse_(train_clip=True)``."""
    objective = SVIObjective(bs.to_sparse_(net, train_clip=True), NUM_DATA, lr=1e-3)

    def step() -> None:
        with pyro.validation_enabled(False):  # as train() does after its first step
            objective.step(x, y, kl_weight=1.0, lr_factor=1.0)

    return step


def dense_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Step:
    """The library's supervised step (cross-entropy, Adam) on the dense ``net``."""
    objective = SupervisedObjective(net, NUM_DATA, lr=1e-3)
    return lambda: objective.step(x, y, kl_weight=1.0, lr_factor=1.0) and None


def plain_step(x: torch.Tensor, y: torch.Tensor, fused_kl: bool = False) -> Step:
    """A sparse-VD LeNet-300-100 step written by hand in plain PyTorch (``fused_kl``:
    with the library's KL kernel, so that the rest of the difference is Pyro's)."""
    sizes = [(784, 300), (300, 100), (100, 10)]
    thetas = [nn.Parameter(torch.randn(o, i) * 0.01) for i, o in sizes]
    log_sigma2s = [nn.Parameter(torch.full((o, i), -10.0)) for i, o in sizes]
    biases = [nn.Parameter(torch.zeros(o)) for _, o in sizes]
    optimizer = torch.optim.Adam([*thetas, *log_sigma2s, *biases], lr=1e-3)

    def step() -> None:
        h, kl = x.flatten(1), 0.0
        for j, (theta, log_sigma2, bias) in enumerate(
            zip(thetas, log_sigma2s, biases, strict=True)
        ):
            log_alpha = (log_sigma2 - torch.log(theta * theta + 1e-8)).clamp(-8, 8)
            if fused_kl:
                kl = kl + sparse_vd_kl_sum(theta, log_sigma2)
            else:
                kl = kl + sparse_vd_kl(log_alpha).sum()
            keep = (log_alpha < 3).detach().float()
            mean = F.linear(h, theta * keep, bias)
            var = F.linear(h * h, log_sigma2.exp())
            h = mean + (var + 1e-8).sqrt() * torch.randn_like(mean)
            if j < 2:
                h = h.relu()
        loss = F.cross_entropy(h, y) * NUM_DATA + kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def medians(steps: dict[str, Step], rounds: int, per_round: int) -> dict[str, float]:
    """Median seconds per step of each, over ``rounds`` interleaved blocks, after warm-up."""
    for step in steps.values():
        for _ in range(max(3, per_round)):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(per_round):
                step()
            times[name].append((time.perf_counter() - start) / per_round)
    for name, t in times.items():
        q = [v * 1e3 for v in statistics.quantiles(t, n=4)]
        print(f"  {name:24s} {q[1]:8.2f} ms/step (IQR {q[0]:.2f}-{q[2]:.2f})")
    return {name: statistics.median(t) for name, t in times.items()}


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def lenet(x: torch.Tensor, y: torch.Tensor, rounds: int, per_round: int) -> None:
    print("LeNet-300-100, batch 100:")
    m = medians(
        {
            "plain PyTorch": plain_step(x, y),
            "plain, fused KL": plain_step(x, y, fused_kl=True),
            "bayessparse SVI": svi_step(LeNet300100(), x, y),
        },
        rounds,
        per_round,
    )
    svi = m["bayessparse SVI"]
    print(
        f"  SVI / plain = {svi / m['plain PyTorch']:.3f}; "
        f"SVI / plain with the fused KL = {svi / m['plain, fused KL']:.3f}"
    )


def scaling(x: torch.Tensor, y: torch.Tensor, rounds: int) -> None:
    print("784-H-H-10 MLPs, batch 100: SVI step / dense step")
    for hidden in (300, 1100, 2100, 4000):
        weights = sum(p.numel() for p in mlp(hidden).parameters() if p.dim() > 1)
        print(f" H = {hidden} ({weights / 1e6:.1f} M weights):")
        per_round = max(1, 2_000_000 // weights)
        m = medians(
            {"dense": dense_step(mlp(hidden), x, y), "SVI": svi_step(mlp(hidden), x, y)},
            rounds,
            per_round,
        )
        print(f"  ratio {m['SVI'] / m['dense']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20, help="steps per round (LeNet)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scaling", action="store_true", help="also the MLP scaling curve")
    parser.add_argument(
        "--glibc-defaults",
        action="store_true",
        help="leave glibc's malloc as it is (train() sets it to reuse large freed blocks)",
    )
    args = parser.parse_args()
    if not args.glibc_defaults:
        keep_freed_memory()  # as train() does
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))
    print(f"{args.threads} threads, {args.rounds} interleaved rounds")
    lenet(x, y, args.rounds, args.steps)
    if args.scaling:
        scaling(x, y, max(3, args.rounds // 4))


if __name__ == "__main__":
    main()
