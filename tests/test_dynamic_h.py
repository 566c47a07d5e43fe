"""Dynamic-H strategies: hand-computed H sequences on scripted histories, bounds, purity, configs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dpl.config import DynamicHConfig
from dpl.dynamic_h import STRATEGIES, HContext, next_h

YAMLS = Path(__file__).resolve().parent.parent / "conf" / "dynamic_h"


def load_cfg(name: str, **overrides):
    """The strategy's YAML merged into the schema, as Hydra composes it, plus overrides."""
    return OmegaConf.merge(OmegaConf.structured(DynamicHConfig), OmegaConf.load(YAMLS / f"{name}.yaml"), overrides)


def run_h(name: str, epochs: int, H0: int = 4, steps_per_epoch: int = 100, val_loss=None, val_acc=None,
          **overrides) -> list[int]:
    """Play a run as the trainer does: H chosen before each epoch from the finished epochs' records."""
    cfg = load_cfg(name, **overrides)
    val_loss = val_loss or [1.0] * epochs
    val_acc = val_acc or [0.5] * epochs
    history, hs = [], []
    for epoch in range(epochs):
        H = next_h(HContext(epoch, epochs, steps_per_epoch, H0, tuple(history)), cfg)
        hs.append(H)
        history.append({"epoch": epoch, "H": H, "val_loss": val_loss[epoch], "val_acc": val_acc[epoch]})
    return hs


# ----------------------------------------------------------------------------- schedules


def test_constant_is_the_configured_h():
    assert run_h("constant", 4, H0=6) == [6, 6, 6, 6]


def test_linear_from_h_min_to_h_max():
    # 4 + 60 e / 4 for e = 0..4
    assert run_h("asc_linear", 5) == [4, 19, 34, 49, 64]
    assert run_h("desc_linear", 5) == [64, 49, 34, 19, 4]
    # 2.5 rounds half up (Python's round would give 2)
    assert run_h("asc_linear", 3, h_min=1, h_max=4) == [1, 3, 4]
    assert run_h("desc_linear", 3, h_min=1, h_max=4) == [4, 3, 1]
    assert run_h("asc_linear", 1) == [4] and run_h("desc_linear", 1) == [64]


def test_pow2_stages():
    # 5 powers (4..64) over 10 epochs: 2 epochs each
    assert run_h("asc_pow2", 10) == [4, 4, 8, 8, 16, 16, 32, 32, 64, 64]
    assert run_h("desc_pow2", 10) == [64, 64, 32, 32, 16, 16, 8, 8, 4, 4]
    # 7 epochs: stage = 5 e // 7
    assert run_h("asc_pow2", 7) == [4, 4, 8, 16, 16, 32, 64]
    # doublings of h_min that stay <= h_max: 3, 6, 12
    assert run_h("asc_pow2", 3, h_min=3, h_max=20) == [3, 6, 12]


def test_sigmoid_between_step_fractions():
    # 220 steps: lo = 220/22 = 10, hi = 220/2 = 110; H = 10 + 100 / (1 + exp(-0.5 (e - 75)))
    hs = run_h("sigmoid", 150, steps_per_epoch=220)
    assert hs[0] == 10 and hs[149] == 110
    assert hs[75] == 60  # midpoint: halfway
    assert (hs[70], hs[73], hs[77], hs[80]) == (18, 37, 83, 102)  # 17.59, 36.89, 83.11, 102.41
    assert hs == sorted(hs)
    # lo = 8/4 = 2, hi = 8/1 = 8, midpoint 2, steepness 1: 2 + 6 * logistic(e - 2)
    custom = dict(midpoint=2, steepness=1.0, low_divisor=4, high_divisor=1)
    assert run_h("sigmoid", 5, steps_per_epoch=8, **custom) == [3, 4, 5, 6, 7]
    # lo = 10/22 would round to 0: H is at least 1
    assert run_h("sigmoid", 1, steps_per_epoch=10)[0] == 1


def test_rev_cosine_between_step_fractions():
    # lo 10, hi 110 over 5 epochs: (1 - cos(pi e / 4)) / 2 = 0, .1464, .5, .8536, 1
    assert run_h("rev_cosine", 5, steps_per_epoch=220) == [10, 25, 60, 95, 110]
    assert run_h("rev_cosine", 1, steps_per_epoch=220) == [10]
    assert run_h("rev_cosine", 2, steps_per_epoch=10) == [1, 5]  # 0.45 -> at least 1; 10/2 = 5


# ----------------------------------------------------------------------------- adaptive


def test_improvement_doubles_on_new_best_and_halves_after_patience():
    acc = [0.10, 0.20, 0.15, 0.18, 0.19, 0.25, 0.24, 0.23, 0.22, 0.21]
    # e0 best (x2), e1 best (x2), e2 stale 1, e3 stale 2 = patience (/2, count restarts),
    # e4 stale 1, e5 best (x2), e6 stale 1, e7 stale 2 (/2), e8 stale 1
    assert run_h("improvement", 10, H0=4, val_acc=acc, patience=2) == [4, 8, 16, 16, 8, 8, 16, 16, 8, 8]
    # the count restarts after a halving: 4 stale epochs with patience 2 halve twice
    assert run_h("improvement", 6, H0=16, val_acc=[0.5, 0.4, 0.4, 0.4, 0.4, 0.4], patience=2) == [
        16, 32, 32, 16, 16, 8]


def test_improvement_clamps_and_ties_do_not_improve():
    assert run_h("improvement", 5, H0=4, val_acc=[0.1, 0.2, 0.3, 0.4, 0.5], h_max=16) == [4, 8, 16, 16, 16]
    assert run_h("improvement", 6, H0=4, val_acc=[0.5] * 6, patience=1) == [4, 8, 4, 4, 4, 4]
    assert run_h("improvement", 1, H0=1) == [4] and run_h("improvement", 1, H0=100) == [64]


def test_loss_trend():
    loss = [3.0, 2.8, 2.6, 2.7, 2.9, 3.0, 2.95, 2.9, 2.85, 2.8]
    # fell twice after e2 (x2); mixed; rose twice after e4 and e5 (/2, /2); mixed; fell twice after e7, e8
    assert run_h("loss", 10, H0=8, val_loss=loss) == [8, 8, 8, 16, 16, 8, 4, 4, 8, 16]
    # an unchanged loss is neither a rise nor a fall
    assert run_h("loss", 5, H0=16, val_loss=[1.0, 1.0, 2.0, 2.0, 2.0]) == [16] * 5


def test_loss_clamps():
    assert run_h("loss", 6, H0=8, val_loss=[1, 2, 3, 4, 5, 6]) == [8, 8, 8, 4, 4, 4]
    assert run_h("loss", 6, H0=8, val_loss=[6, 5, 4, 3, 2, 1], h_max=16) == [8, 8, 8, 16, 16, 16]
    assert run_h("loss", 1, H0=2) == [4]


def test_avg_loss_with_one_epoch_windows():
    # n_losses 3 -> half 1: latest loss against the one before
    loss = [2.0, 1.75, 1.875, 1.875, 1.5, 1.25]
    assert run_h("avg_loss", 6, H0=16, val_loss=loss) == [16, 16, 32, 16, 16, 32]


def test_avg_loss_with_two_epoch_windows():
    # n_losses 4 -> half 2, needs 4 finished epochs. Windows (before | latest):
    # after e3: 1.75 | 1.75 keep; e4: 1.625 | 1.5 x2; e5: 1.75 | 1.125 x2; e6: 1.5 | 1.375 x2 (clamped 64);
    # e7: 1.125 | 1.875 /2
    loss = [2.0, 1.5, 1.75, 1.75, 1.25, 1.0, 1.75, 2.0, 2.0]
    assert run_h("avg_loss", 9, H0=16, val_loss=loss, n_losses=4) == [16, 16, 16, 16, 16, 32, 64, 64, 32]


# ----------------------------------------------------------------------------- contract


HISTORY = (
    {"H": 8, "val_loss": 2.0, "val_acc": 0.3},
    {"H": 16, "val_loss": 1.8, "val_acc": 0.35},
    {"H": 32, "val_loss": 1.6, "val_acc": 0.34},
    {"H": 32, "val_loss": 1.7, "val_acc": 0.33},
)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategies_are_pure(name):
    cfg = load_cfg(name)
    history = copy.deepcopy(HISTORY)
    ctx = HContext(epoch=4, epochs=150, steps_per_epoch=176, H0=4, history=history)
    first = next_h(ctx, cfg)
    assert next_h(ctx, cfg) == first
    assert next_h(HContext(4, 150, 176, 4, copy.deepcopy(HISTORY)), cfg) == first
    assert history == HISTORY  # not mutated
    assert type(first) is int and first >= 1


@pytest.mark.parametrize("name", ["improvement", "loss", "avg_loss", "asc_linear", "desc_pow2"])
def test_bounded_strategies_stay_in_bounds(name):
    for epoch in range(len(HISTORY) + 1):
        h = next_h(HContext(epoch, 10, 100, 1, HISTORY[:epoch]), load_cfg(name, h_min=8, h_max=16))
        assert 8 <= h <= 16


def test_unknown_name_lists_the_allowed_ones():
    with pytest.raises(KeyError) as e:
        next_h(HContext(0, 10, 100, 4, ()), OmegaConf.create({"name": "bogus"}))
    message = str(e.value)
    assert "bogus" in message and "\n" not in message
    assert all(name in message for name in STRATEGIES)


def test_registry_matches_yaml_files():
    assert set(STRATEGIES) == {p.stem for p in YAMLS.glob("*.yaml")}


@pytest.mark.parametrize("path", sorted(YAMLS.glob("*.yaml")), ids=lambda p: p.stem)
def test_yaml_composes_to_the_schema_with_study_defaults(path):
    obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DynamicHConfig), OmegaConf.load(path)))
    assert isinstance(obj, DynamicHConfig) and obj.name == path.stem
    # the study's values: bounds 4..64, patience 4, n_losses 3, sigmoid 75 / 0.5, divisors 22 and 2
    assert (obj.h_min, obj.h_max, obj.patience, obj.n_losses) == (4, 64, 4, 3)
    assert (obj.midpoint, obj.steepness, obj.low_divisor, obj.high_divisor) == (75.0, 0.5, 22.0, 2.0)
