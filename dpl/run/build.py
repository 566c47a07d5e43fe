"""Building one job's parts from its config: data, model, workers, method, the trainer.

Everything is seeded, so every rank of ``engine=distributed`` builds the same parts. The job's
lifecycle around them is :mod:`dpl.run.job`; what is recorded beside the loop, :mod:`dpl.run.recorder`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dpl.run import checkpoint
from dpl.comm import build_compression
from dpl.comm.drops import Drops
from dpl.components.data import TEXT_DATASETS, load_dataset
from dpl.core.engines import build_workers
from dpl.errors import ConfigError, first_line
from dpl.core.methods import build_method
from dpl.components.models import MODELS, SEQUENCE_MODELS, build_model
from dpl.tracking import launch_dir
from dpl.core.loop import Trainer


def resolve_path(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else launch_dir() / p


def build_trainer(cfg: DictConfig, device: torch.device, rank: int = 0, comm=None,
                  data_cache: dict | None = None) -> Trainer:
    """Data, model, workers, method and optimizer for ``cfg`` (seeded: the same on every rank).
    ``data_cache``: raw datasets already read, shared by the runs of a packed group (dpl.components.data.load_dataset)."""

    def load(download: bool):
        node = cfg.dataset if download or "download" not in cfg.dataset else \
            OmegaConf.merge(cfg.dataset, {"download": False})
        root = cfg.dataset.get("root") or cfg.dataset.get("path")  # synthetic data has no files; text, a path
        return load_dataset(node, cfg.seed, device, root=resolve_path(root) if root else None, cache=data_cache)

    text = cfg.dataset.name in TEXT_DATASETS
    if text != (cfg.model.name in SEQUENCE_MODELS):
        allowed = SEQUENCE_MODELS if text else [m for m in MODELS if m not in SEQUENCE_MODELS]
        raise ConfigError(f"model={cfg.model.name} is invalid with dataset={cfg.dataset.name}: allowed "
                          f"{', '.join(allowed)}")
    # engine=distributed: only rank 0 may download; the others wait for it
    data = load(True) if comm is None else comm.rank0_first(load)
    n_train = int(data.train_y.shape[0])
    if cfg.K > n_train:
        raise ConfigError(f"K={cfg.K} is invalid: allowed at most {n_train} (the training samples of "
                          f"{cfg.dataset.name})")
    torch.manual_seed(cfg.seed)
    try:
        options = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "name"}
        model = build_model(cfg.model.name, data.channels, data.num_classes, data.image_size, **options).to(device)
    except ValueError as e:  # the model cannot take these images
        key = "dataset.block_size" if text else "dataset.image_size"
        raise ConfigError(f"{key}={data.image_size} is invalid: {e}") from None
    if cfg.pretrained:
        weights = checkpoint.load_weights(resolve_path(cfg.pretrained))
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:  # missing / unexpected keys or shapes: one line, not torch's list
            first = str(e).strip().splitlines()
            detail = " ".join(line.strip() for line in first[1:3])[:300] or first[0][:300]
            raise checkpoint.CheckpointError(f"pretrained={cfg.pretrained!r} does not fit model "
                                             f"{cfg.model.name} on {cfg.dataset.name}: {detail}") from None
    method = build_method(cfg.method, cfg.local_momentum)
    workers = build_workers(cfg, model, device, comm, synchronous=method.synchronous)
    workers.point.compression = build_compression(cfg.get("compression"), cfg.seed)
    faults = cfg.get("faults")  # configs from before the node existed drop nothing
    workers.point.drops = Drops(faults.drop_prob if faults is not None else 0.0, cfg.seed)
    return Trainer(cfg, data, workers, method, rank=rank)


def load_training_state(trainer: Trainer, ckpt: dict[str, Any], where: Path) -> None:
    """``trainer.load_state_dict(ckpt)``; a checkpoint whose contents do not fit its own config
    (edited, or from another dpl) is one line naming it, not a KeyError or a shape traceback."""
    try:
        trainer.load_state_dict(ckpt)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise checkpoint.CheckpointError(f"checkpoint {where} does not fit the run it describes "
                                         f"({type(e).__name__}: {first_line(e)[:200]})") from None
