"""``python -m dpl --help``: the config groups with their options, and every top-level key in one line each,
read from dpl's registries and ``conf/``'s files.

Hydra's own help lists the groups by building its config repository once per group (a deep copy of the
whole ConfigStore each time: 9 to 40 seconds on a 2-core machine) and shows the internal ``schema/*``
groups as if they were options. This text composes nothing and imports neither torch nor any plugin's
sweeper. ``--cfg job`` still prints the composed config (with any overrides), ``--hydra-help`` Hydra's help.
"""

from __future__ import annotations

import dataclasses
import shutil
import textwrap
from typing import Any

from omegaconf import OmegaConf

from dpl.config.overrides import group_options
from dpl.config.root import NODES, Config
from dpl.config.schema import doc_of
from dpl.config.store import CONF_DIR, GROUPS, default_options

USAGE = """\
dpl: data-parallel training, measured. python -m dpl [group=option ...] [key=value ...]

  python -m dpl method=localsgd K=8 H=16          one run
  python -m dpl -m method=localsgd K=2,4,8 H=4,16 a sweep (one run per combination)
  python -m dpl --config-name <sweep>              a sweep of sweeps/<sweep>.yaml
  python -m dpl <overrides> --cfg job              the composed config, every key of the chosen options
  python -m dpl.report                             tables and figures of a sweep"""


def _value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _key_lines(schema: type, values: Any, prefix: str, skip: set[str], width: int) -> list[str]:
    """One line per key of ``schema``: its dotted name, its default (``values``' where given) and its doc."""
    lines = []
    for field in dataclasses.fields(schema):
        if field.name in skip:
            continue
        default = values.get(field.name) if values is not None and field.name in values else (
            field.default if field.default is not dataclasses.MISSING else "")
        head = f"  {prefix}{field.name}={_value(default)}"
        doc = doc_of(field) or ""
        lines += _wrapped(head, doc, width)
    return lines


def _wrapped(head: str, text: str, width: int, column: int = 34) -> list[str]:
    """``head`` then ``text`` from ``column``, wrapped to ``width`` (the terminal's); a head longer than the
    column has a line of its own."""
    indent = " " * column
    width = max(width, column + 20)
    if len(head) >= column - 1:
        return [head, *textwrap.wrap(text, width=width, initial_indent=indent, subsequent_indent=indent,
                                     break_on_hyphens=False)]
    return textwrap.wrap(text, width=width, initial_indent=head.ljust(column), subsequent_indent=indent,
                         break_on_hyphens=False) or [head]


def help_text(width: int | None = None) -> str:
    """The help (see the module doc), wrapped to ``width`` columns (default: the terminal's, at most 120)."""
    width = width or min(shutil.get_terminal_size((100, 24)).columns, 120)
    defaults = default_options()
    top = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"), resolve=False)
    lines = [USAGE, "", "== Config groups (group=option; * the default) =="]
    for group in (*GROUPS, "experiment"):
        options = [f"{o}*" if o == defaults.get(group) else o for o in group_options(group)]
        lines += textwrap.wrap(", ".join(options), width=width, initial_indent=f"  {group}: ",
                               subsequent_indent=" " * (len(group) + 4), break_on_hyphens=False)
    lines += ["", "== Keys (key=value; each option's own keys: <group>=<option> --cfg job) =="]
    skip = {*GROUPS, *NODES}
    lines += _key_lines(Config, top, "", skip, width)
    for node, schema in NODES.items():
        lines += _key_lines(schema, None, f"{node}.", set(), width)
    lines += ["", "The configuration reference (every option's keys and defaults): docs/configuration.md.",
              "Hydra's flags (-m, --config-name, --cfg, --info ...): python -m dpl --hydra-help"]
    return "\n".join(lines)
