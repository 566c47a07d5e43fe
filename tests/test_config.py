"""Config composition, the registries' agreement with conf/, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from dpl.config.overrides import GROUPS, check_overrides, group_options
from dpl.config.store import registries, to_schema
from dpl.config.upgrade import RENAMED, upgrade_config, upgrade_params
from dpl.config.validate import validate
from dpl.errors import ConfigError
from tests.conftest import compose_cfg


def test_every_group_folder_matches_its_registry():
    for group, registry in registries().items():
        assert set(group_options(group)) == set(registry), group


ABLATION_ROWS = {"paper_lars": "lars_bs512"}  # a row each ablation applies to (default: study/slowmo)


@pytest.mark.parametrize("group", [g for g in GROUPS if g != "experiment"])
def test_every_option_composes_and_validates(group):
    # a dynamic H needs local steps; compression acts on the pseudo-gradient of local methods
    local = ["method=localsgd"] if group in ("dynamic_h", "compression") else []
    if group == "method":  # streaming's fragments take turns within a period: H a multiple of them
        local = ["H=8"]
    for option in group_options(group):
        if group == "ablation":  # an ablation sets keys of the options of the rows it is for
            local = [f"experiment=study/{ABLATION_ROWS.get(option, 'slowmo')}"]
        if group in ("dataset", "model"):  # text is for sequence models, images for image models
            text = registries()[group][option].facts_for(compose_cfg(f"{group}={option}", tiny=False)[group]).text
            local = [{"dataset": "model=gpt_tiny", "model": "dataset=text"}[group]] if text else []
        cfg = compose_cfg(f"{group}={option}", *local, tiny=False)
        node = cfg[group]  # ablation options set a plain key (and other keys, globally)
        assert (node.name if group != "ablation" else node) == option
        validate(cfg)


def test_experiments_compose():
    for option in group_options("experiment"):
        validate(compose_cfg(f"experiment={option}", tiny=False))


def test_defaults_follow_the_study():
    cfg = compose_cfg(tiny=False)
    assert (cfg.K, cfg.H, cfg.batch_size, cfg.epochs, cfg.patience) == (1, 1, 64, 150, 0)
    assert cfg.dataset.name == "cifar100" and cfg.optimizer.name == "sgdm" and cfg.method.name == "centralized"
    assert cfg.lr == cfg.optimizer.lr  # top-level lr follows the optimizer unless overridden
    assert compose_cfg("optimizer=adamw", "lr=0.3", tiny=False).lr == 0.3


@pytest.mark.parametrize("override,needle", [
    ("K=0", "K=0"), ("batch_size=-1", "batch_size=-1"), ("lr=abc", "lr='abc'"),
    ("optimizer=nope", "adamw, lamb, lars, muon, sgdm"), ("K=2,4,0", "K=0"), ("device=gpu", "auto, cpu, cuda"),
    ("optimizer.momentum=1.5", "optimizer.momentum"), ("nokey=1", "nokey"),
    ("+foo=1", "+foo is not a dpl config key"),
    ("+network.bandwdith_gbps=1", "did you mean network.bandwidth_gbps?"),
    ("optimzer.lr=0.1", "did you mean optimizer.lr?"),
    ("lr=inf", "lr=inf is invalid"), ("weight_decay=inf", "weight_decay=inf is invalid"),
    ("method.outer.lr=inf", "method.outer.lr=inf is invalid"), ("optimizer.lr=nan", "optimizer.lr=nan is invalid"),
    ("seed=1180591620717411303424", "seed="), ("logger.experiment=''", "logger.experiment='' is invalid"),
])
def test_preflight_rejects_in_one_line(override, needle):
    with pytest.raises(ConfigError) as e:
        check_overrides([override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_preflight_accepts_sweeps_and_valid_values():
    check_overrides(["K=2,4,8", "H=4,16,64", "lr=1e-3", "method=localsgd,slowmo", "optimizer.betas=[0.9,0.99]",
                     "dynamic_h=glob(*)"])
    # an interval is sampled by the Optuna sweeper; Hydra's basic sweeper cannot list it
    check_overrides(["--config-name", "optuna_lr", "lr=tag(log,interval(1e-4,1))", "hydra.sweeper.n_trials=4"])
    check_overrides(["hydra/sweeper=optuna", "lr=interval(1e-4,1)", "hydra.sweeper.direction=maximize"])
    with pytest.raises(ConfigError, match=r"^lr=interval\(1e-4,1\) is invalid with Hydra's basic sweeper"):
        check_overrides(["-m", "lr=interval(1e-4,1)"])


def test_validate_checks_composed_values():
    cfg = compose_cfg()
    cfg.sharding = "weird"
    with pytest.raises(ConfigError, match="sharding='weird'"):
        validate(cfg)


def test_dynamic_h_needs_a_method_with_local_steps():
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg("method=centralized", "dynamic_h=loss"))
    assert "dynamic_h='loss'" in str(e.value) and "method=localsgd, slowmo" in str(e.value)
    for method in ("localsgd", "slowmo"):
        validate(compose_cfg(f"method={method}", "dynamic_h=loss"))
    validate(compose_cfg("method=centralized", "dynamic_h=constant"))


@pytest.mark.parametrize("override,needle", [("K=0", "K=0"), ("optimizer=nope", "optimizer='nope'"),
                                             ("dynamic_h=loss", "dynamic_h='loss' is invalid with method"),
                                             ("lr=abc", "lr='abc'"), ("batch_size=-1", "batch_size"),
                                             ("optimizer.trust_coefficient=0.1", "not a key of optimizer=sgdm")])
def test_cli_exits_nonzero_with_one_line(override, needle, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dpl", override], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error:")
    assert not (tmp_path / "data").exists()  # failed before any data was touched


def _same(doc: str, value) -> bool:
    if value is None or isinstance(value, bool):
        return doc == {None: "null", True: "true", False: "false"}[value]
    try:
        return float(doc) == float(value)
    except (TypeError, ValueError):
        return doc == str(value)


def test_precision_is_fp32_by_default_and_checked():
    assert compose_cfg().precision == "fp32"
    cfg = compose_cfg("precision=bf16")
    validate(cfg)
    cfg.precision = "fp16"
    with pytest.raises(ConfigError, match="precision='fp16' is invalid: allowed one of fp32, bf16"):
        validate(cfg)



# ----------------------------------------------------------------------------- one schema per option


def test_every_option_has_its_schema_in_the_config_store_under_its_name():
    from hydra.core.config_store import ConfigStore

    from dpl.config.store import register_configs, schemas

    register_configs()
    store = ConfigStore.instance()
    for group, options in schemas().items():
        assert set(options) == set(group_options(group)) == set(registries()[group]), group
        assert set(store.list(f"schema/{group}")) == {f"{o}.yaml" for o in options}, group


def test_each_option_composes_to_exactly_its_schemas_keys():
    from dpl.config.store import option_keys, option_schema, schemas

    for group, options in schemas().items():
        for option in options:
            node = compose_cfg(f"{group}={option}", tiny=False)[group]
            assert OmegaConf.get_type(node) is option_schema(group, option), (group, option)
            assert list(node) == option_keys(group, option), (group, option)
    # the examples: lars has trust_coefficient and sgdm does not; cifar100 shows no synthetic keys
    assert "trust_coefficient" in compose_cfg("optimizer=lars").optimizer
    assert "trust_coefficient" not in compose_cfg("optimizer=sgdm").optimizer
    assert "noise" not in compose_cfg(tiny=False).dataset and "num_train" in compose_cfg(tiny=False).dataset
    assert "root" not in compose_cfg("dataset=synthetic").dataset
    assert "outer" not in compose_cfg("method=centralized").method and "outer" in compose_cfg("method=slowmo").method


def test_hydra_itself_refuses_a_key_the_option_lacks():
    """Without the command-line pre-check (e.g. a YAML or the compose API), composition fails."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="trust_coefficient"):
        compose_cfg("optimizer=sgdm", "optimizer.trust_coefficient=0.1")


@pytest.mark.parametrize("overrides,message", [
    (["optimizer.trust_coefficient=0.1"],
     "optimizer.trust_coefficient is not a key of optimizer=sgdm: allowed lr, weight_decay, grad_clip_norm, "
     "grad_clip_eps, decay_params, momentum, nesterov"),
    (["dataset.noise=0.1"], "dataset.noise is not a key of dataset=cifar100: allowed val_fraction, augment, "
                            "augment_val, crop_padding, root, download, num_train, num_test"),
    (["dataset=synthetic", "dataset.root=x"], "dataset.root is not a key of dataset=synthetic"),
    (["method=centralized", "method.outer.lr=0.5"], "method.outer.lr is not a key of method=centralized: allowed none"),
    (["engine.backend=gloo"], "engine.backend is not a key of engine=simulated: allowed compile, eval_batch_size, memory_format, threads, simulate"),
    (["method=slowmo,centralized", "method.outer.momentum=0.5"],
     "method.outer.momentum is not a key of method=centralized"),
    (["experiment=study/slowmo", "ablation=paper_lars"], "ablation=paper_lars does not apply here"),
])
def test_a_key_of_another_option_is_one_line_naming_the_allowed_keys(overrides, message):
    with pytest.raises(ConfigError) as e:
        check_overrides(overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_key_the_chosen_option_lacks_is_one_line_naming_its_keys():
    check_overrides(["optimizer=lars", "optimizer.max_trust_ratio=1.0"])  # lars and lamb bound the trust ratio
    with pytest.raises(ConfigError) as e:
        check_overrides(["optimizer.max_trust_ratio=1.0"])  # the default optimizer, sgdm, does not
    assert str(e.value) == ("optimizer.max_trust_ratio is not a key of optimizer=sgdm: "
                            "allowed lr, weight_decay, grad_clip_norm, grad_clip_eps, decay_params, momentum, nesterov")
    # an option chosen by another group's option: diloco brings adamw, which has no momentum
    with pytest.raises(ConfigError, match=r"^optimizer.momentum is not a key of optimizer=adamw: allowed "
                                          r"lr, weight_decay, grad_clip_norm, grad_clip_eps, decay_params, betas, eps$"):
        check_overrides(["method=diloco", "optimizer.momentum=0.5"])
    # every option of a sweep over the group must have it
    with pytest.raises(ConfigError, match="not a key of optimizer=sgdm"):
        check_overrides(["optimizer=lamb,sgdm", "optimizer.max_trust_ratio=1.0"])
    # the option comes with its keys: setting only its name is refused
    with pytest.raises(ConfigError, match=r"^optimizer.name cannot be set: choose the option with optimizer="):
        check_overrides(["optimizer.name=lars"])


def test_a_key_of_the_chosen_option_passes_wherever_the_option_is_chosen():
    check_overrides(["optimizer=lars", "optimizer.trust_coefficient=0.01"])
    check_overrides(["experiment=study/lars_bs512", "optimizer.trust_coefficient=0.01"])  # the row chooses lars
    check_overrides(["method=diloco", "optimizer.betas=[0.9,0.95]"])  # diloco chooses adamw
    check_overrides(["--config-name", "outer_optimizers", "method=slowmo", "method.outer.momentum=0.5"])
    # a sweep's config (in sweeps/) is composed too, not skipped: it chooses the method here
    with pytest.raises(ConfigError, match="method.outer.momentum is not a key of method=centralized"):
        check_overrides(["--config-name", "outer_optimizers", "method=centralized", "method.outer.momentum=0.5"])
    with pytest.raises(ConfigError, match="compression.error_feedback is not a key of compression=none"):
        check_overrides(["--config-name", "compression_dense", "compression=none,sign", "compression.error_feedback=true"])
    check_overrides(["experiment=study/lars_bs512", "ablation=paper_lars"])
    check_overrides(["dataset=synthetic", "dataset.num_train=10", "optimizer.lr=0.1"])  # lr: every optimizer's


def test_typed_rebuilds_a_saved_config_and_drops_keys_its_option_lacks():
    """A checkpoint's plain config becomes the typed one; configs saved before the per-option
    schemas carried every option's keys, which are dropped."""
    from dpl.components.optim import LarsConfig, SgdmConfig
    from dpl.config.store import typed

    cfg = compose_cfg("optimizer=lars")
    again = typed(OmegaConf.to_container(cfg))
    assert OmegaConf.get_type(again.optimizer) is LarsConfig and again == cfg
    old = OmegaConf.to_container(compose_cfg())
    old["optimizer"].update(trust_coefficient=1.0, betas=[0.9, 0.999], exclude_1d=True)
    restored = typed(old)
    assert OmegaConf.get_type(restored.optimizer) is SgdmConfig and "trust_coefficient" not in restored.optimizer
    validate(restored)


def test_cfg_job_and_mlflow_params_show_only_what_applies(tmp_path):
    from dpl.tracking.params import flatten_config

    out = subprocess.run([sys.executable, "-m", "dpl", "--cfg", "job"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120, check=True).stdout
    for absent in ("trust_coefficient", "noise", "betas", "switch_epoch", "h_min", "master_port"):
        assert absent not in out, absent
    flat = flatten_config(compose_cfg("optimizer=adamw"))
    assert "optimizer.betas" in flat and "optimizer.momentum" not in flat and "optimizer.trust_coefficient" not in flat


# ----------------------------------------------------------------------------- method.outer


@pytest.mark.parametrize("old,new", list(RENAMED.items()))
def test_a_key_of_before_method_outer_fails_naming_its_new_key(old, new):
    with pytest.raises(ConfigError) as e:
        check_overrides(["method=slowmo", f"{old}=0.5"])
    assert str(e.value).startswith(f"{old} was renamed {new} ") and "\n" not in str(e.value)


@pytest.mark.parametrize("overrides,message", [
    (["method=diloco", "method.outer.name=adam", "method.outer.betas=[0.9,1]"], "method.outer.betas=[0.9, 1] is invalid"),
    (["method=diloco", "method.outer.eps=0"], "method.outer.eps=0.0 is invalid"),
    (["method=localsgd", "method.outer.weight_decay=-1"], "method.outer.weight_decay=-1.0 is invalid"),
    (["method=diloco", "method.outer=5"], "method.outer=5 is invalid: allowed its keys"),
    (["method=diloco", "method.outer={name:adam,lr:0}"], "method.outer.lr=0.0 is invalid"),
    (["method=diloco", "method.outer.lrr=1"], "did you mean method.outer.lr?"),
])
def test_a_bad_outer_value_is_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        check_overrides(overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_outer_names_are_the_outer_registry():
    from dpl.components.optim import OUTER_OPTIMIZERS

    assert tuple(OUTER_OPTIMIZERS) == ("sgd", "adamw", "adam")
    for name in OUTER_OPTIMIZERS:  # every name composes, validates and builds
        check_overrides(["method=diloco", f"method.outer.name={name}"])
        cfg = compose_cfg("method=diloco", f"method.outer.name={name}")
        to_schema(cfg)


def test_an_old_saved_config_resumes_with_its_values_under_method_outer():
    """A checkpoint's config from before method.outer (SlowMo's beta/alpha, DiLoCo's outer_lr,
    outer_momentum, nesterov) is, once upgraded, the config its values give with the new keys."""
    from dpl.config.store import typed

    old_new = [
        ({"name": "slowmo", "beta": 0.2, "alpha": 0.5, "restart_each_epoch": True},
         ["method=slowmo", "method.outer.momentum=0.2", "method.outer.lr=0.5", "method.restart_each_epoch=true"]),
        ({"name": "diloco", "outer_lr": 0.3, "outer_momentum": 0.8, "nesterov": False, "restart_each_epoch": False},
         ["method=diloco", "method.outer.lr=0.3", "method.outer.momentum=0.8", "method.outer.nesterov=false"]),
        ({"name": "localsgd"}, ["method=localsgd"]),
        ({"name": "post_local", "switch_epoch": 3}, ["method=post_local", "method.switch_epoch=3"]),
    ]
    for old, new in old_new:
        expected = compose_cfg(*new)
        saved = OmegaConf.to_container(expected, resolve=True)
        saved.pop("hydra", None)
        saved["method"] = old
        assert typed(upgrade_config(saved)).method == expected.method, old["name"]
    today = {"method": {"name": "centralized"}, "K": 2, "compression": {"name": "none"}, "sync_at_epoch_end": False}
    assert upgrade_config(today) == today
    # before the key, every epoch's end synced the workers
    assert upgrade_config({"method": {"name": "localsgd"}})["sync_at_epoch_end"] is True


def test_old_mlflow_params_are_the_params_a_new_run_of_the_same_config_logs():
    from dpl.tracking.params import flatten_config

    def method_params(*overrides):
        return {k: v for k, v in flatten_config(compose_cfg(*overrides)).items() if k.startswith("method.")}

    slowmo = {"method.name": "slowmo", "method.beta": "0.2", "method.alpha": "0.5", "method.restart_each_epoch": "True"}
    upgraded = upgrade_params(slowmo)
    assert upgraded.pop("sync_at_epoch_end") == "True"  # as its epochs' ends did
    assert upgraded == method_params("method=slowmo", "method.outer.momentum=0.2", "method.outer.lr=0.5",
                                            "method.restart_each_epoch=true")
    assert upgrade_params({"method.name": "localsgd", "sync_at_epoch_end": "False"}) == {
        **method_params("method=localsgd"), "sync_at_epoch_end": "False"}
    new = {**method_params("method=diloco", "method.outer.name=adam"), "sync_at_epoch_end": "False"}
    assert upgrade_params(new) == new  # a run logged with the node is left as it is


@pytest.mark.parametrize("overrides,needle", [
    (["scheduler=cosine", "lr=0.1", "scheduler.min_lr=10"], "scheduler.min_lr=10.0 is invalid with lr=0.1: allowed "
                                                            "at most 0.1"),
    (["scheduler=poly", "lr=0.1", "scheduler.min_lr=0.2"], "scheduler.min_lr=0.2 is invalid with lr=0.1"),
    # the floor is held to the lr after scaling: K=2 x 32 is half of base 128
    (["lr_scaling=linear", "K=2", "batch_size=32", "base_batch_size=128", "lr=0.1", "scheduler=cosine",
      "scheduler.min_lr=0.08"], "with lr=0.1 (0.05 after lr_scaling=linear): allowed at most 0.05"),
])
def test_a_floor_above_the_lr_is_refused(overrides, needle):
    with pytest.raises(ConfigError, match=r"^[^\n]+$") as e:
        validate(compose_cfg(*overrides))
    assert needle in str(e.value)


def test_a_floor_at_or_below_the_scaled_lr_is_allowed():
    validate(compose_cfg("scheduler=cosine", "lr=0.1", "scheduler.min_lr=0.1"))
    validate(compose_cfg("lr_scaling=linear", "K=4", "batch_size=64", "base_batch_size=64", "lr=0.1",
                         "scheduler=cosine", "scheduler.min_lr=0.3"))


@pytest.mark.parametrize("override", ["epochs=100000000000", "max_steps=100000000000"])
def test_a_budget_beyond_the_lr_table_is_refused_before_anything_is_read(override):
    with pytest.raises(ConfigError, match=r"allowed at most 10000000 \(the steps an lr schedule spans\)"):
        validate(compose_cfg(override))


def test_epochs_whose_steps_exceed_the_lr_table_are_refused_before_it_is_built():
    from dpl.core.schedules import MAX_TABLE_STEPS, lr_table

    cfg = compose_cfg("scheduler=cosine").scheduler
    with pytest.raises(ConfigError, match="epochs=5000000 is invalid with 4 steps per epoch: allowed at most 2500000"):
        lr_table(cfg, 0.1, 5_000_000, 4, 0.0)
    with pytest.raises(ConfigError, match=f"max_steps={MAX_TABLE_STEPS + 1} is invalid"):
        lr_table(cfg, 0.1, 1, 4, 0.0, max_steps=MAX_TABLE_STEPS + 1)


def test_sigterm_before_the_run_started_says_nothing_was_recorded_and_leaves_nothing(tmp_path):
    """SIGTERM while the lr table of a long run is built: no MLflow run exists yet, so the line must not
    promise a KILLED run to resume, and the job dir Hydra made goes."""
    import os
    import signal
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    env.pop("DPL_SWEEP_PARENT_RUN_ID", None)
    job = tmp_path / "job"
    args = ["dataset=synthetic", "dataset.num_train=200", "dataset.num_test=50", "batch_size=32",
            "epochs=1000000", "progress=false", "device=cpu", "logger.plots=false", f"hydra.run.dir={job}"]
    proc = subprocess.Popen([sys.executable, "-m", "dpl", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while "tabulating the lr" not in _text_of(job / "dpl.log"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == "error: interrupted by SIGTERM before the run started; nothing was recorded"
    assert list(tmp_path.iterdir()) == []


def _text_of(path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
