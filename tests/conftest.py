"""Shared fixtures: composing the real configs with tiny, offline settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from dpl.config.store import register_configs

CONF = Path(__file__).resolve().parent.parent / "conf"

# A run small enough for CPU tests: 900/100 synthetic train/val images, 200 test images.
TINY = [
    "dataset=synthetic", "dataset.num_train=1000", "dataset.num_test=200", "dataset.num_classes=10",
    "epochs=2", "batch_size=32", "logger=none", "progress=false", "device=cpu", "logger.plots=false",
]


def compose_cfg(*overrides: str, tiny: bool = True) -> DictConfig:
    """The real config with TINY's settings first; a test that picks another dataset gets none of
    TINY's synthetic-only dataset keys (that dataset's schema does not have them)."""
    register_configs()
    base = TINY if tiny else []
    if any(o.startswith("dataset=") and o != "dataset=synthetic" for o in overrides):
        base = [o for o in base if not o.startswith("dataset")]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[*base, *overrides])


@pytest.fixture
def make_cfg(tmp_path):
    """Compose the real config with TINY defaults; results CSV and data root inside tmp_path."""

    def make(*overrides: str, tiny: bool = True) -> DictConfig:
        cfg = compose_cfg(f"results_csv={tmp_path / 'results.csv'}", *overrides, tiny=tiny)
        return cfg

    return make


@pytest.fixture(autouse=True)
def _quiet_threads():
    # Two cores on CI: one intra-op thread each keeps parallel pytest-free runs predictable.
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield
