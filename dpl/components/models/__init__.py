"""Models. They know nothing about workers or parallelism: engines apply that afterwards."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
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
            raise ValueError(f"allowed at least 4 for ResNet20 (its two stride-2 stages need 4x4 pixels)")
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


class _Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)) (GPT-2, Radford et al. 2019)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=-1)
        heads = lambda t: t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    """A decoder-only transformer language model (GPT-2's layout, Radford et al. 2019, at small scale, as
    Karpathy's nanoGPT): byte embeddings plus learned positions, ``n_layer`` blocks, a final LayerNorm,
    and next-byte logits through the token embedding's transpose (weight tying, Press & Wolf 2017).
    Linear and embedding weights start at N(0, 0.02), the residual projections at N(0, 0.02/sqrt(2 n_layer)).

    Input int64 [B, T] (T <= block_size), output logits [B, T, vocab]."""

    def __init__(self, in_channels: int = 1, num_classes: int = 256, image_size: int = 64, n_layer: int = 2,
                 n_head: int = 2, n_embd: int = 64, block_size: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        if image_size > block_size:
            raise ValueError(f"allowed at most model.block_size={block_size} bytes per window for this GPT")
        self.block_size = block_size
        self.wte = nn.Embedding(num_classes, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.Sequential(*[_Block(n_embd, n_head, dropout) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, num_classes, bias=False)
        self.head.weight = self.wte.weight  # tied
        self.drop = nn.Dropout(dropout)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") or name.endswith("mlp.2.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[-1]
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))
        return self.head(self.ln_f(self.blocks(x)))


SEQUENCE_MODELS = ("gpt", "gpt_tiny", "gpt_small")  # models of byte sequences (dataset=text), not images
MODELS: dict[str, Callable[..., nn.Module]] = {"lenet5": LeNet5, "resnet20": ResNet20, "gpt": GPT, "gpt_tiny": GPT,
                                               "gpt_small": GPT}


def build_model(name: str, in_channels: int, num_classes: int, image_size: int, **options) -> nn.Module:
    """The model ``name`` for the data's shape; ``options``: the model's own keys (a GPT's sizes)."""
    return lookup(MODELS, "model", name)(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                                         **options)
