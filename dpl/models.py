"""Models. They know nothing about workers or parallelism: engines apply that afterwards."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dpl.registry import lookup


class LeNet5(nn.Module):
    """The study's LeNet-5 variant (CIFAR-100 with 64-channel convolutions).

    conv 5x5 C->64, ReLU, maxpool 2; conv 5x5 64->64, ReLU, maxpool 2;
    FC ->384 ->192 ->classes with ReLU between. Unpadded convolutions, so the flattened
    size follows the input: 64x5x5 for 32x32 images, 64x4x4 for 28x28 (Fashion-MNIST).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 100, image_size: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"LeNet5 needs images of at least 12x12 pixels, got {image_size}x{image_size}")
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side * side, 384), nn.ReLU(),
            nn.Linear(384, 192), nn.ReLU(),
            nn.Linear(192, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


MODELS: dict[str, Callable[..., nn.Module]] = {"lenet5": LeNet5}


def build_model(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    return lookup(MODELS, "model", name)(in_channels=in_channels, num_classes=num_classes, image_size=image_size)
