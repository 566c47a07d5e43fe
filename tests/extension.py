"""dpl extended from outside the package, as docs/extending.md shows: one codec, one outer optimizer, one
dataset and one per-step metric, each registered here through dpl's registries (no file under dpl/ is
edited, and no YAML is needed: a registered option composes with its schema's defaults).
``DPL_PLUGINS=tests.extension python -m dpl ...`` (or an entry point of the group ``dpl.plugins``)
imports this module before the config is composed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from dpl.comm.codecs import CODECS, Codec, CodecConfig, Key
from dpl.components.data import DATASETS, DatasetBase, DatasetFacts
from dpl.components.data.sources import RawData
from dpl.components.optim import OUTER_OPTIMIZERS, OuterOptimizerConfig
from dpl.config.schema import at_least, check, key
from dpl.core.state import StepOutputs, step_metric

# ----------------------------------------------------------------------------- a codec


@dataclass
class HalvesConfig(CodecConfig):
    stride: int = key(2, "send every stride-th element of each tensor")

    def __post_init__(self) -> None:
        at_least("compression.stride", self.stride, 1, "an integer")


class Halves(Codec):
    """Every ``stride``-th element of each row, the same on every worker (so the payloads add up: all-reduce)."""

    def __init__(self, stride: int) -> None:
        self.stride = stride

    def encode(self, rows: torch.Tensor, key: Key, dropped: Any = None) -> tuple:
        return (rows[:, ::self.stride].float(),)

    def decode(self, payload: tuple, n: int, key: Key) -> torch.Tensor:
        out = torch.zeros(payload[0].shape[0], n, dtype=torch.float64, device=payload[0].device)
        out[:, ::self.stride] = payload[0].double()
        return out

    def payload_bytes(self, n: int) -> int:
        return 4 * math.ceil(n / self.stride)


@CODECS.register("halves", HalvesConfig)
def halves(cfg: Any) -> Codec:
    return Halves(cfg.stride)


# ----------------------------------------------------------------------------- an outer optimizer


@OUTER_OPTIMIZERS.register("rmsprop", OuterOptimizerConfig)
def rmsprop(params: list, cfg: Any, lr: Any, weight_decay: float, per_worker: bool, capturable: bool = False) -> Any:
    """torch.optim.RMSprop on the pseudo-gradient (method.outer's eps and weight_decay; its momentum)."""
    return torch.optim.RMSprop(params, lr=lr, eps=cfg.eps, weight_decay=weight_decay, momentum=cfg.momentum)


# ----------------------------------------------------------------------------- a dataset


@dataclass
class BlobsConfig(DatasetBase):
    num_train: int = key(600, "training images")
    num_classes: int = key(4, "classes: a Gaussian blob of colour each")
    augment: bool = key(False, "random crop and flip of training batches")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.num_classes >= 2, "dataset.num_classes", self.num_classes, "an integer >= 2")


@DATASETS.register("blobs", BlobsConfig,
                   facts=lambda node: DatasetFacts(int(node.num_train) * 9 // 10, 3, 16, int(node.num_classes)))
def blobs(cfg: Any, root: Any) -> RawData:
    """16x16 images of a class's mean colour plus noise."""
    g = torch.Generator().manual_seed(7)
    colours = torch.rand(cfg.num_classes, 3, 1, 1, generator=g)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % cfg.num_classes
        x = (colours[y] + 0.2 * torch.randn(n, 3, 16, 16, generator=g)).clamp(0, 1)
        return (x * 255).round().to(torch.uint8), y

    (train_x, train_y), (test_x, test_y) = draw(int(cfg.num_train)), draw(200)
    return RawData(train_x, train_y, test_x, test_y, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), int(cfg.num_classes))


# ----------------------------------------------------------------------------- a per-step metric


@step_metric("worst_worker_loss", per="step")
def worst_worker_loss(out: StepOutputs) -> torch.Tensor:
    """The largest of the workers' mean losses, averaged over the epoch's steps."""
    return out.losses.detach().max().double()
