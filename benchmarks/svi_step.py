"""Time one SVI training step of sparse-VD LeNet-300-100 against hand-written PyTorch.

Both sides do the same maths on the same batch (batch 100, N = 60000): local
reparameterization with ``train_clip``, the Molchanov KL, the loss N * mean CE + KL, and one
Adam step. The PyTorch side is written the way one would by hand from the paper: autograd
through the KL formula and ``torch.optim.Adam``. A third contender is that same hand-written
step using bayessparse's fused KL kernel, which isolates the overhead of Pyro and the
modules. They are interleaved (``--rounds`` alternating blocks of ``--steps`` steps) so that
machine noise hits all alike, and the ratios of the medians are printed.

Run on idle cores: ``python benchmarks/svi_step.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO

import bayessparse as bs
from bayessparse.distributions import sparse_vd_kl
from bayessparse.distributions.kl import sparse_vd_kl_sum
from bayessparse.models import LeNet300100
from bayessparse.training import SparseClassifier

NUM_DATA, BATCH = 60000, 100


def bayessparse_step(x: torch.Tensor, y: torch.Tensor):
    """The library's step as ``bayessparse.training.train`` takes it: to_sparse_ +
    SparseClassifier (model and guide) + SVI(Trace_ELBO) + JointOptim + project_."""
    net = bs.to_sparse_(LeNet300100(), train_clip=True)
    model = SparseClassifier(net, NUM_DATA)
    svi = SVI(model, model.guide, bs.JointOptim(torch.optim.Adam, {"lr": 1e-3}), Trace_ELBO())

    def step() -> None:
        with pyro.validation_enabled(False):  # as bayessparse.training.train does after step 1
            svi.step(x, y)
        bs.project_(net)

    return step


def plain_step(x: torch.Tensor, y: torch.Tensor, fused_kl: bool = False):
    """A hand-written sparse-VD LeNet-300-100 step in plain PyTorch.

    With ``fused_kl`` it borrows bayessparse's fused KL kernel, so that its difference to
    the SVI step is the cost of Pyro and the modules alone.
    """
    sizes = [(784, 300), (300, 100), (100, 10)]
    thetas = [torch.nn.Parameter(torch.randn(o, i) * 0.01) for i, o in sizes]
    log_sigma2s = [torch.nn.Parameter(torch.full((o, i), -10.0)) for i, o in sizes]
    biases = [torch.nn.Parameter(torch.zeros(o)) for _, o in sizes]
    optimizer = torch.optim.Adam([*thetas, *log_sigma2s, *biases], lr=1e-3)

    def step() -> None:
        h, kl = x.flatten(1), 0.0
        for j, (theta, log_sigma2, bias) in enumerate(
            zip(thetas, log_sigma2s, biases, strict=True)
        ):
            if fused_kl:
                kl = kl + sparse_vd_kl_sum(theta, log_sigma2)
                with torch.no_grad():
                    keep = (log_sigma2 - torch.log(theta * theta + 1e-8) < 3).float()
            else:
                log_alpha = (log_sigma2 - torch.log(theta * theta + 1e-8)).clamp(-8, 8)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))
    steps = {
        "plain PyTorch": plain_step(x, y),
        "plain, fused KL": plain_step(x, y, fused_kl=True),
        "bayessparse SVI": bayessparse_step(x, y),
    }
    for step in steps.values():  # warm-up
        for _ in range(50):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - start) / args.steps)
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, median in medians.items():
        spread = statistics.quantiles(times[name], n=4)
        print(
            f"{name:16s} median {median * 1e3:6.2f} ms/step "
            f"(IQR {spread[0] * 1e3:.2f}-{spread[2] * 1e3:.2f})"
        )
    svi = medians["bayessparse SVI"]
    print(
        f"ratio SVI / plain = {svi / medians['plain PyTorch']:.3f}; SVI / plain with the "
        f"same fused KL = {svi / medians['plain, fused KL']:.3f}  ({args.threads} threads, "
        f"{args.rounds} rounds x {args.steps} steps, interleaved)"
    )


if __name__ == "__main__":
    main()
