"""Hostile names: a sweep, an experiment, a run or a job name never leads out of its folder, never
holds a line break, reaches MLflow's searches whatever its quotes and backslashes, and a results
CSV never hands a spreadsheet program a formula."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from dpl.config.overrides import check_overrides
from dpl.config.validate import validate
from dpl.errors import ConfigError
from dpl.tracking.results import append_result_row, csv_cell
from dpl.tracking.run_names import run_name
from dpl.tracking.store import CONFIG_HASH_TAG, find_finished_run, mlflow_client, tag_filter
from dpl.tracking.sweep import PARENT_TAG, _unfinished_parent
from tests.conftest import compose_cfg
from tests.processes import run_cli

# Names a store must tell apart: quotes, a backslash where it would escape the closing quote, LIKE's
# wildcards, case, spaces.
HOSTILE = ['a"b\\', 'a"b', "a\\", "a'b\"c", "a\\'b", "a%b", "a_b", "axb", "A_B", " a ", "a", "\"'", "ä\"'ü"]


# ----------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("args, expect", [
    (["--config-name", "localsgd_grid", "sweep=../../X"], "sweep='../../X' is invalid: allowed a name without /"),
    (["sweep=a/b"], "sweep='a/b' is invalid"),
    (["sweep=.."], "sweep='..' is invalid"),
    (["-m", "K=1,2", "sweep=ok,../x"], "sweep='../x' is invalid"),
    (["sweep='a\nb'"], "sweep=\"'a\\nb'\" is invalid: allowed no control characters"),
    (["logger.experiment=x\ry"], "logger.experiment='x\\ry' is invalid"),
    (["logger.run_name='\x1b[31mred'"], "is invalid: allowed no control characters"),
    (["results_csv=x\n.csv"], "results_csv='x\\n.csv' is invalid"),
    (["hydra.job.name=../../../../X"], "hydra.job.name='../../../../X' is invalid: allowed a name without /"),
    (["hydra.job.name="], "hydra.job.name='' is invalid: allowed a non-empty name"),
])
def test_hostile_names_on_the_command_line_are_refused_in_one_line(args, expect):
    with pytest.raises(ConfigError) as e:
        check_overrides(args)
    assert expect in str(e.value) and len(str(e.value).splitlines()) == 1


def test_a_derived_sweep_name_is_the_swept_keys_as_one_folder_name():
    from dpl.tracking.run_names import SWEEP_NAME_MAX, derived_sweep_name, name_problem

    assert derived_sweep_name(["H", "seed"]) == "sweep-H-seed"
    assert derived_sweep_name([]) == "sweep"
    # a group's path and a key given twice; "+" and "~" are how it was given, not its name
    assert derived_sweep_name(["+experiment", "hydra/sweeper/sampler", "H", "~H"]) == \
        "sweep-experiment-hydra.sweeper.sampler-H"
    for keys in (["a/../b", "x\ny"], ["..", "."], ["k" * 300]):
        name = derived_sweep_name(keys)
        assert name_problem("sweep", name) is None and len(name) <= SWEEP_NAME_MAX, name


def test_a_name_with_quotes_and_a_backslash_is_a_name():
    check_overrides(["--config-name", "localsgd_grid", "sweep='a\"b\\\\'", "logger.run_name='it\\'s'"])


def test_a_sweep_config_of_the_users_naming_a_folder_outside_is_refused_before_hydra_makes_it(tmp_path):
    (tmp_path / "evil.yaml").write_text("defaults:\n  - config\n  - _sweep\n  - _self_\nsweep: ../../escaped\n"
                                        "hydra:\n  sweeper:\n    params:\n      K: 1,2\n")
    args = ["--config-dir", str(tmp_path), "--config-name", "evil"]
    with pytest.raises(ConfigError, match=r"^sweep='../../escaped' is invalid: allowed a name without /"):
        check_overrides(args)
    check_overrides([*args, "sweep=fine"])  # the command line's name is the one used


@pytest.mark.parametrize("override, expect", [
    ("sweep=../x", "sweep='../x' is invalid"),
    ("logger.experiment='a\u2028b'", "logger.experiment='a\\u2028b' is invalid"),
    ("pretrained='a\tb'", "pretrained='a\\tb' is invalid"),
])
def test_a_composed_config_with_a_hostile_name_is_refused(override, expect):
    """What a YAML sets (a sweep config, an experiment) is checked again once composed."""
    with pytest.raises(ConfigError, match="^" + expect.replace("\\", "\\\\").replace("(", "\\(")):
        validate(compose_cfg(override))


def test_a_run_name_made_from_a_yaml_value_holds_no_control_character():
    cfg = compose_cfg("method=localsgd")
    assert run_name(cfg, overrides=["epochs=3", "dataset.path='x\ny'"], job=None) == \
        "localsgd-K1-H1-sgdm-s0-epochs3-path=x?y"


# ----------------------------------------------------------------------------- MLflow searches


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One run per hostile sweep name (config digest "d"), and one parent run per name, stopped."""
    path = tmp_path_factory.mktemp("names") / "mlflow.db"
    client = mlflow_client(f"sqlite:///{path}")
    experiment = client.create_experiment("x")
    for name in HOSTILE:
        run = client.create_run(experiment, tags={"sweep": name, CONFIG_HASH_TAG: "d"})
        client.set_terminated(run.info.run_id, "FINISHED")
        parent = client.create_run(experiment, tags={PARENT_TAG: name, "sweep_params": "K=1,2"})
        client.set_terminated(parent.info.run_id, "KILLED")
    return path, client


@pytest.mark.parametrize("name", HOSTILE)
def test_every_sweep_name_finds_its_own_runs(name, store):
    path, client = store
    logger = SimpleNamespace(tracking_uri=f"sqlite:///{path}", experiment="x")
    found = find_finished_run(logger, name, "d")
    assert found is not None and found.data.tags["sweep"] == name
    from dpl.report.fetch import fetch_runs

    assert [r.params for r in fetch_runs(client, "x", name, history_keys=())] == [{}]
    runs = client.search_runs([client.get_experiment_by_name("x").experiment_id], tag_filter("sweep", name))
    assert name in [r.data.tags["sweep"] for r in runs]


@pytest.mark.parametrize("name", ['a"b\\', "a'b\"c", "plain'"])
def test_a_stopped_sweep_with_any_name_continues_in_its_parent_run(name, store):
    path, client = store
    config = OmegaConf.create({"logger": {"tracking_uri": f"sqlite:///{path}", "experiment": "x"}})
    parent = _unfinished_parent(config, name, "K=1,2")
    if name == "plain'":
        assert parent is None  # no such sweep
        return
    assert client.get_run(parent).data.tags[PARENT_TAG] == name


def test_a_sweep_named_with_a_quote_and_a_backslash_runs_again_and_skips_what_finished(tmp_path):
    """The probe's crash: the second run of sweep ``a"b\\`` searched MLflow with a broken filter."""
    args = ["--config-name", "localsgd_grid", "sweep='a\"b\\\\'", "K=2", "H=2,4", "dataset=synthetic",
            "dataset.num_train=200", "dataset.num_test=50", "batch_size=32", "epochs=1", "progress=false",
            "device=cpu", "logger.plots=false"]
    for _ in range(2):  # the second run finds each job of the first finished
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("DPL_SWEEP_PARENT_RUN_ID", raising=False)
            proc = run_cli(tmp_path, args)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("already finished") == 2, proc.stdout[-3000:]
    (folder,) = (tmp_path / "multirun").iterdir()
    assert folder.name == 'a"b\\' and len(list(folder.glob("*/*/checkpoint.pt"))) == 2


# ----------------------------------------------------------------------------- the results CSV


def test_results_csv_cells_that_would_be_formulas_are_text_and_numbers_stay_numbers(tmp_path):
    path = tmp_path / "results.csv"
    row = {"run_name": '=HYPERLINK("x")', "plus": "+1", "at": "@SUM(A1:A9)", "tab": "\tx", "cr": "\rx",
           "minus": "-cmd|' /C calc'!A0", "loss": -0.5, "lr": "-1e-3", "tiny": -1e-05, "floor": float("-inf"),
           "n": -3, "plain": "a=b", "job_dir": "job1"}
    append_result_row(path, row)
    append_result_row(path, {**row, "job_dir": "job2"})  # the first row is rewritten: escaped once
    first, second = list(csv.DictReader(path.open(newline="")))
    assert first == {**second, "job_dir": "job1"}
    assert {k: first[k] for k in ("run_name", "plus", "at", "tab", "cr", "minus")} == \
        {"run_name": "'=HYPERLINK(\"x\")", "plus": "'+1", "at": "'@SUM(A1:A9)", "tab": "'\tx", "cr": "'\rx",
         "minus": "'-cmd|' /C calc'!A0"}
    assert float(first["loss"]) == -0.5 and float(first["lr"]) == -1e-3 and float(first["tiny"]) == -1e-05
    assert first["floor"] == "-inf" and int(first["n"]) == -3 and first["plain"] == "a=b"


def test_an_older_results_csv_is_escaped_when_rewritten(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text('job_dir,run_name,loss\nold,=1+1,-0.25\n')
    append_result_row(path, {"job_dir": "new", "run_name": "x", "loss": -1})
    assert [(r["run_name"], r["loss"]) for r in csv.DictReader(path.open(newline=""))] == \
        [("'=1+1", "-0.25"), ("x", "-1")]


@pytest.mark.parametrize("value, cell", [("=1", "'=1"), ("'=1", "'=1"), ("-", "'-"), ("-.5", "-.5"),
                                         ("-5e+07", "-5e+07"), ("-1.", "-1."), ("-1e", "'-1e"), (None, ""),
                                         (-2.5, "-2.5"), ("1-2", "1-2")])
def test_csv_cell(value, cell):
    assert csv_cell(value) == cell and csv_cell(csv_cell(value)) == cell


def test_the_job_dirs_result_csv_is_escaped_too(tmp_path):
    from dpl.run.job import run

    cfg = compose_cfg(f"results_csv={tmp_path / 'results.csv'}", "logger=none", "epochs=1",
                      "dataset.num_train=200", "dataset.num_test=50", "logger.run_name='=HYPERLINK(\"x\")'")
    run(cfg, out_dir=tmp_path / "job")
    for path in (tmp_path / "job" / "result.csv", tmp_path / "results.csv"):
        (row,) = csv.DictReader(Path(path).open(newline=""))
        assert row["logger.run_name"] == "'=HYPERLINK(\"x\")"
