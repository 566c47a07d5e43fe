"""Dataset sources: real on-disk layouts (tiny fakes), offline errors, synthetic data, normalisation."""

from __future__ import annotations

import functools
import hashlib
import http.server
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torchvision.datasets import CIFAR100

from dpl.components.data import DATASETS, cifar10, cifar100, sources
from dpl.components.data.device import eval_batches, load_dataset, make_batch, split_train_val
from dpl.errors import DatasetUnavailable
from dpl.io import atomic_temp_path
from tests.conftest import compose_cfg
from tests.fakes import write_cifar10, write_cifar100, write_fashion_mnist_gz, write_python2_cifar_batch

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"
CPU = torch.device("cpu")


def dataset_cfg(name: str, **overrides):
    """The YAML in conf/dataset/ merged into its schema, as Hydra composes it."""
    return OmegaConf.merge(compose_cfg(f"dataset={name}", tiny=False).dataset, overrides)


def test_registry_keys_are_the_yaml_names():
    assert set(DATASETS) == {p.stem for p in CONF.glob("*.yaml")}


# ----------------------------------------------------------------------------- CIFAR


def test_cifar100_loads_the_pickle_layout_and_splits_90_10(tmp_path):
    written = write_cifar100(tmp_path, n_train=200, n_test=50)
    data = load_dataset(dataset_cfg("cifar100", download=False), seed=3, device=CPU, root=tmp_path)
    assert (len(data.train_y), len(data.val_y), len(data.test_y)) == (180, 20, 50)
    train_idx, val_idx = split_train_val(200, 0.1, seed=3)
    assert torch.equal(data.train_x, torch.from_numpy(written["train_x"][train_idx.numpy()]))
    assert torch.equal(data.val_y, torch.from_numpy(written["train_y"][val_idx.numpy()]))
    assert torch.equal(data.test_x, torch.from_numpy(written["test_x"]))
    assert torch.equal(data.test_y, torch.from_numpy(written["test_y"]))
    assert data.train_x.dtype == torch.uint8 and data.train_y.dtype == torch.int64
    assert (data.channels, data.image_size, data.num_classes) == (3, 32, 100)
    assert torch.allclose(data.mean, torch.tensor([0.5071, 0.4867, 0.4408]))
    assert torch.allclose(data.std, torch.tensor([0.2675, 0.2565, 0.2761]))


def test_cifar_rows_are_channel_major_row_major(tmp_path):
    """The documented layout: row entry c*1024 + h*32 + w is channel c, row h, column w."""
    write_cifar100(tmp_path, n_train=20, n_test=5)
    with open(tmp_path / "cifar-100-python" / "test", "rb") as f:
        row = pickle.load(f, encoding="bytes")[b"data"][4]
    x, _ = sources.read_cifar_batches(tmp_path / "cifar-100-python", ["test"], "fine_labels")
    for c, h, w in [(0, 0, 0), (0, 0, 31), (1, 5, 7), (2, 31, 0), (2, 31, 31)]:
        assert x[4, c, h, w] == row[c * 1024 + h * 32 + w]


def test_cifar10_concatenates_the_five_batches(tmp_path):
    written = write_cifar10(tmp_path, n_per_batch=40, n_test=50)
    raw = cifar10(dataset_cfg("cifar10", download=False), root=tmp_path)
    assert torch.equal(raw.train_x, torch.from_numpy(written["train_x"]))
    assert torch.equal(raw.train_y, torch.from_numpy(written["train_y"]))
    assert torch.equal(raw.test_x, torch.from_numpy(written["test_x"]))
    assert raw.num_classes == 10 and raw.mean == (0.4914, 0.4822, 0.4465)
    data = load_dataset(dataset_cfg("cifar10", download=False), seed=0, device=CPU, root=tmp_path)
    assert (len(data.train_y), len(data.val_y)) == (180, 20)


def test_split_depends_on_the_seed_only():
    a_train, a_val = split_train_val(50_000, 0.1, seed=1)
    b_train, b_val = split_train_val(50_000, 0.1, seed=1)
    _, c_val = split_train_val(50_000, 0.1, seed=2)
    assert (len(a_train), len(a_val)) == (45_000, 5_000)
    assert torch.equal(a_val, b_val) and torch.equal(a_train, b_train) and not torch.equal(a_val, c_val)
    assert torch.equal(torch.cat([a_train, a_val]).sort().values, torch.arange(50_000))


def _assert_one_line_with(message: str, *parts: str) -> None:
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


def test_missing_cifar_without_download_says_where_to_put_it(tmp_path):
    with pytest.raises(DatasetUnavailable) as e:
        load_dataset(dataset_cfg("cifar100", download=False), seed=0, device=CPU, root=tmp_path)
    _assert_one_line_with(str(e.value), f"{tmp_path}/cifar-100-python/", "dataset.download=false",
                          "dataset=synthetic", "dataset=fashion_mnist")


def test_missing_cifar_with_failing_download_is_unavailable(tmp_path, monkeypatch):
    # A real download attempt against a closed local port: fails at once, like being offline.
    monkeypatch.setattr(CIFAR100, "url", "http://127.0.0.1:1/cifar-100-python.tar.gz")
    with pytest.raises(DatasetUnavailable) as e:
        cifar100(dataset_cfg("cifar100", download=True), root=tmp_path)
    _assert_one_line_with(str(e.value), "download failed", f"{tmp_path}/cifar-100-python/", "dataset=synthetic")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def local_http(tmp_path):
    """A real HTTP server on localhost serving ``tmp_path / 'www'``; yields its base URL."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(QuietHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_cifar100_download_extracts_and_loads(tmp_path, local_http, monkeypatch):
    www, base_url = local_http
    written = write_cifar100(tmp_path / "src", n_train=30, n_test=10)
    with atomic_temp_path(www / "cifar-100-python.tar.gz") as tmp, tarfile.open(tmp, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-100-python", arcname="cifar-100-python")
    md5 = hashlib.md5((www / "cifar-100-python.tar.gz").read_bytes()).hexdigest()
    monkeypatch.setattr(CIFAR100, "url", f"{base_url}/cifar-100-python.tar.gz")
    monkeypatch.setattr(CIFAR100, "tgz_md5", md5)
    raw = cifar100(dataset_cfg("cifar100", download=True), root=tmp_path / "data")
    assert torch.equal(raw.train_x, torch.from_numpy(written["train_x"]))
    assert torch.equal(raw.test_y, torch.from_numpy(written["test_y"]))
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["cifar-100-python", "cifar-100-python.tar.gz"]


def test_truncated_cifar_file_is_reported(tmp_path):
    write_cifar100(tmp_path, n_train=20, n_test=5)
    path = tmp_path / "cifar-100-python" / "train"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DatasetUnavailable, match="unreadable"):
        cifar100(dataset_cfg("cifar100", download=False), root=tmp_path)


def test_a_cifar_file_larger_than_any_is_refused_by_its_size_before_it_is_read(tmp_path):
    write_cifar100(tmp_path, n_train=20, n_test=5)
    path = tmp_path / "cifar-100-python" / "train"
    with open(path, "r+b") as f:  # sparse: 2 GiB on paper, no disk used
        f.truncate(2 * 2**30)
    read_before = _bytes_read()
    with pytest.raises(DatasetUnavailable) as e:
        cifar100(dataset_cfg("cifar100", download=False), root=tmp_path)
    _assert_one_line_with(str(e.value), f"{path} is 2048 MiB, more than a CIFAR file holds", "download it again")
    assert _bytes_read() - read_before < 2**26  # refused unread


def _bytes_read() -> int:
    """The bytes this process has read through read() calls so far (Linux; 0 elsewhere)."""
    io = Path("/proc/self/io")
    return int(dict(line.split(": ") for line in io.read_text().splitlines())["rchar"]) if io.is_file() else 0


# ----------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_falls_back_to_the_debian_files(tmp_path, monkeypatch, caplog):
    written = write_fashion_mnist_gz(tmp_path / "debian", n_train=120, n_test=30)
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    with caplog.at_level("INFO", logger="dpl"):
        data = load_dataset(dataset_cfg("fashion_mnist", download=False), seed=0, device=CPU, root=tmp_path / "data")
    assert [r.message for r in caplog.records if "Debian" in r.message] == [
        f"Fashion-MNIST: using the Debian package's files from {tmp_path / 'debian'}/ "
        f"(copied to {tmp_path / 'data' / 'FashionMNIST' / 'raw'}/)"]
    assert (tmp_path / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    assert (len(data.train_y), len(data.val_y), len(data.test_y)) == (108, 12, 30)
    assert (data.channels, data.image_size, data.num_classes) == (1, 28, 10)
    assert torch.equal(data.test_x[:, 0], torch.from_numpy(written["test_x"]))
    assert torch.equal(data.test_y, torch.from_numpy(written["test_y"]).long())
    train_idx, _ = split_train_val(120, 0.1, seed=0)
    assert torch.equal(data.train_x[:, 0], torch.from_numpy(written["train_x"][train_idx.numpy()]))
    assert torch.allclose(data.mean, torch.tensor([0.2860])) and torch.allclose(data.std, torch.tensor([0.3530]))


def test_fashion_mnist_missing_everywhere_is_unavailable(tmp_path):
    with pytest.raises(DatasetUnavailable) as e:
        sources.fashion_mnist(dataset_cfg("fashion_mnist", download=False), root=tmp_path, debian_dir=tmp_path / "none")
    _assert_one_line_with(str(e.value), f"{tmp_path}/FashionMNIST/raw/", "dataset-fashion-mnist", "dataset=synthetic")


@pytest.mark.skipif(not (sources.DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_debian_fashion_mnist(tmp_path):
    data = load_dataset(dataset_cfg("fashion_mnist", download=False), seed=0, device=CPU, root=tmp_path)
    assert (len(data.train_y), len(data.val_y), len(data.test_y)) == (54_000, 6_000, 10_000)
    assert torch.bincount(data.test_y).tolist() == [1000] * 10
    pixels = torch.cat([data.train_x, data.val_x]).float() / 255
    assert abs(pixels.mean().item() - 0.2860) < 1e-3 and abs(pixels.std().item() - 0.3530) < 1e-3


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_balanced_and_seed_split():
    cfg = dataset_cfg("synthetic", num_train=600, num_test=200, num_classes=4, image_size=16)
    a = load_dataset(cfg, seed=0, device=CPU)
    b = load_dataset(cfg, seed=0, device=CPU)
    c = load_dataset(cfg, seed=1, device=CPU)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_x, b.test_x)
    assert torch.equal(a.test_x, c.test_x) and not torch.equal(a.val_y, c.val_y)  # same data, other split
    assert a.train_x.shape == (540, 3, 16, 16) and a.test_x.shape == (200, 3, 16, 16)
    assert torch.bincount(a.test_y).tolist() == [50] * 4
    assert torch.bincount(torch.cat([a.train_y, a.val_y])).tolist() == [150] * 4


def test_synthetic_mean_std_are_the_train_set_statistics():
    cfg = dataset_cfg("synthetic", num_train=300, num_test=50, image_size=12)
    raw = sources.synthetic(cfg)
    pixels = raw.train_x.double().div(255).transpose(0, 1).reshape(3, -1)
    assert np.allclose(raw.mean, pixels.mean(1).numpy()) and np.allclose(raw.std, pixels.std(1).numpy())


def test_synthetic_classes_are_separable():
    """Nearest class mean (from train) classifies the test set far above chance (1/10)."""
    raw = sources.synthetic(dataset_cfg("synthetic", num_train=1000, num_test=300))
    x_train, x_test = raw.train_x.flatten(1).float(), raw.test_x.flatten(1).float()
    means = torch.stack([x_train[raw.train_y == k].mean(0) for k in range(10)])
    accuracy = (torch.cdist(x_test, means).argmin(1) == raw.test_y).float().mean().item()
    assert accuracy > 0.9


def test_batches_are_normalised_with_the_stated_mean_and_std():
    data = load_dataset(dataset_cfg("synthetic", num_train=100, num_test=40), seed=0, device=CPU)
    idx = torch.tensor([[3, 7], [11, 0]])
    x, y = make_batch(data, idx, None, train=False)
    assert x.shape == (2, 2, 3, 32, 32) and x.dtype == torch.float32 and torch.equal(y, data.train_y[idx])
    raw_pixel = data.train_x[11, 2, 5, 9].item()
    expected = (raw_pixel / 255 - data.mean[2].item()) / data.std[2].item()
    assert x[1, 0, 2, 5, 9].item() == pytest.approx(expected, abs=1e-6)
    xv, yv = make_batch(data, torch.tensor([1]), None, train=False, split="val")
    assert torch.equal(yv, data.val_y[1:2])
    assert xv[0, 0, 0, 0].item() == pytest.approx((data.val_x[1, 0, 0, 0].item() / 255 - data.mean[0].item())
                                                  / data.std[0].item(), abs=1e-6)


def test_eval_batches_cover_the_split_in_order():
    data = load_dataset(dataset_cfg("synthetic", num_train=100, num_test=45), seed=0, device=CPU)
    batches = list(eval_batches(data, "test", batch_size=20))
    assert [len(y) for _, y in batches] == [20, 20, 5]
    assert torch.equal(torch.cat([y for _, y in batches]), data.test_y)
    x_all = torch.cat([x for x, _ in batches])
    assert torch.equal(x_all, make_batch(data, torch.arange(45), None, train=False, split="test")[0])


def _augmented_eval_as_first_written(data, split, key):
    """The augmented evaluation batches as they were drawn with a fixed batch of 1000 images:
    batch i hashed under (seed, EVAL, evaluation, i), counters 0.. within the batch."""
    from dpl.components.data.augment import EVAL, augment_bits, normalize, random_crop_flip, stream_key

    xs, ys = data.split(split)
    for i, start in enumerate(range(0, len(ys), 1000)):
        x = xs[start: start + 1000]
        x = random_crop_flip(x, data.crop_padding, augment_bits(stream_key(key[0], EVAL, key[1], i), 0, len(x), CPU))
        yield normalize(x, data.mean, data.std), ys[start: start + 1000]


def test_augmented_evaluation_draws_the_same_crops_for_every_batch_size():
    data = load_dataset(dataset_cfg("synthetic", num_train=100, num_test=2300), seed=0, device=CPU)
    ref = torch.cat([x for x, _ in _augmented_eval_as_first_written(data, "test", (3, 7))])
    for batch in (1000, 300, 64, 5000):
        x = torch.cat([x for x, _ in eval_batches(data, "test", batch, augment_key=(3, 7))])
        assert torch.equal(x, ref), batch
    clean = torch.cat([x for x, _ in eval_batches(data, "test", 300)])
    assert not torch.equal(clean, ref)  # the augmentation did something
    other = torch.cat([x for x, _ in eval_batches(data, "test", 300, augment_key=(3, 8))])
    assert not torch.equal(other, ref)  # redrawn at the next evaluation


@pytest.mark.slow  # tests/test_train.py::test_synthetic_run_learns checks the same through the whole pipeline
def test_lenet_learns_synthetic_in_two_epochs():
    """The point of `synthetic`: a real model learns it far above chance (10%) offline, in seconds."""
    from dpl.components.models.lenet import LeNet5

    torch.manual_seed(0)
    data = load_dataset(dataset_cfg("synthetic", num_train=1000, num_test=200), seed=0, device=CPU)
    model = LeNet5(data.channels, data.num_classes, data.image_size)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for epoch in range(2):
        for step, idx in enumerate(torch.randperm(len(data.train_y), generator=g).split(32)):
            x, y = make_batch(data, idx, (0, epoch * 1000 + step), train=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in eval_batches(data, "test", 50))
    assert correct / len(data.test_y) > 0.5


def test_cifar_reader_reads_python2_pickles(tmp_path):
    """The official files were written by Python 2 (str keys, array bytes as py2 str)."""
    x = np.random.default_rng(0).integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)
    write_python2_cifar_batch(tmp_path / "test", x, np.array([5, 99, 0]), "fine_labels")
    images, fine = sources.read_cifar_batches(tmp_path, ["test"], "fine_labels")
    assert torch.equal(images, torch.from_numpy(x)) and fine.tolist() == [5, 99, 0]
