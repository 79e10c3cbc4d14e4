"""Reference networks of the sparsification literature, as plain torch modules."""

from __future__ import annotations

from torch import nn


class LeNet300100(nn.Sequential):
    """LeNet-300-100: the MNIST MLP 784-300-100-10 with ReLUs (LeCun et al. 1998).

    Accepts images of shape ``(N, 1, 28, 28)`` or flat inputs ``(N, 784)``.
    """

    def __init__(self, in_features: int = 784, num_classes: int = 10) -> None:
        super().__init__(
            nn.Flatten(),
            nn.Linear(in_features, 300),
            nn.ReLU(),
            nn.Linear(300, 100),
            nn.ReLU(),
            nn.Linear(100, num_classes),
        )


class LeNet5Caffe(nn.Sequential):
    """LeNet-5-Caffe: conv 20@5x5, max-pool, conv 50@5x5, max-pool, fc 800-500-10.

    Valid padding throughout, ReLU activations, as in Caffe's MNIST example and the
    sparse VD / L0 / Bayesian Compression papers. Input ``(N, 1, 28, 28)``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__(
            nn.Conv2d(in_channels, 20, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(800, 500),
            nn.ReLU(),
            nn.Linear(500, num_classes),
        )


MODELS: dict[str, type[nn.Module]] = {"lenet300": LeNet300100, "lenet5": LeNet5Caffe}
