"""`mlflow ui` / `mlflow server` start in the installed environment and serve the runs dpl wrote.

MLflow 3.17's server imports a SQLAlchemy-2-only name while optuna 2.10 (the Optuna sweeper's
pin) needs SQLAlchemy 1.4; this test is what notices such a pair again. It starts the real
server on a free port (bounded waits; the whole process group is always killed).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from omegaconf import OmegaConf

from dpl.tracking.loggers import MlflowLogger

START_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


@pytest.fixture
def store_with_a_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = OmegaConf.create({"K": 4, "H": 8, "seed": 0, "method": {"name": "localsgd"},
                            "optimizer": {"name": "sgdm"}, "dynamic_h": {"name": "constant"},
                            "logger": {"name": "mlflow", "tracking_uri": uri, "experiment": "served",
                                       "run_name": None}})
    logger = MlflowLogger(cfg.logger)
    run_id = logger.start(cfg, {"method": "localsgd"})
    logger.log_metrics({"val_acc": 0.5}, step=0)
    logger.finish()
    return uri, run_id


def test_mlflow_server_serves_a_dpl_run(store_with_a_run, tmp_path):
    uri, run_id = store_with_a_run
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, "mlflow server exited:\n" + (tmp_path / "server.log").read_text()[-3000:]
            try:
                if _get(f"{base}/health", timeout=2)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer:\n" + \
                (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(1.0)
        status, body = _get(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=30)
        run = json.loads(body)["run"]
        assert status == 200 and run["info"]["run_name"] == "localsgd-K4-H8-sgdm-s0"
        assert {"key": "val_acc", "value": 0.5} in [{k: m[k] for k in ("key", "value")}
                                                    for m in run["data"]["metrics"]]
        status, page = _get(f"{base}/", timeout=30)  # the UI itself, not only the REST API
        assert status == 200 and b"<html" in page.lower()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        log.close()
