"""Dynamic-H strategies: the study's own H sequences (golden), hand-computed sequences, bounds, purity, configs.

Every expected sequence below is played as the Trainer plays it (H chosen before each epoch from the
finished epochs' records), so it includes the study's one-epoch lag: epoch 0 runs with the configured H
and epoch e >= 1 with the strategy evaluated at e - 1.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dpl.config.store import option_schema
from dpl.core.dynamic_h import STRATEGIES, HContext, next_h
from dpl.errors import ConfigError
from tests.conftest import compose_cfg

YAMLS = Path(__file__).resolve().parent.parent / "conf" / "dynamic_h"
# The H that the study's own dynamic-H functions use in every epoch, run in the study's own loop, for the 9
# strategies x steps per epoch 352/176/88 x H0 4/8 x three validation curves over 150 epochs (162 cases).
GOLDEN = Path(__file__).resolve().parent / "data" / "dynamic_h_golden.json.gz"


def load_cfg(name: str, **overrides):
    """The strategy's YAML merged into the schema, as Hydra composes it, plus overrides."""
    return OmegaConf.merge(compose_cfg(f"dynamic_h={name}", tiny=False).dynamic_h, overrides)


def play(cfg, epochs: int, H0: int, steps_per_epoch: int, val_loss, val_acc) -> list[int]:
    """Play a run as the trainer does: H chosen before each epoch from the finished epochs' records."""
    history, hs = [], []
    for epoch in range(epochs):
        H = next_h(HContext(epoch=epoch, epochs=epochs, steps_per_epoch=steps_per_epoch, H0=H0,
                            history=tuple(history)), cfg)
        hs.append(H)
        history.append({"epoch": epoch, "H": H, "val_loss": val_loss[epoch], "val_acc": val_acc[epoch]})
    return hs


def run_h(name: str, epochs: int, H0: int = 8, steps_per_epoch: int = 100, val_loss=None, val_acc=None,
          **overrides) -> list[int]:
    return play(load_cfg(name, **overrides), epochs, H0, steps_per_epoch,
                val_loss or [1.0] * epochs, val_acc or [0.5] * epochs)


# ----------------------------------------------------------------------------- the study's own sequences


def _golden_cases() -> list[dict]:
    with gzip.open(GOLDEN, "rt") as f:
        return json.load(f)["cases"]


CASES = _golden_cases()


def test_golden_fixture_covers_every_study_strategy():
    assert len(CASES) == 162
    assert {c["strategy"] for c in CASES} == set(STRATEGIES) - {"constant"}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['strategy']}-S{c['steps_per_epoch']}-H{c['H0']}-{c['curve']}")
def test_matches_the_study_in_every_epoch(case):
    cfg = load_cfg(case["strategy"])  # the shipped YAML: its defaults are the study's reported settings
    assert cfg.get("n_losses", case["n_losses"]) == case["n_losses"]  # the loss strategies' window
    hs = play(cfg, case["epochs"], case["H0"], case["steps_per_epoch"], case["val_loss"], case["val_acc"])
    first_bad = next((e for e, (a, b) in enumerate(zip(hs, case["H_per_epoch"])) if a != b), None)
    assert hs == case["H_per_epoch"], f"first differing epoch: {first_bad}"


# ----------------------------------------------------------------------------- schedules


def test_constant_is_the_configured_h():
    assert run_h("constant", 4, H0=6) == [6, 6, 6, 6]


def test_linear_lags_one_epoch():
    # f(e) = floor((floor(120 e / 4) + 1) / 2) + 4 over E = 5: f(0..3) = 4, 19, 34, 49; epoch 0 is H0
    assert run_h("asc_linear", 5, H0=8) == [8, 4, 19, 34, 49]
    # 1 - e/4: 120 -> 64, 90 -> 49, 60 -> 34, 30 -> 19
    assert run_h("desc_linear", 5, H0=8) == [8, 64, 49, 34, 19]
    assert run_h("asc_linear", 1, H0=8) == [8] and run_h("desc_linear", 2, H0=8) == [8, 64]


def test_linear_rounds_half_up_on_other_bounds():
    # h_min 1, h_max 6, E = 3: f(1) = floor((floor(10 * 0.5) + 1) / 2) + 1 = 4 (2.5 rounds up; round() gives 3)
    assert run_h("asc_linear", 3, H0=2, h_min=1, h_max=6) == [2, 1, 4]
    assert run_h("desc_linear", 3, H0=2, h_min=1, h_max=6) == [2, 6, 4]


def test_pow2_rounded_stages():
    # E = 10, 8 e / 9 for e = 0..8: 0, .89, 1.8, 2.7, 3.6, 4.4, 5.3, 6.2, 7.1 -> k = (floor + 1) // 2 = 0 0 1 1 2 2 3 3 4
    assert run_h("asc_pow2", 10, H0=8) == [8, 4, 4, 8, 8, 16, 16, 32, 32, 64]
    # 8 (1 - e / 9): 8, 7.1, 6.2, 5.3, 4.4, 3.6, 2.7, 1.8, .89 -> k = 4 4 3 3 2 2 1 1 0
    assert run_h("desc_pow2", 10, H0=8) == [8, 64, 64, 32, 32, 16, 16, 8, 8, 4]


def test_pow2_first_and_last_stage_are_half_length():
    # 150 epochs: k = 0 while 8 e / 149 < 1 (e <= 18), 1 while < 3 (e <= 55), 2 while < 5 (e <= 93),
    # 3 while < 7 (e <= 130), 4 up to e = 148; plus epoch 0 at H0 = 4
    hs = run_h("asc_pow2", 150, H0=4)
    assert [hs.count(h) for h in (4, 8, 16, 32, 64)] == [1 + 19, 37, 38, 37, 18]
    assert hs == sorted(hs)


def test_pow2_on_other_bounds():
    # h_min 3, h_max 20: doublings of 3 up to 12 (n = 2); 4 e / 4 for e = 0..3: k = 0, 1, 1, 2
    assert run_h("asc_pow2", 5, H0=5, h_min=3, h_max=20) == [5, 3, 6, 6, 12]


def test_sigmoid_clamps_rounds_and_fits_the_epoch():
    # 352 steps: lo 16, hi 176. Epoch 1: f(0) = 16 + 160 sigma(-37.5) -> 16 = 352 / 22 exactly.
    # Epoch 75: f(74) = 16 + 160 sigma(-0.5) = 76.41 -> 76: 4 syncs leave 48 (13.6 % > 5 %) -> floor(352 / 4) = 88.
    # Epoch 76: f(75) = 96: 3 syncs leave 64 -> floor(352 / 3) = 117. Last: 176.
    hs = run_h("sigmoid", 150, H0=4, steps_per_epoch=352)
    assert (hs[0], hs[1], hs[75], hs[76], hs[149]) == (4, 16, 88, 117, 176)
    # The snap is why the study's sigmoid is not monotone. Epoch 77: f(76) = 16 + 160 sigma(0.5) = 115.6 -> 116:
    # 3 syncs leave 4 steps (1.1 %) -> 4 syncs, ceil(352 / 4) = 88. Epoch 82: f(81) = 168.4 -> 168: 2 syncs
    # leave 16 (4.5 %) -> 3 syncs, ceil(352 / 3) = 118, while epoch 78 already had 176.
    assert (hs[77], hs[78], hs[82]) == (88, 176, 118)


def test_sigmoid_rounds_half_to_even():
    # lo = 10 / 10 = 1, hi = 10 / 2.5 = 4; at the midpoint H = 2.5 -> round() = 2, 5 syncs, no remainder.
    # (Half up would give 3: 3 syncs leave 1 step = 10 % > 5 %, floor(10 / 3) = 3.)
    assert run_h("sigmoid", 2, H0=7, steps_per_epoch=10, midpoint=0, steepness=1.0, low_divisor=10,
                 high_divisor=2.5) == [7, 2]


@pytest.mark.parametrize("low_divisor,snap,expected", [
    (6.25, 0.05, 25),  # lo 16, hi 50, H 33: 3 syncs leave 1 step (1 % <= 5 %) -> 4 syncs, ceil(100 / 4) = 25
    (6.25, 0.0, 33),  # snap off: floor(100 / 3) = 33
    (10, 0.05, 33),  # lo 10, hi 50, H 30: 3 syncs leave 10 (10 % > 5 %) -> floor(100 / 3) = 33
])
def test_sigmoid_snap(low_divisor, snap, expected):
    assert run_h("sigmoid", 2, H0=7, steps_per_epoch=100, midpoint=0, steepness=1.0, low_divisor=low_divisor,
                 snap=snap) == [7, expected]


def test_sigmoid_with_fewer_steps_than_the_divisor_is_at_least_one():
    # lo = 10 / 22 < 1: round gives 0, the clamp gives lo, the fit gives H < 1 -> dpl's floor of 1
    assert run_h("sigmoid", 2, H0=4, steps_per_epoch=10) == [4, 1]


def test_rev_cosine():
    # 220 steps: lo 10, hi 110, E = 4: f(e) = 110 - 50 (1 + cos(pi e / 4)):
    # f(0) = 10 (22 syncs); f(1) = 24.6 -> 25: 8 syncs leave 20 (9 %) -> floor(220 / 8) = 27;
    # f(2) = 60: 3 syncs leave 40 -> floor(220 / 3) = 73
    assert run_h("rev_cosine", 4, H0=8, steps_per_epoch=220) == [8, 10, 27, 73]
    assert run_h("rev_cosine", 1, H0=8, steps_per_epoch=220) == [8]


# ----------------------------------------------------------------------------- adaptive


def test_improvement_doubles_on_new_best_and_halves_after_every_stale_epoch_past_patience():
    acc = [0.10, 0.20, 0.20, 0.15, 0.18, 0.19, 0.19, 0.30, 0.25, 0.26]
    # stale count after each epoch: 0 0 1 2 3 4 5 0 1 (a tie is not a new best);
    # 0 -> double, >= 4 -> halve, else keep
    assert run_h("improvement", 10, H0=8, val_acc=acc) == [8, 16, 32, 32, 32, 32, 16, 8, 16, 16]
    # patience 2: counts 0 1 2 3 -> double, keep, halve, halve
    assert run_h("improvement", 5, H0=16, val_acc=[0.5, 0.4, 0.4, 0.4, 0.4], patience=2) == [16, 32, 32, 16, 8]


def test_improvement_bounds_and_the_zero_start():
    assert run_h("improvement", 5, H0=4, val_acc=[0.1, 0.2, 0.3, 0.4, 0.5], h_max=16) == [4, 8, 16, 16, 16]
    # the best starts at 0, so an accuracy of 0 is stale from the first epoch: counts 1 2 3 4 5 6 7 8
    assert run_h("improvement", 9, H0=64, val_acc=[0.0] * 9) == [64, 64, 64, 64, 32, 16, 8, 4, 4]


def test_improvement_guards_the_move_not_the_result():
    # the study halves only if H > h_min and doubles only if H < h_max, without clamping the result:
    # an H0 off the h_min * 2^k ladder can pass h_max (48 < 64 -> 96)
    assert run_h("improvement", 5, H0=6, val_acc=[0.1, 0.2, 0.3, 0.4, 0.5]) == [6, 12, 24, 48, 96]


def test_loss_needs_more_than_n_losses_and_three_strict_moves():
    loss = [3.0, 2.8, 2.6, 2.7, 2.9, 3.0, 2.95, 2.9, 2.85, 2.8, 2.7]
    # 3 losses fell after e2 but only 3 exist: no move. After e3: 2.8 2.6 2.7 mixed; e4: rose -> /2;
    # e5: rose, H = 4 = h_min -> kept; e6: mixed; e7, e8, e9: fell -> x2 each
    assert run_h("loss", 11, H0=8, val_loss=loss) == [8, 8, 8, 8, 8, 4, 4, 4, 8, 16, 32]
    # an unchanged loss is neither a rise nor a fall
    assert run_h("loss", 6, H0=16, val_loss=[1.0, 1.0, 2.0, 2.0, 2.0, 2.0]) == [16] * 6


def test_loss_bounds():
    assert run_h("loss", 6, H0=8, val_loss=[1, 2, 3, 4, 5, 6]) == [8, 8, 8, 8, 4, 4]
    assert run_h("loss", 6, H0=8, val_loss=[6, 5, 4, 3, 2, 1], h_max=16) == [8, 8, 8, 8, 16, 16]


def test_loss_trend_and_n_losses_are_configurable():
    # n_losses 2: acts from 3 losses on; trend 2: one strict fall suffices
    assert run_h("loss", 5, H0=8, val_loss=[1.0, 2.0, 1.5, 1.0, 2.0], n_losses=2, trend=2) == [8, 8, 8, 16, 32]


def test_avg_loss_with_the_studys_ten_losses():
    loss = [2.0] * 6 + [1.5] * 5 + [3.0] * 3
    # after e10 (11 losses): mean(e6..e10) 1.5 < mean(e1..e5) 2.0 -> x2; after e11: 1.8 < 1.9 -> x2;
    # after e12: 2.1 > 1.8 -> /2
    assert run_h("avg_loss", 14, H0=8, val_loss=loss) == [8] * 11 + [16, 32, 16]


def test_avg_loss_with_two_epoch_windows():
    # n_losses 4: acts from 5 losses on. Windows (before | latest):
    # after e4: 1.625 | 1.5 x2; e5: 1.75 | 1.125 x2; e6: 1.5 | 1.375, H = 64 = h_max -> kept; e7: 1.125 | 1.875 /2
    loss = [2.0, 1.5, 1.75, 1.75, 1.25, 1.0, 1.75, 2.0, 2.0]
    assert run_h("avg_loss", 9, H0=16, val_loss=loss, n_losses=4) == [16, 16, 16, 16, 16, 32, 64, 64, 32]


def test_avg_loss_rejects_an_odd_window():
    with pytest.raises(ConfigError, match="dynamic_h.n_losses=3") as e:
        OmegaConf.to_object(load_cfg("avg_loss", n_losses=3))
    assert "\n" not in str(e.value)


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


@pytest.mark.parametrize("name", ["improvement", "loss", "avg_loss", "asc_linear", "desc_linear", "asc_pow2",
                                  "desc_pow2"])
def test_bounded_strategies_stay_in_bounds(name):
    # waves that rise and fall for several epochs; H0 = h_min, so every halving / doubling lands on 8 or 16
    loss = [1.0 + 0.5 * math.sin(e / 3) for e in range(40)]
    acc = [0.5 + 0.3 * math.sin(e / 5) + 0.005 * e for e in range(40)]
    window = {"n_losses": 4} if "loss" in name else {}  # only the loss strategies have a window
    hs = play(load_cfg(name, h_min=8, h_max=16, **window), 40, 8, 100, loss, acc)
    assert set(hs) <= {8, 16} or (name.endswith("linear") and all(8 <= h <= 16 for h in hs))
    assert len(set(hs)) > 1  # the curve does move H


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
    schema = option_schema("dynamic_h", path.stem)
    obj = OmegaConf.to_object(compose_cfg(f"dynamic_h={path.stem}", tiny=False).dynamic_h)
    assert type(obj) is schema and obj.name == path.stem
    # the study's values: bounds 4..64, stale count c > 3, loss after more than 3 losses with 3 strict moves,
    # avg_loss over 10 (its reported runs), sigmoid 75 / 0.5, divisors 22 and 2, the 5 % snap
    study = {"h_min": 4, "h_max": 64, "patience": 4, "trend": 3, "n_losses": 10 if obj.name == "avg_loss" else 3,
             "midpoint": 75.0, "steepness": 0.5, "low_divisor": 22.0, "high_divisor": 2.0, "snap": 0.05}
    assert {k: getattr(obj, k) for k in study if hasattr(obj, k)} == {k: v for k, v in study.items() if hasattr(obj, k)}
