"""The results CSV: one row per finished job (config and final metrics), safe for the jobs of a
parallel sweep appending at the same time; and the checks that a run can write where it is told to."""

from __future__ import annotations

import csv
import fcntl
import re
import tempfile
from pathlib import Path
from typing import Mapping

from dpl.errors import ConfigError
from dpl.io import write_csv


def append_result_row(path: str | Path, row: Mapping[str, object], key: str = "job_dir") -> None:
    """Append one row to the results CSV, widening the header when the row has new columns.

    Jobs of a parallel sweep serialise on an exclusive ``flock`` of ``<path>.lock``; the
    file is rewritten whole into a temp file and renamed, so readers never see half a row.
    A row with the same ``key`` (the job dir) replaces the old one: a job recorded twice
    (finished again after a resume) is still one row.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            columns, rows = _read_csv(path)
            rows = [{k: csv_cell(v) for k, v in r.items()} for r in rows]  # a file from before the escaping
            new = csv_row(row)
            if new.get(key):
                rows = [r for r in rows if r.get(key) != new[key]]
            columns += [k for k in new if k not in columns]
            write_csv(path, rows + [new], columns)  # temp file + rename: never half a row
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.exists():
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def check_writable_file(key: str, value: str, path: Path) -> None:
    """``path`` can be written the way :func:`append_result_row` writes it, or a one-line ConfigError.

    Tried, not inferred from permission bits: root ignores them, a read-only mount does not.
    Nothing is created: a folder that does not exist yet is tried at its deepest existing parent.
    """

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{key}={value!r} is invalid: {why}")

    if not str(value).strip():
        raise bad("allowed a file path")
    if path.is_dir():
        raise bad(f"{path} is a directory (allowed a file path)")
    if path.suffix == ".lock":
        raise bad("a .lock file is where dpl serialises its writers: allowed another file name")
    base = path.parent
    while not base.exists() and base != base.parent:  # made when first written: tried where it would be
        base = base.parent
    lock = path.with_name(path.name + ".lock")
    try:
        if not base.is_dir():
            raise NotADirectoryError(20, f"{base} is not a directory")
        with tempfile.TemporaryFile(dir=base):  # creates nothing that stays: a refused run leaves no trace
            pass
        if lock.exists():
            with open(lock, "a"):
                pass
    except OSError as e:
        raise bad(f"cannot write in {path.parent} ({e.strerror or type(e).__name__})") from None


def check_results_file(key: str, value: str, path: Path, marker: str = "job_dir") -> None:
    """An existing results file must be one dpl wrote (its header has ``marker``, a column of every
    row): appended to, any other CSV or text file would get its first line taken as the header."""
    check_writable_file(key, value, path)
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"{key}={value!r} is invalid: {path} cannot be read ({type(e).__name__})") from None
    if marker not in header:
        raise ConfigError(f"{key}={value!r} is invalid: {path} is not a dpl results file (its header has no "
                          f"{marker} column); give a new file name")


def check_writable_dir(key: str, path: Path) -> None:

    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ConfigError(f"{key}={str(path)!r} is invalid: cannot write there "
                          f"({e.strerror or type(e).__name__})") from None


# What a spreadsheet program reads as a formula when a cell starts with it (OWASP's "CSV injection"):
# ``=HYPERLINK(...)`` in a name would be a live link, ``@SUM(...)`` a call, in whoever opens the file.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# A negative number as Python writes one (-0.5, -1e-03, -inf) is data, not a formula: it stays a number.
_NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|-inf")


def csv_cell(value: object) -> str:
    """``value`` as a CSV cell that a spreadsheet program shows as text: one that would start a formula
    gets a leading ``'`` (what they take as "this is text"), except a negative number. Idempotent: an
    escaped cell starts with ``'``."""
    text = "" if value is None else str(value)
    if text.startswith(_FORMULA_START) and not _NEGATIVE_NUMBER.fullmatch(text):
        return "'" + text
    return text


def csv_row(row: Mapping[str, object]) -> dict[str, str]:
    """A row of :func:`csv_cell` cells (the job dir's ``result.csv`` is the results CSV's row)."""
    return {str(k): csv_cell(v) for k, v in row.items()}
