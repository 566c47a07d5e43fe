"""Every bad input a user can type ends in one line and exit status 2, and leaves nothing behind.

Table-driven: each case is a command line of ``python -m dpl`` run in a fresh directory as a
user would (some with files prepared first: a corrupt checkpoint, a pickle that would run code,
a corrupt MLflow store). Every case asserts the exit status, a single stderr line that starts
with ``error:`` and holds the case's text, no traceback, and that the directory holds afterwards
exactly what it held before: no empty job dir, no empty ``mlflow.db``, no ``results.csv``.

Every case runs in this process through ``dpl.__main__.cli`` (what ``python -m dpl`` runs), its
stdout and stderr captured: most of a subprocess is Python's start-up. A few cases, one of each
kind, also run as real ``python -m dpl`` processes in the default run; the rest of those are slow.
"""

from __future__ import annotations

import os
import pickle
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from tests.processes import run_cli

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
ENV.pop("DPL_SWEEP_PARENT_RUN_ID", None)
TINY = ["dataset=synthetic", "dataset.num_train=200", "dataset.num_test=50", "batch_size=32", "epochs=1",
        "progress=false", "device=cpu", "logger.plots=false"]
MARKER = "PAYLOAD_RAN"  # the file a malicious pickle would create


class _Payload:
    """Unpickled, this creates MARKER in the current directory: what an attacker's file would do."""

    def __reduce__(self):
        return (exec, (f"open({MARKER!r}, 'w').close()",))


def _write(name: str, make: Callable[[Path], None]) -> Callable[[Path], str]:
    def prepare(d: Path) -> str:
        make(d / name)
        return str(d / name)

    return prepare


def _evil_zip(p: Path) -> None:
    torch.save({"format": 1, "model": {"w": torch.zeros(1)}, "x": _Payload()}, p)


def _evil_raw(p: Path) -> None:
    p.write_bytes(pickle.dumps({"format": 1, "x": _Payload()}))


def _partial(p: Path) -> None:
    torch.save({"format": 1, "state": {}}, p)


def _text(p: Path) -> None:
    p.write_text("my notes\nnot,a,results,file\n")


def _corrupt_store(p: Path) -> None:
    with sqlite3.connect(p) as db:
        db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        db.execute("INSERT INTO alembic_version VALUES ('not-a-revision')")
        db.execute("CREATE TABLE experiments (x INTEGER)")


def _garbage(p: Path) -> None:
    p.write_bytes(b"\x00not a torch file" * 10)


def _dir(p: Path) -> None:
    p.mkdir()


@dataclass
class Case:
    id: str
    args: list[str]
    expect: str  # a part of the one error line
    prepare: Optional[Callable[[Path], str]] = None  # makes a file; "{f}" in args is its path
    code: int = 2
    tiny: bool = True
    config_name: Optional[str] = None
    extra: list[str] = field(default_factory=list)


C = Case
CASES = [
    # values out of range or of the wrong type
    C("K=0", ["K=0"], "K=0 is invalid"),
    C("K=-1", ["K=-1"], "K=-1 is invalid"),
    C("K=abc", ["K=abc"], "K='abc' is invalid"),
    C("K=1.5", ["K=1.5"], "K=1.5 is invalid"),
    C("K=null", ["K=null"], "K=None is invalid"),
    C("H=0", ["H=0"], "H=0 is invalid"),
    C("batch_size=0", ["batch_size=0"], "batch_size=0 is invalid"),
    C("epochs=-1", ["epochs=-1"], "epochs=-1 is invalid"),
    C("lr=-0.1", ["lr=-0.1"], "lr=-0.1 is invalid"),
    C("lr=inf", ["lr=inf"], "lr=inf is invalid"),
    C("lr=nan", ["lr=nan"], "lr=nan is invalid"),
    C("lr=1e300", ["lr=1e300"], "lr=1e+300 is invalid"),
    C("lr=abc", ["lr=abc"], "lr='abc' is invalid"),
    C("weight_decay=-1", ["weight_decay=-1"], "weight_decay=-1.0 is invalid"),
    C("warmup_epochs=-1", ["warmup_epochs=-1"], "warmup_epochs=-1.0 is invalid"),
    C("patience=-2", ["patience=-2"], "patience=-2 is invalid"),
    C("device=tpu", ["device=tpu"], "device='tpu' is invalid"),
    C("precision=fp8", ["precision=fp8"], "precision='fp8' is invalid"),
    C("sharding=foo", ["sharding=foo"], "sharding='foo' is invalid"),
    C("dirichlet_alpha=0", ["dirichlet_alpha=0"], "dirichlet_alpha=0.0 is invalid"),
    C("local_momentum=foo", ["local_momentum=foo"], "local_momentum='foo' is invalid"),
    C("shuffle=foo", ["shuffle=foo"], "shuffle='foo' is invalid"),
    C("lr_scaling=foo", ["lr_scaling=foo"], "lr_scaling='foo' is invalid"),
    C("checkpoint_every=-1", ["checkpoint_every=-1"], "checkpoint_every=-1 is invalid"),
    C("progress=maybe", ["progress=maybe"], "progress='maybe' is invalid"),
    C("optimizer.betas=0.9", ["optimizer=adamw", "optimizer.betas=0.9"], "optimizer.betas=0.9 is invalid"),
    C("optimizer.betas=[2,0.5]", ["optimizer=adamw", "optimizer.betas=[2,0.5]"], "optimizer.betas="),
    C("optimizer.momentum=1.5", ["optimizer.momentum=1.5"], "optimizer.momentum=1.5 is invalid"),
    C("trust_coefficient on sgdm", ["optimizer.trust_coefficient=0.01"], "is not a key of optimizer=sgdm"),
    C("optimizer.name=lars", ["optimizer.name=lars"], "optimizer.name cannot be set"),
    C("network.bandwidth_gbps=-1", ["network.bandwidth_gbps=-1"], "network.bandwidth_gbps=-1.0 is invalid"),
    C("method.outer.momentum=1 (slowmo)", ["method=slowmo", "method.outer.momentum=1"],
      "method.outer.momentum=1.0 is invalid"),
    C("method.outer.lr=0", ["method=diloco", "method.outer.lr=0"], "method.outer.lr=0.0 is invalid"),
    C("method.outer.name=foo", ["method=localsgd", "method.outer.name=foo"], "method.outer.name='foo' is invalid"),
    # keys renamed when the outer optimizer became one node (the others: tests/test_config.py)
    C("method.beta=0.5", ["method=slowmo", "method.beta=0.5"], "method.beta was renamed method.outer.momentum"),
    C("method.outer_lr=1", ["method=diloco", "method.outer_lr=1"], "method.outer_lr was renamed method.outer.lr"),
    # streaming DiLoCo, eager updates and dropped workers
    C("method.fragments=0", ["method=streaming_diloco", "method.fragments=0"], "method.fragments=0 is invalid"),
    C("method.fragments=9 (lenet5 has 5 layers)", ["method=streaming_diloco", "method.fragments=9", "H=9"],
      "method.fragments=9 is invalid: allowed at most 5"),
    C("method.alpha=1", ["method=streaming_diloco", "method.alpha=1"], "method.alpha=1.0 is invalid"),
    C("method.delay=-1", ["method=streaming_diloco", "method.delay=-1"], "method.delay=-1 is invalid"),
    C("method.eager with a delay", ["method=streaming_diloco", "method.eager=true", "method.delay=1"],
      "method.delay=1 is invalid with method.eager=true"),
    C("method.alpha on slowmo", ["method=slowmo", "method.alpha=0.5"], "method.alpha was renamed method.outer.lr"),
    C("faults.drop_prob=2", ["method=diloco", "faults.drop_prob=2"], "faults.drop_prob=2.0 is invalid"),
    C("faults.drop_prob on centralized", ["faults.drop_prob=0.1"], "faults.drop_prob=0.1 is invalid with method="),
    C("scheduler.gamma=2 (step)", ["scheduler=step", "scheduler.gamma=2"], "scheduler.gamma=2.0 is invalid"),
    C("dataset.val_fraction=1.5", ["dataset.val_fraction=1.5"], "dataset.val_fraction=1.5 is invalid"),
    C("dataset.num_train=0", ["dataset.num_train=0"], "dataset.num_train=0 is invalid"),
    # unknown keys, options, deletions
    C("+network.bandwdith_gbps=1", ["+network.bandwdith_gbps=1"], "did you mean network.bandwidth_gbps?"),
    C("+foo=1", ["+foo=1"], "+foo is not a dpl config key"),
    C("lrr=0.1", ["lrr=0.1"], "lrr is not a dpl config key"),
    C("~K", ["~K"], "~K is invalid"),
    C("~optimizer.lr", ["~optimizer.lr"], "~optimizer.lr is invalid"),
    C("optimizer=foo", ["optimizer=foo"], "optimizer='foo' is invalid"),
    C("method=foo", ["method=foo"], "method='foo' is invalid"),
    C("dataset=foo", ["dataset=foo"], "dataset='foo' is invalid"),
    C("experiment=study/foo", ["experiment=study/foo"], "experiment='study/foo' is invalid"),
    C("ablation=paper_lars on sgdm", ["ablation=paper_lars"], "ablation=paper_lars does not apply here"),
    C("grammar K=[1,2", ["K=[1,2"], "K=[1,2"),
    C("no key =3", ["=3"], "an override needs a key"),
    C("no value K", ["K"], "K is not a valid override"),
    C("+K=3 (exists)", ["+K=3"], "K is already a dpl config key"),
    C("betas of one", ["optimizer=adamw", "optimizer.betas=[0.9]"], "optimizer.betas=[0.9] is invalid"),
    C("seed=abc", ["seed=abc"], "seed='abc' is invalid"),
    C("lr=[1,2]", ["lr=[1,2]"], "lr=[1, 2] is invalid"),
    C("engine.timeout_s=0", ["engine=distributed", "engine.timeout_s=0"], "engine.timeout_s=0.0 is invalid"),
    C("dynamic_h.h_min=0", ["method=localsgd", "dynamic_h=loss", "dynamic_h.h_min=0"], "dynamic_h.h_min=0"),
    C("compression.ratio=2", ["method=localsgd", "compression=topk", "compression.ratio=2"], "compression.ratio="),
    C("key of another option", ["logger=none", "logger.tracking_uri=x"], "is not a key of logger=none"),
    C("hydra/sweeper=nope", ["hydra/sweeper=nope"], "allowed one of basic, dpl_optuna, optuna"),
    *([C("device=cuda without one", ["device=cuda"], "device='cuda' is invalid")]
      if not torch.cuda.is_available() else []),
    C("logger.experiment empty", ["logger.experiment="], "logger.experiment='' is invalid"),
    C("results_csv a .lock", ["results_csv=x.lock"], "a .lock file"),
    C("--config-name nope", ["--config-name", "nope"], "--config-name nope"),
    # combinations the config alone refuses
    C("dynamic_h on centralized", ["dynamic_h=loss"], "dynamic_h='loss' is invalid with method='centralized'"),
    C("compression on centralized", ["compression=topk"], "compression='topk' is invalid with method="),
    C("engine=distributed without spawn", ["engine=distributed", "K=2", "logger=none"], "engine=distributed needs"),
    C("nccl on cpu", ["engine=distributed", "engine.backend=nccl", "engine.spawn=true", "K=2", "logger=none"],
      "engine.backend='nccl' is invalid"),
    C("engine.master_port=70000", ["engine=distributed", "engine.master_port=70000"], "engine.master_port=70000"),
    C("checkpoint without test_only", ["checkpoint={f}"], "checkpoint=", prepare=_write("c.pt", _garbage)),
    C("test_only without checkpoint", ["test_only=true"], "test_only=true needs checkpoint="),
    # data the config cannot feed
    C("K=5000 on 200 images", ["K=5000"], "K=5000 is invalid: allowed at most"),
    C("dataset.num_train=1", ["dataset.num_train=1"], "dataset.num_train=1 is invalid"),
    C("dataset.image_size=12", ["dataset.image_size=12"], "allowed at least 16"),
    C("dataset.image_size=8", ["dataset.image_size=8"], "dataset.image_size=8 is invalid"),
    C("cifar100 missing, no download", ["dataset=cifar100", "dataset.root=nodata", "dataset.download=false"],
      "nodata", tiny=False),
    C("scheduler.min_lr above lr", ["scheduler=cosine", "lr=0.1", "scheduler.min_lr=10"],
      "scheduler.min_lr=10.0 is invalid with lr=0.1: allowed at most 0.1"),
    C("epochs=1e11", ["epochs=100000000000"], "epochs=100000000000 is invalid: allowed at most 10000000"),
    C("max_steps=1e11", ["max_steps=100000000000"], "max_steps=100000000000 is invalid: allowed at most 10000000"),
    C("epochs past the lr table", ["epochs=5000000"], "epochs=5000000 is invalid with 6 steps per epoch"),
    C("local launcher setup fails", ["-m", "hydra/launcher=local", "hydra.launcher.setup=[exit 3]"],
      "of the sweep did not start: its process exited without a result (hydra.launcher.setup=['exit 3']"),
    C("dataset.path a 2 GiB file", ["dataset=text", "model=gpt_tiny", "dataset.path={f}", "device=cpu",
                                    "progress=false", "logger.plots=false"], "takes the corpus past 1024 MiB",
      prepare=_write("big.txt", lambda p: (p.write_text("words " * 20_000), os.truncate(p, 2 * 2**30))), tiny=False),
    C("resume hostile os.system", ["resume={f}"], "is refused: it names the Python object posix.system",
      prepare=_write("c.pt", lambda p: torch.save({"format": 1, "x": type("S", (), {"__reduce__": lambda self: (
          os.system, (f"touch {MARKER}",))})()}, p))),
    # files that are missing, corrupt, incomplete or hostile
    C("resume missing", ["resume=nowhere"], "no checkpoint at"),
    C("resume garbage", ["resume={f}"], "is corrupt", prepare=_write("c.pt", _garbage)),
    C("resume empty dir", ["resume={f}"], "no checkpoint at", prepare=_write("job", _dir)),
    C("resume without keys", ["resume={f}"], "lacks", prepare=_write("c.pt", _partial)),
    C("resume malicious zip", ["resume={f}"], "is refused", prepare=_write("c.pt", _evil_zip)),
    C("resume malicious raw", ["resume={f}"], "weights_only", prepare=_write("c.pt", _evil_raw)),
    C("test_only malicious", ["test_only=true", "checkpoint={f}"], "is refused", prepare=_write("c.pt", _evil_zip)),
    C("test_only without keys", ["test_only=true", "checkpoint={f}"], "lacks", prepare=_write("c.pt", _partial)),
    C("pretrained missing", ["pretrained=nowhere.pt"], "no weights file at"),
    C("pretrained garbage", ["pretrained={f}"], "is corrupt", prepare=_write("w.pt", _garbage)),
    C("pretrained malicious zip", ["pretrained={f}"], "is refused", prepare=_write("w.pt", _evil_zip)),
    C("pretrained malicious raw", ["pretrained={f}"], "weights_only", prepare=_write("w.pt", _evil_raw)),
    C("pretrained wrong shapes", ["pretrained={f}"], "does not fit model lenet5",
      prepare=_write("w.pt", lambda p: torch.save({"features.0.weight": torch.zeros(3, 3)}, p))),
    C("results_csv a directory", ["results_csv={f}"], "is a directory", prepare=_write("out", _dir)),
    C("results_csv a text file", ["results_csv={f}"], "not a dpl results file", prepare=_write("notes.txt", _text)),
    C("results_csv empty", ["results_csv="], "results_csv"),
    C("results_csv in /proc", ["results_csv=/proc/dpl/results.csv"], "results_csv='/proc/dpl/results.csv'"),
    C("tracking store a directory", ["logger.tracking_uri=sqlite:///{f}"], "logger.tracking_uri",
      prepare=_write("store", _dir)),
    C("tracking store corrupt", ["logger.tracking_uri=sqlite:///{f}"], "logger.tracking_uri",
      prepare=_write("bad.db", _corrupt_store)),
    C("tracking server unreachable", ["logger.tracking_uri=http://127.0.0.1:9"], "is unreachable"),
    C("tracking store half-made with a run", ["logger.tracking_uri=sqlite:///{f}"], "is a half-made MLflow store",
      prepare=_write("mlflow.db", lambda p: sqlite3.connect(p).executescript(  # a migration stopped half-way
          "CREATE TABLE experiments (experiment_id INTEGER, name TEXT); CREATE TABLE runs (run_uuid TEXT);"
          "INSERT INTO runs VALUES ('r0'); CREATE TABLE _alembic_tmp_model_version_tags (key TEXT);"
      ).connection.close())),
    C("hydra.run.dir in /proc", ["hydra.run.dir=/proc/dpl/job"], "/proc/dpl/job"),
    # sweeps
    C("empty range sweep", ["-m", "K=range(1,0)"], "the sweep has no values"),
    C("interval with the basic sweeper", ["-m", "lr=interval(0.1,1)"], "interval"),
    C("sweep dir in /proc", ["-m", "K=1,2", "hydra.sweep.dir=/proc/dpl/sweep"], "/proc/dpl/sweep"),
    C("sweep K=0,2", ["-m", "K=2,0"], "K=0 is invalid"),
    C("optuna direction sideways", ["hydra.sweeper.direction=sideways"], "direction", config_name="optuna_lr"),
    C("optuna n_trials=0", ["hydra.sweeper.n_trials=0"], "n_trials", config_name="optuna_lr"),
    C("sweeper key of optuna on basic", ["-m", "K=1,2", "hydra.sweeper.n_trials=3"], "is not a key of this sweeper"),
    C("packed max_pack=0", ["-m", "hydra/launcher=packed", "seed=0,1", "hydra.launcher.max_pack=0"],
      "hydra.launcher.max_pack=0 is invalid: allowed an integer >= 1"),
    C("packed launcher key typo", ["-m", "hydra/launcher=packed", "seed=0,1", "hydra.launcher.maxpack=2"],
      "not a key of the packed launcher: allowed max_pack, fuse"),
    C("packed key on basic launcher", ["-m", "seed=0,1", "hydra.launcher.max_pack=2"], "basic launcher"),
    C("hydra/launcher=nope", ["-m", "seed=0,1", "hydra/launcher=nope"], "allowed one of basic, local, packed, slurm"),
    C("slurm with a relative store", ["-m", "seed=0,1", "hydra/launcher=slurm"],
      "logger.tracking_uri='sqlite:///mlflow.db' is invalid under hydra/launcher=slurm"),
    C("local launcher key typo", ["-m", "seed=0,1", "hydra/launcher=local", "hydra.launcher.tasks_per_nod=2"],
      "hydra.launcher.tasks_per_nod is not a key of the local launcher: allowed"),
    C("local tasks_per_node=0", ["-m", "seed=0,1", "hydra/launcher=local", "hydra.launcher.tasks_per_node=0"],
      "hydra.launcher.tasks_per_node=0 is invalid: allowed an integer >= 1"),
    C("slurm max_num_timeout=-1", ["-m", "seed=0,1", "hydra/launcher=slurm", "hydra.launcher.max_num_timeout=-1"],
      "hydra.launcher.max_num_timeout=-1 is invalid: allowed an integer >= 0"),
    C("optuna seeds twice", ["hydra.sweeper.seeds=[0,0]"], "hydra.sweeper.seeds=[0,0] is invalid",
      config_name="optuna_lr"),
    C("optuna seeds a count", ["hydra.sweeper.seeds=3"], "allowed null or a list of distinct seeds",
      config_name="optuna_lr"),
    C("optuna seeds and seed", ["hydra.sweeper.seeds=[0,1]", "seed=4"], "seed=4 is invalid with hydra.sweeper.seeds",
      config_name="optuna_lr"),
    C("flags after overrides", ["-m", "K=1,0"], "K=0 is invalid"),
    # names that would lead out of their folder or start a line of their own (a sweep's folder, a job's log)
    C("sweep=../../X", ["sweep=../../X"], "sweep='../../X' is invalid: allowed a name without /",
      config_name="localsgd_grid"),
    C("sweep=a/b", ["-m", "K=1,2", "sweep=a/b"], "sweep='a/b' is invalid"),
    C("sweep with a newline", ["sweep='a\nb'"], "allowed no control characters"),
    C("hydra.job.name=../", ["hydra.job.name=../../../../X"], "hydra.job.name='../../../../X' is invalid"),
    C("logger.experiment with a CR", ["logger.experiment=a\rb"], "logger.experiment='a\\rb' is invalid"),
]


# As real processes in the default run: one case refused before Hydra starts (preflight), one by
# the data after the config composed, one by a hostile file, one by a sweep's job.
AS_A_PROCESS = {"K=0", "K=5000 on 200 images", "resume malicious zip", "sweep K=0,2"}


def run_case(case: Case, base: Path, in_process: bool) -> tuple[subprocess.CompletedProcess, set[str], set[str], Path]:
    d = base / "".join(ch if ch.isalnum() else "_" for ch in case.id)
    d.mkdir()
    f = case.prepare(d) if case.prepare else ""
    args = [a.replace("{f}", f) for a in case.args]
    name = ["--config-name", case.config_name] if case.config_name else []
    argv = [*name, *(TINY if case.tiny else []), *args]
    before = {str(p.relative_to(d)) for p in d.rglob("*")}
    if in_process:
        proc = run_cli(d, argv)
    else:
        proc = subprocess.run([sys.executable, "-m", "dpl", *argv], cwd=d, env=ENV, capture_output=True, text=True,
                              timeout=240)
    after = {str(p.relative_to(d)) for p in d.rglob("*")}
    return proc, before, after, d


def assert_one_line_and_nothing_left(case: Case, outcome) -> None:
    proc, before, after, d = outcome
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert case.expect in lines[0], lines[0]
    assert proc.returncode == case.code, proc.stderr[-3000:]
    assert not (d / MARKER).exists(), "the pickle's payload ran"
    assert after == before, f"left behind: {sorted(after - before)}"


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_inputs")
    return {c.id: run_case(c, base, in_process=True) for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(case, outcomes):
    assert_one_line_and_nothing_left(case, outcomes[case.id])


@pytest.fixture(scope="module")
def process_outcomes(request, tmp_path_factory):
    """The selected cases of the test below as ``python -m dpl`` processes, a few at a time."""
    base = tmp_path_factory.mktemp("bad_inputs_as_processes")
    chosen = {item.callspec.params["case"].id for item in request.session.items
              if getattr(item, "originalname", None) == "test_bad_input_as_a_process_is_one_line_and_leaves_nothing"}
    cases = [c for c in CASES if c.id in chosen]
    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip((c.id for c in cases), pool.map(lambda c: run_case(c, base, in_process=False), cases)))


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=() if c.id in AS_A_PROCESS else pytest.mark.slow)
                                  for c in CASES])
def test_bad_input_as_a_process_is_one_line_and_leaves_nothing(case, process_outcomes):
    assert_one_line_and_nothing_left(case, process_outcomes[case.id])
