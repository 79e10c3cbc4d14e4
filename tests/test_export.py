"""bs.export: a pruned network that runs with torch alone."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import bayessparse as bs
from bayessparse.export import export
from bayessparse.models import LeNet5Caffe


def pruned_lenet5() -> nn.Module:
    torch.manual_seed(0)
    net = bs.to_sparse_(LeNet5Caffe(), "l0")
    with torch.no_grad():  # close a third of the gates, as training would
        for _, layer in bs.sparse_modules(net):
            alpha = layer.gate_log_alpha
            alpha[torch.rand(alpha.shape) < 1 / 3] = -10.0
    return net


def test_exported_lenet5_runs_and_matches_where_bayessparse_cannot_be_imported(tmp_path):
    net = pruned_lenet5().eval()
    done = export(net, tmp_path / "lenet5.pt2", torch.randn(1, 1, 28, 28))
    assert done.compacted
    assert done.parameters < sum(p.numel() for p in LeNet5Caffe().parameters())
    x = torch.randn(5, 1, 28, 28)
    torch.save({"x": x, "y": net(x).detach()}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["bayessparse"] = None  # any import of bayessparse now fails
        try:
            import bayessparse
        except ImportError:
            pass
        else:
            raise SystemExit("bayessparse was importable")
        import torch
        program = torch.export.load({str(tmp_path / "lenet5.pt2")!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        out = program.module()(io["x"])
        print(float((out - io["y"]).abs().max()))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    # Compaction only drops zero terms from the sums; float32 summation order may differ.
    assert float(result.stdout) < 1e-5


def test_the_file_does_not_carry_the_data_set_its_example_was_sliced_from(tmp_path):
    images = torch.randn(2000, 1, 28, 28)  # 6.3 MB; the example is 2 of them
    done = export(pruned_lenet5(), tmp_path / "lenet5.pt2", images[:2])
    weights = 4 * done.parameters
    assert (tmp_path / "lenet5.pt2").stat().st_size < weights + 1_000_000


def test_example_input_that_does_not_fit_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"example input \[\(2, 3, 28, 28\)\] does not fit"):
        export(pruned_lenet5(), tmp_path / "x.pt2", torch.randn(2, 3, 28, 28))
    assert not list(tmp_path.iterdir())


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 1:  # Python control flow: torch.export follows it, torch.fx cannot
            x = x.unsqueeze(0)
        return self.b(x + torch.relu(self.a(x)))


def test_a_network_compact_cannot_handle_is_exported_with_zeros(tmp_path):
    torch.manual_seed(0)
    net = bs.to_sparse_(Residual(), "sparse_vd")
    with pytest.warns(UserWarning, match="without compaction"):
        done = export(net, tmp_path / "r.pt2", torch.randn(3, 6))
    assert not done.compacted
    x = torch.randn(4, 6)
    out = torch.export.load(tmp_path / "r.pt2").module()(x)
    assert torch.allclose(out, net.eval()(x))
