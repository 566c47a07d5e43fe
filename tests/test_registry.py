"""The registries (dpl.registry): each option registered once, next to its code, and nothing else in dpl
spelling its name; every option's schema and documentation derived from its registration; the config
layer loaded without torch."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from dpl.config.schema import doc_of
from dpl.config.store import registries
from dpl.registry import Registry

DPL = Path(__file__).resolve().parents[1] / "dpl"

# Where an option's name is also another word of dpl's, and why: a value of another key, a library's own
# string, a bench's name. Anywhere else an option's name as a string literal would be the code asking which
# option runs, which the options' facts answer (dpl.registry).
SAME_WORD = {
    "none": {
        "dpl.config.root": "the ablation key's default and lr_scaling=none",
        "dpl.core.schedules": "lr_scaling=none (scaled_lr)",
        "dpl.core.engines": "engine.compile=none",
        "dpl.core.workers": "torch's cross_entropy(reduction='none')",
        "dpl.config.overrides": "'allowed none' in an error line",
        "dpl.report.figures": "matplotlib's linestyle='none'",
    },
    "constant": {"dpl.comm.clock": "clock.speed=constant"},
    "step": {
        "dpl.config.study": "scheduler.interval=step, an ablation's value",
        "dpl.core.state": "a step metric's per='step'",
        "dpl.core.loop": "a step metric's per='step'",
        "dpl.components.optim.layerwise": "torch's optimizer state['step']",
        "dpl.components.optim.muon": "torch's optimizer state['step']",
        "dpl.run.job": "a checkpoint's state['step']",
        "dpl.run.checkpoint": "a checkpoint's state['step'] (the upgrade of format-2 in-flight fragments)",
        "dpl.run.recorder": "tqdm's unit='step'",
        "dpl.pack.job": "tqdm's unit='step'",
        "dpl.bench": "python -m dpl.bench step",
    },
    "bf16": {"dpl.config.root": "precision=bf16", "dpl.core.workers": "precision=bf16 (autocast)",
             "dpl.bench": "precision=bf16", "dpl.core.selfcheck": "precision=bf16 (its tolerance)"},
    "distributed": {"dpl.bench": "python -m dpl.bench distributed"},
    "mlflow": {"dpl.tracking.store": "MLflow's own logger names",
               "dpl.tracking.store_file": "the mlflow distribution's version (its store template's name)"},
    "muon": {"dpl.components.optim.muon": "Muon's param-group flag (its checkpoints hold it)"},
    "lars": {"dpl.run.checkpoint": "the upgrade of format-1 LARS optimizer states"},
}


def _literals(path: Path) -> set[str]:
    """The string constants of a module, docstrings left out."""
    tree = ast.parse(path.read_text())
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs}


def _modules() -> dict[str, set[str]]:
    return {".".join(p.relative_to(DPL.parent).with_suffix("").parts).removesuffix(".__init__"): _literals(p)
            for p in sorted(DPL.rglob("*.py"))}


def test_each_option_name_is_a_literal_in_its_registration_alone():
    modules = _modules()
    where_registered: dict[str, set[str]] = {}
    for registry in registries().values():
        for name, option in registry.items():
            where_registered.setdefault(name, set()).add(option.module)
    for group, registry in registries().items():
        for name, option in registry.items():
            assert name in modules[option.module], (group, name)  # registered where it is written
            others = {m for m, lits in modules.items() if name in lits} - where_registered[name]
            unexplained = others - set(SAME_WORD.get(name, {}))
            assert not unexplained, f"{group}={name} is spelled in {sorted(unexplained)}: ask its facts"


def test_the_same_word_table_has_no_stale_entry():
    modules = _modules()
    for word, places in SAME_WORD.items():
        for module in places:
            assert word in modules[module], (word, module)


def test_every_option_has_a_schema_whose_keys_are_documented():
    for group, registry in registries().items():
        for name, option in registry.items():
            if option.schema is None:  # an ablation sets other keys, which their own schemas document
                continue
            for field in dataclasses.fields(option.schema):
                assert doc_of(field), f"{group}={name}: {field.name} has no documentation"


def test_a_name_registered_twice_from_two_places_is_refused():
    reg = Registry("testgroup", "a registry of this test")
    reg.add("x", None, object, module="a")
    reg.add("x", None, object, module="a")  # the same module again (a reload): fine
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("x", None, object, module="b")
    with pytest.raises(KeyError, match="testgroup='y' is unknown: allowed x"):
        reg["y"]


def test_the_config_layer_loads_without_torch():
    """The registries, the schemas, the ConfigStore and every check of the command line and of the composed
    config import no torch: ``--help`` and a refused command need not pay its import."""
    code = ("import sys; from dpl.config.store import register_configs; register_configs(); "
            "import dpl.config.overrides, dpl.config.validate, dpl.config.upgrade; "
            "print(sorted(m for m in ('torch', 'numpy', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
