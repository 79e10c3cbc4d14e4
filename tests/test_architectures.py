"""Real architectures through the whole pipeline: convert, train a few SVI steps, select
masks, compact, export; the exported file runs where bayessparse cannot be imported."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from resnets import ResNet
from torch import nn
from vgg import small_vgg_bn

import bayessparse as bs
from bayessparse.export import Exported


def resnet18_narrow() -> nn.Module:
    """torchvision's ResNet-18 graph (stem, four stages of two BasicBlocks, 1x1 downsample
    skips, batch norms), a quarter as wide to stay fast; the full-width ResNet-18 is
    compacted in test_compact_graphs.py."""
    return ResNet([2, 2, 2, 2], num_classes=10, width=16)


class Conv1dNet(nn.Module):
    """A 1-D signal classifier: a dilated and a grouped Conv1d with batch norms."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(2, 8, 5, padding=2),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.Conv1d(8, 8, 3, padding=2, dilation=2, groups=2),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(4),
        )
        self.head = nn.Linear(8 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class EncoderClassifier(nn.Module):
    """A Transformer encoder (two nn.TransformerEncoderLayer) over 6 tokens, mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


# name -> (network, input shape of one example); FULL_WIDTH runs only with -m slow
FULL_WIDTH = {"resnet18_full": (lambda: ResNet([2, 2, 2, 2], num_classes=10), (3, 32, 32))}
ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet18": (resnet18_narrow, (3, 32, 32)),
    "vgg_bn": (small_vgg_bn, (3, 32, 32)),
    "conv1d": (Conv1dNet, (2, 64)),
    "transformer": (EncoderClassifier, (6, 16)),
}


def svi_steps(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
    """A few SVI steps as README's "Use from Python" writes them."""

    def model(x: torch.Tensor, y: torch.Tensor) -> None:
        logits = net(x)
        pyro.factor("kl", -bs.kl(net))
        with pyro.plate("data", size=1000, subsample=torch.arange(len(x))):
            pyro.sample("y", dist.Categorical(logits=logits), obs=y)

    optim = bs.JointOptim(torch.optim.Adam, {"lr": 1e-2})
    svi = SVI(model, bs.SparseGuide(net), optim, Trace_ELBO())
    losses = []
    for _ in range(steps):
        losses.append(svi.step(x, y))
        bs.project_(net)
    return losses


# Loads each exported program with torch alone (importing bayessparse or pyro fails) and
# prints the largest difference from the expected outputs. One process for all programs:
# importing torch and torch.export takes seconds.
RUN_WITHOUT_BAYESSPARSE = """
import sys
sys.modules["bayessparse"] = None
sys.modules["pyro"] = None
try:
    import bayessparse
except ImportError:
    pass
else:
    raise SystemExit("bayessparse was importable")
import torch
for program, io in zip(sys.argv[1::2], sys.argv[2::2]):
    x, expected = torch.load(io)
    got = torch.export.load(program).module()(x)
    print((got - expected).abs().max().item())
"""


def run_without_bayessparse(runs: list[tuple[Path, torch.Tensor, torch.Tensor]]) -> list[float]:
    """For each ``(program, x, expected)``, the largest difference between ``expected`` and
    the program's output on ``x``, run in a fresh Python that cannot import bayessparse."""
    args = []
    for program, x, expected in runs:
        io = program.with_suffix(".io.pt")
        torch.save((x, expected), io)
        args += [str(program), str(io)]
    done = subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT_BAYESSPARSE, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return [float(line) for line in done.stdout.split()]


def params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@dataclass
class Pipeline:
    """One architecture through the pipeline, and what the tests check."""

    net: nn.Module  # the trained sparse network
    trained: bool  # the SVI steps changed the gates
    losses: list[float]
    done: Exported
    baked: nn.Module  # the masked network at the export's selection, in original shape
    x: torch.Tensor  # test inputs
    expected: torch.Tensor  # baked(x)


def run_pipeline(name: str, folder: Path) -> Pipeline:
    build, shape = {**ARCHITECTURES, **FULL_WIDTH}[name]
    torch.manual_seed(0)
    net = bs.to_sparse_(build(), "l0", l0_lambda=0.1)
    x, y = torch.randn(8, *shape), torch.randint(0, 10, (8,))
    gates = {n: m.gate_log_alpha.detach().clone() for n, m in bs.sparse_modules(net)}
    losses = svi_steps(net, x, y, steps=3)
    trained = any(not torch.equal(m.gate_log_alpha, gates[n]) for n, m in bs.sparse_modules(net))
    selection = {"sparsity": 0.5, "scope": "layer"}  # half of each layer's units
    done = bs.export(net.eval(), folder / f"{name}.pt2", x[:2], **selection)
    baked = bs.to_dense(net, bake=True, **selection)
    x_test = torch.randn(5, *shape)
    with torch.no_grad():
        expected = baked(x_test)
    return Pipeline(net, trained, losses, done, baked, x_test, expected)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Callable[[str], Pipeline]:
    """``pipeline(name)``: the architecture's run, made on first use and kept."""
    runs: dict[str, Pipeline] = {}

    def get(name: str) -> Pipeline:
        if name not in runs:
            runs[name] = run_pipeline(name, tmp_path_factory.mktemp(name))
        return runs[name]

    return get


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_l0_gates_train_compact_and_export(name, pipeline):
    run = pipeline(name)
    convs = [m for _, m in bs.sparse_modules(run.net) if isinstance(m, nn.modules.conv._ConvNd)]
    assert all(m.gate == "output" for m in convs)  # one gate per channel: compaction cuts
    assert all(torch.isfinite(torch.tensor(run.losses))) and run.trained
    assert run.done.compacted and run.done.parameters <= params(run.baked)
    if name != "transformer":  # compaction keeps torch's encoder layers whole (zeros baked)
        assert run.done.parameters < params(run.baked)
    assert not any(isinstance(m, bs.SparseModule) for m in run.done.module.modules())
    with torch.no_grad():
        assert torch.allclose(run.done.module(run.x), run.expected, atol=1e-5)


def test_exported_programs_run_without_bayessparse(pipeline):
    runs = [pipeline(name) for name in sorted(ARCHITECTURES)]
    errors = run_without_bayessparse([(r.done.path, r.x, r.expected) for r in runs])
    assert len(errors) == len(runs) and max(errors) < 1e-5


@pytest.mark.slow
def test_full_width_resnet18_through_the_pipeline(pipeline):
    """torchvision's ResNet-18 itself (11 M weights), end to end, without bayessparse."""
    run = pipeline("resnet18_full")
    assert run.trained and run.done.compacted and run.done.parameters < params(run.baked)
    (error,) = run_without_bayessparse([(run.done.path, run.x, run.expected)])
    assert error < 1e-5
