"""Residual networks for the compaction tests, written out as torchvision defines them.

torchvision's PyPI build does not import beside the CPU torch wheel used here, so
``BasicBlock`` and ResNet-18 are copied from ``torchvision.models.resnet`` (no weights,
no Bottleneck, no options that ResNet-18 does not use), and a small ResNet-style net with
identity and 1x1-projection skips for the quicker tests.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: conv3x3-BN-ReLU-conv3x3-BN, plus the skip, ReLU."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    """torchvision's ``ResNet`` with ``BasicBlock`` (``ResNet([2, 2, 2, 2])`` is ResNet-18)."""

    def __init__(self, layers: list[int], num_classes: int = 1000, width: int = 64) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet([2, 2, 2, 2], num_classes)


class SmallResNet(nn.Module):
    """A ResNet-style net for quick tests: a conv-BN-ReLU stem, a block with an identity
    skip, a block with a 1x1-projection skip (stride 2), global average pooling
    (``mean``) and a linear head."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.block1 = BasicBlock(width, width)
        projection = nn.Sequential(conv1x1(width, 2 * width, 2), nn.BatchNorm2d(2 * width))
        self.block2 = BasicBlock(width, 2 * width, 2, projection)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.head(x.mean((2, 3)))


def randomise_batch_norms_(net: nn.Module, generator: torch.Generator | None = None) -> None:
    """Non-trivial running statistics and affine parameters in every batch norm, so that a
    closed channel's constant ``β − γ·μ/σ`` after it is not 0 (of either sign)."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                n, dtype = m.num_features, m.running_mean.dtype
                m.running_mean.copy_(torch.randn(n, generator=generator, dtype=dtype))
                m.running_var.copy_(torch.rand(n, generator=generator, dtype=dtype) + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator, dtype=dtype) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator, dtype=dtype))


def gate_convs_(net: nn.Module, closed: float, seed: int = 0) -> nn.Module:
    """L0 output gates on every convolution, a fraction ``closed`` of them closed, and
    batch norms with random statistics; in eval mode."""
    import bayessparse as bs  # only here: the architectures themselves are plain torch

    generator = torch.Generator().manual_seed(seed)
    bs.to_sparse_(net, "l0", include=lambda name, m: isinstance(m, nn.Conv2d))
    with torch.no_grad():
        for _, layer in bs.sparse_modules(net):
            alpha = layer.gate_log_alpha
            alpha.fill_(10.0)
            alpha[torch.rand(alpha.shape, generator=generator) < closed] = -10.0
    randomise_batch_norms_(net, generator)
    return net.eval()
