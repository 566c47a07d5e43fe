"""engine=distributed on gloo (CPU, localhost): the same numbers as the simulation, faults named,
one output dir written by rank 0 alone."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dpl.comm.process_group import rank_state, stack_states
from dpl.errors import RankFailure
from dpl.launch.faults import culprits
from dpl.launch.ranks import spawn
from dpl.run import checkpoint
from dpl.run.build import build_trainer
from dpl.run.job import run
from tests.conftest import TINY

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
DIST = ["engine=distributed", "engine.timeout_s=60"]
SMALL = ["dataset.num_train=500", "dataset.num_test=100"]  # 450 train images: 8 steps per epoch at K=2

# One case per way the ranks communicate: gradients through DDP, parameter averages with a
# mid-epoch period and averaged momentum, SlowMo's outer step, and H chosen from the history.
VARIANTS = {
    "centralized": ["method=centralized", "epochs=1"],
    "localsgd": ["method=localsgd", "H=4", "local_momentum=average", "epochs=1"],
    "slowmo": ["method=slowmo", "H=3", "method.outer.momentum=0.6", "epochs=1"],
    "dynamic_h": ["method=localsgd", "H=2", "dynamic_h=improvement", "dynamic_h.h_min=2", "dynamic_h.h_max=8"],
    # DiLoCo's outer Nesterov step over an inner AdamW; post-local SGD's gradient all-reduce through
    # the comm point (no DDP), then local steps
    "diloco": ["method=diloco", "H=3", "epochs=1"],
    # an outer Adam (method.outer): its moments on the pseudo-gradient, the same on every rank
    "outer_adam": ["method=localsgd", "H=3", "method.outer.name=adam", "method.outer.lr=0.01", "epochs=1"],
    "post_local": ["method=post_local", "method.switch_epoch=1", "H=3", "epochs=2"],
    # BatchNorm: per-worker running statistics, averaged at syncs (LocalSGD) or never (centralized)
    "resnet20_localsgd": ["model=resnet20", "dataset.image_size=12", "method=localsgd", "H=3", "epochs=1"],
    "resnet20_centralized": ["model=resnet20", "dataset.image_size=12", "method=centralized", "epochs=1"],
    # compressed pseudo-gradients: payloads all-gathered (top-k with its residuals), quantized (int8)
    # under SlowMo's outer step, and scaled signs beside BatchNorm buffers averaged as they are
    "topk_ef": ["method=localsgd", "H=3", "compression=topk", "compression.ratio=0.05",
                "compression.error_feedback=true", "epochs=1"],
    "int8_slowmo": ["method=slowmo", "H=3", "compression=int8", "epochs=1"],
    "resnet20_sign_ef": ["model=resnet20", "dataset.image_size=12", "method=localsgd", "H=3", "compression=sign",
                         "compression.error_feedback=true", "epochs=1"],
    # streaming DiLoCo: fragments' all-reduces in flight (async_op=True) for τ steps, mixed in with α;
    # compressed fragments (fp4) all-gathered in flight, with workers dropped (the mean over those that arrived)
    "streaming": ["method=streaming_diloco", "H=6", "method.delay=2", "method.alpha=0.5", "epochs=1"],
    "streaming_fp4_drops": ["method=streaming_diloco", "H=6", "method.fragments=3", "method.delay=1",
                            "compression=fp4", "compression.error_feedback=true", "faults.drop_prob=0.3",
                            "epochs=1"],
    "fp8": ["method=diloco", "H=3", "compression=fp8", "epochs=1"],
    "diloco_drops": ["method=diloco", "H=3", "faults.drop_prob=0.4", "epochs=1"],
    # eager outer steps: every rank its own anchor, the average of a sync waited for at the next one
    "streaming_eager": ["method=streaming_diloco", "H=4", "method.eager=true", "epochs=1"],
    # asynchronous DiLoCo: workers at their own modelled speeds, each arrival broadcast from its rank and
    # applied by every replica of the global model in the clock's order (delayed Nesterov, dynamic H)
    "async_diloco": ["method=async_diloco", "H=3", "clock.speed=lognormal", "network.bandwidth_gbps=1000",
                     "method.nesterov_every=2", "method.dynamic_local_updates=true", "epochs=2"],
    # the slow worker's rank slowed for real (clock.emulate: it sleeps after each step it computes, and computes
    # nothing in the ticks it idles): the numbers are the simulation's, which has no such key
    "async_emulated": ["method=async_diloco", "H=3", "clock.speed=slow", "clock.slow_fraction=0.5",
                       "clock.slow_factor=2", "clock.emulate=true", "epochs=1"],
    # elastic workers: rank 1 leaves and joins again (pulling the anchor), synchronous and asynchronous
    "elastic_diloco": ["method=diloco", "H=3", "faults.schedule=[2:1:leave,6:1:join]", "epochs=1"],
    "elastic_async": ["method=async_diloco", "H=3", "clock.speed=lognormal", "network.bandwidth_gbps=1000",
                      "faults.schedule=[3:0:leave,9:0:join]", "epochs=2"],
}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Ranks and the simulation on one thread each: the same kernels, so K=2 agrees bit for bit.

    With different thread counts the convolutions round differently, and a ReLU that such
    a rounding flips makes single gradients differ far beyond rounding.
    """
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # read by the spawned ranks
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def simulated_params(make_cfg, *overrides: str) -> tuple[list[torch.Tensor], list[dict]]:
    trainer = build_trainer(make_cfg(*overrides), torch.device("cpu"))
    trainer.fit()
    return [t.detach() for t in trainer.workers.params + trainer.workers.buffers], trainer.state.history


def saved_params(job_dir: Path) -> tuple[list[torch.Tensor], list[dict]]:
    """Every worker's parameters and buffers (BatchNorm statistics), and the history."""
    ckpt = checkpoint.load(job_dir)
    return ckpt["workers"]["params"] + ckpt["workers"]["buffers"], ckpt["state"]["history"]


def assert_same_run(sim, dist_run, atol=0.0):
    """Same weights (and buffers) and per-epoch records. With K=2 the weights agree bit for bit: the ranks'
    (a/2 + b/2) equals the simulation's mean (a + b)/2 exactly in binary floating point."""
    (sim_params, sim_hist), (dist_params, dist_hist) = sim, dist_run
    assert len(sim_params) == len(dist_params)
    for a, b in zip(sim_params, dist_params):
        assert a.shape == b.shape  # every worker is in the checkpoint, stacked as in the simulation
        torch.testing.assert_close(a, b, atol=atol, rtol=0)
    assert [r["H"] for r in sim_hist] == [r["H"] for r in dist_hist]
    # the same traffic through the one point: the algorithm's rounds and bytes, and the bookkeeping's
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "drift", "comm_bytes", "sync_rounds",
                "collectives", "bookkeeping_bytes"):
        assert [r[key] for r in sim_hist] == pytest.approx([r[key] for r in dist_hist], rel=1e-5, abs=1e-9), key


def train_variants(variants: dict, cfg, out_dir: Path, comm) -> dict:
    """Runs on every rank: several jobs one after another in the same process group."""
    return {name: run(v, out_dir / name, comm) for name, v in variants.items()}


def test_every_method_on_two_processes_equals_the_simulation(make_cfg, tmp_path):
    variants = {name: make_cfg(*DIST, *SMALL, "K=2", *ov) for name, ov in VARIANTS.items()}
    spawn(functools.partial(train_variants, variants), variants["centralized"], tmp_path)
    for name, ov in VARIANTS.items():
        simulated = [o for o in ov if o != "clock.emulate=true"]  # its workers share one process: nothing to slow
        assert_same_run(simulated_params(make_cfg, *SMALL, "K=2", *simulated), saved_params(tmp_path / name))
    _, hist = saved_params(tmp_path / "dynamic_h")
    assert [r["H"] for r in hist] == [2, 4]  # the first epoch improved: H doubled on every rank alike
    for name in ("diloco_drops", "streaming_fp4_drops"):  # some contributions were dropped, the same on both
        assert sum(r["dropped"] for r in saved_params(tmp_path / name)[1]) > 0
    # eager: each rank's own anchor, stacked in the checkpoint as the simulation holds them, and loaded back
    ckpt = checkpoint.load(tmp_path / "streaming_eager")
    anchors = ckpt["workers"]["eager.anchor"]
    assert all(a.shape[0] == 2 for a in anchors) and not torch.equal(anchors[0][0], anchors[0][1])
    trainer = build_trainer(make_cfg(*SMALL, "K=2", *VARIANTS["streaming_eager"]), torch.device("cpu"))
    trainer.load_state_dict(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(trainer.method.anchor, anchors))
    assert all(r["comm_wall_s"] > 0 for r in hist)  # measured time in the all-reduces


@pytest.mark.slow  # K=4 ranks; the two-process test of every method stays in the default run
def test_four_processes_equal_the_simulation(make_cfg, tmp_path):
    ov = [*SMALL, "K=4", "method=localsgd", "H=3", "epochs=1"]
    compressed = [*ov, "compression=randomk", "compression.ratio=0.1", "compression.error_feedback=true"]
    cfg = make_cfg(*DIST, *ov)
    spawn(functools.partial(train_variants, {"job": cfg, "randomk": make_cfg(*DIST, *compressed)}), cfg, tmp_path)
    # a ring of 4 sums in another order than mean(0): equal to rounding
    assert_same_run(simulated_params(make_cfg, *ov), saved_params(tmp_path / "job"), atol=1e-5)
    # compressed payloads are all-gathered and decoded in worker order on every rank: bit for bit
    assert_same_run(simulated_params(make_cfg, *compressed), saved_params(tmp_path / "randomk"))
    residuals = checkpoint.load(tmp_path / "randomk")["workers"]["residuals"]  # every rank's, stacked [K, ...]
    assert [r.shape[0] for r in residuals] == [4] * len(residuals)


def cli_args(tmp_path: Path, *overrides: str) -> list[str]:
    return [*TINY, f"results_csv={tmp_path / 'results.csv'}", *DIST, *overrides]


@pytest.mark.slow  # ~15 s: torchrun's agent plus two ranks that each run Hydra
def test_torchrun_ranks_share_one_output_dir_and_only_rank0_writes(make_cfg, tmp_path):
    ov = [*SMALL, "K=2", "method=slowmo", "H=3", "epochs=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "dpl", *cli_args(tmp_path, *ov)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_dirs = [p.parent for p in (tmp_path / "outputs").glob("*/*/.hydra")]
    assert len(list((tmp_path / "outputs").glob("*/*"))) == 1 and len(job_dirs) == 1
    job = job_dirs[0]
    assert {p.name for p in job.iterdir()} >= {"checkpoint.pt", "history.csv", "result.csv", ".hydra"}
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 2  # one row, from rank 0
    assert_same_run(simulated_params(make_cfg, *ov), saved_params(job))


def _start(tmp_path: Path, job: Path, *overrides: str) -> tuple[subprocess.Popen, dict[int, int]]:
    """Start a spawn job; return it and its ranks' pids (from its log) once training checkpointed."""
    cmd = [sys.executable, "-m", "dpl", *cli_args(tmp_path, "engine.spawn=true", *overrides), f"hydra.run.dir={job}"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids: dict[int, int] = {}
    for line in proc.stdout:
        m = re.search(r"rank (\d+) is pid (\d+)", line)
        if m:
            pids[int(m.group(1))] = int(m.group(2))
        if len(pids) == 2:
            break
    deadline = time.time() + 120
    while not (job / checkpoint.FILENAME).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    return proc, pids


def test_killed_rank_ends_the_job_naming_it_then_resume_finishes_the_run(make_cfg, tmp_path):
    # the kill lands right after the first checkpoint (step 4), with 28 of 32 steps still to go
    ov = [*SMALL, "K=2", "method=localsgd", "H=3", "epochs=4", "checkpoint_every=4"]
    job = tmp_path / "job"
    proc, pids = _start(tmp_path, job, *ov, "engine.timeout_s=30")
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    t0 = time.time()
    os.kill(pids[1], signal.SIGKILL)
    out = proc.stdout.read()
    assert proc.wait(timeout=60) == 1
    assert time.time() - t0 < 15  # a dead peer is seen at once, well within engine.timeout_s
    assert "error: rank 1 died first (killed by SIGKILL)" in out, out[-3000:]
    assert checkpoint.load(job)["state"]["epoch"] < 4  # it stopped early
    assert not (tmp_path / "results.csv").exists()
    # Resume with the same world size: the checkpoint holds every worker, each rank takes its row.
    final = run(make_cfg(f"resume={job}"))
    assert final["epochs_run"] == 4
    assert_same_run(simulated_params(make_cfg, *ov), saved_params(job))
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 2  # one row: rank 0's
    assert len((job / "history.csv").read_text().splitlines()) == 5


@pytest.mark.slow  # ~25 s: the collective timeout itself
def test_hung_rank_ends_the_job_within_the_timeout_naming_it(tmp_path):
    timeout_s = 8
    proc, pids = _start(tmp_path, tmp_path / "job", "K=2", "method=centralized", "epochs=50",
                        f"engine.timeout_s={timeout_s}")
    t0 = time.time()
    os.kill(pids[1], signal.SIGSTOP)  # alive but silent: only the collective timeout can tell
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 1
    assert time.time() - t0 < timeout_s + 10  # the timeout, the ranks' reports, the teardown
    assert "error: rank 1 hung" in out, out[-3000:]


def test_rank_with_its_own_error_is_named(make_cfg, tmp_path):
    with pytest.raises(RankFailure, match="^rank 1 failed: ValueError: only rank 1 breaks$"):  # rank 0 not blamed
        spawn(_fail_on_rank1, make_cfg(*DIST, "K=2"), tmp_path)


def _fail_on_rank1(_cfg, _out_dir, comm):
    if comm.rank == 1:
        raise ValueError("only rank 1 breaks")
    comm.all_reduce_([torch.ones(1, 1)], "sum")  # rank 0 waits in a collective that rank 1 never joins


def test_culprits_reads_reports_and_exit_codes():
    reports = {0: "peer", 2: "error: ValueError: boom"}
    assert culprits(reports, 3) == "rank 1 died or hung (it stopped answering); rank 2 failed: ValueError: boom"
    exits = {0: 1, 1: -signal.SIGKILL, 2: 1}
    assert culprits({0: "peer", 2: "peer"}, 3, exits) == "rank 1 died (killed by SIGKILL)"
    assert culprits({0: "peer"}, 2, {0: 1, 1: None}) == "rank 1 hung (no answer within engine.timeout_s; killed it)"
    # killed silent by the launcher after rank 1 died: it waited on rank 1, it is not blamed
    assert culprits({0: "peer"}, 3, {0: 1, 1: -signal.SIGKILL, 2: None}, order=[1, 0]) == \
        "rank 1 died first (killed by SIGKILL); the other ranks stopped after it"


def test_checkpoint_of_every_worker_round_trips_through_the_ranks():
    def rank(r):
        return {"workers": {"params": [torch.full((1, 3), float(r))], "buffers": []},
                "optimizer": {"state": {0: {"momentum_buffer": torch.full((1, 3), 10.0 + r),
                                            "step": torch.tensor(7.0)}},
                              "param_groups": [{"params": [0]}]},
                "state": {"epoch": 1, "sums": {"train_loss": 2.0 + r, "train_acc": 3, "drift": 0.5}, "seen": 4},
                "method": {"anchor": None}}

    merged = stack_states([rank(0), rank(1)])
    assert torch.equal(merged["workers"]["params"][0], torch.tensor([[0.0] * 3, [1.0] * 3]))
    assert torch.equal(merged["optimizer"]["state"][0]["momentum_buffer"][:, 0], torch.tensor([10.0, 11.0]))
    assert merged["optimizer"]["state"][0]["step"] == 7.0
    assert merged["state"]["sums"]["train_loss"] == 5.0 and merged["state"]["seen"] == 8 and merged["state"]["epoch"] == 1
    back = [rank_state(merged, r, 2) for r in (0, 1)]
    assert torch.equal(back[1]["workers"]["params"][0], rank(1)["workers"]["params"][0])
    assert back[0]["state"]["sums"]["train_loss"] == 5.0  # summed once at epoch end:
    assert back[1]["state"]["sums"].get("train_loss", 0.0) == 0 and back[1]["state"]["seen"] == 0  # rank 0 holds it
    with pytest.raises(checkpoint.CheckpointError, match="same world size"):
        rank_state(merged, 0, 4)


def test_distributed_engine_outside_a_launcher_fails_in_one_line(make_cfg, tmp_path):
    from dpl.errors import ConfigError

    with pytest.raises(ConfigError, match="torchrun --nproc-per-node=K"):
        run(make_cfg(*DIST, "K=2"), out_dir=tmp_path)
    with pytest.raises(ConfigError, match="engine.backend='nccl' is invalid on device cpu"):
        run(make_cfg(*DIST, "K=2", "engine.spawn=true", "engine.backend=nccl"), out_dir=tmp_path)
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node=K"):
        build_trainer(make_cfg(*DIST, "K=2"), torch.device("cpu"))  # no process group, no workers


# ----------------------------------------------------------------------------- run names


@pytest.mark.slow  # ~50 s on 2 loaded cores: the command end to end (test_spawned_ranks_... is its fast part)
def test_a_spawned_run_is_named_by_its_command_line_as_the_simulation_is(tmp_path):
    """Its ranks have no Hydra: the launching process hands them the overrides that name the run."""
    from dpl.tracking.store import mlflow_client

    args = ["dataset=synthetic", "dataset.num_train=200", "dataset.num_test=50", "epochs=1", "batch_size=32",
            "progress=false", "device=cpu", "logger.plots=false", f"results_csv={tmp_path / 'results.csv'}",
            *DIST, "engine.spawn=true", "method=localsgd", "K=2", "H=2",
            f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    proc = subprocess.run([sys.executable, "-m", "dpl", *args], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("dpl").experiment_id])
    # the simulation's name of these overrides, with engine=distributed's; bookkeeping (engine.*) left out
    assert found.info.run_name == "localsgd-K2-H2-sgdm-s0-synthetic-num_train200-num_test50-epochs1-batch_size32-" \
                                  "distributed"


NAMING = ["method=localsgd", "K=2", "H=4", "engine=distributed", "epochs=3", "dataset=synthetic",
          "dataset.num_train=2000", "device=cpu"]
NAMED = "localsgd-K2-H4-sgdm-s0-distributed-epochs3-synthetic-num_train2k"  # docs/reports.md's example


@contextlib.contextmanager
def hydra_job(overrides: list[str]):
    """The job config of ``python -m dpl *overrides``, with Hydra's runtime config set as in its process."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from dpl.config.store import register_configs
    from tests.conftest import CONF

    register_configs()
    before = HydraConfig.instance().cfg
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        full = compose("config", overrides=overrides, return_hydra_config=True)
        try:
            HydraConfig.instance().set_config(full)
            yield OmegaConf.masked_copy(full, [k for k in full if k != "hydra"])
        finally:
            HydraConfig.instance().cfg = before


def _name_in_rank(cfg, out_dir: Path, comm) -> str:
    from dpl.tracking.run_names import run_name

    return run_name(cfg)


def test_spawned_ranks_name_the_run_by_the_launching_processs_overrides(tmp_path):
    from dpl.launch.ranks import launch

    with hydra_job([*NAMING, "engine.spawn=true", "engine.timeout_s=60"]) as cfg:
        assert launch(cfg, tmp_path, _name_in_rank) == NAMED  # rank 0's, in a process without Hydra


def test_torchrun_and_slurm_ranks_carry_the_naming_of_their_hydra_job(monkeypatch, tmp_path):
    """Under torchrun or srun each rank is a Hydra job of the same command line: launch() reads its
    naming there and pins it, so the run is named by it whatever the rank's body can still read."""
    from hydra.core.hydra_config import HydraConfig

    from dpl.launch import ranks
    from dpl.tracking import run_names

    monkeypatch.setattr(run_names, "_carried", None)  # put back after the test: it is process-wide
    with hydra_job(NAMING) as cfg:
        assert run_names.job_naming(cfg) == run_names.Naming(tuple(NAMING), None)  # all differ from the defaults
        monkeypatch.setattr(ranks, "under_torchrun", lambda: True)
        monkeypatch.setattr(ranks, "torchrun_store", lambda: (None, 0, 1))
        monkeypatch.setattr(ranks, "run_rank", lambda body, cfg, out_dir, *a, **k: body(cfg, out_dir, None))

        def body(cfg, out_dir, comm):  # the recorder's view: Hydra's config no longer consulted
            HydraConfig.instance().cfg = None
            return run_names.run_name(cfg)

        assert ranks.launch(cfg, tmp_path, body) == NAMED
        run_names.carry_naming(None)  # without it a rank names the run by its base config alone
        assert run_names.run_name(cfg) == "localsgd-K2-H4-sgdm-s0"
