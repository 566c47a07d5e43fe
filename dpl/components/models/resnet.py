"""ResNet-20 for CIFAR (He et al. 2016, Sec. 4.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity shortcut (He et al. 2016, Fig. 2).

    Option A (Sec. 4.2): where a block halves the resolution and doubles the channels, the
    shortcut subsamples by 2 and pads the new channels with zeros, so it adds no parameters.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.pad = stride, planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[..., ::self.stride, ::self.stride]
        # zero channels split before and after, as in the authors' Torch code
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    """The CIFAR ResNet-20 of He et al. 2016, "Deep Residual Learning for Image Recognition", Sec. 4.2.

    A 3x3 convolution to 16 channels, then 3 stages of n=3 basic blocks with 16, 32 and 64
    channels (stages 2 and 3 start with stride 2), global average pooling and one linear
    layer: 6n+2 = 20 weighted layers, 269,722 parameters for 10 classes (the paper's 0.27M).
    Shortcuts are identities (option A). Convolutions are padded and the pooling is
    global, so any image of at least 4x4 pixels works: 32x32 (CIFAR) and 28x28
    (Fashion-MNIST, 28 -> 14 -> 7) alike. Convolutions are initialised as in He et al. 2015
    ("Delving Deep into Rectifiers"), which the paper uses; BatchNorm starts at gamma=1,
    beta=0 and the linear layer at PyTorch's default.

    The BatchNorm running statistics are model buffers: under the engines each worker
    keeps its own, and syncs average them with the parameters (dpl.core.workers).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, n: int = 3) -> None:
        super().__init__()
        if image_size < 4:
            raise ValueError("allowed at least 4 for ResNet20 (its two stride-2 stages need 4x4 pixels)")
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks, planes = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                blocks.append(_BasicBlock(planes, width, stride if i == 0 else 1))
                planes = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # N(0, 2/(3*3*out)), as the authors' Torch code
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(x.mean((-2, -1)))
