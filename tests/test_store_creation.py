"""The MLflow SQLite store is made whole or not at all: a SIGTERM, a SIGKILL or a full disk during its
creation leaves nothing that a later run trips over, and a half-made store left by other means is
rebuilt when it holds no runs, and named in one line when it does. Real MLflow, real SQLite, real
signals and a real full file system (a small tmpfs; mounting it needs root)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpl.errors import TrackingError
from dpl.tracking import store_file
from dpl.tracking.store import mlflow_client, open_store
from tests.processes import run_cli

ROOT = Path(__file__).resolve().parent.parent
TINY = ["dataset=synthetic", "dataset.num_train=200", "dataset.num_test=50", "batch_size=32", "epochs=1",
        "progress=false", "device=cpu", "logger.plots=false"]
# What dpl does when it runs: SIGTERM raises Terminated (dpl.run.interrupt), then the store is opened.
CREATE = ("import sys\nfrom dpl.run.interrupt import catch_sigterm\ncatch_sigterm()\n"
          "from dpl.tracking.store import open_store\nopen_store(sys.argv[1])\n")


@pytest.fixture(scope="module")
def template_cache(tmp_path_factory) -> Path:
    """A cache holding this MLflow version's store template, made once here (migrating takes seconds)."""
    cache = tmp_path_factory.mktemp("template_cache")
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    try:
        template = store_file.ensure_template()
    finally:
        if before is None:
            os.environ.pop("XDG_CACHE_HOME")
        else:
            os.environ["XDG_CACHE_HOME"] = before
    assert template.parent == cache / "dpl" and store_file.inspect(template).kind == "ok"
    assert sorted(p.name for p in template.parent.iterdir()) == [template.name, template.name + ".lock"]
    return cache


@pytest.fixture
def cache(template_cache, tmp_path, monkeypatch) -> Path:
    """This test's own copy of the template cache, as ``$XDG_CACHE_HOME``."""
    mine = tmp_path / "cache"
    shutil.copytree(template_cache, mine)
    monkeypatch.setenv("XDG_CACHE_HOME", str(mine))
    return mine


def _uri(db: Path) -> str:
    return f"sqlite:///{db}"


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", "-journal")))


def _log_a_run(db: Path) -> str:
    client = mlflow_client(_uri(db))
    experiment = client.create_experiment("kept")
    return client.create_run(experiment).info.run_id


def _kill_during_creation(uri: str, watch: Path, sig: int, cache: str) -> subprocess.CompletedProcess:
    """Start a process that creates the store ``uri``, and send it ``sig`` as soon as a temporary
    store file in ``watch`` is being written (MLflow's migrations are running on it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": cache}
    proc = subprocess.Popen([sys.executable, "-c", CREATE, uri], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if watch.is_dir() and any(p.stat().st_size > 0 for p in watch.glob(".*.tmp")):
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"the store was made before it could be killed: {proc.communicate()}"
    os.kill(proc.pid, sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_sigterm_during_first_creation_leaves_nothing_and_the_next_run_succeeds(tmp_path, monkeypatch):
    run, cache = tmp_path / "run", tmp_path / "cache"  # an empty cache: the template is migrated, and hit
    run.mkdir()
    killed = _kill_during_creation(_uri(run / "mlflow.db"), cache / "dpl", signal.SIGTERM, str(cache))
    assert killed.returncode != 0 and "Terminated" in killed.stderr
    template = cache / "dpl" / store_file.template_path().name
    assert not template.exists() and _leftovers(cache / "dpl") == []  # its temporary file was removed
    assert sorted(p.name for p in run.iterdir()) == []  # no mlflow.db, half-made or whole; no lock file
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    done = run_cli(run, TINY)  # the same folder, the same cache: the template is made again
    assert done.returncode == 0, done.stderr
    assert store_file.inspect(run / "mlflow.db").kind == "ok" and store_file.inspect(template).kind == "ok"
    (finished,) = mlflow_client(_uri(run / "mlflow.db")).search_runs(["1"])
    assert finished.info.status == "FINISHED"


def test_sigkill_during_creation_in_place_leaves_no_store_and_its_leftovers_go(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    unwritable = tmp_path / "a_file"  # a cache under a file cannot be made: the store is migrated in place
    unwritable.write_text("")
    killed = _kill_during_creation(_uri(run / "mlflow.db"), run, signal.SIGKILL, str(unwritable))
    assert killed.returncode == -signal.SIGKILL
    assert not (run / "mlflow.db").exists() and _leftovers(run)  # SIGKILL: nothing could clean up
    monkeypatch.setenv("XDG_CACHE_HOME", str(unwritable))
    client = open_store(_uri(run / "mlflow.db"))  # in place again; under the lock, the leftovers go
    assert client.search_experiments() and _leftovers(run) == []
    assert store_file.inspect(run / "mlflow.db").kind == "ok"


@pytest.fixture
def small_disk(tmp_path):
    """A 300 KiB tmpfs: MLflow's store (~900 KiB) does not fit. Unmounted however the test ends."""
    where = tmp_path / "small_disk"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_a_full_disk_during_creation_is_one_line_and_leaves_nothing(small_disk, tmp_path, cache):
    db = small_disk / "mlflow.db"
    with pytest.raises(TrackingError) as e:
        open_store(_uri(db))
    message = str(e.value)
    assert "\n" not in message and str(db) in message and "No space left on device" in message
    assert sorted(p.name for p in small_disk.iterdir()) == []  # no half-copied store, no lock file
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)  # space again
    run = tmp_path / "run"
    run.mkdir()
    done = run_cli(run, [*TINY, f"logger.tracking_uri={_uri(db)}"])
    assert done.returncode == 0, done.stderr
    assert store_file.inspect(db).kind == "ok" and _leftovers(small_disk) == []


@pytest.mark.slow  # migrates in place, as the test above does after its kill
def test_a_full_cache_disk_makes_the_store_in_place(small_disk, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(small_disk))
    db = tmp_path / "mlflow.db"
    _log_a_run(db)
    assert store_file.inspect(db).kind == "ok"
    assert [p.name for p in (small_disk / "dpl").iterdir()] == [store_file.template_path().name + ".lock"]


# ----------------------------------------------------------------------------- half-made stores


def _with_leftover_table(db: Path) -> None:
    """What a batch migration stopped half-way leaves (the issue's "_alembic_tmp_... already exists")."""
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE _alembic_tmp_model_version_tags (key VARCHAR(250))")


def _set_back(db: Path) -> None:
    """Tables made by a migration whose revision was never recorded ("table secrets already exists")."""
    with sqlite3.connect(db) as con:
        con.execute("UPDATE alembic_version SET version_num = 'bf29a5ff90ea'")  # the one before secrets


def _first_tables_only(db: Path) -> None:
    """A store killed before its first migration: MLflow's first tables, no alembic_version."""
    import sqlalchemy
    from mlflow.store.db.utils import InitialBase

    engine = sqlalchemy.create_engine(_uri(db))
    InitialBase.metadata.create_all(engine)
    engine.dispose()


@pytest.mark.parametrize("plant", [_with_leftover_table, _set_back, _first_tables_only])
def test_a_half_made_store_without_runs_is_rebuilt(plant, tmp_path, cache, caplog):
    db = tmp_path / "mlflow.db"
    if plant is not _first_tables_only:
        shutil.copyfile(store_file.ensure_template(), db)
    plant(db)
    assert store_file.inspect(db).kind in ("half", "behind")
    with caplog.at_level(logging.WARNING, logger="dpl"):
        client = open_store(_uri(db))
    assert f"rebuilding the MLflow store {db}" in caplog.text
    assert store_file.inspect(db).kind == "ok" and _leftovers(tmp_path) == []
    run = client.create_run(client.create_experiment("after")).info.run_id
    assert client.get_run(run).info.status == "RUNNING"


def test_a_half_made_store_with_a_run_is_named_in_one_line_and_left_alone(tmp_path, cache):
    db = tmp_path / "mlflow.db"
    _log_a_run(db)
    _with_leftover_table(db)
    before = db.read_bytes()
    with pytest.raises(TrackingError) as e:
        open_store(_uri(db))
    message = str(e.value)
    assert "\n" not in message and f"{db} is a half-made MLflow store" in message
    assert "holds 1 runs" in message and f"mv {db} {db}.broken" in message
    assert db.read_bytes() == before
    done = run_cli(tmp_path, [*TINY, f"logger.tracking_uri={_uri(db)}"])  # refused before any data loads
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [f"error: {message}"]


def test_an_older_mlflow_store_with_runs_is_upgraded_not_rebuilt(tmp_path, cache):
    """A store an MLflow 1.x left (schema revision cc1f77228345), with a run: MLflow upgrades it."""
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config

    db = tmp_path / "mlflow.db"
    _first_tables_only(db)
    import sqlalchemy

    engine = sqlalchemy.create_engine(_uri(db))
    with engine.begin() as connection:
        config = _get_alembic_config(_uri(db))
        config.attributes["connection"] = connection
        command.upgrade(config, "cc1f77228345")
    engine.dispose()
    with sqlite3.connect(db) as con:
        con.execute("INSERT INTO experiments (experiment_id, name, artifact_location, lifecycle_stage) "
                    "VALUES (1, 'old', '/tmp/old', 'active')")
        con.execute("INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, user_id, "
                    "status, start_time, end_time, source_version, lifecycle_stage, artifact_uri, experiment_id) "
                    "VALUES ('r0', 'old run', 'LOCAL', '', '', 'me', 'FINISHED', 1, 2, '', 'active', '', 1)")
    assert store_file.inspect(db).kind == "behind"
    client = open_store(_uri(db))
    assert client.get_run("r0").info.run_name == "old run"
    assert store_file.inspect(db).kind == "ok"


def test_a_file_that_is_not_sqlite_is_one_line_and_left_alone(tmp_path, cache):
    db = tmp_path / "mlflow.db"
    db.write_bytes(os.urandom(4096))
    before = db.read_bytes()
    with pytest.raises(TrackingError) as e:
        open_store(_uri(db))
    assert "\n" not in str(e.value) and f"{db} is not an SQLite file" in str(e.value)
    assert db.read_bytes() == before


def test_a_whole_store_opens_with_one_cheap_check(tmp_path, cache):
    db = tmp_path / "mlflow.db"
    open_store(_uri(db))
    for cached in (store_file.head, store_file.alembic_head, store_file.known_revisions, store_file.known_tables):
        cached.cache_clear()
    for _ in range(3):
        assert store_file.inspect(db).kind == "ok"
    # MLflow's ~65 migration scripts (a tenth of a second to read) were never read: the template's
    # revision is the head, and a store at it with no leftover tables needs nothing more
    for slow in (store_file.alembic_head, store_file.known_revisions, store_file.known_tables):
        assert slow.cache_info().misses == 0, slow
