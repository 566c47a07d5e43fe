"""Datasets: the ``dataset`` group's options, each registered here with its schema and its facts.

A dataset's builder reads it from disk (or makes it) as :class:`~dpl.components.data.sources.RawData`:
a training and a test set of uint8 images on the CPU; :func:`dpl.components.data.device.load_dataset`
then subsamples it (``dataset.num_train`` / ``num_test``), splits off validation with the run's seed and
moves it to the training device as one tensor per split. A text dataset's builder returns its windows on
the device itself (:mod:`dpl.components.data.text`). The facts of each dataset (its sizes, channels,
classes, whether it is text) are known before it is read, so a config that no split could feed fails
before anything is loaded.

The readers (torchvision, NumPy, torch) are imported by the builders, not here: the registry loads
without them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import MISSING

from dpl.config.schema import at_least, check, key
from dpl.registry import Registry

DATASETS = Registry("dataset", "where the samples come from")


@dataclass(frozen=True)
class DatasetFacts:
    """What a dataset is, known from its config before it is read."""

    train: Optional[int]  # training samples, the validation split taken out (None: known once read)
    channels: int = 3
    image_size: int = 32  # a text dataset: the window length in bytes
    classes: int = 10  # a text dataset: its vocabulary (bytes)
    text: bool = False  # byte sequences for a sequence model (dpl.components.models), not images


# ----------------------------------------------------------------------------- schemas


@dataclass
class DatasetBase:
    name: str = key(MISSING, "the dataset (an option of the group)")
    val_fraction: float = key(0.1, "share of the training samples held out for validation (seeded split)")
    augment: bool = key(True, "random crop (with padding) and horizontal flip of training batches")
    augment_val: bool = key(False, "validation images augmented too, redrawn (seeded) at every evaluation "
                                   "(the study)")
    crop_padding: int = key(4, "pixels of zero padding around an image before its random crop")

    def __post_init__(self) -> None:
        check(0.0 < self.val_fraction < 1.0, "dataset.val_fraction", self.val_fraction, "0 < x < 1")
        at_least("dataset.crop_padding", self.crop_padding, 0, "an integer")


@dataclass
class FileDatasetConfig(DatasetBase):
    """A dataset read from files under ``root`` (cifar10, cifar100, fashion_mnist)."""

    root: str = key("data", "folder of the dataset's files (relative paths: the launch directory)")
    download: bool = key(True, "download the files when they are missing")
    num_train: Optional[int] = key(None, "train on this many of the training images (a fixed random subset, the "
                                         "same for every seed); null: all")
    num_test: Optional[int] = key(None, "test on this many of the test images (a fixed random subset); null: all")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_train is not None:  # two at least: the validation split takes one
            at_least("dataset.num_train", self.num_train, 2, "null or an integer")
        if self.num_test is not None:
            at_least("dataset.num_test", self.num_test, 1, "null or an integer")


@dataclass
class SyntheticDatasetConfig(DatasetBase):
    """Generated class prototypes plus Gaussian noise (:func:`dpl.components.data.sources.synthetic`)."""

    num_train: int = key(5000, "training images generated (before the validation split)")
    num_test: int = key(1000, "test images generated")
    num_classes: int = key(10, "classes, each a smooth random prototype")
    channels: int = key(3, "channels per image")
    image_size: int = key(32, "height and width in pixels")
    noise: float = key(0.35, "std of the per-pixel Gaussian noise, in [0, 1] pixel units")

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least("dataset.num_train", self.num_train, 2, "an integer")
        for name in ("num_test", "channels", "image_size"):
            at_least(f"dataset.{name}", getattr(self, name), 1, "an integer")
        at_least("dataset.num_classes", self.num_classes, 2, "an integer")
        at_least("dataset.noise", self.noise, 0.0)


@dataclass
class TextDatasetConfig(DatasetBase):
    """Byte-level text (:mod:`dpl.components.data.text`): every UTF-8 file under ``path``, split by position
    in each file. ``augment``: each training window starts at a random offset past its slot."""

    val_fraction: float = key(0.05, "share of each file's bytes (before its test part) held out for validation")
    crop_padding: int = key(0, "(images only)")
    path: str = key("/usr/share/games/fortunes", "a UTF-8 file or a folder of them (default: Debian's fortunes, "
                                                 "apt-get install fortunes; relative: the launch directory)")
    block_size: int = key(64, "bytes per window (the model's context must hold it)")
    test_fraction: float = key(0.05, "share of each file's bytes (its end) held out for testing")

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least("dataset.block_size", self.block_size, 1, "an integer")
        check(0.0 < self.test_fraction < 1.0 and self.val_fraction + self.test_fraction < 1.0,
              "dataset.test_fraction", self.test_fraction, "0 < x < 1 - dataset.val_fraction")


# ----------------------------------------------------------------------------- options


def validation_size(n: int, val_fraction: float) -> int:
    """Samples of ``n`` the validation split takes: one at least, and one left for training at least."""
    return min(max(round(n * val_fraction), 1), n - 1)


def _files(train: int, channels: int, image_size: int, classes: int) -> Callable[[Any], DatasetFacts]:
    """The facts of a dataset of files with ``train`` training images, of which ``num_train`` are used."""

    def facts(node: Any) -> DatasetFacts:
        used = train if node.get("num_train") is None else min(int(node.num_train), train)
        return DatasetFacts(used - validation_size(used, node.val_fraction), channels, image_size, classes)

    return facts


@DATASETS.register("cifar100", FileDatasetConfig, facts=_files(50_000, 3, 32, 100))
def cifar100(cfg: Any, root: Path) -> Any:
    """CIFAR-100 (Krizhevsky 2009): 32x32 colour images of 100 classes, normalised as the study does."""
    from dpl.components.data import sources

    return sources.cifar("CIFAR100", "CIFAR-100", "fine_labels", 100, (0.5071, 0.4867, 0.4408),
                         (0.2675, 0.2565, 0.2761), cfg, root)


@DATASETS.register("cifar10", FileDatasetConfig, facts=_files(50_000, 3, 32, 10))
def cifar10(cfg: Any, root: Path) -> Any:
    """CIFAR-10 (Krizhevsky 2009): 32x32 colour images of 10 classes."""
    from dpl.components.data import sources

    return sources.cifar("CIFAR10", "CIFAR-10", "labels", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                         cfg, root)


@DATASETS.register("fashion_mnist", FileDatasetConfig, facts=_files(60_000, 1, 28, 10))
def fashion_mnist(cfg: Any, root: Path) -> Any:
    """Fashion-MNIST (Xiao et al. 2017): 28x28 grey images of 10 kinds of clothing; read from Debian's
    dataset-fashion-mnist when it is installed, else downloaded."""
    from dpl.components.data import sources

    return sources.fashion_mnist(cfg, root)


@DATASETS.register("synthetic", SyntheticDatasetConfig,
                   facts=lambda node: DatasetFacts(int(node.num_train) - validation_size(int(node.num_train),
                                                                                          node.val_fraction),
                                                   int(node.channels), int(node.image_size), int(node.num_classes)))
def synthetic(cfg: Any, root: Optional[Path]) -> Any:
    """Learnable generated images, the same for every run: needs no files (offline, tests)."""
    from dpl.components.data import sources

    return sources.synthetic(cfg, root)


@DATASETS.register("text", TextDatasetConfig,
                   facts=lambda node: DatasetFacts(None, 1, int(node.block_size), 256, text=True))
def text(cfg: Any, root: Path, device: Any) -> Any:
    """Bytes of UTF-8 files, for a sequence model: windows on the device (:func:`dpl.components.data.text.load_text`)."""
    from dpl.components.data.text import load_text

    return load_text(cfg, device, root)
