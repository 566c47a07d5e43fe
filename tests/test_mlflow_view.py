"""What MLflow's runs table shows of a run: the params that tell runs apart, bytes in MiB."""

from __future__ import annotations

import pytest

from dpl.run.recorder import in_mib
from dpl.tracking.params import VIEW_METRICS, VIEW_PARAMS, flatten_config
from tests.conftest import compose_cfg


def test_the_view_s_params_are_keys_of_a_run():
    params = flatten_config(compose_cfg("batch_size=16", "dataset.num_train=300", "dataset.noise=0.5"))
    assert [params[k] for k in VIEW_PARAMS] == ["16", "300", "0.5"]  # each a param, so a column can show it


def test_bytes_are_also_recorded_in_mib():
    record = {"comm_bytes": 95755440.0, "comm_bytes_total": 2 ** 21, "peak_sync_bytes": 0.0, "val_acc": 0.5}
    assert in_mib(record) == {"comm_mib": pytest.approx(91.32, abs=0.01), "comm_mib_total": 2.0, "peak_sync_mib": 0.0}
    assert set(VIEW_METRICS) <= set(in_mib({"comm_bytes_total": 1.0}))


def test_dpl_s_runs_view_shows_batch_size_data_size_and_mib():
    from dpl.tracking.store import VIEW_COLUMNS

    wanted = {f"params.`{k}`" for k in VIEW_PARAMS} | {f"metrics.`{m}`" for m in VIEW_METRICS}
    assert wanted <= set(VIEW_COLUMNS)
    assert "metrics.`comm_bytes_total`" not in VIEW_COLUMNS  # 95755440 is what a reader could not read
