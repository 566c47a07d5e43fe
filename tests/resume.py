"""Kill a run in-process at a given step, resume it from its checkpoint, compare with an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpl.core import loop as train_mod
from dpl.run.job import run

FINAL = ("test_acc", "test_acc_best", "best_val_acc", "test_loss")


class Stop(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way catches it."""


def assert_resume_is_exact(make_cfg, overrides: list[str], tmp_path: Path, monkeypatch, stop_at: int) -> None:
    """Run ``overrides`` whole; run them again, stopped after global step ``stop_at`` (pick a step
    past a checkpoint, e.g. mid-period); resume the stopped job: the final metrics must be equal."""
    full = run(make_cfg(*overrides), out_dir=tmp_path / "full")
    original_fit = train_mod.Trainer.fit

    def fit_then_stop(self):
        def hook(trainer):
            if trainer.state.global_step == stop_at:
                raise Stop()
        self.on_step.append(hook)
        original_fit(self)

    monkeypatch.setattr(train_mod.Trainer, "fit", fit_then_stop)
    with pytest.raises(Stop):
        run(make_cfg(*overrides), out_dir=tmp_path / "cut")
    monkeypatch.setattr(train_mod.Trainer, "fit", original_fit)
    resumed = run(make_cfg(f"resume={tmp_path / 'cut'}"))
    for key in FINAL:
        assert resumed[key] == full[key], key
