"""dpl.report.budget: the first epoch at a target accuracy and what was spent by then, on hand-made histories."""

from __future__ import annotations

import math

from dpl.report.budget import final_value, to_target

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
