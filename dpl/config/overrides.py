"""The command line, checked before Hydra composes anything.

Hydra reports a bad override over several lines (and only after composing); a researcher wants one
line naming the key and what it accepts, before any data is loaded. :func:`check_overrides` checks
every key against the schemas (a typo names the nearest real key) and every value of a sweep
(``K=2,4,8``) against its key's type and range, so a sweep does not die at its fifth job; Hydra's own
groups (sweeper, launcher) and their keys are checked the same way. The composed config is
:mod:`dpl.config.validate`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import itertools
import shutil
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from omegaconf import DictConfig

from dpl.config.root import NODES as NESTED
from dpl.config.root import Config
from dpl.config.store import CONF_DIR, option_keys, option_schema, registries, schemas
from dpl.config.store import GROUPS as REGISTERED_GROUPS
from dpl.config.upgrade import RENAMED
from dpl.errors import ConfigError, first_line
from dpl.tracking.loggers import LOGGERS
from dpl.tracking.run_names import CONTROL, NAME_KEYS, check_name_keys, name_problem
from dpl.tracking.sweep import check_seeds

SWEEPS_DIR = CONF_DIR.parent / "sweeps"  # the sweep configs (`--config-name <sweep>`)
GROUPS = (*REGISTERED_GROUPS, "experiment")  # experiment: presets of keys of several groups, YAML only


def group_keys(group: str) -> list[str]:
    """The keys any option of ``group`` has (in the order of first appearance); a node's keys
    dotted below it (``outer.lr``: method.outer is one schema, dpl.components.optim.OuterOptimizerConfig)."""
    keys: dict[str, None] = {}
    for option in schemas()[group]:
        for f in dataclasses.fields(option_schema(group, option)):
            node = _node_schema(option_schema(group, option), f.name)
            keys.update(dict.fromkeys([f.name, *(f"{f.name}.{g.name}" for g in dataclasses.fields(node))]
                                      if node else [f.name]))
    return list(keys)


def _node_schema(schema: type, name: str) -> type | None:
    """The dataclass of field ``name`` of ``schema`` when it is a node (``outer``), else None."""
    typ = typing.get_type_hints(schema).get(name)
    return typ if dataclasses.is_dataclass(typ) else None


def config_keys() -> list[str]:
    """Every key a dpl config can have, dotted (``K``, ``optimizer.lr``, ``network.bandwidth_gbps``);
    a group's keys are those of any of its options."""
    keys = [f.name for f in dataclasses.fields(Config) if f.name not in schemas() and f.name not in NESTED]
    for group in schemas():
        keys += [f"{group}.{k}" for k in group_keys(group)]
    for node, schema in NESTED.items():
        keys += [f"{node}.{f.name}" for f in dataclasses.fields(schema)]
    return keys


def check_key(key: str, adding: bool = False) -> None:
    """An unknown key fails in one line naming the nearest real one: Hydra would accept
    ``+network.bandwdith_gbps=1`` as a new key and train with the default bandwidth."""
    if key in GROUPS or key.split(".", 1)[0] == "hydra":
        return
    if not key:
        raise ConfigError("an override needs a key: key=value (e.g. K=4)")
    keys = config_keys()
    if key in RENAMED and key not in keys:  # method.alpha is streaming DiLoCo's own key again (check_applies)
        raise ConfigError(f"{key} was renamed {RENAMED[key]} (the local methods' outer optimizer is one node, "
                          f"method.outer)")
    if key in keys:
        if adding:  # Hydra: "Could not append to config. An item is already at 'K'" and a traceback
            raise ConfigError(f"+{key} is invalid: {key} is already a dpl config key (set it with {key}=...)")
        return
    near = difflib.get_close_matches(key, keys + list(GROUPS), n=1, cutoff=0.6)
    hint = f"did you mean {near[0]}?" if near else "see `python -m dpl --cfg job` for all keys"
    shown = ("+" if adding else "") + key
    raise ConfigError(f"{shown} is not a dpl config key: {hint}")


def _option_specific(key: str) -> bool:
    """``optimizer.trust_coefficient`` (lars and lamb have it, sgdm not) but not ``optimizer.lr``;
    ``method.outer.lr`` by its node, ``outer`` (the local methods have it, centralized not)."""
    group, dot, name = key.partition(".")
    name = name.split(".", 1)[0]
    return bool(dot) and group in schemas() and not all(name in option_keys(group, o) for o in schemas()[group])


def check_applies(key: str, choices: dict[str, str]) -> None:
    """``key`` must be a key of the option its group has in ``choices`` (Hydra's chosen options)."""
    group, _, name = key.partition(".")
    name = name.split(".", 1)[0]  # method.outer.lr: the option must have the node
    option = choices.get(group)
    if option in schemas().get(group, {}) and name not in option_keys(group, option):
        if key in RENAMED:  # SlowMo's old method.alpha (streaming DiLoCo has an alpha of its own)
            raise ConfigError(f"{key} was renamed {RENAMED[key]} for {group}={option} (the local methods' outer "
                              f"optimizer is one node, method.outer)")
        allowed = ", ".join(k for k in option_keys(group, option) if k != "name") or "none"
        raise ConfigError(f"{key} is not a key of {group}={option}: allowed {allowed}")


def check_ablation(choices: dict[str, str]) -> None:
    """An ablation sets its keys; one whose keys the run's options lack (``paper_lars`` on SGDM) is refused."""
    ablation = registries()["ablation"].get(choices.get("ablation"))
    departure = ablation.facts if ablation is not None else None
    for key in departure.paper_values if departure else ():
        try:
            check_applies(key, choices)
        except ConfigError as e:
            raise ConfigError(f"ablation={choices['ablation']} does not apply here (it is for "
                              f"{departure.applies_to}): {e}") from None


def chosen_options(overrides: list, args: list[str], conf_dir: Path = CONF_DIR) -> list[dict[str, str]]:
    """The options Hydra will choose for every group, once per combination of the group choices on the
    command line (``optimizer=sgdm,lars`` gives two); an experiment or method may choose others
    (``method=diloco`` brings ``optimizer=adamw``), so ask Hydra: it composes the defaults lists only."""
    choice_lists, ablations = [], [None]
    for o in overrides:
        if o.key_or_group in GROUPS and not o.package and not o.is_delete():
            values = list(_values(o))
            if not values:  # a glob: any option
                return []
            if o.key_or_group == "ablation":  # it only sets keys, which may not compose: checked apart
                ablations = values
                continue
            choice_lists.append([f"{o.key_or_group}={v}" for v in values])
    found = []
    with composer(args, conf_dir) as compose:
        for combo in itertools.islice(itertools.product(*choice_lists), 64):
            try:
                cfg = compose(list(combo))
            except Exception:  # a broken config: the run reports Hydra's own error
                continue
            choices = dict(cfg.hydra.runtime.choices)
            found += [{**choices, **({"ablation": a} if a else {})} for a in ablations]
    return found


def config_name(args: list[str]) -> str:
    """The primary config the command line names (``--config-name <sweep>``), else ``config``."""
    return _flag(args, ("--config-name", "-cn")) or "config"


def _flag(args: list[str], names: tuple[str, ...]) -> str | None:
    for i, a in enumerate(args):
        for n in names:
            if a == n and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(n + "="):
                return a.split("=", 1)[1]
    return None



def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """The option names of ``group``: its registered options and its YAML files, sub-folders included
    (``experiment=study/localsgd``)."""
    root = conf_dir / group
    files = {p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml")}
    return sorted(files | set(registries().get(group, {})))


def check_overrides(args: Iterable[str], conf_dir: Path = CONF_DIR) -> None:
    """Raise ConfigError for the first override whose key or value is invalid."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob

    args = list(args)
    check_printable(args)
    parser = OverridesParser.create()
    parsed = []
    for text in override_args(args):
        try:
            parsed += parser.parse_overrides([text])
        except Exception as e:  # Hydra's grammar errors, several lines each
            raise ConfigError(f"{text} is not a valid override: {str(e).strip().splitlines()[0]}") from None
    check_names(parsed)
    specific = []
    for o in parsed:
        key = o.key_or_group
        if key.startswith("hydra") or o.package:
            continue
        if o.is_delete():
            if key not in GROUPS:  # a key of the typed schema: Hydra fails with a traceback
                raise ConfigError(f"~{key} is invalid: dpl config keys cannot be deleted (set a value, {key}=...)")
            continue
        check_key(key, o.is_add())
        if o.is_sweep_override() and not isinstance(o.value(), Glob) and not list(_values(o)):
            raise ConfigError(f"{o.input_line} is invalid: the sweep has no values")
        group, _, name = key.partition(".")
        if name == "name" and group in schemas():  # would keep the old option's keys and schema
            raise ConfigError(f"{key} cannot be set: choose the option with {group}=<option> "
                              f"(one of {', '.join(schemas()[group])}), which brings its keys")
        if _option_specific(key):
            specific.append(key)
        values = list(_values(o))
        if key in GROUPS:
            options = group_options(key, conf_dir)
            for v in values:
                if v is not None and str(v) not in options:
                    raise ConfigError(f"{key}={v!r} is invalid: allowed one of {', '.join(options)}")
            continue
        for v in values:
            check_value(key, v, o.is_add())
    check_hydra_overrides(parsed, args, conf_dir)
    check_launcher_overrides(parsed, args, conf_dir)
    check_launcher(parsed, args, conf_dir)
    ablating = any(o.key_or_group == "ablation" for o in parsed)
    if specific or ablating:  # a key only some options have: it must be one of the chosen option's
        for choices in chosen_options(parsed, args, conf_dir):
            for key in specific:
                check_applies(key, choices)
            check_ablation(choices)


def check_printable(args: list[str]) -> None:
    """No argument holds a control character (a newline, CR, tab, ESC ...): every value may end up in a
    name, a path, a log line or a CSV row, where a line break starts a line of its author's choosing;
    Hydra's grammar error would also quote it over two lines."""
    for arg in args:
        if CONTROL.search(arg):
            key, eq, value = arg.partition("=")
            shown = f"{key}={value!r}" if eq and not CONTROL.search(key) else repr(arg)
            raise ConfigError(f"{shown} is invalid: allowed no control characters (newline, carriage return, "
                              f"tab, NUL, ESC ...) on the command line")


def check_names(parsed: list) -> None:
    """The names (``sweep``, ``logger.experiment``, ``logger.run_name``, ``hydra.job.name``) hold no
    control character (Hydra's quoted strings may), and those that name a folder or file are one path
    component: ``sweep=../../x`` would put the sweep's jobs outside multirun/, ``hydra.job.name=../x``
    the job's log outside its dir (Hydra makes both before dpl sees the composed config)."""
    for o in parsed:
        key = o.key_or_group.lstrip("+~")
        if key not in NAME_KEYS or o.is_delete():
            continue
        for value in _values(o):
            why = name_problem(key, value)
            if why is not None:
                raise ConfigError(f"{key}={value!r} is invalid: {why}")


def check_yaml_names(cfg: DictConfig, parsed: list) -> None:
    """The names a sweep config (``--config-name``, maybe of the user's ``--config-dir``) sets, where the
    command line does not: Hydra makes the sweep's folder from them before any job is validated."""
    check_name_keys(cfg, skip=[o.key_or_group for o in parsed])


def check_launcher_overrides(parsed: list, args: list[str], conf_dir: Path = CONF_DIR) -> None:
    """``hydra.launcher.*`` of dpl's packed launcher: its own keys, with values it accepts (Hydra would
    report them in a traceback). Other launchers' keys are theirs to check."""
    keys = [o for o in parsed if o.key_or_group.startswith("hydra.launcher.")]
    if not keys:
        return
    with composer(args, conf_dir) as compose:
        launcher = compose([o.input_line for o in parsed if o.key_or_group == "hydra/launcher"]).hydra.launcher
    target = str(launcher.get("_target_", ""))
    if target.endswith("BasicLauncher"):
        raise ConfigError(f"{keys[0].key_or_group} is not a key of Hydra's basic launcher, which has none "
                          f"(the packed launcher's keys need hydra/launcher=packed)")
    if not target.startswith("hydra_plugins.dpl_launchers."):
        return
    name = {"SlurmLauncher": "slurm launcher", "LocalLauncher": "local launcher"}.get(target.rsplit(".", 1)[-1],
                                                                                      "packed launcher")
    at_least = {"max_pack": 1, **SUBMITIT_COUNTS}
    for o in keys:
        key = o.key_or_group[len("hydra.launcher."):]
        if key.split(".")[0] not in launcher or key == "_target_":
            allowed = ", ".join(str(k) for k in launcher.keys() if k != "_target_")
            raise ConfigError(f"{o.key_or_group} is not a key of the {name}: allowed {allowed}")
        for value in _values(o):
            low = at_least.get(key)
            unset = value is None and launcher.get(key) is None  # the plugin's "not asked for" (gpus_per_node)
            if low is not None and not unset and not (isinstance(value, int) and not isinstance(value, bool)
                                                      and value >= low):
                raise ConfigError(f"{o.key_or_group}={value!r} is invalid: allowed an integer >= {low}")
            if key == "fuse" and not isinstance(value, bool):
                raise ConfigError(f"{o.key_or_group}={value!r} is invalid: allowed true or false")


# The submitit launchers' counts (conf/hydra/launcher/): the least each allows.
SUBMITIT_COUNTS = {"timeout_min": 1, "tasks_per_node": 1, "nodes": 1, "array_parallelism": 1, "max_num_timeout": 0,
                   "cpus_per_task": 1, "gpus_per_node": 0, "gpus_per_task": 0, "signal_delay_s": 0}


def check_launcher(parsed: list, args: list[str], conf_dir: Path = CONF_DIR) -> None:
    """The launcher as it composes (chosen on the command line or by a sweep's YAML): the submitit
    plugin's typed keys hold their types (OmegaConf's error is a traceback otherwise), and under
    ``hydra/launcher=slurm`` the MLflow store is one every node reaches
    (:func:`dpl.tracking.store.check_store_for_launcher`) and Slurm is there, before any job is queued."""
    from dpl.tracking.store import check_store_for_launcher

    keys = [o for o in parsed if o.key_or_group.startswith("hydra.launcher.")]
    if not keys and not any(o.key_or_group == "hydra/launcher" for o in parsed) \
            and _flag(args, ("--config-name", "-cn")) is None:
        return
    keep = [o.input_line for o in parsed if not o.is_sweep_override() and (
        o.key_or_group in ("hydra/launcher", "logger") or o.key_or_group.startswith(("logger.", "hydra.launcher.")))]
    try:
        with composer(args, conf_dir) as compose:
            cfg = compose(keep)
    except Exception as e:  # noqa: BLE001 - OmegaConf's ValidationError, over several lines
        if not keys:
            raise
        raise ConfigError(f"{' '.join(o.input_line for o in keys)} is invalid: {first_line(e)}") from None
    check_yaml_names(cfg, parsed)
    target = str(cfg.hydra.launcher.get("_target_", "")).rsplit(".", 1)[-1]
    if LOGGERS.facts(cfg.logger).store:
        check_store_for_launcher(str(cfg.logger.tracking_uri), target)
    if target == "SlurmLauncher" and shutil.which("srun") is None:  # submitit's own check is a traceback
        raise ConfigError("hydra/launcher=slurm is invalid here: Slurm's commands (sbatch, srun) are not on PATH; "
                          "run it where they are (a cluster's login node), or try the sweep on this machine "
                          "with hydra/launcher=local")


# Hydra's flags that take a value (``--config-name optuna_lr``); the value is not an override.
VALUE_FLAGS = ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd", "--cfg", "-c",
               "--package", "-p", "--experimental-rerun")
INFO_TOPICS = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def override_args(args: list[str]) -> list[str]:
    """The overrides of a command line: every argument that is neither a flag nor a flag's value."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a in VALUE_FLAGS or (a in ("--info", "-i") and i + 1 < len(args) and args[i + 1] in INFO_TOPICS):
            i += 2
            continue
        if not a.startswith("-"):
            out.append(a)
        i += 1
    return out


def check_hydra_overrides(parsed: list, args: list[str], conf_dir: Path = CONF_DIR) -> None:
    """The primary config exists; an interval sweep has a sweeper that samples it; the Optuna
    sweeper's own keys hold values it accepts (Hydra and Optuna report them in tracebacks)."""
    name = _flag(args, ("--config-name", "-cn"))
    if name is not None and _flag(args, ("--config-path", "-cp")) is None:  # a --config-path: Hydra's to find
        dirs = [d for d in (_flag(args, ("--config-dir", "-cd")), str(SWEEPS_DIR), str(conf_dir)) if d]
        if not any((Path(d) / f"{name.removesuffix('.yaml')}.yaml").is_file() for d in dirs):
            known = sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml") if not p.stem.startswith("_"))
            raise ConfigError(f"--config-name {name} is invalid: allowed config, or a sweep of sweeps/ "
                              f"({', '.join(known)}), or a YAML of your --config-dir")
    from hydra.core.override_parser.types import IntervalSweep

    hydra_groups = [o.input_line for o in parsed if o.key_or_group.startswith("hydra/")]
    if hydra_groups:
        try:
            with composer(args, conf_dir) as compose:
                compose(hydra_groups)
        except Exception as e:  # Hydra's "Could not find ..." and its list of options, over several lines
            lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
            at = next((i for i, line in enumerate(lines) if line.startswith("Available options")), None)
            listed = [] if at is None else list(itertools.takewhile(lambda line: not line.endswith(":"),
                                                                    lines[at + 1:]))
            options = f": allowed one of {', '.join(listed)}" if listed else ""
            raise ConfigError(f"{' '.join(hydra_groups)} is invalid: {lines[0] if lines else type(e).__name__}"
                              f"{options}") from None
    interval = next((o for o in parsed if o.is_sweep_override() and isinstance(o.value(), IntervalSweep)), None)
    sweeper_keys = [o for o in parsed if o.key_or_group.startswith("hydra.sweeper.")]
    seed = next((o for o in parsed if o.key_or_group == "seed"), None)
    searching = name is not None or any(o.key_or_group == "hydra/sweeper" for o in parsed)
    if interval is None and not sweeper_keys and not (seed is not None and searching):
        return
    sweeper = sweeper_config(parsed, args, conf_dir)  # (the hydra.sweeper.* overrides not applied)
    optuna = "optuna" in str(sweeper.get("_target_", "")).lower()
    if interval is not None and not optuna:
        raise ConfigError(f"{interval.input_line} is invalid with Hydra's basic sweeper, which needs values to "
                          f"list: sample it with hydra/sweeper=optuna (or --config-name optuna_lr), or list "
                          f"values ({interval.key_or_group}=0.1,0.3,1)")
    for o in sweeper_keys:
        key = o.key_or_group[len("hydra.sweeper."):]
        if key.split(".")[0] not in sweeper:
            allowed = ", ".join(str(k) for k in sweeper.keys() if k != "_target_")
            raise ConfigError(f"{o.key_or_group} is not a key of this sweeper ({sweeper.get('_target_', 'basic')}): "
                              f"allowed {allowed}")
        value = o.value()
        if key == "direction" and value not in ("minimize", "maximize"):
            raise ConfigError(f"{o.input_line} is invalid: allowed minimize or maximize")
        if key in ("n_trials", "n_jobs") and not (isinstance(value, int) and not isinstance(value, bool)
                                                   and value >= 1):
            raise ConfigError(f"{o.input_line} is invalid: allowed an integer >= 1")
        if key == "seeds":
            check_seeds(value, o.input_line)
    seeds = next((o.value() for o in reversed(sweeper_keys) if o.key_or_group == "hydra.sweeper.seeds"),
                 sweeper.get("seeds"))
    searched = next((o.input_line for o in sweeper_keys if o.key_or_group == "hydra.sweeper.params.seed"),
                    "hydra.sweeper.params.seed" if "seed" in (sweeper.get("params") or {}) else None)
    check_seed_source(seeds, seed.input_line if seed is not None else searched)


def check_seed_source(seeds: Any, seed: str | None) -> None:
    """With ``hydra.sweeper.seeds`` the sweeper sets each job's seed: a ``seed`` override or a
    searched seed (``seed``, the line that sets it) as well would be overridden in silence."""
    if seeds is not None and seed is not None:
        raise ConfigError(f"{seed} is invalid with hydra.sweeper.seeds={list(seeds)}, which sets each job's "
                          f"seed: drop one of them")


def sweeper_config(parsed: list, args: list[str], conf_dir: Path = CONF_DIR) -> DictConfig:
    """``hydra.sweeper`` as Hydra composes it for this command line (its config name and sweeper choice)."""
    with composer(args, conf_dir) as compose:
        return compose([o.input_line for o in parsed if o.key_or_group == "hydra/sweeper"]).hydra.sweeper


@contextlib.contextmanager
def composer(args: list[str], conf_dir: Path = CONF_DIR) -> Iterator[Callable[[list[str]], DictConfig]]:
    """``compose(overrides)`` of the command line's primary config, Hydra's own config included."""
    from hydra import compose, initialize_config_dir

    from dpl.config.store import register_configs

    name = config_name(args)
    # Hydra finds the primary config only in the primary dir (not in hydra.searchpath): a sweep's is
    # in sweeps/ (or the user's --config-dir), and its `- config` default is found through the search path
    dirs = [d for d in (_flag(args, ("--config-dir", "-cd")), str(SWEEPS_DIR)) if d]
    primary = next((Path(d) for d in dirs if (Path(d) / f"{name}.yaml").is_file()), conf_dir)
    search = f"hydra.searchpath=[{','.join('file://' + str(Path(d).resolve()) for d in (conf_dir, *dirs))}]"
    register_configs()
    with initialize_config_dir(config_dir=str(primary.resolve()), version_base="1.3"):
        yield lambda overrides: compose(name, overrides=[*overrides, search], return_hydra_config=True)


def _values(o) -> Iterable[Any]:
    from hydra.core.override_parser.types import Glob, IntervalSweep

    if not o.is_sweep_override():
        return [o.value()]
    sweep = o.value()
    if isinstance(sweep, Glob):
        return []  # matched against the group's options by Hydra itself: nothing can be invalid
    if isinstance(sweep, IntervalSweep):
        return [sweep.start, sweep.end]
    return list(o.sweep_iterator())


def check_value(key: str, value: Any, adding: bool = False) -> None:
    """Type- and range-check one ``key=value`` against the schema dataclasses."""
    schema, name = Config, key
    if "." in key:
        group, name = key.split(".", 1)
        node, _, sub = name.partition(".")
        # a group's key: type- and range-checked by the first option that has it
        schema = NESTED.get(group) or next(
            (s for s in schemas().get(group, {}).values() if node in {f.name for f in dataclasses.fields(s)}), None)
        if schema is not None and sub:  # a node's key (method.outer.lr): checked by the node's schema
            schema, name = _node_schema(schema, node), sub
        if schema is None or "." in name:
            check_key(key, adding)
            return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    if name not in fields:
        check_key(key, adding)
        return
    if name in schemas() or name in NESTED:
        return
    if _node_schema(schema, name) is not None:  # method.outer={name:adam,lr:0.001}: each of its keys
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} is invalid: allowed its keys, e.g. {key}.lr=0.5 or {key}={{lr:0.5}}")
        for sub, v in value.items():
            check_value(f"{key}.{sub}", v, adding)
        return
    typ = typing.get_type_hints(schema)[name]
    value = _coerce(key, value, typ)
    try:
        schema(**{name: value}) if schema is not Config else Config(**{name: value})
    except ConfigError as e:
        if e.args[0].startswith(f"{key}="):
            raise
        # another field's check failed on its default; only the overridden key matters here


def _coerce(key: str, value: Any, typ: Any) -> Any:
    optional = typing.get_origin(typ) is typing.Union and type(None) in typing.get_args(typ)
    if optional:
        if value is None:
            return None
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    if typing.get_origin(typ) is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} is invalid: allowed a list, e.g. {key}=[0.9,0.999]")
        return value
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: value is not None,
    }.get(typ, True)
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: allowed {'null or ' if optional else ''}{_type_name(typ)}")
    return float(value) if typ is float else value


def _type_name(typ: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(typ, str(typ))
