"""What a run is recorded by: its resolved config flattened to params, the config's digest, the code's
version (git), and the directory it was launched from."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from dpl.tracking.run_names import BOOKKEEPING

NOT_HASHED = BOOKKEEPING  # keys that change how a job runs or is displayed, not what it computes
SOURCE_NAME = "python -m dpl"  # the Source column of the MLflow UI
# The params that tell runs apart beyond method, K, H, optimizer, lr and seed: runs that differ only in
# batch size, data size or noise look identical in MLflow's runs table unless these are columns of dpl's
# view (dpl.tracking.store.VIEW_COLUMNS), and MLflow shows no param as a column by default.
VIEW_PARAMS = ("batch_size", "dataset.num_train", "dataset.noise")
VIEW_METRICS = ("comm_mib_total",)  # bytes sent per worker in MiB (dpl.run.recorder.in_mib), not 95755440


def flatten_config(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as ``{"optimizer.lr": "0.1", "K": "4", ...}``; ``hydra`` is skipped.

    Lists stay whole (``"[0.9, 0.999]"``) so one config key is one MLflow param.
    """
    flat: dict[str, str] = {}
    _flatten(_resolved(cfg), "", flat)
    return flat


def _resolved(cfg: DictConfig) -> dict[str, Any]:
    # Mask `hydra` out before resolving: its ${now:...} / ${hydra:...} interpolations only
    # resolve inside a running Hydra app.
    keys = [k for k in cfg.keys() if k != "hydra"]
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True, throw_on_missing=False)


def _flatten(node: Mapping[str, Any], prefix: str, out: dict[str, str]) -> None:
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _flatten(value, name + ".", out)
        else:
            out[name] = str(value)


def config_hash(cfg: DictConfig) -> str:
    """A digest of the resolved config (logger and bookkeeping keys left out): two jobs with
    the same digest train the same model, whatever their output dirs."""
    flat = {k: v for k, v in flatten_config(cfg).items()
            if k not in NOT_HASHED and not k.startswith(("logger.", "hydra."))}
    return hashlib.sha1(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def launch_dir() -> Path:
    """The directory the command was started in (Hydra may have changed the cwd since)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        from hydra.utils import get_original_cwd

        return Path(get_original_cwd())
    return Path(os.getcwd())


def git_commit(path: str | Path | None = None) -> str:
    """Short sha of the git repo holding ``path`` (default: the dpl package), ``-dirty``
    if tracked files have uncommitted changes, ``"unknown"`` outside a repo. Never raises."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    if where.is_file():
        where = where.parent
    sha = _git(where, "rev-parse", "--short", "HEAD")
    if not sha:
        return "unknown"
    changes = _git(where, "status", "--porcelain", "--untracked-files=no")
    return sha + ("-dirty" if changes else "")


def source_tags(entry: str = SOURCE_NAME, path: str | Path | None = None) -> dict[str, str]:
    """MLflow's standard source tags: the UI's Source and Version columns.

    ``mlflow.source.git.commit`` is the full sha of the repo holding ``path`` (default: the dpl
    package); ``git_dirty`` says whether tracked files had uncommitted changes."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    tags = {"mlflow.source.name": entry, "mlflow.source.type": "LOCAL"}
    sha = _git(where, "rev-parse", "HEAD")
    if sha:
        tags["mlflow.source.git.commit"] = sha
        tags["git_dirty"] = str(bool(_git(where, "status", "--porcelain", "--untracked-files=no"))).lower()
        branch = _git(where, "rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":
            tags["mlflow.source.git.branch"] = branch
    return tags


def _git(where: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
