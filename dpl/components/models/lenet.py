"""LeNet-5 as the study trains it."""

from __future__ import annotations

import torch
from torch import nn


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
        if side < 1:  # each 5x5 conv takes 4 pixels, each pool halves: 16 -> 12 -> 6 -> 2 -> 1
            raise ValueError(f"allowed at least 16 for LeNet5 (images of {image_size}x{image_size} pixels "
                             f"vanish in its two conv+pool stages)")
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side * side, 384), nn.ReLU(),
            nn.Linear(384, 192), nn.ReLU(),
            nn.Linear(192, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
