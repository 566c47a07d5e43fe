"""The documentation's examples do what it says: the README's runnable blocks run as written, and each
documented error line is what its command prints.

The convention: a fenced ``bash`` block of README.md whose previous non-blank line is ``<!-- runnable -->``
is run here, as one ``bash -e`` script in an empty directory, and must exit 0 within
:data:`LIMIT_S`. Only blocks that are genuinely small are marked (generated data, one epoch); the
others (CIFAR-100, sweeps of 150 epochs, ``mlflow ui``) are left unmarked and are not run.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- runnable -->"
LIMIT_S = 120  # a marked block is a first look: the two commands took 25 s on 2 cores at load 0.3, 45 s at 2.9
FENCE = re.compile(r"^```(\w*)\s*$")


def marked_blocks(text: str) -> list[str]:
    """The bodies of the fenced bash blocks right after a :data:`MARKER` line."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        if before == MARKER:
            assert fence.group(1) == "bash", f"README.md line {i + 1}: a runnable block must be ```bash"
            blocks.append("\n".join(lines[i + 1:end]))
        i = end + 1
    return blocks


def test_the_marker_finds_only_the_block_after_it():
    text = f"```bash\nfalse\n```\n\n{MARKER}\n\n```bash\necho a\n```\n```bash\nfalse\n```\n"
    assert marked_blocks(text) == ["echo a"]


def test_the_readme_marks_a_first_run_and_its_report():
    blocks = marked_blocks((ROOT / "README.md").read_text())
    assert blocks, f"README.md marks no block {MARKER}"
    commands = [line for block in blocks for line in block.splitlines() if line.strip()]
    assert any(c.startswith("python -m dpl ") for c in commands)
    assert not any(c.startswith("mlflow ui") for c in commands)  # a server never exits: not runnable


@pytest.mark.parametrize("block", marked_blocks((ROOT / "README.md").read_text()))
def test_a_runnable_readme_block_runs_as_written(block, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # dpl from this checkout, as `pip install -e .` gives it
    env.pop("OMP_NUM_THREADS", None)  # as a new user's shell: engine.threads=auto decides
    r = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=LIMIT_S)
    assert r.returncode == 0, f"{block}\nexited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    if not re.search(r"^python -m dpl ", block, re.M):
        return
    assert (tmp_path / "results.csv").exists() and (tmp_path / "mlflow.db").exists()
    # the address the README tells a new user to open is the one the run printed
    out = r.stdout + r.stderr
    link = re.search(r"MLflow: (\S+)", out)
    assert link and link.group(1).endswith("/#/experiments/1/runs?viewStateShareKey=dpl"), out[-2000:]
    assert "http://127.0.0.1:5000/#/experiments/1/runs?viewStateShareKey=dpl" in (ROOT / "README.md").read_text()


def documented_errors() -> list[tuple[str, str, str]]:
    """``(page, command, error line)`` of every ``$ python -m dpl ...`` followed by its ``error:`` line in
    README.md and docs/*.md."""
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        lines = page.read_text().splitlines()
        for line, after in zip(lines, lines[1:]):
            if line.startswith("$ python -m dpl ") and after.startswith("error: "):
                found.append((page.name, line[2:], after))
    return found


def test_the_documented_errors_are_found():
    assert any("optimizer.name=" in command for _, command, _ in documented_errors())


@pytest.mark.parametrize("page,command,error", documented_errors())
def test_a_documented_error_is_what_the_command_prints(page, command, error, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(command.split(), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (page, command, r.stderr[-2000:])
    assert r.stderr.strip().splitlines()[-1] == error, page  # the page's copy, word for word
