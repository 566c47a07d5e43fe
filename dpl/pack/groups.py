"""Which jobs of a sweep can share one process: the packing rules of ``hydra/launcher=packed``.

Two jobs pack when their resolved configs differ only in keys that change neither a tensor's
shape nor how many steps an epoch has, nor which code runs: :data:`PACKABLE` (a run's seed,
its learning rates, weight decay, momenta, H and its dynamic-H rule, since each run syncs on
its own schedule outside the fused step, and the study's ablation flags) and bookkeeping keys
(:data:`BOOKKEEPING`: where and how a run records). Any other difference (K, the batch size,
the model, the dataset, the method, the epochs, the engine ...) starts another group. A job
that cannot pack at all (``engine=distributed``, ``resume=``, ``test_only``) is a group of one.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from dpl.core.engines import ENGINES
from dpl.tracking.run_names import BOOKKEEPING as RUN_BOOKKEEPING

# Per-run values that the fused step carries per run (each run's own optimizer, lr table and sync schedule).
PACKABLE = (
    "seed", "lr", "weight_decay", "warmup_epochs", "H", "patience",
    "optimizer.lr", "optimizer.weight_decay", "optimizer.momentum", "optimizer.nesterov", "optimizer.betas",
    "optimizer.eps", "optimizer.grad_clip_norm", "optimizer.grad_clip_eps", "optimizer.decay_params",
    "optimizer.trust_coefficient", "optimizer.wd_in_grad_norm", "optimizer.exclude_1d",
    "method.outer.lr", "method.outer.momentum", "method.outer.nesterov", "method.restart_each_epoch",
    # the study's ablation flags (conf/ablation/): none changes a shape
    "ablation", "restart_inner_each_epoch", "sync_at_epoch_end", "shuffle", "local_momentum", "dataset.augment_val",
    "scheduler.interval",
)
PACKABLE_PREFIXES = ("dynamic_h.",)
# where and how a run records; not the device or how the step runs, which the whole group shares
BOOKKEEPING = (*(k for k in RUN_BOOKKEEPING if k != "device" and not k.startswith("engine.")), "sweep")
BOOKKEEPING_PREFIXES = ("logger.", "hydra.")
# Jobs that never pack: a job that continues (or only tests) another; and one of an engine with a process
# per worker (its facts)
ALONE_IF_SET = ("resume", "test_only", "checkpoint")


def varies_freely(key: str) -> bool:
    """Whether jobs that differ in ``key`` may share a group."""
    return (key in PACKABLE or key in BOOKKEEPING or key == "dynamic_h"
            or key.startswith(PACKABLE_PREFIXES + BOOKKEEPING_PREFIXES))


def packs(flat: Mapping[str, str]) -> str:
    """'' when the job (its flattened resolved config) can share a process, else why not."""
    engine = flat.get("engine.name")
    if engine in ENGINES and ENGINES[engine].facts.processes:
        return f"engine.name={engine}"
    for key in ALONE_IF_SET:
        if flat.get(key) not in (None, "None", "False", "false", ""):
            return f"{key}={flat[key]}"
    return ""


def group_key(flat: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """What must be equal for two jobs to pack: every key that does not vary freely."""
    return tuple(sorted((k, v) for k, v in flat.items() if not varies_freely(k)))


def group_jobs(flats: Sequence[Mapping[str, str]], max_pack: int) -> list[list[int]]:
    """The jobs (by index, in order of their first job) as groups of at most ``max_pack`` that share
    a process; a job that cannot pack (:func:`packs`) is a group of its own."""
    if max_pack < 1:
        raise ValueError(f"hydra.launcher.max_pack={max_pack} is invalid: allowed >= 1")
    open_groups: dict[tuple, list[int]] = {}
    groups: list[list[int]] = []
    for i, flat in enumerate(flats):
        if packs(flat):
            groups.append([i])
            continue
        key = group_key(flat)
        group = open_groups.get(key)
        if group is None or len(group) >= max_pack:
            group = open_groups[key] = []
            groups.append(group)
        group.append(i)
    return groups


def differing_keys(flats: Sequence[Mapping[str, str]]) -> list[str]:
    """The keys whose values differ among ``flats`` (what a group's runs differ in, for the log line)."""
    keys = sorted({k for f in flats for k in f})
    return [k for k in keys if len({f.get(k) for f in flats}) > 1 and not k.startswith(BOOKKEEPING_PREFIXES)]
