"""engine.threads: typed and checked at startup, resolved from the launch's processes, applied before the
first step, and recorded with the run."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from dpl.config.validate import validate
from dpl.core import engines
from dpl.core.engines import LAUNCH_JOBS_ENV, torch_threads
from dpl.errors import ConfigError
from tests.conftest import compose_cfg


@pytest.fixture
def bare(monkeypatch):
    """No thread settings from the environment, and a machine of 8 cores."""
    for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", LAUNCH_JOBS_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(engines, "cores", lambda: 8)
    return monkeypatch


@pytest.mark.parametrize("value", ["0", "-2", "many", "1.5", "true"])
def test_a_bad_thread_count_fails_in_one_line(value):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(f"engine.threads={value}"))
    assert str(e.value).startswith("engine.threads=") and "auto or an integer >= 1" in str(e.value)
    assert "\n" not in str(e.value)


def test_auto_divides_the_cores_among_the_processes_of_the_launch(bare):
    simulated, spawn, wide = compose_cfg("K=4"), compose_cfg("engine=distributed", "K=4"), \
        compose_cfg("engine=distributed", "K=16")
    assert torch_threads(simulated) == 8  # the simulation: K workers, one process
    assert torch_threads(spawn) == 2  # engine.spawn's K ranks
    assert torch_threads(wide) == 1  # at least one
    bare.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun / Slurm: the ranks on this machine, not all K
    assert torch_threads(wide) == 4
    bare.setenv(LAUNCH_JOBS_ENV, "2")  # two such jobs of a sweep at once
    assert torch_threads(wide) == 2
    assert torch_threads(simulated) == 4


def test_joblib_jobs_count_as_processes(bare):
    from hydra.core.hydra_config import HydraConfig

    cfg = compose_cfg("engine=distributed", "K=2")
    hydra = OmegaConf.create({"hydra": {"launcher": {
        "_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 2}}})
    bare.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    bare.setattr(HydraConfig, "get", staticmethod(lambda: hydra.hydra))
    assert torch_threads(cfg) == 2  # 8 cores / (2 jobs x 2 ranks)
    hydra.hydra.launcher.n_jobs = -1  # joblib's "every core": 8 jobs
    assert torch_threads(cfg) == 1


def test_the_user_s_choice_wins(bare):
    bare.setenv("OMP_NUM_THREADS", "3")
    cfg = compose_cfg("engine=distributed", "K=4")
    assert torch_threads(cfg) == 3
    cfg.engine.threads = 5
    assert torch_threads(cfg) == 5  # an integer as given, OMP_NUM_THREADS or not


def test_the_count_is_applied_before_the_first_step_and_recorded(make_cfg, tmp_path):
    from mlflow.tracking import MlflowClient

    from dpl.run.job import run

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        run(make_cfg("engine.threads=1", "logger=mlflow", f"logger.tracking_uri={uri}", "logger.experiment=t",
                     "method=localsgd", "K=2", "H=4", "epochs=1"),
            out_dir=tmp_path / "job")
        assert torch.get_num_threads() == 1  # set where the workers were built (build_workers)
    finally:
        torch.set_num_threads(before)
    client = MlflowClient(uri)
    (r,) = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert r.data.tags["threads"] == "1" and r.data.params["engine.threads"] == "1"
    # bytes in MiB beside the raw bytes (the runs table's 91.3, not 95755440)
    assert r.data.metrics["comm_mib_total"] == pytest.approx(r.data.metrics["comm_bytes_total"] / 2 ** 20)
    assert r.data.metrics["comm_mib_total"] > 0
