"""The configuration's reference, generated from the registries: every group, every option, every key with
its default (as Hydra composes the option) and its documentation (the schema's ``key(default, doc)``).

``docs/configuration.md`` is this text (its build hook, ``docs/hooks.py``, calls :func:`reference`); a key
without documentation fails the build (:class:`UndocumentedKey`), so the reference cannot fall behind.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from dpl.config.root import NODES, Config
from dpl.config.schema import doc_of
from dpl.config.store import CONF_DIR, default_options, register_configs, registries


class UndocumentedKey(ValueError):
    """A schema key written without its documentation (``key(default, doc)``)."""


def _doc(schema: type, field: dataclasses.Field, where: str) -> str:
    doc = doc_of(field)
    if not doc:
        raise UndocumentedKey(f"{where}.{field.name} ({schema.__name__}) has no documentation: write it as "
                              f"key(default, \"what it is\")")
    return doc


def _cell(value: Any) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str) and value == "???":
        return "–"
    return f"`{value}`".replace("|", "\\|")


def _rows(schema: type, node: Any, where: str, skip: Iterable[str] = ()) -> list[str]:
    rows = []
    for field in dataclasses.fields(schema):
        if field.name in skip:
            continue
        doc = _doc(schema, field, where)
        value = node.get(field.name) if node is not None else None
        if dataclasses.is_dataclass(field.type if isinstance(field.type, type) else None) or \
                isinstance(value, DictConfig):  # a node of keys (method.outer): a row per key
            sub = OmegaConf.get_type(value) if isinstance(value, DictConfig) else None
            for inner in _rows(sub, value, f"{where}.{field.name}") if sub else []:
                rows.append(inner.replace("| `", f"| `{field.name}.", 1))
            continue
        rows.append(f"| `{field.name}` | {_cell(value)} | {_text(doc)} |")
    return rows


def _text(doc: str) -> str:
    return doc.replace("|", "\\|")  # a table cell: its pipes are text


def _table(rows: list[str]) -> list[str]:
    return ["| key | default | what it is |", "|---|---|---|", *rows] if rows else ["(no keys of its own)"]


def _summary(build: Any) -> str:
    """The first paragraph of a builder's docstring, its Sphinx roles as code (``:class:`~.a.B``` -> ```B```)."""
    doc = inspect.getdoc(build) if build is not None else None
    text = doc.split("\n\n")[0].replace("\n", " ") if doc else ""
    return re.sub(r":\w+:`~?\.?([^`]+)`", lambda m: f"`{m.group(1).rsplit('.', 1)[-1]}`", text).replace("``", "`")


def reference() -> str:
    """The configuration reference as Markdown (see the module doc)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    defaults = default_options()
    out = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = compose("config")
        raw = OmegaConf.to_container(base, resolve=False)
        groups = registries()
        out += ["## The run's own keys", "",
                "Set on the command line as `key=value` (`python -m dpl K=4 H=16`).", ""]
        own = [f for f in dataclasses.fields(Config) if f.name not in groups and f.name not in NODES]
        out += _table([f"| `{f.name}` | {_cell(raw.get(f.name))} | {_text(_doc(Config, f, 'config'))} |" for f in own])
        for node, schema in NODES.items():
            out += ["", f"## `{node}`", "", _doc(Config, next(f for f in dataclasses.fields(Config) if f.name == node),
                                                  "config").capitalize() + ".", ""]
            out += _table([row.replace("| `", f"| `{node}.", 1) for row in _rows(schema, base[node], node)])
        for group, registry in groups.items():
            out += ["", f"## `{group}`", "", f"{registry.doc.capitalize()}. Default: `{group}={defaults.get(group)}`; "
                    f"options: {', '.join(f'`{n}`' for n in registry)}.", ""]
            for name, option in registry.items():
                extra = ["model=gpt_tiny"] if group == "dataset" and option.facts_for(
                    compose("config", overrides=[f"{group}={name}"])[group]).text else []
                extra = ["dataset=text"] if group == "model" and option.facts.text else extra
                out += [f"### `{group}={name}`", ""]
                summary = _summary(option.build) if option.build is not None else ""
                if option.schema is None:  # an ablation: the keys it sets
                    d = option.facts
                    sets = ", ".join(f"{k}={_cell(v).strip('`')}" for k, v in d.paper_values.items())
                    out += [f"The study: {d.study}. The papers: {d.paper}. For {d.applies_to}."
                            + (f" Sets `{sets}`." if sets else ""), ""]
                    continue
                if summary:
                    out += [summary, ""]
                node = compose("config", overrides=[f"{group}={name}", *extra])[group]
                rows = [row.replace("| `", f"| `{group}.", 1) for row in _rows(option.schema, node, group, skip=("name",))]
                out += _table(rows) + [""]
    return "\n".join(out).rstrip() + "\n"
