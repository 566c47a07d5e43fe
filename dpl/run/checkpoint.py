"""Checkpoints: one file per job dir, replaced atomically (temp file, fsync, rename).

Every file dpl reads with torch (a checkpoint to resume or test, ``pretrained=`` weights)
is loaded with ``weights_only=True``: torch's restricted unpickler builds tensors, numbers,
strings and plain containers and refuses any other global, so a shared checkpoint cannot
run code when it is opened (a pickle's ``__reduce__`` can name any callable). dpl's own
checkpoints hold nothing else (``tests/test_checkpoint.py`` writes one of every method,
optimizer and compressor and reads it back), so the allow-list of extra globals is empty.

A checkpoint carries its format's version (:data:`FORMAT_VERSION`); one of an older format is brought
to the current one when it is read, by :func:`upgrade` alone, so the trainer, the methods and the
config only ever see the current format.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from dpl.config.upgrade import upgrade_config
from dpl.errors import CheckpointError, WriteError
from dpl.io import atomic_open, atomic_write_text
from dpl.run.interrupt import resume_hint

FILENAME = "checkpoint.pt"
RUN_FILE = "run.json"  # the job's config and MLflow run, written before the first checkpoint
# 1: up to dpl 0.1.0's first releases; 2: the epoch's metric sums by name (TrainState.sums), every config
# node present, method states complete
FORMAT_VERSION = 3
# What a resume or test_only reads from a checkpoint (dpl.core.loop.Trainer.state_dict, plus the Recorder's extras).
REQUIRED_KEYS = ("state", "traffic", "workers", "model", "best_model", "optimizer", "method", "comm", "rng",
                 "config")


def save(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` so that ``path`` holds either the previous checkpoint or this one.

    Serialised in memory first and written with plain file I/O: torch's own file writer reports a
    full disk as "PytorchStreamWriter failed writing file" without the reason, and this way the
    ``OSError`` (``No space left on device``) reaches the user, in one line naming the file."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, **state}, buffer)
    try:
        with atomic_open(path, "wb") as f:
            f.write(buffer.getbuffer())
    except OSError as e:
        raise WriteError(f"could not write the checkpoint {path}: {e.strerror or type(e).__name__} "
                         f"(the previous checkpoint is kept; {resume_hint(Path(path).parent)})") from None


def save_run_file(extras: dict[str, Any], job: Path) -> None:
    """``<job>/run.json``: what a resume needs besides the training state (config, MLflow run, launch
    dir), written when the run starts. A job killed while its first checkpoint was being written
    has no checkpoint, and without this its MLflow run could never be continued or ended."""
    atomic_write_text(Path(job) / RUN_FILE, json.dumps(extras, indent=1))


def load_resumable(path: str | Path) -> tuple[dict[str, Any], Path]:
    """(checkpoint, job dir) to resume from; a job dir with no checkpoint yet but a ``run.json``
    gives that file's contents without a training state (the job starts over, in the same run)."""
    p = Path(path).expanduser()
    run_file = p / RUN_FILE if p.is_dir() else None
    if run_file is not None and not (p / FILENAME).exists() and run_file.is_file():
        try:
            extras = json.loads(run_file.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{run_file} is unreadable ({type(e).__name__}) and there is no "
                                  f"{FILENAME}: nothing to resume") from None
        if not isinstance(extras, dict) or not isinstance(extras.get("config"), dict):
            raise CheckpointError(f"{run_file} is not a dpl run file and there is no {FILENAME}: nothing to resume")
        try:
            return {**extras, "config": upgrade_config(extras["config"])}, p
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{run_file} is not a dpl run file ({type(e).__name__}: {e}) and there is "
                                  f"no {FILENAME}: nothing to resume") from None
    found = locate(p)
    return load(found), found.parent


def locate(path: str | Path) -> Path:
    """A job dir or a checkpoint file -> the checkpoint file."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / FILENAME
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {p} (give a dpl job dir or its {FILENAME})")
    return p


def safe_load(p: Path, what: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(p, weights_only=True)``, every failure one line naming ``p``."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = refused_global(str(e))
        if found:
            raise CheckpointError(f"{what} {p} is refused: it names the Python object {found}, which "
                                  f"loading could run (dpl loads only tensors and plain containers, "
                                  f"weights_only=True)") from None
        raise CheckpointError(f"{what} {p} is corrupt or not a torch file that loads with weights_only=True "
                              f"(only tensors and plain containers are read)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, TypeError, AttributeError,
            KeyError, IndexError, MemoryError) as e:
        raise CheckpointError(f"{what} {p} is corrupt or unreadable ({type(e).__name__})") from None


# How torch's weights_only loader words its refusal of a global, which names it (torch 2.14): "Unsupported
# global: GLOBAL builtins.exec was not an allowed global by default", and for a module it blocks outright
# (os, subprocess, ...) "Trying to load unsupported GLOBAL posix.system whose module posix is blocked".
REFUSED_GLOBAL = re.compile(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)")


def refused_global(message: str) -> Optional[str]:
    """The object torch's safe loader refused to load, as its error ``message`` names it (None: no such refusal)."""
    found = REFUSED_GLOBAL.search(message)
    return found.group(1).rstrip(".") if found else None


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint at ``path`` (a job dir or the file), in the current format."""
    p = locate(path)
    state = safe_load(p, "checkpoint", map_location)
    if not isinstance(state, dict) or state.get("format") not in range(1, FORMAT_VERSION + 1):
        raise CheckpointError(f"{p} is not a dpl checkpoint (format 1 to {FORMAT_VERSION})")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{p} is not a complete dpl checkpoint: it lacks {', '.join(missing)}")
    try:
        return upgrade(state)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{p} is not a dpl checkpoint of format {state['format']} "
                              f"({type(e).__name__}: {e})") from None


def upgrade(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of any earlier format as the current one (:data:`FORMAT_VERSION`); the current format
    is returned as it is.

    Format 1 to 2: the config's keys of before ``method.outer`` moved under it, and the nodes added since
    (``compression``) present; the history's epochs counted from 1 (checkpoints written before epochs were
    counted from 1 everywhere hold 0-based records, and a resumed run would otherwise append epoch 3 after
    epochs 0 and 1, and report the wrong best epoch); the epoch's running sums under their metrics' names;
    a local method's sync count and in-flight fragments (none before compression and streaming existed);
    LARS's ``momentum_form`` in its param groups (its form before the option existed: ``lr_outside``).

    Format 2 to 3: ``sync_at_epoch_end`` in the config, true (every epoch's end synced then); a streaming
    fragment in flight lands at a step of the run, not of its epoch; the state's last record at its
    epoch's start and its best score the best validation accuracy. A streaming run continues with
    today's fragment order (fragment 0 first), so it does not continue its own schedule exactly.
    """
    if ckpt["format"] == FORMAT_VERSION:
        return ckpt
    config = upgrade_config(ckpt["config"])
    state, method, optimizer = dict(ckpt["state"]), dict(ckpt["method"]), ckpt["optimizer"]
    if ckpt["format"] < 2:
        history = state.get("history") or []
        if history and history[0].get("epoch") == 0:
            state["history"] = [{**row, "epoch": row["epoch"] + 1} for row in history]
            if state.get("best_epoch", -1) >= 0:
                state["best_epoch"] += 1
        sums = {"train_loss": state.pop("loss_sum", 0.0), "train_acc": state.pop("correct", 0),
                "drift": state.pop("drift_sum", 0.0)}
        state["sums"] = {k: float(v) for k, v in sums.items()}
        if "anchor" in method:
            method.setdefault("syncs", 0)
            method.setdefault("in_flight", {})
        if config.get("optimizer", {}).get("name") == "lars":
            optimizer = {**optimizer, "param_groups": [{"momentum_form": "lr_outside", **g}
                                                       for g in optimizer["param_groups"]]}
    epoch_start = state.get("global_step", 0) - state.get("step", 0)
    state.setdefault("recorded_at", epoch_start)  # records were made at epochs' ends only
    state.setdefault("best_score", state.get("best_val_acc", -1.0))  # the best was by validation accuracy
    if method.get("in_flight"):
        method["in_flight"] = {p: {**f, "lands_at": None if f["lands_at"] is None else f["lands_at"] + epoch_start}
                               for p, f in method["in_flight"].items()}
    return {**ckpt, "format": FORMAT_VERSION, "config": config, "state": state, "method": method,
            "optimizer": optimizer}


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Model weights from a dpl checkpoint (its averaged model) or a plain state_dict file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"no weights file at {p}")
    obj = safe_load(p, "weights file")
    if isinstance(obj, dict) and obj.get("format") in range(1, FORMAT_VERSION + 1) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        return obj
    raise CheckpointError(f"{p} holds neither a dpl checkpoint nor a state_dict")
