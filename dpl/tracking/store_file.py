"""The SQLite file of an MLflow store: made whole or not at all, and checked when it is opened.

MLflow builds a new store by running its ~65 schema migrations on the file in place; a process
killed during that, or a full disk, leaves a file that no later run can open ("table secrets
already exists"). Here a new store is a copy of a migrated template, kept once per MLflow version
in the user's cache (``$XDG_CACHE_HOME/dpl`` or ``~/.cache/dpl``), written to a temporary file
beside the store and renamed into place. Where the cache cannot hold a template, the temporary
file itself is migrated. A half-made store found when one is opened is rebuilt if it holds
nothing, and named in one line otherwise. The callers hold the store's lock (``<db>.lock``).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import logging
import os
import re
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Iterator, NamedTuple

from dpl.errors import TrackingError

log = logging.getLogger("dpl")

_TMP_TABLE = "_alembic_tmp_"  # what an interrupted batch migration leaves (alembic on SQLite)
# What a store is kept for: a broken store holding any of these is never replaced.
_CONTENT = {"runs": "SELECT count(*) FROM runs", "registered_models": "SELECT count(*) FROM registered_models",
            "logged_models": "SELECT count(*) FROM logged_models", "trace_info": "SELECT count(*) FROM trace_info",
            "experiments": "SELECT count(*) FROM experiments WHERE name != 'Default'"}


class State(NamedTuple):
    """What :func:`inspect` found. ``kind``: missing, empty, ok, half (MLflow stopped half-way making
    or upgrading it), behind (an older MLflow's schema, or one whose upgrade stopped between steps) or
    other (MLflow's to judge: a newer MLflow's store, another program's file). ``why`` says what is
    wrong, ``runs`` how many runs it holds (None: not known); ``replaceable``: its tables are all
    MLflow's and it holds nothing (no runs, models, traces or experiments of its own)."""

    kind: str
    why: str = ""
    runs: int | None = 0
    replaceable: bool = False


def cache_dir() -> Path:
    """Where the templates live: ``$XDG_CACHE_HOME/dpl``, or ``~/.cache/dpl``."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "dpl"


def template_path() -> Path:
    from importlib.metadata import version

    return cache_dir() / f"mlflow-{version('mlflow')}.db"


def prepare(db: Path) -> None:
    """Make ``db`` a store MLflow opens: created if missing or empty, rebuilt if half-made or behind
    and holding nothing; a half-made store that holds runs is a one-line TrackingError naming it.
    Cheap for a whole store: one query of its table names, one of its schema revision."""
    state = inspect(db)
    if state.kind == "half" and not state.replaceable:
        raise TrackingError(half_made_message(db, state))
    if state.kind in ("half", "behind") and state.replaceable:
        log.warning("rebuilding the MLflow store %s: it held no runs and was half-made (%s)", db, state.why)
    elif state.kind not in ("missing", "empty"):
        return  # whole, or MLflow's to open (it upgrades an older MLflow's store with runs in place)
    create(db)


def half_made_message(db: Path, state: State) -> str:
    runs = f"{state.runs} runs" if state.runs is not None else "data"
    return (f"{db} is a half-made MLflow store ({state.why}) that holds {runs}: MLflow cannot open it; "
            f"move it aside (mv {db} {db}.broken) to start a new store there, or restore it from a backup")


def inspect(db: Path) -> State:
    """The state of the store file ``db``: for a whole one, one query of its table names and one of
    its schema revision. A file that is not SQLite raises ``sqlite3.DatabaseError``."""
    if not db.exists():
        return State("missing")
    with contextlib.closing(sqlite3.connect(f"{db.absolute().as_uri()}?mode=rw", uri=True)) as con:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return State("empty")
        revision = None
        if "alembic_version" in tables:
            row = con.execute("SELECT max(version_num) FROM alembic_version").fetchone()
            revision = row[0] if row else None
        temporary = sorted(t for t in tables if t.startswith(_TMP_TABLE))
        if revision == head() and not temporary:
            return State("ok")
        return _judge(con, tables, revision, temporary)


def _judge(con: sqlite3.Connection, tables: set[str], revision: str | None, temporary: list[str]) -> State:
    """A store not at MLflow's head: half-made only on evidence that MLflow made it and stopped."""
    if temporary:
        kind, why = "half", f"an interrupted migration left table {temporary[0]}"
    elif revision is None and {"experiments", "runs"} <= tables:
        kind, why = "half", "no alembic_version: its first tables were being created"
    elif revision in known_revisions() and revision != alembic_head():
        kind, why = "behind", f"at schema revision {revision}, not {alembic_head()}"
    else:
        return State("other")
    runs = _count(con, tables, {"runs": _CONTENT["runs"]})
    mine = tables <= known_tables() | {"alembic_version"} | set(temporary)
    return State(kind, why, runs, replaceable=mine and _count(con, tables, _CONTENT) == 0)


def _count(con: sqlite3.Connection, tables: set[str], queries: dict[str, str]) -> int | None:
    """Rows of ``queries`` over the tables present; None where a table is not as MLflow makes it."""
    try:
        return sum(con.execute(q).fetchone()[0] for table, q in queries.items() if table in tables)
    except sqlite3.Error:
        return None


@functools.lru_cache(maxsize=None)
def head() -> str:
    """MLflow's latest schema revision, read from the template when there is one: alembic's own
    answer reads every migration script (~0.1 s), and the template was checked against it when made."""
    template = template_path()
    if template.is_file():
        with contextlib.suppress(sqlite3.Error), contextlib.closing(
                sqlite3.connect(f"{template.absolute().as_uri()}?mode=ro", uri=True)) as con:
            row = con.execute("SELECT version_num FROM alembic_version").fetchone()
            if row:
                return row[0]
    return alembic_head()


@functools.lru_cache(maxsize=None)
def alembic_head() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


@functools.lru_cache(maxsize=None)
def known_revisions() -> frozenset[str]:
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    return frozenset(r.revision for r in ScriptDirectory.from_config(_get_alembic_config("")).walk_revisions())


@functools.lru_cache(maxsize=None)
def known_tables() -> frozenset[str]:
    from mlflow.store.db.utils import Base, InitialBase

    return frozenset(Base.metadata.tables) | frozenset(InitialBase.metadata.tables)


def create(db: Path) -> None:
    """Put a fresh store at ``db`` (replacing what is there) in one rename: a copy of the template,
    or, where the cache cannot hold one, a file migrated beside ``db``."""
    _remove_leftovers(db)
    try:
        template = ensure_template()
    except Exception as e:  # noqa: BLE001 - a read-only or full cache: migrated where the store goes instead
        log.debug("no MLflow store template in %s (%s): migrating %s in place", cache_dir(), e, db)
        template = None
    try:
        with _temporary_beside(db) as tmp:
            if template is None or not _copied(template, tmp):
                _migrate(tmp)
            _replace(tmp, db)
    except OSError as e:
        raise TrackingError(f"{db} cannot be created: {e.strerror or e} (free some space in {db.parent}, "
                            f"or put the store elsewhere)") from None
    except sqlite3.Error as e:
        raise TrackingError(f"{db} cannot be created: {e}") from None


def _copied(template: Path, tmp: Path) -> bool:
    """Copy the template to ``tmp``; False (and the template removed, to be made again) where the
    copy is not a whole store at MLflow's head."""
    shutil.copyfile(template, tmp)
    try:
        with contextlib.closing(sqlite3.connect(tmp)) as con:
            revision = con.execute("SELECT version_num FROM alembic_version").fetchone()
            temporary = con.execute(f"SELECT name FROM sqlite_master WHERE name GLOB '{_TMP_TABLE}*'").fetchall()
        if revision == (alembic_head(),) and not temporary:
            return True
    except sqlite3.DatabaseError:
        pass
    log.warning("the MLflow store template %s was damaged: removed (the next new store makes it again)", template)
    template.unlink(missing_ok=True)
    tmp.write_bytes(b"")
    return False


def ensure_template() -> Path:
    """The migrated template of this MLflow version, made (atomically, under its own lock) if missing."""
    template = template_path()
    if template.is_file():
        return template
    template.parent.mkdir(parents=True, exist_ok=True)
    with flock(template.with_name(template.name + ".lock")):
        if not template.is_file():  # another process made it while this one waited
            _remove_leftovers(template)
            with _temporary_beside(template) as tmp:
                _migrate(tmp)
                _replace(tmp, template)
    return template


def _migrate(path: Path) -> None:
    """Run MLflow's own creation of the schema (its first tables, then every migration) on ``path``,
    and check that it reached the head: a copy of a file that did not is never made."""
    from mlflow.store.db.utils import _initialize_tables, create_sqlalchemy_engine

    engine = create_sqlalchemy_engine(f"sqlite:///{path}")
    try:
        _initialize_tables(engine)
    except Exception as e:  # sqlalchemy's errors carry the SQL over many lines: its sqlite3 error is the news
        cause = getattr(e, "orig", None)
        raise cause if isinstance(cause, sqlite3.Error) else e from None
    finally:
        engine.dispose()
    with contextlib.closing(sqlite3.connect(path)) as con:
        (revision,) = con.execute("SELECT version_num FROM alembic_version").fetchone()
    if revision != alembic_head():
        raise sqlite3.DatabaseError(f"the migrated schema is at {revision}, not {alembic_head()}")


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    """An empty temporary file in ``path``'s folder (so the rename is atomic), removed unless renamed."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
            leftover.unlink(missing_ok=True)


def _remove_leftovers(path: Path) -> None:
    """Temporary files of processes that died making ``path``: made only under its lock, which the
    caller now holds, so none of them is still being written."""
    mine = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp(-journal)?")  # as mkstemp names them
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*"):
        if mine.fullmatch(leftover.name):  # not another store's (``x.db`` beside ``x.db.old``)
            leftover.unlink(missing_ok=True)


def _replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    # A journal left by a crash belongs to the file being replaced: never replayed onto the new one
    for suffix in ("-journal", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power loss
    finally:
        os.close(fd)


@contextlib.contextmanager
def flock(path: Path) -> Iterator[None]:
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
