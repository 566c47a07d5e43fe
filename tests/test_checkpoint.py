"""Checkpoints and weights files load without running code, and every checkpoint dpl writes loads so.

A pickle can name any callable for its loader to call (``__reduce__``); torch's ``weights_only``
loader refuses every global but tensors and plain containers. The payload below creates a marker
file when unpickled the unsafe way (checked first, so the test would notice a payload that
never worked); each of dpl's loading paths must refuse it in one line and leave no marker.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from dpl.components.data.sources import read_cifar_batches
from dpl.errors import DatasetUnavailable
from dpl.run import checkpoint
from dpl.run.checkpoint import CheckpointError
from dpl.run.job import run, salvage

MARKER = "PAYLOAD_RAN"


class Payload:
    def __reduce__(self):
        return (exec, (f"open({MARKER!r}, 'w').close()",))


def _malicious(tmp_path: Path) -> dict[str, Path]:
    """The same hostile dict as torch's zip format and as a plain pickle."""
    evil = {"format": checkpoint.FORMAT_VERSION, "model": {"w": torch.zeros(1)}, "x": Payload()}
    zipped, raw = tmp_path / "evil_zip.pt", tmp_path / "evil_raw.pt"
    torch.save(evil, zipped)
    raw.write_bytes(pickle.dumps(evil))
    return {"zip": zipped, "raw": raw}


def test_the_payload_runs_when_unpickled_unsafely(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = _malicious(tmp_path)
    pickle.loads(files["raw"].read_bytes())
    assert (tmp_path / MARKER).exists()  # the payload is live: the tests below would see it run


@pytest.mark.parametrize("form", ["zip", "raw"])
def test_a_malicious_file_runs_nothing_through_any_loading_path(make_cfg, tmp_path, monkeypatch, form):
    monkeypatch.chdir(tmp_path)
    evil = _malicious(tmp_path)[form]
    job = tmp_path / "job"
    job.mkdir()
    (job / checkpoint.FILENAME).write_bytes(evil.read_bytes())
    refused = "is refused: it names the Python object exec" if form == "zip" else "loads with weights_only=True"
    paths = {  # name: (load, the file it must name)
        "resume": (lambda: run(make_cfg(f"resume={job}"), out_dir=tmp_path / "a"), job / checkpoint.FILENAME),
        "test_only": (lambda: run(make_cfg("test_only=true", f"checkpoint={evil}"), out_dir=tmp_path / "b"), evil),
        "pretrained": (lambda: run(make_cfg(f"pretrained={evil}"), out_dir=tmp_path / "c"), evil),
        "load": (lambda: checkpoint.load(evil), evil),
        "load_weights": (lambda: checkpoint.load_weights(evil), evil),
    }
    for name, (load, path) in paths.items():
        with pytest.raises(CheckpointError) as e:
            load()
        assert refused in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value), name
        assert not (tmp_path / MARKER).exists(), f"{name} ran the payload"
    salvage(make_cfg(), job, "FAILED", "a test")  # the launcher's salvage reads the job's checkpoint too
    assert not (tmp_path / MARKER).exists(), "salvage ran the payload"


def test_a_malicious_cifar_file_is_refused_without_running(tmp_path, monkeypatch):
    from tests.fakes import write_cifar100

    monkeypatch.chdir(tmp_path)
    write_cifar100(tmp_path, n_train=4, n_test=2)
    folder = tmp_path / "cifar-100-python"
    read_cifar_batches(folder, ["train"], "fine_labels")  # the honest file reads
    (folder / "train").write_bytes(pickle.dumps({b"data": Payload(), b"fine_labels": [0]}, protocol=2))
    with pytest.raises(DatasetUnavailable, match=r"names __builtin__.exec, which a data file must not"):
        read_cifar_batches(folder, ["train"], "fine_labels")
    assert not (tmp_path / MARKER).exists()


# What a checkpoint holds differs by method, optimizer and compressor (outer momentum, LAMB's
# step tensors, error-feedback residuals, a dynamic H's history): one run of each kind.
KINDS = [
    ["method=localsgd", "K=2", "H=2", "optimizer=lars", "compression=topk", "dynamic_h=loss"],
    ["method=slowmo", "K=2", "H=2", "optimizer=lamb"],
    ["method=diloco", "K=2", "H=2", "compression=int8"],
    ["method=post_local", "K=2", "H=2", "optimizer=adamw"],
]


@pytest.mark.parametrize("overrides", KINDS, ids=[k[0].split("=")[1] for k in KINDS])
def test_every_checkpoint_dpl_writes_loads_with_weights_only(make_cfg, tmp_path, overrides):
    job = tmp_path / "job"
    run(make_cfg(*overrides, "epochs=1", "dataset.num_train=200"), out_dir=job)
    path = job / checkpoint.FILENAME
    torch.load(path, weights_only=True)  # torch's own safe loader, no extra globals allowed
    state = checkpoint.load(path)
    assert set(checkpoint.REQUIRED_KEYS) <= set(state)
    assert set(checkpoint.load_weights(path)) == set(state["model"])
    # and it resumes: a finished job says so (it read every key it needs)
    assert run(make_cfg(f"resume={job}"), out_dir=job)["already_finished"]


def test_incomplete_or_foreign_files_are_one_line(tmp_path):
    partial, foreign, empty = tmp_path / "partial.pt", tmp_path / "foreign.pt", tmp_path / "empty.pt"
    torch.save({"format": checkpoint.FORMAT_VERSION, "state": {}}, partial)
    torch.save({"weights": [1, 2]}, foreign)
    torch.save({}, empty)
    with pytest.raises(CheckpointError, match="not a complete dpl checkpoint: it lacks traffic, workers"):
        checkpoint.load(partial)
    with pytest.raises(CheckpointError, match="is not a dpl checkpoint"):
        checkpoint.load(foreign)
    for p in (partial, foreign, empty):
        with pytest.raises(CheckpointError, match="holds neither a dpl checkpoint nor a state_dict"):
            checkpoint.load_weights(p)


class SystemPayload:
    """``os.system`` (pickled as ``posix.system``): a module torch's safe loader blocks outright."""

    def __reduce__(self):
        import os

        return (os.system, (f"touch {MARKER}",))


def test_a_global_from_a_blocked_module_is_refused_naming_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "system.pt"
    torch.save({"format": checkpoint.FORMAT_VERSION, "x": SystemPayload()}, evil)
    named = SystemPayload().__reduce__()[0]
    shown = f"{named.__module__}.{named.__name__}"  # posix.system on Linux
    for load in (checkpoint.load, checkpoint.load_weights):
        with pytest.raises(CheckpointError) as e:
            load(evil)
        assert f"is refused: it names the Python object {shown}, which loading could run" in str(e.value)
        assert str(evil) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / MARKER).exists()


@pytest.mark.parametrize("payload,wording", [
    (Payload, "Unsupported global: GLOBAL exec was not an allowed global by default"),
    (SystemPayload, "Trying to load unsupported GLOBAL {name} whose module {module} is blocked"),
])
def test_torchs_wording_of_a_refused_global_is_the_one_dpl_reads(tmp_path, payload, wording):
    """torch's refusals as dpl parses them (``checkpoint.REFUSED_GLOBAL``): a torch that words them anew
    fails here, not silently as "corrupt" in front of a user."""
    path = tmp_path / "evil.pt"
    torch.save({"x": payload()}, path)
    named = payload().__reduce__()[0]
    name = "exec" if named is exec else f"{named.__module__}.{named.__name__}"
    with pytest.raises(pickle.UnpicklingError) as e:
        torch.load(path, weights_only=True)
    assert wording.format(name=name, module=named.__module__) in str(e.value)
    assert checkpoint.refused_global(str(e.value)) == name
