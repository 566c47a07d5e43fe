"""Device-resident datasets: the whole split lives on the training device as one uint8 tensor.

A step cuts its batch with an index tensor and augments + normalises it in one batched
operation (the KellerJordan/cifar10-airbench recipe): no per-sample Python, no PIL, no
DataLoader on the hot path.  Per-worker shards are index tensors (:mod:`dpl.components.data.sharding`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from dpl.components.data import DATASETS, validation_size
from dpl.components.data.augment import (
    EVAL,
    TRAIN,
    augment_bits,
    draw_bits,
    normalize,
    random_crop_flip,
    signed64,
    stream_key,
)
from dpl.components.data.sources import RawData
from dpl.components.data.text import TextData

SPLITS = ("train", "val", "test")


@dataclass
class DeviceData:
    train_x: torch.Tensor  # uint8 [N, C, H, W] on the training device
    train_y: torch.Tensor  # int64 [N]
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor  # float32 [C], in [0, 1] pixel units
    std: torch.Tensor  # float32 [C]
    num_classes: int
    augment: bool  # random crop + flip on train batches
    crop_padding: int
    augment_val: bool = False  # random crop + flip on validation batches too (the study)

    @property
    def channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[2]

    @property
    def tokens_per_sample(self) -> int:
        """What a sample counts in the epoch's sums and rates: one image (a text window counts its bytes)."""
        return 1

    def metrics(self, split: str, loss: float) -> dict[str, float]:
        """A split's metrics beside its loss and accuracy (text: bits per byte); none for images."""
        return {}

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in SPLITS:
            raise KeyError(f"split={name!r} is unknown: allowed {', '.join(SPLITS)}")
        return getattr(self, f"{name}_x"), getattr(self, f"{name}_y")


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted indices of a seeded random train/val split of ``n`` samples (50,000 -> 45,000/5,000 at 0.1)."""
    n_val = validation_size(n, val_fraction)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def load_dataset(cfg: Any, seed: int, device: torch.device, root: str | Path | None = None,
                 cache: Optional[dict] = None) -> DeviceData | TextData:
    """Load the ``dataset`` config node's data, split train/val with ``seed``, move it to ``device``.

    ``root`` (absolute, resolved by the caller) overrides ``cfg.root``; the test set is the official one,
    or its fixed subset of ``num_test`` images (as the training set is cut to ``num_train``).
    ``cache``: the raw images of each (dataset node, root) read once and kept there, for the runs of a
    packed sweep, which differ at most in their seed's split (the raw data does not depend on the seed).
    """
    option = DATASETS[cfg.name]
    if option.facts_for(cfg).text:  # bytes, not images: split by position, windows for samples
        return option.build(cfg, root, device)
    key = (repr(sorted(_plain(cfg).items())), str(root))
    raw = cache.get(key) if cache is not None else None
    if raw is None:
        raw = subsample(option.build(cfg, root), cfg.get("num_train"), cfg.get("num_test"))
        if cache is not None:
            cache[key] = raw
    train_idx, val_idx = split_train_val(len(raw.train_y), float(cfg.val_fraction), seed)
    x, y = raw.train_x, raw.train_y
    return DeviceData(
        train_x=x[train_idx].to(device), train_y=y[train_idx].to(device),
        val_x=x[val_idx].to(device), val_y=y[val_idx].to(device),
        test_x=raw.test_x.to(device), test_y=raw.test_y.to(device),
        mean=torch.tensor(raw.mean, dtype=torch.float32, device=device),
        std=torch.tensor(raw.std, dtype=torch.float32, device=device),
        num_classes=raw.num_classes,
        augment=bool(cfg.augment),
        crop_padding=int(cfg.crop_padding),
        augment_val=bool(cfg.augment_val),
    )


SUBSET_SEED = 20261206  # the subset of a dataset does not change with the run's seed: every run sees the same images


def subsample(raw: RawData, num_train: Optional[int], num_test: Optional[int]) -> RawData:
    """``raw`` cut to its first ``num_train`` training and ``num_test`` test images in a fixed random order
    (None: all of them); the normalisation stays the full dataset's."""

    def cut(x: torch.Tensor, y: torch.Tensor, n: Optional[int], salt: int) -> tuple[torch.Tensor, torch.Tensor]:
        if n is None or n >= len(y):
            return x, y
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(SUBSET_SEED + salt))[:n].sort().values
        return x[keep], y[keep]

    train_x, train_y = cut(raw.train_x, raw.train_y, num_train, 0)
    test_x, test_y = cut(raw.test_x, raw.test_y, num_test, 1)
    return RawData(train_x, train_y, test_x, test_y, raw.mean, raw.std, raw.num_classes)


def _plain(cfg: Any) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


def train_key(seed: int, step: int) -> int:
    """The augmentation key of training step ``step`` (global) under ``seed``: a 64-bit host int,
    stored as the int64 value torch holds, so it can also be written into a device tensor."""
    return signed64(stream_key(seed, TRAIN, step))


def make_batch(
    data: DeviceData, idx: torch.Tensor, key: tuple[int, int] | torch.Tensor | None, train: bool, split: str = "train",
    rows: slice | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the batch ``idx`` (int64, any shape S, e.g. ``[K, B]``) from ``split``.

    Returns normalised float32 x ``[*S, C, H, W]`` and int64 y ``[*S]``.

    With ``train`` and ``data.augment`` (and the train split) each image gets its own random
    crop and flip, a hash of ``key`` = (seed, global step) (or ``train_key(seed, step)`` held in an
    int64 device tensor, so a compiled or captured step reads it without recompiling) and the image's position in the
    full batch ``idx`` (worker k, sample b: position k * B + b; see dpl.components.data.augment);
    otherwise the images are only normalised. ``rows`` (a slice of ``idx``'s first
    dimension, e.g. one rank's workers) returns only those rows, and they get exactly the
    crops they would get as part of the full batch.
    """
    if isinstance(data, TextData):
        return data.batch(idx, key, train, split, rows)
    xs, ys = data.split(split)
    rows = slice(0, idx.shape[0]) if rows is None else rows
    keep = idx[rows]
    flat = keep.reshape(-1).to(xs.device)
    x = xs[flat]
    if train and data.augment and split == "train":
        if key is None:
            raise ValueError("an augmented training batch needs its key (seed, step)")
        per_row = idx[0].numel() if idx.dim() > 0 else 1
        stream = key if torch.is_tensor(key) else train_key(*key)
        bits = augment_bits(stream, rows.start * per_row, flat.numel(), xs.device)
        x = random_crop_flip(x, data.crop_padding, bits)
    x = normalize(x, data.mean, data.std)
    return x.view(*keep.shape, *x.shape[1:]), ys[flat].view(keep.shape)


# Augmented validation draws its crops in blocks of this many images of the split: image i gets
# the bits of counter i % AUGMENT_BLOCK under the key of block i // AUGMENT_BLOCK, whatever the
# evaluation batch size (1000 was the fixed batch size these keys were first drawn with).
AUGMENT_BLOCK = 1000


def eval_batches(data: DeviceData, split: str, batch_size: int,
                 augment_key: tuple[int, int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The whole ``split`` ('val' or 'test', or 'train') in order, normalised.

    Not augmented, unless ``augment_key`` = (seed, evaluation) is given: then every image gets
    a random crop and flip hashed from (seed, evaluation, block, position in the block; blocks of
    :data:`AUGMENT_BLOCK` images) with the training batches' counter-based hash (in its own key
    domain), so the draws are redrawn at each evaluation, reproducible, the same whichever
    process or device evaluates a batch, and the same for every ``batch_size`` (the study
    validates on augmented images this way).
    """
    if isinstance(data, TextData):
        yield from data.eval_batches(split, batch_size)
        return
    xs, ys = data.split(split)
    keys = None
    if augment_key is not None:  # one key per block, mixed on the host and sent to the device once
        blocks = range((len(ys) + AUGMENT_BLOCK - 1) // AUGMENT_BLOCK)
        keys = torch.tensor([signed64(stream_key(augment_key[0], EVAL, augment_key[1], b)) for b in blocks],
                            dtype=torch.int64, device=xs.device)
    for start in range(0, len(ys), batch_size):
        x = xs[start: start + batch_size]
        if keys is not None:
            pos = torch.arange(start, start + x.shape[0], device=x.device)
            bits = draw_bits(keys[pos // AUGMENT_BLOCK], pos % AUGMENT_BLOCK)
            x = random_crop_flip(x, data.crop_padding, bits)
        yield normalize(x, data.mean, data.std), ys[start: start + batch_size]
