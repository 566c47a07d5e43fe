"""``dataset=text``: byte-level language modelling on any UTF-8 text file or folder of them.

Tokens are bytes (a vocabulary of 256, no tokenizer to download), held on the device as uint8.
Each file is split by position: its first ``1 - val_fraction - test_fraction`` train, then
validation, then test, and each split is the files' parts in order (so every file is in every
split, and no window crosses a split: each split is its own tensor). A training *sample* is a
window slot: slot i starts at ``i * block_size``; the window, ``block_size + 1`` bytes (inputs and
their next-byte targets), starts at a random offset in ``[0, block_size)`` past it (clamped to the
split's end), hashed from (seed, step, worker, sample) exactly like an image's crop
(:mod:`dpl.components.data.augment`), so resume and simulation ≡ ``engine=distributed`` stay exact. Shards,
epoch orders and batches of slots are the image datasets' (:mod:`dpl.components.data.sharding`); each slot's
label is the index of the file it starts in, so ``sharding=dirichlet`` skews the workers by source
file (non-iid text). Evaluation reads a split's non-overlapping windows in order.

The default corpus is Debian's ``fortunes`` package (``/usr/share/games/fortunes``: about 2.5 MB of
English quotations in 60-odd files; ``apt-get install fortunes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from dpl.components.data.augment import TRAIN, augment_bits, signed64, stream_key
from dpl.components.data.sources import DatasetUnavailable

VOCAB = 256  # bytes
MIN_FILE_BYTES = 64  # smaller files (fortune's empty ones) are left out


MAX_CORPUS_BYTES = 2**30  # 1 GiB of bytes: held whole on the device as uint8; far beyond a byte-level study corpus
PROBE_BYTES = 2**16  # a file's head, read first: a NUL there marks a binary file, left out unread


def _read_text_file(f: Path, root: Path, total: int) -> Optional[bytes]:
    """File ``f``'s bytes, read in a bounded way: None for a binary file (a NUL in its head, the rest left
    unread); a file that would take the corpus past :data:`MAX_CORPUS_BYTES` is refused in one line by its
    size, before it is read."""
    with open(f, "rb") as fh:
        head = fh.read(PROBE_BYTES)
        if b"\x00" in head:
            return None
        size = max(f.stat().st_size, len(head))
        if total + size > MAX_CORPUS_BYTES:
            raise DatasetUnavailable(f"dataset.path={str(root)!r}: {f} ({size / 2**20:.0f} MiB) takes the corpus past "
                                     f"{MAX_CORPUS_BYTES >> 20} MiB, the most dpl reads (held whole on the device): "
                                     f"point dataset.path at a smaller file or folder")
        return head + fh.read(MAX_CORPUS_BYTES - total - len(head) + 1)  # bounded even if it grew meanwhile


def read_corpus(path: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of the text file ``path``, or of every text file under the folder ``path`` (sorted
    by path; symlinks, binary files such as fortune's ``.dat`` indexes, and tiny files left out)."""
    if not path.exists():
        raise DatasetUnavailable(f"dataset.path={str(path)!r} does not exist (the default corpus is Debian's "
                                 f"fortunes: apt-get install fortunes)")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    corpus, total = [], 0
    for f in files:
        try:
            data = _read_text_file(f, path, total)
        except OSError:
            continue
        if data is None or len(data) < MIN_FILE_BYTES or b"\x00" in data:
            continue
        total += len(data)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        corpus.append((str(f.relative_to(path)) if path.is_dir() else f.name, data))
    if not corpus:
        raise DatasetUnavailable(f"dataset.path={str(path)!r} holds no UTF-8 text file of at least "
                                 f"{MIN_FILE_BYTES} bytes")
    return corpus


@dataclass
class TextData:
    """A corpus's three splits as uint8 byte tensors on the device, and the windows cut from them."""

    train_tokens: torch.Tensor
    val_tokens: torch.Tensor
    test_tokens: torch.Tensor
    train_y: torch.Tensor  # int64 [slots]: the file each training slot starts in (the "label" shards see)
    block_size: int
    augment: bool  # a random offset per training window (else the slot's own start)
    num_classes: int = VOCAB
    augment_val: bool = False

    @property
    def train_x(self) -> torch.Tensor:
        return self.train_tokens

    @property
    def channels(self) -> int:
        return 1

    @property
    def image_size(self) -> int:
        return self.block_size

    @property
    def tokens_per_sample(self) -> int:
        return self.block_size

    def windows(self, split: str, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-byte targets (int64 [*S, block_size] each) of the windows at ``starts``."""
        tokens = getattr(self, f"{split}_tokens")
        span = tokens[starts.unsqueeze(-1) + torch.arange(self.block_size + 1, device=tokens.device)].long()
        return span[..., :-1], span[..., 1:]

    def batch(self, idx: torch.Tensor, key, train: bool, split: str = "train",
              rows: Optional[slice] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The windows of slots ``idx`` (the rows ``rows`` of it), at their offsets (see the module doc)."""
        rows = slice(0, idx.shape[0]) if rows is None else rows
        keep = idx[rows]
        tokens = getattr(self, f"{split}_tokens")
        starts = keep.to(tokens.device) * self.block_size
        if train and self.augment and split == "train":
            if key is None:
                raise ValueError("a training batch of text needs its key (seed, step)")
            per_row = idx[0].numel() if idx.dim() > 0 else 1
            stream = key if torch.is_tensor(key) else signed64(stream_key(key[0], TRAIN, key[1]))
            bits = augment_bits(stream, rows.start * per_row, keep.numel(), tokens.device).view(keep.shape)
            starts = starts + bits.remainder(self.block_size)
        return self.windows(split, starts.clamp(max=len(tokens) - self.block_size - 1))

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The split's non-overlapping windows in order, ``batch_size`` at a time."""
        tokens = getattr(self, f"{split}_tokens")
        n = slots(len(tokens), self.block_size)
        for first in range(0, n, batch_size):
            starts = torch.arange(first, min(first + batch_size, n), device=tokens.device) * self.block_size
            yield self.windows(split, starts)

    def metrics(self, split: str, loss: float) -> dict[str, float]:
        """Bits per byte of a split's mean loss per byte (nats): loss / ln 2 (tokens are bytes)."""
        return {f"{split}_bpb": loss / math.log(2)}


def slots(n: int, block_size: int) -> int:
    """Window slots of a split of ``n`` bytes: each needs ``block_size + 1`` bytes from its start."""
    return max((n - 1) // block_size, 0)


def load_text(cfg, device: torch.device, root: Optional[Path] = None) -> TextData:
    """``dataset=text``: the corpus at ``dataset.path``, split by position within each file."""
    path = Path(str(root if root is not None else cfg.path)).expanduser()
    corpus = read_corpus(path)
    val_f, test_f = float(cfg.val_fraction), float(cfg.test_fraction)
    parts: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
    for _, data in corpus:
        n = len(data)
        a = round(n * (1 - val_f - test_f))
        b = a + round(n * val_f)
        parts["train"].append(data[:a])
        parts["val"].append(data[a:b])
        parts["test"].append(data[b:])
    T = int(cfg.block_size)
    tensors = {k: torch.frombuffer(bytearray(b"".join(v)), dtype=torch.uint8) for k, v in parts.items()}
    for k, t in tensors.items():
        if slots(len(t), T) < 1:
            raise DatasetUnavailable(f"dataset.path={str(path)!r}: its {k} split has {len(t)} bytes, fewer than "
                                     f"one window of dataset.block_size + 1 = {T + 1}")
    # the file each slot starts in: the first file whose train part ends past the slot's start
    ends = torch.tensor([len(b) for b in parts["train"]], dtype=torch.int64).cumsum(0)
    labels = torch.searchsorted(ends, torch.arange(slots(len(tensors["train"]), T)) * T, right=True)
    return TextData(train_tokens=tensors["train"].to(device), val_tokens=tensors["val"].to(device),
                    test_tokens=tensors["test"].to(device), train_y=labels.to(device), block_size=T,
                    augment=bool(cfg.augment))
