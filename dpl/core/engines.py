"""Engines: the ``engine`` group's options, how the K workers run. ``simulated`` holds them in one process
as a leading dimension of every tensor; ``distributed`` runs one process per worker on torch.distributed.

Each engine is registered here with its schema; the keys every engine has say how the local step runs
(:func:`compile_mode`) and in which memory layout images enter the model (:func:`memory_format`). torch is
imported where workers are built, so the registry loads without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

from dpl.components.optim import OPTIMIZERS
from dpl.config.schema import at_least, check, key, one_of, positive
from dpl.errors import ConfigError
from dpl.registry import Registry

ENGINES = Registry("engine", "how the K workers run: in one process, or one process each")

EAGER, GRAPH, COMPILED = "none", "graph", "compile"  # engine.compile: how the local step runs
COMPILE_MODES = ("auto", EAGER, GRAPH, COMPILED)
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
SIMULATIONS = ("auto", "vmap", "loop")
BACKENDS = ("auto", "gloo", "nccl")
# The jobs of one launch that run at once on this machine (a parallel sweep's), set by the launcher
# that knows how many it starts; its child processes (spawned ranks) inherit it.
LAUNCH_JOBS_ENV = "DPL_LAUNCH_JOBS"


@dataclass(frozen=True)
class EngineFacts:
    processes: bool  # one process per worker, started by a launcher (torchrun, Slurm, engine.spawn)


@dataclass
class EngineBase:
    name: str = key(MISSING, "the engine (an option of the group)")
    compile: str = key("auto", "how the local step runs: auto (a CUDA graph on CUDA where it can, else none) | none "
                               "(eager) | graph (one replayed CUDA graph) | compile (torch.compile)")
    eval_batch_size: int = key(1000, "samples per evaluation batch (the results do not depend on it)")
    memory_format: str = key("auto", "layout of image batches entering the model: auto (channels_last on CPU, "
                                     "contiguous on CUDA) | contiguous | channels_last")
    threads: Any = key("auto", "torch's CPU threads in each process: auto (OMP_NUM_THREADS when set, else this "
                               "machine's cores / the processes of the launch sharing them, at least 1) | an integer "
                               ">= 1")

    def __post_init__(self) -> None:
        one_of("engine.compile", self.compile, COMPILE_MODES)
        one_of("engine.memory_format", self.memory_format, MEMORY_FORMATS)
        at_least("engine.eval_batch_size", self.eval_batch_size, 1, "an integer")
        number = isinstance(self.threads, int) and not isinstance(self.threads, bool) and self.threads >= 1
        check(self.threads == "auto" or number, "engine.threads", self.threads, "auto or an integer >= 1")


@dataclass
class SimulatedEngineConfig(EngineBase):
    simulate: str = key("auto", "how the K forwards run: vmap (one batched call) | loop | auto (vmap on CUDA, "
                                "the loop on CPU)")

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of("engine.simulate", self.simulate, SIMULATIONS)


@dataclass
class DistributedEngineConfig(EngineBase):
    backend: str = key("auto", "torch.distributed's backend: auto (nccl on CUDA, gloo on CPU) | gloo | nccl")
    spawn: bool = key(False, "start the K local processes from this one command (else torchrun or Slurm does)")
    timeout_s: float = key(300.0, "a rank that dies or hangs ends the whole job after at most this long")
    master_addr: str = key("127.0.0.1", "the address the ranks' store and connections listen on (spawn)")
    master_port: int = key(0, "spawn: the launcher's store port; 0: a free one (torchrun brings its own)")

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of("engine.backend", self.backend, BACKENDS)
        positive("engine.timeout_s", self.timeout_s)
        check(0 <= self.master_port < 65536, "engine.master_port", self.master_port, "0 (a free port) to 65535")


@ENGINES.register("simulated", SimulatedEngineConfig, facts=EngineFacts(processes=False))
def simulated(cfg: Any, model: Any, device: Any, comm: Any = None, synchronous: bool = False, **point: Any) -> Any:
    """The K workers in this process, stacked (:class:`~dpl.core.workers.StackedWorkers`)."""
    from dpl.comm.stacked import StackedComm
    from dpl.core.workers import StackedWorkers

    return StackedWorkers(model, cfg.K, comm or StackedComm(cfg.K), simulation_mode(cfg.engine.simulate, device),
                          **point)


@ENGINES.register("distributed", DistributedEngineConfig, facts=EngineFacts(processes=True))
def distributed(cfg: Any, model: Any, device: Any, comm: Any = None, synchronous: bool = False, **point: Any) -> Any:
    """This rank's worker (:class:`~dpl.core.ddp.DistributedWorkers`); ``synchronous`` (the method averages
    gradients at every step of the run) wraps it in DistributedDataParallel."""
    from dpl.comm.process_group import ProcessGroupComm
    from dpl.core.ddp import DistributedWorkers

    if not isinstance(comm, ProcessGroupComm):
        raise ConfigError("engine=distributed needs its processes: launch with torchrun --nproc-per-node=K "
                          "-m dpl engine=distributed ..., or add engine.spawn=true")
    return DistributedWorkers(model, comm, ddp=synchronous, **point)


def build_workers(cfg: Any, model: Any, device: Any, comm: Any = None, synchronous: bool = False,
                  **point: Any) -> Any:
    """The K workers of ``model``; ``synchronous``: the method averages gradients at every step; ``point``:
    their communication point's ``codec``, ``drops`` and ``seed`` (:class:`dpl.comm.point.CommPoint`).

    From here on K is the workers' (``workers.K``, their communicator's world): the simulation builds
    its communicator from ``cfg.K``, and a process group's world size is checked against ``cfg.K``
    once, where a rank joins it (:func:`dpl.launch.ranks.run_rank`).
    """
    set_threads(cfg)  # before the first step: each step's kernels split over this many threads
    return ENGINES.build(cfg.engine.name, cfg, model, device, comm, synchronous, **point)


def cores() -> int:
    """The cores this process may run on: its CPU affinity (what a Slurm allocation or a container's
    cpuset leaves it), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # macOS, Windows: no affinity call
        return os.cpu_count() or 1


def _count(value: Any) -> int:
    """A positive count from an environment variable or a launcher key; 0 when there is none."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        return 0
    return n if n > 0 else 0


def concurrent_jobs() -> int:
    """The jobs of this launch running at once on this machine: :data:`LAUNCH_JOBS_ENV` when the launcher
    set it (``hydra/launcher=local`` starts every job of a sweep at once), else Hydra's joblib launcher's
    ``n_jobs`` (negative as joblib reads it: -1 every core, -2 all but one, ...), else 1."""
    jobs = _count(os.environ.get(LAUNCH_JOBS_ENV))
    if jobs:
        return jobs
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:
        return 1
    if not HydraConfig.initialized():
        return 1
    launcher = HydraConfig.get().launcher
    if "joblib" not in str(launcher.get("_target_", "")):
        return 1
    n = launcher.get("n_jobs")
    if isinstance(n, int) and n < 0:
        return max(1, cores() + 1 + n)
    return _count(n) or 1


def launch_processes(cfg: Any) -> int:
    """The processes of this launch that share this machine's cores: the ranks on this machine
    (``engine=distributed``: torchrun's or Slurm's ``LOCAL_WORLD_SIZE``, else the K that ``engine.spawn``
    starts) times the jobs of a parallel sweep running at once (:func:`concurrent_jobs`)."""
    ranks = 1
    if ENGINES.facts(cfg.engine).processes:
        ranks = _count(os.environ.get("LOCAL_WORLD_SIZE")) or int(cfg.K)
    return ranks * concurrent_jobs()


def torch_threads(cfg: Any) -> int:
    """``engine.threads`` as a number: an integer as given; ``auto``: ``OMP_NUM_THREADS`` when set (the
    user's choice for every process), else :func:`cores` / :func:`launch_processes`, at least 1.

    torch's default is every core in every process: the K ranks of a spawn, the jobs of a joblib or local
    sweep then each take all of them, and the threads of one process wait on each other when another
    load holds some cores. On this project's shared 2-core CPU a simulated run took 33.3 s per epoch with
    torch's default and 9.4 s with one thread, the same numbers (docs/benchmarks.md)."""
    requested = cfg.engine.get("threads", "auto")  # absent from a config stored before the key existed
    if requested != "auto":
        return int(requested)
    return _count(os.environ.get("OMP_NUM_THREADS")) or max(1, cores() // launch_processes(cfg))


def set_threads(cfg: Any) -> int:
    """Apply :func:`torch_threads` to this process (torch.set_num_threads); return it."""
    import torch

    threads = torch_threads(cfg)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def one_process_engine(node: Any) -> Any:
    """The engine node that runs ``node``'s workers in one process, with ``node``'s keys every engine has."""
    from omegaconf import OmegaConf

    name = next(n for n, e in ENGINES.items() if not e.facts.processes)
    # threads: absent from a config stored before the key existed (its schema's default then)
    shared = {f: node[f] for f in ("compile", "eval_batch_size", "memory_format", "threads") if f in node}
    return OmegaConf.structured(ENGINES[name].schema(name=name, **shared))


def pick_device(name: str) -> Any:
    """``device=auto|cpu|cuda`` as a torch device (auto: CUDA when one is visible)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' is invalid: no CUDA device is visible (allowed auto, cpu)")
    return torch.device(name)


def simulation_mode(requested: str, device: Any) -> str:
    """``auto``: vmap on CUDA (one batched kernel per layer), the loop on CPU, where a
    vmap'd LeNet-5 measured slower than K separate forwards (see ``python -m dpl.bench``).
    Both modes handle model buffers (BatchNorm statistics) and give the same numbers."""
    if requested != "auto":
        return requested
    return "vmap" if device.type == "cuda" else "loop"


def memory_format(requested: str, device: Any) -> str:
    """``engine.memory_format``: the layout of image batches entering the model.

    ``auto``: channels_last on CPU, where oneDNN's NHWC convolutions measured faster (``python -m
    dpl.bench layout`` on this project's 2-core CPU, LeNet-5, full training steps: 1.15x at K=1 x 64
    in fp32, 1.3-1.4x at K=1 x 512 and K=8 x 64, 1.5x in bf16); contiguous on CUDA, where it has
    not been measured yet. It applies where a worker sees a plain [B, C, H, W] batch:
    ``engine.simulate=loop``, every ``engine=distributed`` rank and evaluation; under ``simulate=vmap``
    (CUDA's default) the K stacked batches keep their layout: torch's vmap cannot query channels_last
    strides, and its batched convolution folds the workers into the channels, which would undo the
    layout anyway.
    """
    if requested not in MEMORY_FORMATS:
        raise ValueError(f"engine.memory_format={requested!r} is invalid: allowed {', '.join(MEMORY_FORMATS)}")
    if requested == "auto":
        return "channels_last" if device.type == "cpu" else "contiguous"
    return requested


def compile_mode(requested: str, device: Any, workers: Any, optimizer: str) -> tuple[str, str]:
    """The mode the local step runs in (:mod:`dpl.core.step`), and why it differs from ``requested`` ('' when
    it does not).

    A CUDA graph needs CUDA, workers whose collectives can run beside it (the workers say which,
    :meth:`~dpl.core.workers.StackedWorkers.graph_blocker`) and an optimizer whose per-step values live on the
    device (the optimizer's facts: ``capturable``). torch.compile runs anywhere except through DistributedDataParallel's
    gradient hooks (``workers.reduces_in_backward``).
    """
    if requested not in COMPILE_MODES:
        raise ValueError(f"engine.compile={requested!r} is invalid: allowed {', '.join(COMPILE_MODES)}")
    graph_blocker = "it needs CUDA" if device.type != "cuda" else workers.graph_blocker()
    if not graph_blocker and not OPTIMIZERS[optimizer].facts.capturable:
        graph_blocker = f"optimizer={optimizer} keeps a host step count"
    if requested == "auto":
        return (EAGER, "") if graph_blocker else (GRAPH, "")
    if requested == GRAPH and graph_blocker:
        return EAGER, f"engine.compile=graph runs eagerly: {graph_blocker}"
    if requested == COMPILED and workers.reduces_in_backward:
        return EAGER, "engine.compile=compile runs eagerly: DistributedDataParallel's hooks are not compiled here"
    return requested, ""
