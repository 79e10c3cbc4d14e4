"""VGG as torchvision defines it (``torchvision.models.vgg``: ``make_layers`` from a cfg, then
``features``, ``avgpool``, ``classifier`` with dropout), without weights, with a small cfg,
pooled size and classifier width so that tests on 32x32 inputs stay fast."""

from __future__ import annotations

import torch
from torch import Tensor, nn

# torchvision's "A" (VGG-11) is [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"].
SMALL_CFG: list[int | str] = [16, "M", 32, "M", 64, 64, "M"]


def make_layers(cfg: list[int | str], batch_norm: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        else:
            assert isinstance(v, int)
            conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
            if batch_norm:
                layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            else:
                layers += [conv2d, nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """torchvision's ``VGG``; its defaults are ``pooled=7, hidden=4096``."""

    def __init__(
        self,
        features: nn.Module,
        num_classes: int = 10,
        pooled: int = 2,
        hidden: int = 64,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((pooled, pooled))
        channels = [m for m in features.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        self.classifier = nn.Sequential(
            nn.Linear(channels * pooled * pooled, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def small_vgg_bn(num_classes: int = 10) -> VGG:
    return VGG(make_layers(SMALL_CFG, batch_norm=True), num_classes)
