"""Watching a spawned ``engine=distributed`` job from a test: its ranks' pids and its first epoch."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from dpl.run import checkpoint
from dpl.run.checkpoint import CheckpointError


def rank_pids(proc: subprocess.Popen, world: int) -> dict[int, int]:
    """{rank: pid} from the launcher's "rank R is pid P" lines, once all ``world`` ranks have said it."""
    pids: dict[int, int] = {}
    for line in proc.stdout:
        m = re.search(r"rank (\d+) is pid (\d+)", line)
        if m:
            pids[int(m.group(1))] = int(m.group(2))
        if len(pids) == world:
            return pids
    raise AssertionError("the ranks never started")


def wait_epoch(job: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Return once the job's checkpoint holds a finished epoch (a fault injected later hits a running job)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if checkpoint.load(job)["state"]["epoch"] >= 1:
                return
        except CheckpointError:
            pass
        time.sleep(0.05)
    raise AssertionError("no epoch finished")


def run_cli(cwd: Path, args: list[str]) -> subprocess.CompletedProcess:
    """``python -m dpl *args`` in ``cwd``, run in this process (``dpl.__main__`` as ``__main__``): its exit
    status, stdout and stderr as a subprocess would give them, without a new interpreter's start-up.
    What a run changes in the process (environment, SIGTERM handler, root logger, cwd, warning
    filters, Hydra's config, torch's threads) is put back; warnings print to the captured stderr, as in a fresh interpreter."""
    import contextlib
    import io
    import logging
    import os
    import runpy
    import signal
    import sys
    import traceback
    import warnings

    import torch
    from hydra.core.hydra_config import HydraConfig

    out, err = io.StringIO(), io.StringIO()
    env, argv, cwd_before = dict(os.environ), sys.argv, os.getcwd()
    hydra_cfg, raise_exceptions = HydraConfig.instance().cfg, logging.raiseExceptions
    sigterm, root = signal.getsignal(signal.SIGTERM), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    code, threads = 0, torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # as the tests' subprocesses run (OMP_NUM_THREADS=1)
        os.environ["OMP_NUM_THREADS"] = "1"  # engine.threads=auto reads it (the environment is put back below)
        os.chdir(cwd)
        os.environ["DPL_NO_FAST_EXIT"] = "1"  # this process goes on after the command (dpl.__main__)
        sys.argv = ["dpl", *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.resetwarnings()  # Python's own default filters, not pytest's
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = lambda m, c, f, n, file=None, line=None: err.write(
                warnings.formatwarning(m, c, f, n, line))
            try:  # as `python -m dpl` does: Hydra finds conf/ next to the __main__ module's file
                runpy.run_module("dpl", run_name="__main__", alter_sys=True)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # what an uncaught exception would print, and its status
                traceback.print_exc(file=err)
                code = 1
    finally:
        os.chdir(cwd_before)
        torch.set_num_threads(threads)
        sys.argv = argv
        os.environ.clear()
        os.environ.update(env)
        signal.signal(signal.SIGTERM, sigterm)
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        for h in handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(level)
        logging.raiseExceptions = raise_exceptions
        HydraConfig.instance().cfg = hydra_cfg  # else launch_dir() would still answer the run's cwd
    return subprocess.CompletedProcess(["dpl", *args], code, out.getvalue(), err.getvalue())


def optuna_trials(storage: str, name: str):
    """The trials of Optuna study ``name`` in ``storage``, read without Optuna's own log lines; its
    verbosity is put back, since a later in-process command's lines are checked."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=storage).trials
    finally:
        optuna.logging.set_verbosity(verbosity)
