"""Config composition, the registries' agreement with conf/, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from dpl.config import ConfigError
from dpl.preflight import validate
from dpl.preflight import GROUPS, check_overrides, group_options
from dpl.preflight import registries
from tests.conftest import CONF, compose_cfg


def test_every_group_folder_matches_its_registry():
    for group, registry in registries().items():
        assert set(group_options(group)) == set(registry), group


@pytest.mark.parametrize("group", [g for g in GROUPS if g != "experiment"])
def test_every_option_composes_and_validates(group):
    # a dynamic H needs local steps; compression acts on the pseudo-gradient of local methods
    local = ["method=localsgd"] if group in ("dynamic_h", "compression") else []
    for option in group_options(group):
        cfg = compose_cfg(f"{group}={option}", *local, tiny=False)
        node = cfg[group]  # ablation options set a plain key (and other keys, globally)
        assert (node.name if group != "ablation" else node) == option
        validate(cfg)


def test_experiments_compose():
    for option in group_options("experiment"):
        validate(compose_cfg(f"experiment={option}", tiny=False))


def test_defaults_follow_the_study():
    cfg = compose_cfg(tiny=False)
    assert (cfg.K, cfg.H, cfg.batch_size, cfg.epochs, cfg.patience) == (1, 1, 64, 150, 0)
    assert cfg.dataset.name == "cifar100" and cfg.optimizer.name == "sgdm" and cfg.method.name == "centralized"
    assert cfg.lr == cfg.optimizer.lr  # top-level lr follows the optimizer unless overridden
    assert compose_cfg("optimizer=adamw", "lr=0.3", tiny=False).lr == 0.3


@pytest.mark.parametrize("override,needle", [
    ("K=0", "K=0"), ("batch_size=-1", "batch_size=-1"), ("lr=abc", "lr='abc'"),
    ("optimizer=nope", "adamw, lamb, lars, sgdm"), ("K=2,4,0", "K=0"), ("device=gpu", "auto, cpu, cuda"),
    ("optimizer.momentum=1.5", "optimizer.momentum"), ("nokey=1", "nokey"),
])
def test_preflight_rejects_in_one_line(override, needle):
    with pytest.raises(ConfigError) as e:
        check_overrides([override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_preflight_accepts_sweeps_and_valid_values():
    check_overrides(["K=2,4,8", "H=4,16,64", "lr=1e-3", "method=localsgd,slowmo", "optimizer.betas=[0.9,0.99]",
                     "dynamic_h=glob(*)", "lr=tag(log,interval(1e-4,1))"])


def test_validate_checks_composed_values():
    cfg = compose_cfg()
    cfg.sharding = "weird"
    with pytest.raises(ConfigError, match="sharding='weird'"):
        validate(cfg)


def test_dynamic_h_needs_a_method_with_local_steps():
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg("method=centralized", "dynamic_h=loss"))
    assert "dynamic_h='loss'" in str(e.value) and "method=localsgd, slowmo" in str(e.value)
    for method in ("localsgd", "slowmo"):
        validate(compose_cfg(f"method={method}", "dynamic_h=loss"))
    validate(compose_cfg("method=centralized", "dynamic_h=constant"))


@pytest.mark.parametrize("override,needle", [("K=0", "K=0"), ("optimizer=nope", "optimizer='nope'"),
                                             ("dynamic_h=loss", "dynamic_h='loss' is invalid with method"),
                                             ("lr=abc", "lr='abc'"), ("batch_size=-1", "batch_size")])
def test_cli_exits_nonzero_with_one_line(override, needle, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dpl", override], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error:")
    assert not (tmp_path / "data").exists()  # failed before any data was touched


def _same(doc: str, value) -> bool:
    if value is None or isinstance(value, bool):
        return doc == {None: "null", True: "true", False: "false"}[value]
    try:
        return float(doc) == float(value)
    except (TypeError, ValueError):
        return doc == str(value)


def test_readme_defaults_match_the_config():
    """Every `| key | default |` row of README.md's key tables states the composed default."""
    import re

    rows = re.findall(r"^\| ((?:`[\w.]+`(?:, | / )?)+) \| ([^|]+) \|", (CONF.parent / "README.md").read_text(), re.M)
    assert len(rows) > 20
    configs = [compose_cfg(tiny=False), compose_cfg("engine=distributed", tiny=False)]
    checked = 0
    for keys_cell, default_cell in rows:
        keys = re.findall(r"`([\w.]+)`", keys_cell)
        bold = re.findall(r"\*\*(\w+)\*\*", default_cell)
        if len(keys) == 1 and bold:  # a config group: its default option in bold
            assert configs[0][keys[0]].name == bold[0], keys[0]
            checked += 1
            continue
        defaults = [d.strip() for d in re.split(r", | / ", default_cell.strip())]
        if len(defaults) != len(keys):
            continue  # prose ("the optimizer's")
        for key, doc in zip(keys, defaults):
            for cfg in configs:
                value = OmegaConf.select(cfg, key, default="<absent>")
                if value != "<absent>":
                    assert _same(doc, value), f"README says {key}={doc}, the config {value}"
                    checked += 1
    assert checked > 25

def test_precision_is_fp32_by_default_and_checked():
    assert compose_cfg().precision == "fp32"
    cfg = compose_cfg("precision=bf16")
    validate(cfg)
    cfg.precision = "fp16"
    with pytest.raises(ConfigError, match="precision='fp16' is invalid: allowed one of fp32, bf16"):
        validate(cfg)


