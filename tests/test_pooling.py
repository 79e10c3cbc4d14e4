"""BlockMaxPool: the same values as torch's max-pools it replaces, and only those."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bayessparse.compaction import BlockMaxPool, block_max_pools_
from bayessparse.export import export
from bayessparse.models import LeNet5Caffe

POOLS = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("kernel", [1, 2, 3, (2, 3, 1)])
@pytest.mark.parametrize("batched", [True, False])
def test_equals_torch_max_pool_on_sizes_the_windows_do_not_divide(dims, kernel, batched):
    window = kernel if isinstance(kernel, int) else kernel[:dims]
    torch.manual_seed(dims)
    shape = (3, 4, *(7, 8, 5)[:dims]) if batched else (4, *(7, 8, 5)[:dims])
    x = torch.randn(shape, dtype=torch.float64)
    x[x > 1.5] = math.inf
    x.view(-1)[::17] = math.nan  # maxima propagate NaN, as torch's kernel does
    torch_pool = POOLS[dims](window)
    block = block_max_pools_(nn.Sequential(torch_pool))[0]
    assert isinstance(block, BlockMaxPool)
    assert torch.equal(block(x).isnan(), torch_pool(x).isnan())
    assert torch.equal(block(x).nan_to_num(), torch_pool(x).nan_to_num())


@pytest.mark.parametrize(
    "pool",
    [
        nn.MaxPool2d(3, stride=2),
        nn.MaxPool2d(2, padding=1),
        nn.MaxPool2d(2, dilation=2),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.MaxPool2d(2, return_indices=True),
        nn.AvgPool2d(2),
    ],
    ids=repr,
)
def test_pools_whose_windows_do_not_tile_are_kept(pool):
    net = nn.Sequential(nn.Identity(), pool)
    assert block_max_pools_(net)[1] is pool


def test_nested_pools_are_replaced_and_lenet5_output_is_unchanged():
    torch.manual_seed(0)
    net = nn.Sequential(LeNet5Caffe()).eval()
    x = torch.randn(4, 1, 28, 28)
    expected = net(x)
    block_max_pools_(net)
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    assert sum(isinstance(m, BlockMaxPool) for m in net.modules()) == 2
    assert torch.equal(net(x), expected)


def test_export_writes_block_pools_and_leaves_the_users_network_alone(tmp_path):
    torch.manual_seed(0)
    net = LeNet5Caffe().eval()
    done = export(net, tmp_path / "lenet5.pt2", torch.randn(2, 1, 28, 28))
    assert any(isinstance(m, BlockMaxPool) for m in done.module.modules())
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 2
    program = torch.export.load(tmp_path / "lenet5.pt2")
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("max_pool" in t for t in targets), targets
    x = torch.randn(7, 1, 28, 28)  # another batch size: the batch is dynamic
    assert torch.allclose(program.module()(x), net(x), atol=1e-5)
