"""SNIP on LeNet-300-100 under the paper's own training recipe, outside the bench's budget.

    python benchmarks/snip_recipe.py --sparsity 0.95 --epochs 167 --schedule step

SNIP's scores come from one batch at a variance-scaling draw (the library's ``snip``);
the masked net then trains with SGD, momentum 0.9, weight decay 5e-4, batch 100, lr 0.1
multiplied by 0.1 every 25,000 iterations (``--schedule step``; 167 epochs are 100,000
iterations), or held for half the run then linear to 0 (``--schedule linear``). The
test error is printed every 20 epochs and at the end. ``--standardize`` divides the
inputs by their global standard deviation, and ``--init vs_l`` draws the trained net's
weights from LeCun's variance scaling with zero biases: both as in the authors' code
(``snip-public``), which scores one draw and trains another.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bayessparse.data import load_mnist, preprocess
from bayessparse.pruning import prune
from bayessparse.pruning.at_init import VARIANCE_SCALING, variance_scaling
from bayessparse.recipes import build_net

BATCH, STEP_EVERY = 100, 25_000


def learning_rate(schedule: str, step: int, total: int) -> float:
    if schedule == "step":
        return 0.1 * 0.1 ** (step // STEP_EVERY)
    return 0.1 * min(1.0, 2 * (1 - step / total))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsity", type=float, default=0.95)
    parser.add_argument("--epochs", type=int, default=167)
    parser.add_argument("--schedule", choices=("step", "linear"), default="step")
    parser.add_argument(
        "--init", default="torch", help="the trained net's init: recipes', or vs_*"
    )
    parser.add_argument("--standardize", action="store_true", help="inputs / their global std")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = preprocess(load_mnist())
    (x, y), (x_test, y_test) = data["train"], data["test"]
    if args.standardize:
        x, x_test = x / x.std(), x_test / x.std()
    torch.manual_seed(args.seed)
    net = build_net("lenet300", "dense", "torch" if args.init in VARIANCE_SCALING else args.init)
    if args.init in VARIANCE_SCALING:
        draw = torch.Generator().manual_seed(args.seed + 1)
        for layer in (m for m in net.modules() if isinstance(m, torch.nn.Linear)):
            with torch.no_grad():
                layer.weight.copy_(variance_scaling(layer.weight.shape, args.init, draw, x.dtype))
                layer.bias.zero_()
    chosen = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))[:1000]
    prune(net, "snip", args.sparsity, data=(x[chosen], y[chosen]), seed=args.seed)
    optim = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    per_epoch = len(x) // BATCH
    total, start = args.epochs * per_epoch, time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(x))
        for i in range(per_epoch):
            for group in optim.param_groups:
                group["lr"] = learning_rate(args.schedule, epoch * per_epoch + i, total)
            batch = order[i * BATCH : (i + 1) * BATCH]
            loss = F.cross_entropy(net(x[batch]), y[batch])
            optim.zero_grad()
            loss.backward()
            optim.step()
        if (epoch + 1) % 20 == 0 or epoch + 1 == args.epochs:
            with torch.no_grad():
                error = (net(x_test).argmax(1) != y_test).float().mean().item()
            seconds = time.perf_counter() - start
            print(f"epoch {epoch + 1}: test error {error:.2%} ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
