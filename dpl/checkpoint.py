"""Checkpoints: one file per job dir, replaced atomically (temp file, fsync, rename)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from dpl.errors import CheckpointError
from dpl.io import atomic_temp_path

FILENAME = "checkpoint.pt"
FORMAT_VERSION = 1


def save(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` so that ``path`` holds either the previous checkpoint or this one."""
    with atomic_temp_path(path) as tmp:
        torch.save({"format": FORMAT_VERSION, **state}, tmp)


def locate(path: str | Path) -> Path:
    """A job dir or a checkpoint file -> the checkpoint file."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / FILENAME
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {p} (give a dpl job dir or its {FILENAME})")
    return p


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    p = locate(path)
    try:
        state = torch.load(p, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {p} is corrupt or unreadable ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{p} is not a dpl checkpoint (format {FORMAT_VERSION})")
    return state


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Model weights from a dpl checkpoint (its averaged model) or a plain state_dict file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"no weights file at {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # any unreadable file is the same error to the user
        raise CheckpointError(f"weights file {p} is corrupt or unreadable ({type(e).__name__})") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT_VERSION:
        return obj["model"]
    if isinstance(obj, dict) and all(torch.is_tensor(v) for v in obj.values()):
        return obj
    raise CheckpointError(f"{p} holds neither a dpl checkpoint nor a state_dict")
