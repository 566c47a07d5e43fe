"""Where the pixels come from: one function per dataset YAML, each returning raw uint8 NCHW tensors.

Real datasets are read as whole arrays (no per-sample iteration).  CIFAR's pickles are
read by :func:`read_cifar_batches` for real and test files alike: torchvision's CIFAR
classes insist on the md5 of the official files, so we use torchvision only for the
download (whose archive md5 it does check) and parse the documented pickle layout here.
"""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dpl.errors import DatasetUnavailable
from dpl.io import atomic_open

log = logging.getLogger("dpl")

# Where the Debian package `dataset-fashion-mnist` installs the four gzipped IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# The synthetic data must not change with the training seed: every run sees the same images.
SYNTHETIC_SEED = 20240917

OFFLINE_HINT = "dataset=synthetic or dataset=fashion_mnist run offline"


@dataclass
class RawData:
    """A dataset's official train and test sets, on the CPU, before the train/val split."""

    train_x: torch.Tensor  # uint8 [N, C, H, W]
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, ...]  # per channel, in [0, 1] pixel units
    std: tuple[float, ...]
    num_classes: int


def _root(cfg: Any, root: str | Path | None) -> Path:
    return Path(root if root is not None else cfg.root)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# ----------------------------------------------------------------------------- CIFAR


def read_cifar_batches(folder: Path, names: list[str], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate CIFAR python-version pickles: ``data`` uint8 [n, 3072] (row-major CHW) + labels.

    The official files are Python 2 pickles: ``encoding="latin1"`` (as torchvision reads
    them) is what NumPy needs for their arrays and turns their keys into str; files
    written by Python 3 with bytes keys keep bytes keys, so keys are normalised to str.
    """
    xs, ys = [], []
    for name in names:
        path = folder / name
        _check_cifar_size(path, folder)
        try:
            with open(path, "rb") as f:
                entry = {_key(k): v for k, v in _ArrayUnpickler(f, encoding="latin1").load().items()}
            data = np.asarray(entry["data"], dtype=np.uint8)
            labels = np.asarray(entry[label_key], dtype=np.int64)
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError, AttributeError) as e:
            raise DatasetUnavailable(
                f"{path} is unreadable ({_first_line(e)}): delete {folder}/ and download it again"
            ) from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise DatasetUnavailable(
                f"{path} is malformed (data {data.shape}, {len(labels)} labels): delete {folder}/ and download it again"
            )
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


# The largest official CIFAR pickle is CIFAR-100's train file, 50000 x 3072 bytes and labels (~155 MiB); a
# file far larger is not one, and would be read whole before its layout could be checked.
MAX_CIFAR_FILE_BYTES = 256 * 2**20


def _check_cifar_size(path: Path, folder: Path) -> None:
    """Refuse, by its size and before reading it, a file larger than any CIFAR pickle."""
    try:
        size = path.stat().st_size
    except OSError:
        return  # reading it says why, in one line
    if size > MAX_CIFAR_FILE_BYTES:
        raise DatasetUnavailable(f"{path} is {size / 2**20:.0f} MiB, more than a CIFAR file holds (at most "
                                 f"{MAX_CIFAR_FILE_BYTES >> 20} MiB): delete {folder}/ and download it again")


class _ArrayUnpickler(pickle.Unpickler):
    """A pickle reader that builds NumPy arrays and plain containers only.

    A CIFAR file is a pickle, and a plain ``pickle.load`` calls whatever the file names
    (a dataset folder from elsewhere could run code when read). The official files and
    :mod:`tests.fakes` need exactly these globals: NumPy's array reconstruction (under its
    NumPy 1 and NumPy 2 module names) and ``_codecs.encode``, which protocol 2 uses for bytes.
    """

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a data file must not (loading could run it)")
        return super().find_class(module, name)


def _key(k: str | bytes) -> str:
    return k.decode("latin1") if isinstance(k, bytes) else k


def _all_files(folder: Path, names: list[str]) -> bool:
    return all((folder / name).is_file() for name in names)


def _cifar_files(tv_class: type) -> list[str]:
    return [name for name, _ in tv_class.train_list + tv_class.test_list] + [tv_class.meta["filename"]]


def _ensure_cifar(tv_class: type, title: str, root: Path, download: bool) -> Path:
    """Return the folder with the extracted pickles, downloading the archive when allowed."""
    folder = root / tv_class.base_folder
    if _all_files(folder, _cifar_files(tv_class)):
        return folder
    reason = "dataset.download=false"
    if download:
        try:
            _download_cifar(tv_class, root)
        except Exception as e:  # network, proxy, http and checksum failures all mean "not available"
            reason = f"download failed: {_first_line(e)}"
        else:
            if _all_files(folder, _cifar_files(tv_class)):
                return folder
            reason = "the downloaded archive lacks them"
    raise DatasetUnavailable(
        f"{title} not found in {folder.resolve()}/ ({reason}): put {', '.join(_cifar_files(tv_class))} "
        f"(extracted from {tv_class.filename}) there; {OFFLINE_HINT}"
    )


def _download_cifar(tv_class: type, root: Path) -> None:
    """Download (md5-checked by torchvision) and extract beside the target, then move files in.

    Extracting into a temporary folder and renaming each file means a run killed
    mid-extraction never leaves a truncated pickle under ``base_folder``.
    """
    from torchvision.datasets.utils import download_and_extract_archive

    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=root) as tmp:
        download_and_extract_archive(tv_class.url, str(root), extract_root=tmp,
                                     filename=tv_class.filename, md5=tv_class.tgz_md5)
        folder = root / tv_class.base_folder
        folder.mkdir(exist_ok=True)
        for name in _cifar_files(tv_class):
            extracted = Path(tmp) / tv_class.base_folder / name
            if extracted.is_file() and not (folder / name).is_file():
                os.replace(extracted, folder / name)


def _torchvision(name: str) -> Any:
    """``torchvision.datasets.<name>``, imported when a real dataset is read: importing torchvision
    takes as long as importing torch (it loads its models too), which runs on synthetic data,
    the tests and a refused command would pay for nothing."""
    import torchvision.datasets

    return getattr(torchvision.datasets, name)


def cifar(tv_name: str, title: str, label_key: str, num_classes: int, mean: tuple[float, ...],
          std: tuple[float, ...], cfg: Any, root: str | Path | None = None) -> RawData:
    """A CIFAR dataset through torchvision's download (``tv_name``: its class), labels from ``label_key``."""
    tv_class = _torchvision(tv_name)
    folder = _ensure_cifar(tv_class, title, _root(cfg, root), bool(cfg.download))
    train_x, train_y = read_cifar_batches(folder, [n for n, _ in tv_class.train_list], label_key)
    test_x, test_y = read_cifar_batches(folder, [n for n, _ in tv_class.test_list], label_key)
    for y in (train_y, test_y):
        if len(y) and not (0 <= int(y.min()) and int(y.max()) < num_classes):
            raise DatasetUnavailable(f"{folder}/ has labels outside 0..{num_classes - 1}: it is not {title}")
    return RawData(train_x, train_y, test_x, test_y, mean, std, num_classes)


# ----------------------------------------------------------------------------- Fashion-MNIST


def _fashion_raw_names() -> list[str]:
    return [name.removesuffix(".gz") for name, _ in _torchvision("FashionMNIST").resources]


def install_debian_fashion_mnist(raw_folder: Path, debian_dir: Path = DEBIAN_FASHION_MNIST) -> bool:
    """Decompress the Debian package's ``*.gz`` files into torchvision's raw folder.

    Their gzip md5s differ from torchvision's list, so torchvision's download check would
    reject the archives; the decompressed IDX files are what ``FashionMNIST(download=False)``
    reads (it only checks they exist).  Returns False when the package's files are not all there.
    """
    sources = [debian_dir / f"{name}.gz" for name in _fashion_raw_names()]
    if not all(s.is_file() for s in sources):
        return False
    for src in sources:
        with gzip.open(src, "rb") as fin, atomic_open(raw_folder / src.stem, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    return True


def _download_fashion_mnist(cfg: Any, root: Path, raw_folder: Path, debian_dir: Path) -> None:
    reason = "dataset.download=false"
    if cfg.download:
        try:
            _torchvision("FashionMNIST")(str(root), train=True, download=True)
        except Exception as e:  # network, http and checksum failures all mean "not available"
            reason = f"download failed: {_first_line(e)}"
    if not _all_files(raw_folder, _fashion_raw_names()):
        raise DatasetUnavailable(
            f"Fashion-MNIST not found in {raw_folder.resolve()}/ ({reason}): put "
            f"{', '.join(_fashion_raw_names())} there, or apt-get install dataset-fashion-mnist "
            f"(read from {debian_dir}/); dataset=synthetic runs offline"
        )


def fashion_mnist(cfg: Any, root: str | Path | None = None, debian_dir: str | Path | None = None) -> RawData:
    """Fashion-MNIST (1x28x28, 10 classes) through torchvision, or the Debian package when offline.

    ``debian_dir`` defaults to :data:`DEBIAN_FASHION_MNIST` (read at call time, so tests can point it elsewhere).
    """
    root = _root(cfg, root)
    debian_dir = Path(debian_dir if debian_dir is not None else DEBIAN_FASHION_MNIST)
    raw_folder = root / "FashionMNIST" / "raw"
    # Prefer the local package over the network: same pixels, no wait for a timeout offline.
    if not _all_files(raw_folder, _fashion_raw_names()):
        if install_debian_fashion_mnist(raw_folder, debian_dir):
            log.info("Fashion-MNIST: using the Debian package's files from %s/ (copied to %s/)",
                     debian_dir, raw_folder)
        else:
            _download_fashion_mnist(cfg, root, raw_folder, debian_dir)
    fashion = _torchvision("FashionMNIST")
    train, test = (fashion(str(root), train=t, download=False) for t in (True, False))
    return RawData(
        train.data.unsqueeze(1).contiguous(), train.targets.long(),
        test.data.unsqueeze(1).contiguous(), test.targets.long(),
        (0.2860,), (0.3530,), 10,
    )


# ----------------------------------------------------------------------------- synthetic


def synthetic(cfg: Any, root: str | Path | None = None) -> RawData:
    """Learnable generated images: a smooth random prototype per class plus per-pixel Gaussian noise.

    Prototypes are uniform noise on a 4x4 grid upsampled bilinearly to ``image_size``, so
    they survive small crops and flips; ``noise`` is the per-pixel std in [0, 1] units.
    Labels are exactly balanced.  Fixed seed, so every run sees the same data.
    """
    g = torch.Generator().manual_seed(SYNTHETIC_SEED)
    c, s, k = int(cfg.channels), int(cfg.image_size), int(cfg.num_classes)
    grid = torch.rand(k, c, 4, 4, generator=g)
    prototypes = F.interpolate(grid, size=(s, s), mode="bilinear", align_corners=True)
    train_x, train_y = _sample_synthetic(prototypes, int(cfg.num_train), float(cfg.noise), g)
    test_x, test_y = _sample_synthetic(prototypes, int(cfg.num_test), float(cfg.noise), g)
    pixels = train_x.to(torch.float64).div(255.0).transpose(0, 1).reshape(c, -1)
    mean = tuple(pixels.mean(1).tolist())
    std = tuple(pixels.std(1).clamp_min(1e-3).tolist())  # a constant channel must not divide by zero
    return RawData(train_x, train_y, test_x, test_y, mean, std, k)


def _sample_synthetic(
    prototypes: torch.Tensor, n: int, noise: float, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randperm(n, generator=g) % prototypes.shape[0]
    x = prototypes[y] + noise * torch.randn((n, *prototypes.shape[1:]), generator=g)
    return x.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8), y
