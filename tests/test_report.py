"""``python -m dpl.report`` over real runs: its numbers are MLflow's, diverged runs are listed, not averaged."""

from __future__ import annotations

import csv
import itertools
import math
import os
import re
import socket
import sqlite3
import statistics
import time

import pytest
from scipy import stats as scipy_stats

from dpl.report.cli import main, safe_folder_name
from dpl.report.fetch import RunRecord, fetch_runs, group_columns, group_runs, mean_curve
from dpl.report.tables import (
    budget_rows,
    compare_groups,
    markdown,
    md_escape,
    pareto_front,
    summarise,
    write_csv_table,
)
from dpl.run.job import run
from dpl.tracking.store import mlflow_client, tag_filter
from tests.conftest import compose_cfg

BASE = ["dataset=synthetic", "dataset.num_train=200", "dataset.num_test=50", "epochs=2", "batch_size=32",
        "progress=false", "device=cpu", "logger=mlflow", "logger.plots=false", "logger.experiment=rep", "sweep=rep"]
JOBS = {  # name -> overrides: 3 seeds x 2 configs (H=2, H=4), a dynamic strategy, a diverging lr
    **{f"h{h}_seed{s}": ["method=localsgd", "K=2", f"H={h}", f"seed={s}"] for h in (2, 4) for s in range(3)},
    "dynamic": ["method=localsgd", "K=2", "H=2", "dynamic_h=loss", "dynamic_h.h_min=1"],
    "diverged": ["method=centralized", "lr=1e9"],
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Run the jobs in this process into one sqlite store; return (uri, {name: result}, report dir)."""
    tmp = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    results = {}
    for name, overrides in JOBS.items():
        cfg = compose_cfg(*BASE, f"logger.tracking_uri={uri}", f"results_csv={tmp / 'results.csv'}", *overrides,
                          tiny=False)
        results[name] = run(cfg, out_dir=tmp / name)
    out = tmp / "out"
    assert main(["--experiment", "rep", "--tracking-uri", uri, "--out", str(out)]) == 0
    return uri, results, out


def _log_run(uri, experiment, tags, metrics=None, status="FINISHED", reason=None, first_step=0, **cfg):
    """One fake job run in the store at ``uri``, through dpl's own logger: params from ``cfg``,
    ``metrics`` as {key: value or [value per epoch, from step ``first_step``]}; no model is trained."""
    from omegaconf import OmegaConf

    from dpl.tracking.loggers import MlflowLogger

    node = OmegaConf.create({**cfg, "logger": {"tracking_uri": uri, "experiment": experiment, "run_name": None}})
    logger = MlflowLogger(node.logger)
    logger.start(node, tags)
    for key, values in (metrics if metrics is not None else {"test_acc": 0.5}).items():
        for step, value in enumerate(values if isinstance(values, list) else [values], start=first_step):
            logger.log_metrics({key: value}, step=step)
    logger.finish(status, reason)


def _mlflow_runs(uri):
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name("rep")
    return client.search_runs([exp.experiment_id], max_results=100)


def _rows(out, name="summary.csv"):
    with open(out / name, newline="") as f:
        return list(csv.DictReader(f))


def _cell(rows, **key):
    (row,) = [r for r in rows if all(r[k] == v for k, v in key.items())]
    return row


def test_divergence_fails_the_run_with_its_reason_and_returns_no_objective(store):
    uri, results, _ = store
    assert results["diverged"]["diverged"] is True and math.isnan(results["diverged"]["best_val_acc"])
    (failed,) = [r for r in _mlflow_runs(uri) if r.info.status == "FAILED"]
    assert failed.data.params["lr"] == "1000000000.0"
    assert "training loss is" in failed.data.tags["failure_reason"]


def test_table_numbers_are_mlflow_numbers(store):
    uri, _, out = store
    rows = _rows(out)
    assert len(rows) == 4  # (centralized), (K=2 H=2 constant, 3 seeds), (K=2 H=2 loss), (K=2 H=4, 3 seeds)
    by_seed = {r.data.params["seed"]: r for r in _mlflow_runs(uri)
               if r.data.params["H"] == "2" and r.data.params["dynamic_h.name"] == "constant"}
    cell = _cell(rows, method="localsgd", H="2", dynamic_h="constant")
    assert cell["n"] == "3" and cell["failed"] == "0"
    for metric in ("test_acc", "best_val_acc", "test_loss", "comm_bytes_total", "samples_total", "modelled_time_s"):
        values = [by_seed[s].data.metrics[metric] for s in ("0", "1", "2")]
        mean, sd = statistics.fmean(values), statistics.stdev(values)
        half = scipy_stats.t.ppf(0.975, 2) * sd / math.sqrt(3)
        assert float(cell[f"{metric}_mean"]) == pytest.approx(mean, rel=1e-12)
        assert float(cell[f"{metric}_std"]) == pytest.approx(sd, rel=1e-9, abs=1e-12)
        if sd:
            assert float(cell[f"{metric}_ci95_lo"]) == pytest.approx(mean - half)
            assert float(cell[f"{metric}_ci95_hi"]) == pytest.approx(mean + half)
    single = _cell(rows, dynamic_h="loss")  # one run: no std, no interval
    (dyn,) = [r for r in _mlflow_runs(uri) if r.data.params["dynamic_h.name"] == "loss"]
    assert single["n"] == "1" and float(single["test_acc_mean"]) == dyn.data.metrics["test_acc"]
    assert single["test_acc_std"] == single["test_acc_ci95_lo"] == single["test_acc_ci95_hi"] == ""
    diverged = _cell(rows, method="centralized")
    assert (diverged["n"], diverged["failed"], diverged["test_acc_mean"]) == ("0", "1", "")
    per_run = _rows(out, "runs.csv")
    assert len(per_run) == len(JOBS) and {r["seed"] for r in per_run} == {"0", "1", "2"}


def test_markdown_shows_mean_pm_ci_half_width_and_n_and_lists_the_failure(store):
    uri, _, out = store
    text = (out / "report.md").read_text()
    cell = _cell(_rows(out), method="localsgd", H="2", dynamic_h="constant")
    mean, lo, hi = (float(cell[f"test_acc_{k}"]) for k in ("mean", "ci95_lo", "ci95_hi"))
    assert f"| {100 * mean:.2f} ± {100 * (hi - lo) / 2:.2f} (3) |" in text
    single = _cell(_rows(out), dynamic_h="loss")
    assert f"| {100 * float(single['test_acc_mean']):.2f} ± ? (1) |" in text  # one seed: no interval, not ± 0
    assert "95 % CI, Student's t with n−1 df" in text
    assert "7 finished, 1 failed" in text and "diverged" in text
    (failed,) = [r for r in _mlflow_runs(uri) if r.info.status == "FAILED"]
    group = "dataset=synthetic method=centralized K=1 H=1 dynamic_h=constant optimizer=sgdm batch_size=32"
    assert f"| {failed.info.run_id} | {group} | FAILED | {failed.data.tags['failure_reason']} |" in text


def test_figures_are_written(store):
    _, _, out = store
    for name in ("acc_vs_H", "acc_vs_rounds", "learning_curves", "h_over_epochs", "pareto", "acc_vs_time",
                 "budget_to_target", "time_vs_bandwidth"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not list(out.glob(".*.tmp")) and not list(out.glob(".*png"))  # no temp files left behind


def test_comparisons_against_the_default_baseline_equal_scipy(store):
    uri, _, out = store
    rows = _rows(out, "comparisons.csv")
    runs = {(r.data.params["H"], r.data.params["dynamic_h.name"], r.data.params["seed"]): r
            for r in _mlflow_runs(uri) if r.data.params["method.name"] == "localsgd"}
    # the sweep's reference settings (docs/reports.md): dynamic_h=constant and the smallest H, 2; every group
    # with a finished run agrees with it on the other columns (the centralized one diverged: not a baseline)
    assert {r["baseline"] for r in rows} == {"dataset=synthetic method=localsgd K=2 H=2 dynamic_h=constant "
                                             "optimizer=sgdm batch_size=32"}
    for metric in ("test_acc", "best_val_acc"):
        (h4,) = [r for r in rows if r["metric"] == metric and "H=4" in r["group"]]
        a = [runs[("4", "constant", s)].data.metrics[metric] for s in "012"]
        b = [runs[("2", "constant", s)].data.metrics[metric] for s in "012"]
        assert h4["test"] == "paired" and (h4["n"], h4["n_baseline"]) == ("3", "3")  # the same three seeds
        assert float(h4["delta_mean"]) == pytest.approx(statistics.fmean(a) - statistics.fmean(b))
        if len({x - y for x, y in zip(a, b)}) > 1:
            assert float(h4["p_value"]) == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue)
            assert h4["p_holm"] == h4["p_value"]  # the dynamic group cannot be tested: a family of one
        (dyn,) = [r for r in rows if r["metric"] == metric and "dynamic_h=loss" in r["group"]]
        assert (dyn["test"], dyn["p_value"], dyn["n"]) == ("", "", "1")  # one run: a difference, no test
    text = (out / "report.md").read_text()
    assert "## Differences to the baseline" in text and "too few runs to test" in text


def test_budget_to_target_equals_the_numbers_in_history_csv(store):
    _, results, out = store
    histories = {name: _rows(out.parent / name, "history.csv") for name in results if name != "diverged"}
    per_epoch: dict[str, dict[int, list[float]]] = {}
    for name, rows in histories.items():
        for epoch, row in enumerate(rows, start=1):
            per_epoch.setdefault(name.split("_seed")[0], {}).setdefault(epoch, []).append(float(row["val_acc"]))
    # the default: the lowest of the groups' best mean validation accuracy (each group's mean curve reaches it)
    target = min(max(statistics.fmean(v) for v in curve.values()) for curve in per_epoch.values())
    budget = _rows(out, "budget.csv")
    assert [float(r["target_val_acc"]) for r in budget] == pytest.approx([target] * len(budget))
    for h in (2, 4):
        spent = []
        for s in range(3):
            rows = histories[f"h{h}_seed{s}"]
            i = next((i for i, r in enumerate(rows) if float(r["val_acc"]) >= target), None)  # by hand
            if i is not None:  # a seed below its group's mean may never reach the target: counted, not averaged
                spent.append({"epoch": i + 1, **{k: float(rows[i][k]) for k in (
                    "samples_total", "sync_rounds_total", "comm_bytes_total", "modelled_time_s")}})
        row = _cell(budget, H=str(h), dynamic_h="constant")
        assert (row["n"], row["reached"]) == ("3", str(len(spent))) and spent
        per_run = [r for r in _rows(out, "runs.csv") if r["H"] == str(h) and r["dynamic_h"] == "constant"]
        assert sorted(float(r["to_target_epoch"]) for r in per_run if r["to_target_epoch"]) == \
            sorted(x["epoch"] for x in spent)
        for key in spent[0]:
            assert float(row[f"{key}_mean"]) == pytest.approx(statistics.fmean(x[key] for x in spent)), key
    assert "## Budget to reach" in (out / "report.md").read_text()


def test_time_to_target_at_the_runs_own_bandwidth_is_the_budget_tables_modelled_time(store):
    _, _, out = store
    budget, bandwidth = _rows(out, "budget.csv"), _rows(out, "time_vs_bandwidth.csv")
    assert sorted({float(r["bandwidth_gbps"]) for r in bandwidth}) == [1.0, 10.0, 100.0]
    for h in (2, 4):
        spent = _cell(budget, H=str(h), dynamic_h="constant")
        at = {float(r["bandwidth_gbps"]): r for r in bandwidth if r["H"] == str(h) and r["dynamic_h"] == "constant"}
        assert at[10.0]["reached"] == spent["reached"]  # the runs logged at 10 Gb/s (network.bandwidth_gbps)
        assert float(at[10.0]["time_s_mean"]) == pytest.approx(float(spent["modelled_time_s_mean"]), rel=1e-9)
        times = [float(at[b]["time_s_mean"]) for b in (1.0, 10.0, 100.0)]
        # H=4 spans two epochs of 2 steps: a target reached in the first is reached before any sync
        assert times == sorted(times, reverse=True) and (h == 4 or times[0] > times[1] > times[2])


def test_time_vs_bandwidth_hand_computed_and_legible():
    from dpl.report.figures import fig_time_vs_bandwidth
    from dpl.report.tables import bandwidth_rows
    from tests.legible import assert_legible

    def run(method, seed, compute, latency, transfer, overlap=(0.0, 0.0, 0.0), accs=(0.2, 0.6)):
        ol, ot, ow = overlap  # the overlapped syncs' latency and transfer, the compute they overlap
        per_epoch = {"val_acc": accs, "compute_time_s": compute, "comm_time_s": latency + transfer,
                     "comm_transfer_s": transfer, "overlap_latency_s": ol, "overlap_transfer_s": ot,
                     "overlap_window_s": ow}
        history = {k: [(e + 1, v if k == "val_acc" else float(v)) for e, v in
                       enumerate(v if k == "val_acc" else [v] * len(accs))] for k, v in per_epoch.items()}
        return RunRecord(run_id=f"{method}{seed}", status="FINISHED", history=history, metrics={"test_acc": 0.6},
                         params={"method.name": method, "K": "4", "seed": str(seed), "network.bandwidth_gbps": "10"})

    runs = [run("centralized", s, 1.0, 0.5, 1.5) for s in (0, 1)] + \
        [run("streaming_diloco", s, 1.0, 0.1, 0.2, overlap=(0.05, 0.1, 0.6)) for s in (0, 1)] + \
        [run("diloco", 0, 1.0, 0.1, 0.2), run("diloco", 1, 1.0, 0.1, 0.2, accs=(0.2, 0.3))]  # one never gets there
    rows = bandwidth_rows(runs, group_columns(runs), target=0.5, bandwidths=(1.0, 10.0, 100.0))
    got = {(r["method"], r["bandwidth_gbps"]): r for r in rows}
    # two epochs each: compute + latency + transfer x 10 / bandwidth - min(overlapped, window)
    assert got["centralized", 1.0]["time_s_mean"] == pytest.approx(2 * (1.0 + 0.5 + 15.0))
    assert got["centralized", 100.0]["time_s_mean"] == pytest.approx(2 * (1.0 + 0.5 + 0.15))
    assert got["streaming_diloco", 1.0]["time_s_mean"] == pytest.approx(2 * (1.0 + 0.1 + 2.0 - 0.6))  # capped
    assert got["streaming_diloco", 100.0]["time_s_mean"] == pytest.approx(2 * (1.0 + 0.1 + 0.02 - 0.06))
    assert (got["diloco", 10.0]["reached"], got["diloco", 10.0]["n"]) == (1, 2)
    old = RunRecord(run_id="old", status="FINISHED", params={"method.name": "slowmo", "K": "4", "seed": "0"},
                    metrics={}, history={"val_acc": [(1, 0.9)]})  # logged before the fields: left out
    assert {r["method"] for r in bandwidth_rows([*runs, old], group_columns([*runs, old]), 0.5)} == \
        {"centralized", "streaming_diloco", "diloco"}
    fig = fig_time_vs_bandwidth(rows, list(group_columns(runs)))
    assert fig.axes[0].get_xscale() == "log" and fig.axes[0].get_yscale() == "log"
    assert_legible(fig, "time_vs_bandwidth.png")
    labels = {t.get_text() for leg in fig.legends for t in leg.get_texts()}
    assert any("reached 1 of 2" in label for label in labels)


def test_baseline_and_target_options(store, tmp_path, capsys):
    uri, _, _ = store
    out = tmp_path / "o"
    assert main(["--experiment", "rep", "--tracking-uri", uri, "--out", str(out), "--baseline", "H=4",
                 "--target-acc", "1.0"]) == 0
    rows = _rows(out, "comparisons.csv")
    assert rows and all("H=4" in r["baseline"] and "H=4" not in r["group"] for r in rows)
    budget = _rows(out, "budget.csv")  # nobody reaches 100 %: counted, not dropped
    assert budget and all(r["reached"] == "0" and r["epoch_mean"] == "" for r in budget)
    for bad in (["--baseline", "nope=1"], ["--baseline", "H=99"], ["--target-acc", "7"], ["--bandwidths", "1,0"],
                ["--bandwidths", "fast"]):
        capsys.readouterr()
        code = _exit_code(lambda: main(["--experiment", "rep", "--tracking-uri", uri, "--out", str(out), *bad]))  # noqa: B023
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "error" in err[0], (bad, err)


def _exit_code(call) -> int:
    try:
        return call()
    except SystemExit as e:  # argparse's own errors (usage line + error line go to stderr)
        return e.code


def test_sweep_tag_selects_the_same_runs(store):
    uri, _, _ = store
    client = mlflow_client(uri)
    by_tag = fetch_runs(client, sweep="rep", history_keys=())
    by_name = fetch_runs(client, experiment="rep", history_keys=())
    assert sorted(r.run_id for r in by_tag) == sorted(r.run_id for r in by_name) and len(by_tag) == len(JOBS)
    dynamic = [r for r in fetch_runs(client, experiment="rep") if r.params.get("dynamic_h.name") == "loss"]
    assert [step for step, _ in dynamic[0].history["H"]] == [1, 2]  # H of each epoch (from 1), from the metric history


def test_unknown_experiment_is_one_line_error(store, capsys):
    uri, _, _ = store
    assert main(["--experiment", "nope", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "nope" in err[0]


# ----------------------------------------------------------------------------- stores and folders it cannot use
#
# Each ends in one ``error:`` line and exit status 2, and leaves the folder as it was.


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in captured.err, captured
    return err[0]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once it is closed


@pytest.mark.parametrize("empty", [None, b""], ids=["no file", "an empty mlflow.db"])
def test_an_empty_folder_has_no_runs_and_gets_no_store(empty, tmp_path, monkeypatch, capsys):
    if empty is not None:  # what an earlier dpl.report left in an empty folder
        (tmp_path / "mlflow.db").write_bytes(empty)
    before = sorted(tmp_path.iterdir())
    monkeypatch.chdir(tmp_path)
    assert main([]) == 2
    line = _error_line(capsys)
    assert "no runs here" in line and str(tmp_path / "mlflow.db") in line
    assert sorted(tmp_path.iterdir()) == before  # no mlflow.db made or filled, no lock, no reports/
    assert empty is None or (tmp_path / "mlflow.db").read_bytes() == empty


@pytest.mark.parametrize("server,why", [("refused", "Connection refused"), ("silent", "timed out")])
def test_an_unreachable_server_is_one_line_within_seconds(server, why, tmp_path, monkeypatch, capsys):
    import mlflow.tracking  # noqa: F401 - imported before the clock starts: only the wait is timed

    monkeypatch.chdir(tmp_path)
    with socket.socket() as listening:  # silent: it accepts connections and never answers
        listening.bind(("127.0.0.1", 0))
        listening.listen(8)
        uri = f"http://127.0.0.1:{listening.getsockname()[1] if server == 'silent' else _closed_port()}"
        start = time.monotonic()
        assert main(["--tracking-uri", uri]) == 2
        assert time.monotonic() - start < 10  # MLflow's own retries took minutes
    line = _error_line(capsys)
    assert f"--tracking-uri={uri!r} is unreachable" in line and why in line
    assert list(tmp_path.iterdir()) == []


def test_a_store_of_random_bytes_is_one_line_and_left_alone(tmp_path, monkeypatch, capsys):
    db = tmp_path / "mlflow.db"
    db.write_bytes(os.urandom(8192))
    before = db.read_bytes()
    monkeypatch.chdir(tmp_path)
    assert main([]) == 2
    line = _error_line(capsys)
    assert f"{db} is not an SQLite file" in line
    assert db.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["mlflow.db"]


def test_a_half_made_store_with_runs_is_named_and_left_alone(tmp_path, capsys):
    db = tmp_path / "mlflow.db"
    _log_run(f"sqlite:///{db}", "e", {}, K=1)
    with sqlite3.connect(db) as con:  # what a migration stopped half-way leaves
        con.execute("CREATE TABLE _alembic_tmp_model_version_tags (key VARCHAR(250))")
    before = db.read_bytes()
    assert main(["--tracking-uri", f"sqlite:///{db}", "--out", str(tmp_path / "out")]) == 2
    line = _error_line(capsys)
    assert f"{db} is a half-made MLflow store" in line and "holds 1 runs" in line and "mv " in line
    assert db.read_bytes() == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("out", ["/proc/dpl/report", "{file}/report"])
def test_an_unwritable_out_is_one_line_before_the_store_is_read(out, tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("")
    out = out.format(file=tmp_path / "a_file")
    monkeypatch.chdir(tmp_path)
    # no store here at all: the --out error is the one said, so --out was checked first
    assert main(["--out", out]) == 2
    line = _error_line(capsys)
    assert f"--out={out!r} cannot be written" in line and "choose another --out" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _log_run(uri, "e", {}, K=1)
    assert main(["--experiment", "e", "--tracking-uri", uri, "--out", out]) == 2
    assert f"--out={out!r} cannot be written" in _error_line(capsys)


def test_no_arguments_reports_the_latest_sweep_even_after_newer_single_runs(tmp_path, monkeypatch, capsys):
    from dpl.tracking.sweep import PARENT_TAG

    monkeypatch.chdir(tmp_path)  # the default store is ./mlflow.db, the default output ./reports/<name>

    def one_run(experiment, tags, **cfg):
        _log_run("sqlite:///mlflow.db", experiment, tags, **cfg)

    one_run("dpl", {}, K=1)
    assert main([]) == 0  # no sweep at all: the single runs of "dpl", and the line says why
    assert capsys.readouterr().out.startswith("reporting experiment='dpl': the store holds no sweep")
    one_run("grid", {PARENT_TAG: "grid"}, K=2)
    one_run("grid", {"sweep": "grid"}, K=2)
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("reporting sweep='grid': the latest sweep in the store") and \
        (tmp_path / "reports/grid/report.md").is_file()
    one_run("dpl", {}, K=4)  # a smoke run after the sweep is not a sweep: the sweep is still the one reported
    assert main([]) == 0
    assert capsys.readouterr().out.startswith("reporting sweep='grid': the latest sweep")


H_SWEEP = {1: (0.30, 0.52), 2: (0.28, 0.47), 4: (0.25, 0.44)}  # H -> validation accuracy at epochs 1 and 2


@pytest.fixture
def h_sweep_store(tmp_path, monkeypatch):
    """./mlflow.db as the issue's new user had it: an older sweep, a centralized smoke run, then a sweep
    over H run with ``python -m dpl -m sweep=h_sweep ...`` (no parent run, so in experiment "dpl" beside
    the smoke runs) whose first attempt was killed, then one more smoke run. Returns {name: run ids}."""
    from dpl.tracking.sweep import PARENT_TAG

    monkeypatch.chdir(tmp_path)
    uri = "sqlite:///mlflow.db"

    def job(experiment, tags, h, seed, accs, status="FINISHED", method="localsgd"):
        metrics = {"val_acc": list(accs), "test_acc": accs[-1], "best_val_acc": max(accs),
                   "samples_total": [1000.0 * (e + 1) for e in range(len(accs))]}
        _log_run(uri, experiment, tags, metrics, status=status, first_step=1, K=2, H=h, seed=seed, batch_size=32,
                 method={"name": method}, dataset={"name": "synthetic"})

    job("grid_a", {PARENT_TAG: "grid_a"}, 4, 0, [0.1])
    job("grid_a", {"sweep": "grid_a"}, 4, 0, [0.2, 0.3])
    job("dpl", {}, 1, 0, [0.05], method="centralized")  # the smoke run: never a baseline of the sweep
    job("dpl", {"sweep": "dead"}, 2, 0, [0.01], status="KILLED")  # a sweep that never finished a run
    for h in (1, 8):  # the first attempt, killed: same tag, not results
        job("dpl", {"sweep": "h_sweep"}, h, 0, [0.01], status="KILLED")
    for h, accs in H_SWEEP.items():
        for seed in (0, 1):
            job("dpl", {"sweep": "h_sweep"}, h, seed, [a + 0.01 * seed for a in accs])
    job("dpl", {}, 1, 1, [0.06], method="centralized")
    client = mlflow_client(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=100)
    return {"finished": {r.info.run_id for r in runs if r.data.tags.get("sweep") == "h_sweep"
                         and r.info.status == "FINISHED"},
            "killed": {r.info.run_id for r in runs if r.info.status == "KILLED" and r.data.tags["sweep"] == "h_sweep"}}


def test_no_arguments_reports_the_latest_sweeps_finished_runs_against_a_baseline_of_its_own(h_sweep_store, capsys,
                                                                                             tmp_path):
    assert main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("reporting sweep='h_sweep': the latest sweep in the store (its newest run started ")
    assert "left out 2 runs of the sweep that did not finish (2 killed); --include-failed counts and lists them" \
        in lines
    out = tmp_path / "reports" / "h_sweep"
    assert {r["run_id"] for r in _rows(out, "runs.csv")} == h_sweep_store["finished"]  # no smoke run, no killed one
    assert [(r["H"], r["n"], r["failed"]) for r in _rows(out)] == [("1", "2", "0"), ("2", "2", "0"), ("4", "2", "0")]
    # the baseline: the sweep's smallest H, a group of the sweep's own runs
    comparisons = _rows(out, "comparisons.csv")
    assert comparisons and {r["baseline"] for r in comparisons} == \
        {"dataset=synthetic method=localsgd K=2 H=1 batch_size=32"}
    assert any(line.startswith("baseline H=1 (H=1: the smallest H of the sweep") for line in lines)
    # the budget's target: the lowest of the groups' best mean validation accuracy (H=4's, at epoch 2)
    target = min(max(statistics.fmean([a, a + 0.01]) for a in accs) for accs in H_SWEEP.values())
    assert [float(r["target_val_acc"]) for r in _rows(out, "budget.csv")] == pytest.approx([target] * 3)
    assert f"budget target {100 * target:.2f} % validation accuracy (the lowest of the groups' best mean " \
           f"validation accuracies, that of H=4 at epoch 2" in "\n".join(lines)
    text = (out / "report.md").read_text()
    assert "Baseline: H=1: the smallest H" in text and "Target: the lowest of the groups' best mean" in text


def test_include_failed_counts_and_lists_a_sweeps_killed_runs(h_sweep_store, capsys, tmp_path):
    assert main(["--sweep", "h_sweep", "--include-failed"]) == 0
    assert "left out" not in capsys.readouterr().out
    out = tmp_path / "reports" / "h_sweep"
    assert {r["run_id"] for r in _rows(out, "runs.csv")} == h_sweep_store["finished"] | h_sweep_store["killed"]
    assert [(r["H"], r["n"], r["failed"]) for r in _rows(out)] == \
        [("1", "2", "1"), ("2", "2", "0"), ("4", "2", "0"), ("8", "0", "1")]
    assert {r["baseline"].split()[3] for r in _rows(out, "comparisons.csv")} == {"H=1"}  # never the killed-only H=8
    text = (out / "report.md").read_text()
    assert "6 finished, 2 failed" in text and text.count("| KILLED |") == 2
    # a sweep none of whose runs finished is one error line that says why
    assert main(["--sweep", "dead"]) == 2
    assert "no finished runs for sweep='dead' in sqlite:///mlflow.db (1 killed; --include-failed reports them)" \
        in _error_line(capsys)


# ----------------------------------------------------------------------------- hostile names
#
# Experiment, sweep and param names come from the store: whoever logged a run chose them. The
# report must stay in reports/, keep its table whole, inject nothing and still find the runs.

HOSTILE = ["../../../X", "a/b", "</script><script>alert(1)</script>", "x|y", "two\nlines", "it's", "both'\"quotes",
           r"$\frac{a}{b}$", "[x](javascript:alert(1))"]


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory):
    """One store; per hostile name an experiment and a sweep of that name whose dataset, method
    and failure reason carry it too: two seeds and a diverged run of it, and a localsgd run."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('hostile') / 'mlflow.db'}"
    for name in HOSTILE:
        metrics = {"test_acc": 0.5, "val_acc": [0.3, 0.4], "comm_bytes_total": 2.0**20, "modelled_time_s": 3.0}
        for seed, method in ((0, name), (1, name), (0, "localsgd")):
            _log_run(uri, name, {"sweep": name}, metrics, K=2, seed=seed, dataset={"name": name},
                     method={"name": method})
        _log_run(uri, name, {"sweep": name}, {}, status="FAILED", reason=f"diverged: {name}", K=2, seed=2,
                 dataset={"name": name}, method={"name": name})
    return uri


def _cells(line: str) -> int:
    """The number of cells of a Markdown table row: its ``|`` that no backslash escapes, less one."""
    return sum(token == "|" for token in re.findall(r"\\.|\|", line)) - 1


def _tables(text: str) -> list[list[str]]:
    tables, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            tables.append([])
        if line.startswith("|"):
            tables[-1].append(line)
    return tables


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_name_reports_inside_reports_and_injects_nothing(hostile_store, name, tmp_path, monkeypatch,
                                                                    capsys):
    launch = tmp_path / "a" / "b" / "c" / "launch"  # deep enough that ../../../X would still land in tmp_path
    launch.mkdir(parents=True)
    monkeypatch.chdir(launch)
    for kind in ("--sweep", "--experiment"):
        assert main([kind, name, "--tracking-uri", hostile_store]) == 0, kind
    (folder,) = (launch / "reports").iterdir()
    assert folder.name == safe_folder_name(name) and folder.is_dir()
    written = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert written and all(p.parent == folder for p in written)  # nothing anywhere else
    out = capsys.readouterr().out
    if folder.name != name:
        assert out.count(f"writing to reports/{folder.name}: sweep={name!r} is not a safe folder name") == 1
    text = (folder / "report.md").read_text()
    assert "<script" not in text.lower() and not re.search(r"(?<!\\)[\[\]`]", text)  # no tag, no link, no code
    assert text.startswith(f"# dpl report: {md_escape(name)}\n")
    assert "3 finished, 1 failed" in text  # the sweep (or experiment) of this name, all of it
    tables = _tables(text)  # the groups, (the differences, the budget), the failed runs
    main_table, failed = tables[0], tables[-1]
    assert len(main_table) == 4 and len(failed) == 3  # header, rule, a row per group / per failed run
    for table in tables:
        assert all(_cells(line) == _cells(table[0]) for line in table), table
    assert main_table[0].startswith("| dataset | method | K | failed | test acc % |") and _cells(failed[0]) == 4


def test_a_name_with_both_quotes_is_matched_after_the_search(hostile_store):
    client = mlflow_client(hostile_store)
    for name in ("it's", 'both\'"quotes'):
        runs = fetch_runs(client, sweep=name, history_keys=())
        assert len(runs) == 4 and {r.params["dataset.name"] for r in runs} == {name}
    assert tag_filter("sweep", "it's") == 'tags.`sweep` = "it\'s"'
    # MLflow's syntax has no escape for both quotes: a wider search, matched in Python
    assert tag_filter("sweep", 'both\'"quotes') == "tags.`sweep` LIKE 'both%'"


def test_safe_folder_name_is_one_plain_path_component():
    for name in [*HOSTILE, "..", ".", "", ".hidden", "a\\b", "nul\x00byte", "x" * 300, "é" * 200, "a..b"]:
        safe = safe_folder_name(name)
        assert safe and len(safe.encode()) <= 100 and not safe.startswith(".") and ".." not in safe, name
        assert "/" not in safe and "\\" not in safe and safe.isprintable(), name
    assert safe_folder_name("x" * 300) != safe_folder_name("x" * 299)  # cut names keep apart
    for plain in ("localsgd_grid", "dynamic_h", "optuna-lr.v2", "study"):
        assert safe_folder_name(plain) == plain


def test_md_escape_keeps_text_literal():
    assert md_escape("</script>") == "&lt;/script&gt;"
    assert md_escape("x|y") == "x\\|y" and md_escape("two\nlines") == "two<br>lines"
    assert md_escape("[x](javascript:alert(1))") == "\\[x\\](javascript:alert(1))"
    assert md_escape("`a` *b* _c_ a&b") == "\\`a\\` \\*b\\* \\_c\\_ a&amp;b"
    assert md_escape("dynamic_h batch_size 0.001 4→32 –") == "dynamic_h batch_size 0.001 4→32 –"  # unchanged
    assert md_escape("a\\") + " |" == "a\\\\ |"  # a trailing backslash cannot escape the cell's end


def test_figures_show_names_literally():
    from matplotlib.cbook import is_math_text
    from matplotlib.text import Text

    from dpl.report.figures import build_figures
    from tests.legible import assert_legible

    names = [r"$\frac{a}{b}$", r"$\nosuchcommand$", "_hidden"]
    runs = [RunRecord(run_id=str(next(_IDS)), status="FINISHED",
                      params={"dataset.name": name, "method.name": method, "K": "2", "H": str(h)},
                      metrics={"test_acc": 0.5, "sync_rounds_total": 10.0 / h, "comm_bytes_total": 2.0**20 / h,
                               "modelled_time_s": 1.0 / h},
                      history={"val_acc": [(0, 0.3), (1, 0.4)]})
            for name in names[:2] for method in names for h in (1, 2)]
    figures = build_figures(runs, group_columns(runs))
    assert len(figures) >= 4
    for fig_name, fig in figures.items():
        assert_legible(fig, fig_name)  # draws: an unknown mathtext command would raise here
        texts = [t.get_text() for t in fig.findobj(Text)]
        assert not any(is_math_text(t) for t in texts if "$" in t.replace(r"\$", "")), fig_name
        shown = {t.replace(r"\$", "$").lstrip("\u200b") for t in texts}
        assert set(names[:2]) <= shown, fig_name  # the dataset panels, titled by the names as written
        legend = {t.get_text().lstrip("\u200b") for leg in fig.legends for t in leg.get_texts()}
        assert not legend or any("_hidden" in t for t in legend), fig_name  # a leading _ no longer hides it


def test_default_experiment_is_the_logger_default():
    from dpl.report.fetch import DEFAULT_EXPERIMENT

    assert compose_cfg("logger=mlflow", tiny=False).logger.experiment == DEFAULT_EXPERIMENT


# ----------------------------------------------------------------------------- pure helpers


def test_pareto_front_hand_computed():
    # (bytes, accuracy): (5, .30) is beaten by (2, .40); (10, .45) and (20, .50) by (10, .50)
    points = [(10.0, 0.50), (2.0, 0.40), (5.0, 0.30), (0.0, 0.20), (10.0, 0.45), (20.0, 0.50)]
    assert pareto_front(points) == [3, 1, 0]


def test_mean_std_and_mean_curve_hand_computed():
    from dpl.report.stats import describe

    mean_std = lambda values: (describe(values).mean, describe(values).std)  # noqa: E731 (the table's numbers)
    assert mean_std([0.5, 0.7]) == (pytest.approx(0.6), pytest.approx(math.sqrt(0.02)))
    mean, std = mean_std([0.3])
    assert mean == 0.3 and math.isnan(std)
    assert all(math.isnan(v) for v in mean_std([]))
    assert mean_curve([[(0, 0.1), (1, 0.3)], [(0, 0.3)]]) == ([0, 1], [pytest.approx(0.2), 0.3])


_IDS = itertools.count()


def _rec(status="FINISHED", acc=0.5, **params):
    base = {"method.name": "slowmo", "K": "4", "H": "8", "dynamic_h.name": "constant", "optimizer.name": "sgdm",
            "batch_size": "64", "seed": "0", "lr": "0.04"}
    return RunRecord(run_id=str(next(_IDS)), status=status, params={**base, **params},
                     metrics={"test_acc": acc} if status == "FINISHED" else {})


def test_group_columns_add_swept_params_but_not_seeds_or_dependent_ones():
    runs = [_rec(**{"method.outer.momentum": b, "seed": s}) for b in ("0.2", "0.6") for s in ("0", "1")]
    assert list(group_columns(runs)) == ["method", "K", "H", "dynamic_h", "optimizer", "batch_size",
                                         "method.outer.momentum"]
    # lr follows the optimizer here: it does not split the optimizer's group
    runs = [_rec(**{"optimizer.name": "adamw", "lr": "0.001"}), _rec(**{"optimizer.name": "sgdm", "lr": "0.01"})]
    assert "lr" not in group_columns(runs)


def test_summarise_keeps_failed_runs_out_of_the_means():
    runs = [_rec(acc=0.4), _rec(acc=0.6, seed="1"), _rec(status="FAILED", seed="2")]
    (row,) = summarise(runs, group_columns(runs), metrics=("test_acc",))
    assert (row["n"], row["failed"]) == (2, 1)
    assert row["test_acc_mean"] == pytest.approx(0.5) and row["test_acc_std"] == pytest.approx(math.sqrt(0.02))


# ----------------------------------------------------------------------------- figures are legible


def _study_runs(epochs: int) -> list[RunRecord]:
    """Two datasets; a LocalSGD K x H grid with seeds, SlowMo, centralized baselines, two dynamic
    strategies that start at the configured H=1 but train with larger ones, an lr search with a
    diverged trial: every figure has something to draw."""
    runs = []

    def add(dataset, status="FINISHED", acc=0.5, rounds=100.0, mib=10.0, hs=(1,), **params):
        base = {"dataset.name": dataset, "method.name": "localsgd", "K": "4", "H": "1", "dynamic_h.name": "constant",
                "optimizer.name": "sgdm", "batch_size": "64", "seed": "0", "lr": "0.04"}
        hs = list(hs) * epochs if len(hs) == 1 else list(hs)[:epochs]
        history = {"val_acc": [(e + 1, acc * (e + 1) / epochs) for e in range(epochs)],  # steps from 1, as logged
                   "H": [(e + 1, float(hs[e])) for e in range(epochs)]}
        metrics = {"test_acc": acc, "best_val_acc": acc, "sync_rounds_total": rounds, "comm_bytes_total": mib * 2**20,
                   "modelled_time_s": 60.0 + mib / 10,
                   "H_first": hs[0], "H_last": hs[-1], "H_mean": sum(hs) / len(hs)} if status == "FINISHED" else {}
        runs.append(RunRecord(run_id=str(next(_IDS)), status=status, params={**base, **params}, metrics=metrics,
                              history=history if status == "FINISHED" else {}))

    for dataset in ("cifar100", "fashion_mnist"):
        for k, h, seed in itertools.product((2, 4, 8), (1, 2, 4, 8, 16, 32, 64), (0, 1)):
            add(dataset, acc=0.3 + 0.01 * k - 0.002 * h + 0.001 * seed, rounds=30000 / h, mib=3000 / h,
                K=str(k), H=str(h), seed=str(seed))
        add(dataset, acc=0.45, rounds=30000, mib=3000, **{"method.name": "centralized", "K": "4"})
        add(dataset, acc=0.44, rounds=3750, mib=375, H="8", **{"method.name": "slowmo"})
        add(dataset, acc=0.43, rounds=3750, mib=375, H="8", **{"method.name": "diloco", "optimizer.name": "adamw"})
        add(dataset, acc=0.41, rounds=2000, mib=200, hs=(4, 8, 16, 16, 32), **{"dynamic_h.name": "loss"})
        add(dataset, acc=0.40, rounds=1500, mib=150, hs=(64, 32, 16, 8, 4), **{"dynamic_h.name": "desc_pow2"})
    for i, lr in enumerate((1.3e-4, 4.7e-4, 0.0012345678901234567, 0.0093, 0.031, 0.17, 0.66)):
        add("cifar100", acc=0.2 + 0.03 * i, rounds=30000, mib=3000, lr=str(lr), sweep="optuna_lr",
            **{"method.name": "centralized", "K": "1", "optimizer.name": "adamw" if i % 2 else "sgdm"})
    add("cifar100", status="FAILED", lr="0.9", **{"method.name": "centralized", "K": "1"})
    return runs


@pytest.mark.parametrize("epochs", [1, 5])
def test_every_figure_is_legible(epochs):
    from dpl.report.figures import build_figures
    from tests.legible import assert_legible

    runs = _study_runs(epochs)
    figures = build_figures(runs, group_columns(runs))
    assert set(figures) == {"acc_vs_H.png", "acc_vs_rounds.png", "learning_curves.png", "h_over_epochs.png",
                            "pareto.png", "acc_vs_time.png", "acc_vs_lr.png"}
    for name, fig in figures.items():
        assert [ax.get_title() for ax in fig.axes] == ["cifar100", "fashion_mnist"], name  # a panel per dataset
        assert_legible(fig, name)
    for name in ("learning_curves.png", "h_over_epochs.png"):  # whole epochs, counted from 1
        ticks = [t for ax in figures[name].axes for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert all(t == int(t) for t in ticks) and min(ticks) >= 0, name
    labels = {t.get_text() for leg in figures["h_over_epochs.png"].legends for t in leg.get_texts()}
    assert labels == {"loss (n=1)", "desc_pow2 (n=1)"}  # no "H=1": the configured H is not what they trained with


def test_table_has_a_dataset_column_rounded_params_and_the_h_trained_with():
    from dpl.report.tables import markdown

    runs = _study_runs(5)
    columns = group_columns(runs)
    assert list(columns)[:2] == ["dataset", "method"] and "lr" in columns
    text = markdown(summarise(runs, columns), columns, runs, "t")
    head = text.splitlines()[4].strip("| ").split(" | ")
    assert len(head) == len(set(head)) and head[0] == "dataset"  # no column twice
    assert "0.00123" in text and "0.0012345678901234567" not in text  # an Optuna lr, rounded
    assert "| 4→32 |" in text and "| 64→4 |" in text  # the dynamic rows' H: first→last, not the configured 1


def test_pareto_figure_draws_a_curve_per_setting_through_h_and_marks_the_front():
    from dpl.report.figures import build_figures
    from tests.legible import series

    runs = _study_runs(3)
    figures = build_figures(runs, group_columns(runs))
    for name in ("pareto.png", "acc_vs_time.png"):
        ax = figures[name].axes[0]
        labels = {line.get_label() for line in series(ax)}
        for method in ("slowmo", "diloco", "centralized"):
            assert any(label.startswith(method) for label in labels), (name, method)
        # LocalSGD: a curve per K, each through its 7 Hs (two seeds each)
        assert {label: len(line.get_xdata()) for line in series(ax) if (label := line.get_label()).startswith(
            "localsgd K=") and "constant" in label} == {f"localsgd K={k} constant sgdm lr=0.04 (n=2)": 7
                                                       for k in (2, 4, 8)}, name
        assert "Pareto front" in labels


def test_pareto_figure_of_a_compression_sweep_draws_a_curve_per_compressor():
    from dpl.report.figures import build_figures
    from tests.legible import assert_legible

    runs = []
    for name, ef, ratios in (("topk", "True", ("0.001", "0.01", "0.1")), ("topk", "False", ("0.001", "0.01", "0.1")),
                             ("randomk", "True", ("0.01", "0.1")), ("int8", "False", ("1",)),
                             ("none", "False", ("1",))):
        for ratio in ratios:
            mib = 40.0 * float(ratio)
            runs.append(RunRecord(run_id=str(next(_IDS)), status="FINISHED",
                                  params={"method.name": "localsgd", "K": "4", "H": "8", "compression.name": name,
                                          "compression.ratio": ratio, "compression.error_feedback": ef},
                                  metrics={"test_acc": 0.3 + 0.01 * len(name) + mib / 100,
                                           "comm_bytes_total": mib * 2**20, "modelled_time_s": 10.0 + mib}))
    columns = group_columns(runs)
    assert list(columns)[:4] == ["method", "K", "H", "compression"]
    assert {"compression.ratio", "compression.error_feedback"} <= set(columns)
    fig = build_figures(runs, columns)["pareto.png"]
    ax = fig.axes[0]
    curves = {line.get_label(): len(line.get_xdata()) for line in ax.get_lines() if not line.get_label().startswith("_")}
    # one curve per compressor and error feedback, through its ratios; one method: not named
    assert curves == {"topk+EF (n=1)": 3, "topk (n=1)": 3, "randomk+EF (n=1)": 2, "int8 (n=1)": 1, "none (n=1)": 1,
                      "Pareto front": curves["Pareto front"]}
    assert_legible(fig, "pareto.png")


# ----------------------------------------------------------------------------- statistics on hand-made runs


def _hist(*accs):
    return {"val_acc": [(e + 1, a) for e, a in enumerate(accs)],
            "samples_total": [(e + 1, 100.0 * (e + 1)) for e in range(len(accs))]}


def test_groups_ignore_the_seed_and_only_the_seed():
    same = [_rec(seed=s, results_csv=f"/r{s}.csv", **{"logger.experiment": s}) for s in ("0", "1", "2")]
    assert len(group_runs(same, group_columns(same))) == 1  # seeds and bookkeeping: one group
    for key, values in (("lr", ("0.1", "0.2")), ("dataset.num_train", ("100", "200")), ("K", ("2", "4"))):
        runs = [_rec(seed=s, **{key: v}) for v in values for s in ("0", "1")]
        groups = group_runs(runs, group_columns(runs))
        assert len(groups) == 2 and all(len(m) == 2 for m in groups.values()), key


def test_a_target_that_some_runs_never_reach_is_reported_as_such():
    runs = [_rec(seed="0", **{"H": "2"}), _rec(seed="1", **{"H": "2"}), _rec(seed="0", **{"H": "4"}),
            _rec(seed="1", **{"H": "4"})]
    for r, h in zip(runs, (_hist(0.2, 0.6), _hist(0.3, 0.4), _hist(0.1, 0.2), _hist(0.1, 0.3))):
        r.history = h
    columns = group_columns(runs)
    rows = budget_rows(runs, columns, target=0.5)
    h2, h4 = (_cell(rows, H=h) for h in ("2", "4"))
    assert (h2["n"], h2["reached"], h2["epoch_mean"], h2["samples_total_mean"]) == (2, 1, 2.0, 200.0)
    assert math.isnan(h2["epoch_ci95_lo"])  # one run reached it: no interval
    assert (h4["n"], h4["reached"]) == (2, 0) and math.isnan(h4["epoch_mean"])
    text = markdown(summarise(runs, columns), columns, runs, "t", budget=rows)
    assert "| 1 of 2 | 2.0 ± ? (1) |" in text and "| 0 of 2 | – |" in text
    from dpl.report.figures import fig_budget
    from tests.legible import assert_legible

    fig = fig_budget(rows, list(columns))
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["H=2 (reached 1 of 2)", "H=4 (reached 0 of 2)"]  # never reached: named, no bar
    assert_legible(fig, "budget_to_target.png")


def test_default_baseline_is_each_rows_own_ablation_none():
    from dpl.report.tables import default_baseline

    runs = []
    for method, shift in (("slowmo", 0.0), ("centralized", 0.3)):
        for ablation, gain in (("none", 0.0), ("lr_per_step", 0.05), ("clean_val", 0.0)):
            for s in range(3):
                runs.append(_rec(acc=0.4 + shift + gain + 0.01 * s * (1 + gain), seed=str(s), ablation=ablation,
                                 **{"method.name": method}))
    columns = group_columns(runs)
    assert "ablation" in columns
    spec = default_baseline(group_runs(runs, columns), list(columns))
    assert spec == {"ablation": "none"}
    rows = compare_groups(runs, columns, spec, metrics=("test_acc",))
    assert len(rows) == 4 and all(r["baseline"].replace("ablation=none", "") == r["group"].split("ablation=")[0]
                                  for r in rows)  # each compared with its own row's none
    lr = [r for r in rows if "lr_per_step" in r["group"]]
    assert all(r["test"] == "paired" and r["delta_mean"] == pytest.approx(0.05 + 0.0005) for r in lr)
    clean = [r for r in rows if "clean_val" in r["group"]]
    assert all(r["exact"] and r["p_value"] == 1.0 for r in clean)  # unchanged on every seed: not a test
    # Holm's family is the two real tests of the metric
    assert all(r["p_holm"] == pytest.approx(min(1.0, 2 * min(x["p_value"] for x in lr)))
               or r["p_holm"] == pytest.approx(max(x["p_value"] for x in lr)) for r in lr)


def _single_runs(groups: int, label_len: int = 1) -> list[RunRecord]:
    """Single runs of experiment "dpl" that differ in engine, epochs and data size (and, with
    ``label_len`` > 1, in a long-valued param): the groups the report labels with long names."""
    runs = []
    for i in range(groups):
        params = {"dataset.name": "synthetic", "method.name": "localsgd", "K": "2", "H": str(2 ** (i % 4)),
                  "dynamic_h.name": "constant", "optimizer.name": "sgdm", "batch_size": "64", "seed": "0",
                  "engine.name": ("simulated", "distributed")[i % 2], "epochs": str(1 + i),
                  "dataset.num_train": str(1000 * (i + 1)), "model.name": f"resnet{i}" + "_wide" * label_len}
        acc = 0.19 + 0.0005 * i
        runs.append(RunRecord(run_id=str(next(_IDS)), status="FINISHED", params=params,
                              metrics={"test_acc": acc, "best_val_acc": acc, "sync_rounds_total": 100.0 * (i + 1),
                                       "comm_bytes_total": 2**20 * (i + 1), "modelled_time_s": 10.0 + i},
                              history={"val_acc": [(e, acc - 0.001 * (3 - e)) for e in range(1, 4)]}))
    return runs


@pytest.mark.parametrize("groups,label_len", [(1, 1), (2, 1), (7, 1), (7, 8), (20, 1), (20, 6)])
def test_figures_of_many_long_named_groups_are_legible(groups, label_len):
    """The "dpl" experiment's figures, 1 to 20 groups with long labels: the legend sits right of the
    panels below the title, covers no data, title or tick label, and lies wholly in the figure."""
    from dpl.report.figures import build_figures
    from tests.legible import assert_legible

    runs = _single_runs(groups, label_len)
    figures = build_figures(runs, group_columns(runs))
    assert {"acc_vs_H.png", "acc_vs_rounds.png", "learning_curves.png"} <= set(figures)
    for name, fig in figures.items():
        assert_legible(fig, name)
    if groups > 1:  # a curve and an entry per group: every label is there to be measured
        (legend,) = figures["learning_curves.png"].legends
        assert len(legend.get_texts()) == groups


def test_accuracy_axes_are_percent_from_a_round_floor():
    """Accuracies 19.0-19.95% are drawn on a 10-20% axis labelled in percent, not stretched over
    0.190-0.200; the other figures' accuracy axes are percent too."""
    from dpl.report.figures import build_figures

    runs = _single_runs(20)
    figures = build_figures(runs, group_columns(runs))
    for name in ("acc_vs_H.png", "acc_vs_rounds.png", "learning_curves.png", "pareto.png", "acc_vs_time.png"):
        fig = figures[name]
        fig.canvas.draw()
        ax = fig.axes[0]
        lo, hi = ax.get_ylim()
        assert lo <= 0.10 < 0.19 and 0.20 <= hi and hi - lo >= 0.1 - 1e-9, (name, lo, hi)
        shown = [t.get_text() for t in ax.get_yticklabels() if lo <= t.get_position()[1] <= hi]
        assert "10%" in shown and "20%" in shown and all(s.endswith("%") for s in shown), (name, shown)


def test_histories_of_old_runs_logged_from_step_0_read_as_epochs_from_1(tmp_path):
    """Runs logged before epochs were counted from 1 have their first epoch at step 0: the report
    shifts them, so an old and a new run of the same curve land on the same epochs."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    curve = [0.2, 0.3, 0.4]
    _log_run(uri, "old_new", {}, metrics={"val_acc": curve}, first_step=0, seed=0)  # an old run
    _log_run(uri, "old_new", {}, metrics={"val_acc": curve}, first_step=1, seed=1)  # a run of today
    runs = fetch_runs(mlflow_client(uri), "old_new")
    assert [r.history["val_acc"] for r in runs] == [list(zip((1, 2, 3), curve))] * 2


def test_runs_logged_before_method_outer_group_with_new_runs_of_the_same_config(tmp_path):
    """An old SlowMo run (method.beta, method.alpha) and a new one (method.outer.*) of the same
    config are one group; another slow momentum is another group, under the new param's name."""
    from omegaconf import OmegaConf

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    new = OmegaConf.to_container(compose_cfg("method=slowmo").method)
    common = {"K": 4, "H": 8, "optimizer": {"name": "sgdm"}}
    _log_run(uri, "old_new", {}, seed=0, method={"name": "slowmo", "beta": 0.6, "alpha": 1.0,
                                                 "restart_each_epoch": False}, **common)
    _log_run(uri, "old_new", {}, seed=1, method=new, **common)
    _log_run(uri, "old_new", {}, seed=0, method={"name": "slowmo", "beta": 0.2, "alpha": 1.0,
                                                 "restart_each_epoch": False}, **common)
    runs = fetch_runs(mlflow_client(uri), experiment="old_new")
    columns = group_columns(runs)
    assert columns["method.outer.momentum"] == "method.outer.momentum" and "method.beta" not in columns
    sizes = {key[list(columns).index("method.outer.momentum")]: len(g) for key, g in group_runs(runs, columns).items()}
    assert sizes == {"0.6": 2, "0.2": 1}


def test_language_model_runs_get_their_bits_per_byte_and_image_runs_do_not(tmp_path):
    from dpl.report.cli import write_report

    def run(seed, bpb=None):
        metrics = {"test_acc": 0.3 + seed / 100, "test_acc_best": 0.3, "best_val_acc": 0.3, "test_loss": 1.5,
                   "comm_bytes_total": 1e6 * (seed + 1)}
        if bpb is not None:
            metrics["test_bpb"] = bpb
        return RunRecord(run_id=f"r{seed}", status="FINISHED", metrics=metrics,
                         history={"val_acc": [(1, 0.3)]},
                         params={"method.name": "diloco", "K": "4", "seed": str(seed), "dataset.name": "text"})

    written = write_report([run(0, 2.0), run(1, 2.2)], tmp_path / "lm", "lm", metric="test_bpb")
    assert any(p.name == "pareto.png" for p in written)
    text = (tmp_path / "lm" / "report.md").read_text()
    assert "test bits/byte" in text and "2.100 ± " in text
    assert float(_rows(tmp_path / "lm")[0]["test_bpb_mean"]) == pytest.approx(2.1)
    write_report([run(0), run(1)], tmp_path / "images", "images")
    assert "bits/byte" not in (tmp_path / "images" / "report.md").read_text()


def test_the_pareto_front_of_a_lower_is_better_metric_keeps_the_lowest():
    from dpl.report.tables import pareto_front

    points = [(0.0, 3.3), (1.0, 3.1), (2.0, 3.5), (3.0, 2.9)]
    assert pareto_front([(x, -y) for x, y in points]) == [0, 1, 3]
    assert pareto_front(points) == [0, 2]


# ----------------------------------------------------------------------------- figures that cannot mislead


def _bounded_runs() -> list[RunRecord]:
    """LocalSGD over K x batch size x H, three seeds: K=2 near 100 % and K=4 near 0 %, where Student's t
    draws bars past 100 % and below 0 %. Every group has a mean of its own (a line's points name their
    groups), costs that differ by K, batch size and H, and a validation curve near the bounds too."""
    runs = []
    for k, bs, h in itertools.product((2, 4), (32, 64), (1, 2, 4)):
        gap = 0.015 + 0.001 * h + 0.0005 * (bs == 64)  # the distance of the group's mean from its bound
        for seed, spread in enumerate((0.2, 2.2, 0.6)):  # mean spread 1: the group's mean is bound -/+ gap
            acc = 1.0 - gap * spread if k == 2 else gap * spread
            runs.append(RunRecord(
                run_id=str(next(_IDS)), status="FINISHED",
                params={"dataset.name": "synthetic", "method.name": "localsgd", "K": str(k), "H": str(h),
                        "dynamic_h.name": "constant", "optimizer.name": "sgdm", "batch_size": str(bs),
                        "seed": str(seed)},
                metrics={"test_acc": acc, "best_val_acc": acc, "sync_rounds_total": 1000.0 / h,
                         "comm_bytes_total": 2.0**20 * 100 * k * (1 + bs / 1000) / h,
                         "modelled_time_s": 10.0 + k + bs / 100 + 100.0 / h},
                history={"val_acc": [(1, acc), (2, acc)], "samples_total": [(1, 1000.0), (2, 2000.0)],
                         "comm_bytes_total": [(1, 1e6 * k / h), (2, 2e6 * k / h)]}))
    return runs


def test_figures_of_accuracies_near_0_and_100_percent_cannot_mislead(tmp_path):
    """Intervals stay in 0-100 %, a line joins only groups that differ in its own axis (never two K or
    two batch sizes), each line has a colour of its own, and every figure has a sensible aspect."""
    from dpl.report.cli import write_report
    from dpl.report.figures import build_figures
    from tests.legible import assert_aspect, assert_distinct_colours, assert_in_range, assert_legible, png_size, series

    runs = _bounded_runs()
    columns = group_columns(runs)
    means = {key: (statistics.fmean(r.metrics["test_acc"] for r in members), dict(zip(columns, key)))
             for key, members in group_runs(runs, columns).items()}
    figures = build_figures(runs, columns)
    assert {"acc_vs_H.png", "acc_vs_rounds.png", "learning_curves.png", "pareto.png", "acc_vs_time.png"} <= \
        set(figures)
    for name, fig in figures.items():
        assert_legible(fig, name)
        assert_aspect(fig, name)
        assert_in_range(fig, name)  # bars and bands of accuracies near 0 and 100 % stay inside
        assert "logit scale" in fig._suptitle.get_text(), name  # the method is said where the bars are
        for ax in fig.axes:
            assert_distinct_colours(ax, name)
    for name in ("acc_vs_H.png", "acc_vs_rounds.png", "pareto.png", "acc_vs_time.png"):
        lines = [line for line in series(figures[name].axes[0]) if line.get_label() != "Pareto front"]
        assert len(lines) == 4, name  # one per K and batch size
        for line in lines:
            groups = [min(means.values(), key=lambda m: abs(m[0] - y))[1] for y in line.get_ydata()]  # noqa: B023
            assert len({(g["K"], g["batch_size"]) for g in groups}) == 1, (name, line.get_label())
            assert sorted(g["H"] for g in groups) == ["1", "2", "4"], (name, line.get_label())
    for path in write_report(runs, tmp_path / "r", "bounded"):
        if path.suffix == ".png":
            width, height = png_size(path)
            assert height / 2 <= width <= 3 * height, (path.name, width, height)
    assert (tmp_path / "r" / "budget_to_target.png").is_file()


def test_the_report_csvs_never_hold_a_live_formula(tmp_path):
    """A group's label carries users' names (a sweep, an experiment): a spreadsheet opening summary.csv
    shows them as text, while numbers, negative ones too, stay numbers."""
    import csv

    path = write_csv_table([{"group": "sweep==HYPERLINK(\"http://x\")", "name": "@SUM(A1)", "delta": -0.5,
                             "label": "+cmd", "acc": 0.25}], tmp_path / "summary.csv")
    (row,) = csv.DictReader(path.open())
    assert row == {"group": 'sweep==HYPERLINK("http://x")', "name": "'@SUM(A1)", "delta": "-0.5",
                   "label": "'+cmd", "acc": "0.25"}
