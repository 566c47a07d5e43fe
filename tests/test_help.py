"""``python -m dpl --help``: every group's options and every top-level key, from the registries, composing
nothing and importing neither torch nor a sweeper's optuna."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

from dpl.config.help import help_text
from dpl.config.root import NODES, Config
from dpl.config.store import GROUPS, default_options, registries

ROOT = Path(__file__).resolve().parent.parent


def test_help_lists_each_group_s_options_and_every_top_level_key():
    text = help_text(width=100_000)  # unwrapped: a group's options on its one line
    lines = text.splitlines()
    defaults = default_options()
    for group, registry in registries().items():
        (line,) = [ln for ln in lines if ln.startswith(f"  {group}: ")]
        shown = line.split(": ", 1)[1].split(", ")
        assert set(registry) <= {o.rstrip("*") for o in shown}, group
        assert f"{defaults[group]}*" in shown, group
    assert "study/localsgd" in next(ln for ln in lines if ln.startswith("  experiment: "))
    assert "schema/" not in text  # the schemas' internal groups are not options
    for f in dataclasses.fields(Config):
        if f.name not in GROUPS and f.name not in NODES:
            assert any(ln.startswith(f"  {f.name}=") for ln in lines), f.name
    for node, schema in NODES.items():
        for f in dataclasses.fields(schema):
            assert any(ln.startswith(f"  {node}.{f.name}=") for ln in lines), f"{node}.{f.name}"


def test_help_as_a_command_composes_nothing_and_imports_no_torch():
    code = ("import sys, runpy; sys.argv = ['dpl', '--help', 'method=localsgd']\n"
            "try:\n    runpy.run_module('dpl', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('IMPORTED', sorted(m for m in ('torch', 'optuna', 'mlflow') if m in sys.modules))")
    env = {**os.environ, "DPL_NO_FAST_EXIT": "1"}  # the process goes on after the command: to look at it
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("dpl: data-parallel training") and "IMPORTED []" in out.stdout
    assert "== Config groups" in out.stdout and out.stderr == ""
