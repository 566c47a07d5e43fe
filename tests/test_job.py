"""What a run shows while it trains: a bar over the steps of each epoch, one log line per epoch."""

from __future__ import annotations

import logging

from dpl.run.job import run
from dpl.run.recorder import h_summary


def test_progress_bars_and_one_log_line_per_epoch(make_cfg, tmp_path, capsys, caplog):
    # 1000 synthetic images -> 900 train / batch 32 = 29 steps per epoch (K=1)
    with caplog.at_level(logging.INFO, logger="dpl"):
        run(make_cfg("progress=true", "epochs=2"), out_dir=tmp_path / "job")
    err = capsys.readouterr().err.replace("\r", "\n")
    assert "epoch 1/2" in err and "epoch 2/2" in err
    assert "29/29" in err and "step" in err  # the step bar reached the end of an epoch
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]
    assert all("val_acc=" in line and "H=1" in line for line in lines)


def test_h_summary_is_the_h_trained_with():
    history = [{"H": 4}, {"H": 8}, {"H": 16}, {"H": 8}]
    assert h_summary(history) == {"H_first": 4.0, "H_last": 8.0, "H_mean": 9.0}
    assert h_summary([]) == {}
