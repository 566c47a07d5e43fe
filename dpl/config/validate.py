"""The composed config, checked before anything is built: every value against its schema, every group's
option against its registry, and the checks across options, in this one place.

An option's own ranges are its schema's (``__post_init__``, next to its registration); what one option
requires of another is here: a dynamic H or dropped workers need a method with local steps, compression
needs one that does not average gradients, a text dataset needs a sequence model, K workers need K
training samples, and so on. Each reads the options' facts (:mod:`dpl.registry`), never their names.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dpl.comm.codecs import CODECS
from dpl.comm.drops import Membership
from dpl.components.data import DATASETS
from dpl.components.models import MODELS
from dpl.config.root import Config
from dpl.config.store import check_options, registries, to_schema
from dpl.core.dynamic_h import STRATEGIES
from dpl.core.engines import ENGINES
from dpl.core.methods import METHODS
from dpl.core.schedules import MAX_TABLE_STEPS, scaled_lr
from dpl.errors import ConfigError
from dpl.tracking.run_names import CONTROL, check_name_keys


def check_choices(cfg: DictConfig) -> None:
    """Each group's option must be registered."""
    for group, registry in registries().items():
        node = cfg[group]
        name = node.name if isinstance(node, DictConfig) else node  # ablation: a plain key
        if name not in registry:
            raise ConfigError(f"{group}.name={name!r} is invalid: allowed one of {', '.join(sorted(registry))}")


def _local_methods() -> str:
    return ", ".join(n for n, m in METHODS.items() if m.facts.local_steps)


def check_dynamic_h(cfg: DictConfig) -> None:
    """A dynamic H needs local steps: a method that averages every step would silently ignore it."""
    if STRATEGIES.facts(cfg.dynamic_h).changes_h and not METHODS.facts(cfg.method).local_steps:
        raise ConfigError(f"dynamic_h={cfg.dynamic_h.name!r} is invalid with method={cfg.method.name!r}, "
                          f"which has no local steps: allowed dynamic_h=constant, or method={_local_methods()}")


def check_eval_every(cfg: DictConfig) -> None:
    """A dynamic H is chosen from each epoch's record: records every eval_every steps would feed it
    something else."""
    if cfg.get("eval_every") is not None and STRATEGIES.facts(cfg.dynamic_h).changes_h:
        raise ConfigError(f"eval_every={cfg.eval_every} is invalid with dynamic_h={cfg.dynamic_h.name!r}, which "
                          f"chooses H from each epoch's record: allowed eval_every=null, or dynamic_h=constant")


def check_compression(cfg: DictConfig) -> None:
    """Compression acts on the pseudo-gradient of local methods; a method that averages gradients
    (centralized, post_local's first phase) would send them uncompressed, so it is refused."""
    if not CODECS.facts(cfg.compression).exact and METHODS.facts(cfg.method).averages_gradients:
        local = ", ".join(n for n, m in METHODS.items() if not m.facts.averages_gradients)
        raise ConfigError(f"compression={cfg.compression.name!r} is invalid with method={cfg.method.name!r}, which "
                          f"averages gradients: allowed compression=none, or method={local}")


def check_faults(cfg: DictConfig) -> None:
    """Dropped workers drop contributions to a local method's sync; a method without one would
    train as if nothing were dropped."""
    if cfg.faults.drop_prob > 0 and not METHODS.facts(cfg.method).local_steps:
        raise ConfigError(f"faults.drop_prob={cfg.faults.drop_prob} is invalid with method={cfg.method.name!r}, whose "
                          f"syncs average gradients: allowed faults.drop_prob=0, or method={_local_methods()}")
    check_schedule(cfg)


def check_schedule(cfg: DictConfig) -> None:
    """Elastic workers (``faults.schedule``) leave a local method's averages; a method that averages gradients
    (on ranks inside DDP's backward), each worker's own outer state (eager updates) or a codec's per-worker
    residuals would need more than that: refused, as a schedule that names a worker beyond K."""
    if not cfg.faults.schedule:
        return
    Membership(list(cfg.faults.schedule), cfg.K)  # the entries against K: one line for a bad one
    facts = METHODS.facts(cfg.method)
    _refuse("faults.schedule (elastic workers)", [
        (facts.averages_gradients or not facts.local_steps, f"method={cfg.method.name}",
         "a method whose syncs average models: " + ", ".join(
             n for n, m in METHODS.items() if m.facts.local_steps and not m.facts.averages_gradients)),
        (bool(cfg.method.get("eager", False)), "method.eager=true", "method.eager=false"),
        _codec_refusal(cfg),
    ])


def check_asynchronous(cfg: DictConfig) -> None:
    """An asynchronous method runs on its own modelled timeline, one worker's push at a time: what needs all
    workers at once (a codec's exchange, dropped contributions to a joint sync, averaged inner state, an
    epoch-end sync) or a clock measured as it runs, it does not have."""
    if not METHODS.facts(cfg.method).asynchronous:
        return
    _refuse(f"method={cfg.method.name}", [
        _codec_refusal(cfg),
        (cfg.faults.drop_prob > 0, f"faults.drop_prob={cfg.faults.drop_prob}", "faults.drop_prob=0"),
        (cfg.sync_at_epoch_end, "sync_at_epoch_end=true", "sync_at_epoch_end=false"),
        (cfg.local_momentum == "average", "local_momentum=average", "local_momentum=keep | reset"),
        (cfg.clock.device == "measured" and cfg.clock.sample_cost_us is None, "clock.device=measured",
         "a modelled clock.device, or clock.sample_cost_us (the timeline is known before the first step)"),
    ])


def check_emulation(cfg: DictConfig) -> None:
    """``clock.emulate`` slows each process by its worker's time factor: it needs one process per worker."""
    if cfg.clock.emulate and not ENGINES.facts(cfg.engine).processes:
        others = [n for n, e in ENGINES.items() if e.facts.processes]
        raise ConfigError(f"clock.emulate=true is invalid with engine={cfg.engine.name}, whose workers share one "
                          f"process: allowed engine={' | '.join(others)}, or clock.emulate=false")


def _codec_refusal(cfg: DictConfig) -> tuple[bool, str, str]:
    """A compression codec (anything but the exact parameters), for the checks that cannot take one."""
    return (not CODECS.facts(cfg.compression).exact, f"compression={cfg.compression.name}",
            "compression=" + " | ".join(n for n, c in CODECS.items() if c.facts.exact))


def _refuse(against: str, refused: list[tuple[bool, str, str]]) -> None:
    """The first of (bad, what, allowed) that is bad, as one line: ``what`` is invalid with ``against``."""
    for bad, what, allowed in refused:
        if bad:
            raise ConfigError(f"{what} is invalid with {against}: allowed {allowed}")


def check_fragments(cfg: DictConfig) -> None:
    """Streaming DiLoCo's fragments take turns, one every H/P steps, each sync in flight for tau of them:
    H a multiple of P (even turns) and tau < H/P (a sync lands before the next fragment's starts), as
    torchft requires; and a fixed H, since a period's slots are laid out for one H."""
    P = cfg.method.get("fragments")
    if P is None:
        return
    if cfg.H % P:
        raise ConfigError(f"H={cfg.H} is invalid with method.fragments={P}: allowed a multiple of {P} (the "
                          f"fragments take turns, one every H/P steps)")
    delay = cfg.method.get("delay", 0)
    if delay >= cfg.H // P:
        raise ConfigError(f"method.delay={delay} is invalid with H={cfg.H} and method.fragments={P}: allowed at most "
                          f"{cfg.H // P - 1} (a fragment's sync lands before the next fragment's starts)")
    if P > 1 and STRATEGIES.facts(cfg.dynamic_h).changes_h:
        raise ConfigError(f"dynamic_h={cfg.dynamic_h.name!r} is invalid with method.fragments={P}: allowed "
                          f"dynamic_h=constant (the fragments' slots are laid out for one H)")


def check_data(cfg: DictConfig) -> None:
    """The model takes the dataset's samples (a sequence model bytes, an image model images), and every
    worker gets a training sample at least (where the dataset's size is known before it is read)."""
    data = DATASETS.facts(cfg.dataset)
    if data.text != MODELS.facts(cfg.model).text:
        allowed = [n for n, m in MODELS.items() if m.facts.text == data.text]
        raise ConfigError(f"model={cfg.model.name} is invalid with dataset={cfg.dataset.name}: allowed "
                          f"{', '.join(allowed)}")
    if data.train is not None and cfg.K > data.train:
        raise ConfigError(f"K={cfg.K} is invalid: allowed at most {data.train} (the training samples of "
                          f"{cfg.dataset.name})")


def check_processes(cfg: DictConfig) -> None:
    """Several processes started as ranks (torchrun, srun, a Slurm job's tasks) for an engine that
    runs all K workers in one: each would train the whole run into the same job dir."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if not ENGINES.facts(cfg.engine).processes and world > 1 and "RANK" in os.environ:
        many = ", ".join(n for n, e in ENGINES.items() if e.facts.processes)
        raise ConfigError(f"engine={cfg.engine.name} is invalid with {world} processes started as ranks "
                          f"(torchrun or Slurm tasks): it runs all K workers in one process; allowed "
                          f"engine={many}, or start one task (tasks_per_node=1, srun --ntasks=1)")


def check_checkpoint_use(cfg: DictConfig) -> None:
    """``checkpoint=`` is what ``test_only=true`` evaluates; alone it would be ignored, and a fresh
    model trained where the user meant to continue or start from one."""
    if cfg.checkpoint and not cfg.test_only:
        raise ConfigError(f"checkpoint={cfg.checkpoint!r} is only read with test_only=true: to continue its "
                          f"training use resume={_job_of(cfg.checkpoint)}, to start from its weights "
                          f"pretrained={cfg.checkpoint}")


def check_min_lr(cfg: DictConfig) -> None:
    """A schedule's floor is below the lr it decays from (after ``lr_scaling``): a floor above it makes
    the "decay" climb to the floor, and the run trains at an lr nobody asked for."""
    min_lr = cfg.scheduler.get("min_lr")
    if min_lr is None:
        return
    lr = scaled_lr(cfg.lr, cfg.lr_scaling, cfg.K * cfg.batch_size, cfg.base_batch_size)
    if min_lr > lr:
        scaled = "" if lr == cfg.lr else f" ({lr:.6g} after lr_scaling={cfg.lr_scaling})"
        raise ConfigError(f"scheduler.min_lr={min_lr} is invalid with lr={cfg.lr}{scaled}: allowed at most "
                          f"{lr:.6g} (the lr the schedule decays from)")


def check_budget(cfg: DictConfig) -> None:
    """A run's lr is tabulated step by step before it trains (:func:`dpl.core.schedules.lr_table`): a budget
    beyond :data:`~dpl.core.schedules.MAX_TABLE_STEPS` steps is refused here, before any data is read (every
    epoch has a step at least); what the steps of an epoch make of ``epochs`` is checked once they are known."""
    for name in ("epochs", "max_steps"):
        value = cfg.get(name)
        if value is not None and value > MAX_TABLE_STEPS:
            raise ConfigError(f"{name}={value} is invalid: allowed at most {MAX_TABLE_STEPS} (the steps an lr "
                              f"schedule spans)")


def _job_of(checkpoint: str) -> str:
    """The job dir a checkpoint path belongs to (``resume=`` takes the dir, or the file itself)."""
    path = Path(str(checkpoint)).expanduser()
    return shlex.quote(str(path.parent if path.suffix == ".pt" else path))


def check_names(cfg: DictConfig) -> None:
    """The names a YAML may set (a sweep config, an experiment, a ``--config-dir``) as the command line's
    are checked (:func:`dpl.config.overrides.check_names`), and no string of the config holds a control
    character: each reaches a tag, a CSV row or a log line."""
    check_name_keys(cfg)
    values = OmegaConf.to_container(cfg, resolve=False)
    values.pop("hydra", None)  # Hydra's own node (its help texts span lines) is not dpl's
    for key, value in config_strings(values):
        if CONTROL.search(value):
            raise ConfigError(f"{key}={value!r} is invalid: allowed no control characters (newline, carriage "
                              f"return, tab, NUL, ESC ...)")


def config_strings(node: object, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, value) of every string in a plain container (a config unresolved: an interpolation's value is
    another key's)."""
    if isinstance(node, dict):
        return [kv for k, v in node.items() for kv in config_strings(v, f"{prefix}{k}.")]
    if isinstance(node, (list, tuple)):
        return [kv for i, v in enumerate(node) for kv in config_strings(v, f"{prefix}{i}.")]
    return [(prefix[:-1], node)] if isinstance(node, str) else []


def validate(cfg: DictConfig) -> Config:
    """The whole composed config: every value against its schema, every group's option against its
    registry, and the checks across options; raise ConfigError in one line."""
    check_choices(cfg)
    check_options(cfg)
    obj = to_schema(cfg)
    check_dynamic_h(cfg)
    check_eval_every(cfg)
    check_compression(cfg)
    check_faults(cfg)
    check_fragments(cfg)
    check_asynchronous(cfg)
    check_emulation(cfg)
    check_data(cfg)
    check_checkpoint_use(cfg)
    check_min_lr(cfg)
    check_budget(cfg)
    check_names(cfg)
    return obj
