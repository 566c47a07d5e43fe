"""dpl.report.budget: the first epoch at a target accuracy and what was spent by then, on hand-made histories."""

from __future__ import annotations

import math

import pytest

from dpl.report.budget import final_value, reaches, target_text, to_target

HISTORY = {"val_acc": [(1, 0.20), (2, 0.35), (3, 0.33), (4, 0.50)],
           "samples_total": [(1, 1000.0), (2, 2000.0), (3, 3000.0), (4, 4000.0)],
           "sync_rounds_total": [(1, 4.0), (2, 8.0), (3, 12.0), (4, 16.0)],
           "comm_bytes_total": [(1, 10.0), (2, 20.0), (3, 30.0), (4, 40.0)],
           "modelled_time_s": [(1, 1.5), (2, 3.0), (3, 4.5), (4, 6.0)]}


def test_first_epoch_at_the_target_and_the_budgets_at_its_end():
    assert to_target(HISTORY, 0.35) == {"epoch": 2.0, "samples_total": 2000.0, "sync_rounds_total": 8.0,
                                        "comm_bytes_total": 20.0, "modelled_time_s": 3.0}
    assert to_target(HISTORY, 0.34)["epoch"] == 2.0  # reached at 2 even though epoch 3 falls below again
    assert to_target(HISTORY, 0.0)["epoch"] == 1.0


def test_a_target_never_reached_is_none_and_a_missing_budget_nan():
    assert to_target(HISTORY, 0.51) is None
    assert to_target({}, 0.1) is None
    spent = to_target({"val_acc": [(1, 0.4)]}, 0.3)
    assert spent["epoch"] == 1.0 and all(math.isnan(spent[k]) for k in spent if k != "epoch")


def test_final_value_is_the_last_epochs():
    assert final_value(HISTORY) == 0.50 and math.isnan(final_value({}))


def test_a_bits_per_byte_target_is_reached_from_above():
    """val_bpb (and val_loss): lower is better, so the target is reached at the first epoch at or below it."""
    history = {"val_bpb": [(1, 4.8), (2, 4.1), (3, 4.2), (4, 3.9)], "modelled_time_s": [(e, 2.0 * e) for e in range(1, 5)]}
    spent = to_target(history, 4.1, "val_bpb")
    assert spent["epoch"] == 2.0 and spent["modelled_time_s"] == 4.0
    assert to_target(history, 3.8, "val_bpb") is None
    assert reaches(3.9, 4.0, "val_bpb") and not reaches(3.9, 4.0) and reaches(0.5, 0.4)
    assert target_text(3.9123, "val_bpb") == "3.912 validation bits per byte"
    assert target_text(0.4123) == "41.23 % validation accuracy"


def test_the_natural_bits_per_byte_target_is_the_highest_of_the_groups_best():
    from dpl.report.fetch import RunRecord
    from dpl.report.tables import budget_rows, natural_target

    def run(h: str, seed: int, curve: list[float]) -> RunRecord:
        return RunRecord(run_id=f"{h}{seed}", status="FINISHED", params={"H": h, "seed": str(seed)}, metrics={},
                         history={"val_bpb": list(enumerate(curve, 1)),
                                  "modelled_time_s": [(e, float(e)) for e in range(1, len(curve) + 1)]})

    runs = [run("1", 0, [5.0, 4.0, 3.5]), run("1", 1, [5.0, 4.0, 3.7]), run("8", 0, [5.0, 4.4, 4.2]),
            run("8", 1, [5.0, 4.6, 4.4])]
    target, why = natural_target(runs, {"H": "H"}, "val_bpb")
    assert target == pytest.approx(4.3) and why.startswith("the highest of the groups' best mean validation bits")
    rows = budget_rows(runs, {"H": "H"}, target, "val_bpb")
    assert [(r["H"], r["reached"], r["modelled_time_s_mean"]) for r in rows] == [("1", 2, 2.0), ("8", 1, 3.0)]
    assert rows[0]["target_metric"] == "val_bpb" and rows[0]["target_val_bpb"] == target
