"""Building one job's parts from its config, all of them, in one place: data, model, workers and their
communication point, method, inner optimizer, lr schedule, the local step, the ledger; and the trainer
that receives them finished (:class:`dpl.core.loop.Trainer`).

Everything is seeded, so every rank of ``engine=distributed`` builds the same parts. The job's
lifecycle around them is :mod:`dpl.run.job`; what is recorded beside the loop, :mod:`dpl.run.recorder`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dpl.comm.clock import WorkerClock, sample_cost_s, worker_speeds
from dpl.comm.codecs import build_codec
from dpl.comm.cost import CommLedger, message_s, param_bytes
from dpl.comm.drops import Drops, Membership
from dpl.components.data import DATASETS
from dpl.components.data.device import load_dataset
from dpl.components.data.sharding import make_shards, steps_per_epoch
from dpl.components.models import MODELS, build_model
from dpl.components.optim import OPTIMIZERS, build_optimizer
from dpl.components.optim.clip import grad_clip
from dpl.components.optim.decay import decays, param_groups
from dpl.core.engines import build_workers, compile_mode, memory_format
from dpl.core.loop import Trainer
from dpl.core.methods import METHODS, build_method
from dpl.core.methods.elastic import with_members
from dpl.core.schedules import LrSchedule, lr_table, scaled_lr
from dpl.core.selfcheck import self_checked
from dpl.core.step import SlowedStep, build_local_step
from dpl.errors import ConfigError, first_line
from dpl.run import checkpoint
from dpl.tracking.params import launch_dir

log = logging.getLogger("dpl")


def resolve_path(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else launch_dir() / p


def build_trainer(cfg: DictConfig, device: torch.device, rank: int = 0, comm: Any = None,
                  data_cache: dict | None = None) -> Trainer:
    """Every part of the run ``cfg`` (seeded: the same on every rank), and its trainer. ``comm``: a rank's
    communicator (``engine=distributed``); ``data_cache``: raw datasets already read, shared by the runs of a
    packed group (:func:`dpl.components.data.device.load_dataset`)."""
    hp = OmegaConf.to_object(cfg)  # plain dataclasses for the per-step reads: DictConfig access costs ~10 us each
    data = load_data(cfg, device, comm, data_cache)
    n_train = int(data.train_y.shape[0])
    if cfg.K > n_train:  # a text dataset's windows are only known once it is read (others: dpl.config.validate)
        raise ConfigError(f"K={cfg.K} is invalid: allowed at most {n_train} (the training samples of "
                          f"{cfg.dataset.name})")
    model = _model(cfg, data, device)
    method = build_method(cfg.method, cfg.local_momentum)
    if cfg.faults.schedule:  # elastic workers: who is in the run at each step
        method = with_members(method, Membership(cfg.faults.schedule, cfg.K))
    workers = build_workers(cfg, model, device, comm, synchronous=METHODS.facts(cfg.method).synchronous,
                            codec=build_codec(cfg.compression), drops=Drops(cfg.faults.drop_prob, cfg.seed),
                            seed=cfg.seed)
    workers.precision = cfg.precision
    workers.channels_last = memory_format(cfg.engine.memory_format, device) == "channels_last"
    # Shards are a function of the seed only, so every method and engine sees the same ones. Every process
    # holds all K rows: the shuffles and crops of a step are drawn jointly for the K workers, so a rank of
    # the multi-process engine draws them all and cuts its ``rows``.
    shards = make_shards(data.train_y.cpu(), workers.K, cfg.sharding, cfg.seed, cfg.dirichlet_alpha).to(device)
    rows = slice(rank, rank + workers.k_local)
    per_epoch = steps_per_epoch(shards.shape[1], cfg.batch_size)
    base_lr = scaled_lr(cfg.lr, cfg.lr_scaling, workers.K * cfg.batch_size, cfg.base_batch_size)
    # how the local step runs (engine.compile): eager, torch.compile, or a replayed CUDA graph
    mode, why = compile_mode(cfg.engine.compile, device, workers, cfg.optimizer.name)
    if why:
        log.warning(why)
    # On CUDA torch's optimizers in their graph-safe form (fused SGD, capturable AdamW): they read the
    # tensor lr on the device, where the default foreach SGD reads it back to the host every step.
    capturable = device.type == "cuda"
    # the parameters whose decay optimizer.decay_params turns off form a group of their own, decided on the
    # model (the template: its parameters' dimensions without the workers'), in its parameters' order
    params = param_groups(workers.params, decays(model, decay_params(cfg)))
    optimizer = build_optimizer(params, cfg.optimizer, base_lr, cfg.weight_decay, per_worker=True,
                                capturable=capturable)
    table = lr_table(cfg.scheduler, base_lr, cfg.epochs, per_epoch, cfg.warmup_epochs, cfg.max_steps, cfg.warmup_steps)
    schedule = LrSchedule(table, base_lr,
                          cfg.scheduler.interval, per_epoch, device, capturable)
    schedule.attach(optimizer)
    clock = cfg.clock
    speeds = worker_speeds(workers.K, clock.speed, cfg.seed, clock.spread, clock.slow_fraction, clock.slow_factor)
    sample_cost = _sample_cost_s(cfg, model, data)
    tokens = cfg.batch_size * data.tokens_per_sample  # one worker's samples of a step, as the cost counts them
    own = method.timeline(WorkerClock(
        tuple(float(s) for s in speeds), tokens * (sample_cost or 0.0),
        message_s(param_bytes(workers.params, per_worker=True), cfg.network.bandwidth_gbps, cfg.network.latency_us)))
    # a step of the loop lasts as long as its slowest worker's, unless the method keeps its own timeline
    ledger = CommLedger(K=workers.K, bandwidth_gbps=cfg.network.bandwidth_gbps, latency_us=cfg.network.latency_us,
                        topology=cfg.network.topology, sample_cost_s=sample_cost,
                        step_factor=float(speeds.max()) if own is None else own)
    method.start(workers, optimizer)
    local_step = build_local_step(mode, data, workers, optimizer, lambda epoch: method.on_gradients(workers, epoch),
                                  method.edits_gradients, cfg.seed, rows, schedule.now, schedule.device_table,
                                  capturable=OPTIMIZERS.facts(cfg.optimizer).capturable, clip=grad_clip(cfg.optimizer))
    local_step = self_checked(local_step, mode)  # a compiled or captured step checks its first result
    if clock.get("emulate", False):  # (absent from a config stored before the key existed)
        local_step = SlowedStep(local_step, float(speeds[rank] / speeds.min()), device)  # one worker, rank = k
    # what picks the best model: accuracy means little for bytes, so text is judged by its validation loss
    best = cfg.best_metric if cfg.best_metric != "auto" else "val_loss" if DATASETS.facts(cfg.dataset).text else "val_acc"
    return Trainer(cfg, hp, data, shards, workers, method, optimizer, schedule, local_step, ledger, mode, best)


def decay_params(cfg: DictConfig) -> str:
    """``optimizer.decay_params``, with ``auto`` the model's default (a fact of its registration)."""
    mode = cfg.optimizer.get("decay_params", "auto")
    return MODELS.facts(cfg.model).decay if mode == "auto" else mode


def load_data(cfg: DictConfig, device: torch.device, comm: Any = None, cache: dict | None = None) -> Any:
    """The run's dataset on ``device``; under ``engine=distributed`` only rank 0 may download, the others
    wait for it."""

    def load(download: bool) -> Any:
        node = cfg.dataset if download or "download" not in cfg.dataset else \
            OmegaConf.merge(cfg.dataset, {"download": False})
        root = cfg.dataset.get("root") or cfg.dataset.get("path")  # synthetic data has no files; text, a path
        return load_dataset(node, cfg.seed, device, root=resolve_path(root) if root else None, cache=cache)

    return load(True) if comm is None else comm.rank0_first(load)


def _model(cfg: DictConfig, data: Any, device: torch.device) -> torch.nn.Module:
    """The model for the data's shape, initialised from the seed (and from ``pretrained`` weights)."""
    torch.manual_seed(cfg.seed)
    try:
        options = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "name"}
        model = build_model(cfg.model.name, data.channels, data.num_classes, data.image_size, **options).to(device)
    except ValueError as e:  # the model cannot take these images
        key = "dataset.block_size" if data.tokens_per_sample > 1 else "dataset.image_size"
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
    return model


def _sample_cost_s(cfg: DictConfig, model: torch.nn.Module, data: Any) -> float | None:
    """The modelled compute per sample of the ledger (:func:`dpl.comm.clock.sample_cost_s`), counted once on
    one sample of the data's shape, and logged: None with ``clock.device=measured``."""
    text = MODELS.facts(cfg.model).text
    # one sample as the model takes it: only its shape matters, it is counted on the meta device
    example = torch.zeros(1, data.image_size, dtype=torch.long, device="meta") if text else \
        torch.zeros(1, *data.train_x.shape[1:], device="meta")
    cost = sample_cost_s(cfg.clock, cfg.precision, model, example, data.tokens_per_sample)
    if cost is not None and cfg.clock.sample_cost_us is None:
        log.info("modelled compute: %.4g us per %s on %s (%s, mfu %g)", cost * 1e6, "token" if text else "sample",
                 cfg.clock.device, cfg.precision, cfg.clock.mfu)
    return cost


def load_training_state(trainer: Trainer, ckpt: dict[str, Any], where: Path) -> None:
    """``trainer.load_state_dict(ckpt)``; a checkpoint whose contents do not fit its own config
    (edited, or from another dpl) is one line naming it, not a KeyError or a shape traceback."""
    try:
        trainer.load_state_dict(ckpt)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise checkpoint.CheckpointError(f"checkpoint {where} does not fit the run it describes "
                                         f"({type(e).__name__}: {first_line(e)[:200]})") from None


def save_training(trainer: Trainer, path: str | Path, extras: dict[str, Any]) -> None:
    """Checkpoint ``trainer`` at ``path`` with ``extras`` (the config, the run): the state of every worker,
    gathered on the process that writes it."""
    state = trainer.workers.point.gather_state(trainer.state_dict())
    if state is not None:
        checkpoint.save({**state, **extras}, path)
