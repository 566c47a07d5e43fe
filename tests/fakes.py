"""Tiny fake dataset files in the real on-disk layouts, for tests that must not download.

CIFAR: the python-version pickles (protocol 2, bytes keys, ``data`` uint8 [n, 3072] in
row-major CHW order) as in cifar-{10,100}-python.tar.gz.  Fashion-MNIST: gzipped IDX
files (big-endian int32 header: magic 2051 for images, 2049 for labels).
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

from dpl.io import atomic_open


def _images(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _pickle(path: Path, obj: dict) -> None:
    with atomic_open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _cifar_batch(x: np.ndarray, labels: np.ndarray, label_key: bytes, name: bytes) -> dict:
    return {
        b"batch_label": name,
        label_key: [int(v) for v in labels],
        b"data": x.reshape(len(x), -1),  # [n, 3072]: the 1024 R, then G, then B values, rows top to bottom
        b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(x))],
    }


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 50, seed: int = 0) -> dict[str, np.ndarray]:
    """Write ``root/cifar-100-python/{train,test,meta}``; return the NCHW pixels and fine labels written."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x, fine = _images(rng, n, (3, 32, 32)), rng.integers(0, 100, size=n)
        batch = _cifar_batch(x, fine, b"fine_labels", f"{split}ing batch 1 of 1".encode())
        batch[b"coarse_labels"] = [int(v) // 5 for v in fine]
        _pickle(folder / split, batch)
        out[f"{split}_x"], out[f"{split}_y"] = x, fine
    _pickle(folder / "meta", {
        b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)],
    })
    return out


def write_cifar10(root: Path, n_per_batch: int = 40, n_test: int = 50, seed: int = 0) -> dict[str, np.ndarray]:
    """Write ``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``; return what was written."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    xs, ys = [], []
    for i in range(1, 6):
        x, y = _images(rng, n_per_batch, (3, 32, 32)), rng.integers(0, 10, size=n_per_batch)
        _pickle(folder / f"data_batch_{i}", _cifar_batch(x, y, b"labels", f"training batch {i} of 5".encode()))
        xs.append(x)
        ys.append(y)
    test_x, test_y = _images(rng, n_test, (3, 32, 32)), rng.integers(0, 10, size=n_test)
    _pickle(folder / "test_batch", _cifar_batch(test_x, test_y, b"labels", b"testing batch 1 of 1"))
    _pickle(folder / "batches.meta", {
        b"num_cases_per_batch": n_per_batch,
        b"label_names": [f"class_{i}".encode() for i in range(10)],
        b"num_vis": 3072,
    })
    return {"train_x": np.concatenate(xs), "train_y": np.concatenate(ys), "test_x": test_x, "test_y": test_y}


def write_fashion_mnist_gz(folder: Path, n_train: int = 120, n_test: int = 30, seed: int = 0) -> dict[str, np.ndarray]:
    """Write the four gzipped IDX files as the Debian package names them; return what was written."""
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, split, n in (("train", "train", n_train), ("t10k", "test", n_test)):
        x, y = _images(rng, n, (28, 28)), rng.integers(0, 10, size=n).astype(np.uint8)
        _write_gz(Path(folder) / f"{prefix}-images-idx3-ubyte.gz", struct.pack(">iiii", 2051, n, 28, 28) + x.tobytes())
        _write_gz(Path(folder) / f"{prefix}-labels-idx1-ubyte.gz", struct.pack(">ii", 2049, n) + y.tobytes())
        out[f"{split}_x"], out[f"{split}_y"] = x, y
    return out


def _write_gz(path: Path, payload: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(gzip.compress(payload))


def write_python2_cifar_batch(path: Path, x: np.ndarray, labels: np.ndarray, label_key: str) -> None:
    """A batch pickled as Python 2's cPickle wrote the official files: str (not unicode) keys
    and the array's bytes as py2 ``str`` objects (opcodes BINSTRING/SHORT_BINSTRING)."""

    def s(b: bytes) -> bytes:  # a Python 2 str
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def k(v: int) -> bytes:
        return b"J" + struct.pack("<i", v)

    rows, cols = len(x), x[0].size
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + k(0) + b"\x85" + s(b"b") + b"\x87R"
             + b"(" + k(1) + k(rows) + k(cols) + b"\x86"
             + b"cnumpy\ndtype\n" + s(b"u1") + k(0) + k(1) + b"\x87R"
             + b"(" + k(3) + s(b"|") + b"NNN" + k(-1) + k(-1) + k(0) + b"tb"
             + b"\x89" + s(np.ascontiguousarray(x).tobytes()) + b"tb")
    label_list = b"](" + b"".join(k(int(v)) for v in labels) + b"e"
    payload = b"\x80\x02}(" + s(b"data") + array + s(label_key.encode()) + label_list + b"u."
    with atomic_open(path, "wb") as f:
        f.write(payload)
