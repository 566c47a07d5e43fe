"""Options from outside dpl: the modules that register them, imported before the config is composed.

A module registers its options when it is imported (a codec, a dataset, an outer optimizer, a step
metric: docs/extending.md). ``python -m dpl`` imports

- every entry point of the group ``dpl.plugins`` of the installed packages (a package says
  ``[project.entry-points."dpl.plugins"] mine = "mypkg.dpl_options"`` in its pyproject.toml), and
- the modules named in the environment variable ``DPL_PLUGINS`` (comma-separated module names, found on
  ``sys.path``, e.g. ``DPL_PLUGINS=my_codec python -m dpl compression=my_codec``),

once per process. A name that cannot be imported is one line, as any config error.
"""

from __future__ import annotations

import importlib
import os
import re
from importlib import metadata

from dpl.errors import ConfigError

ENV = "DPL_PLUGINS"
GROUP = "dpl.plugins"
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_loaded: set[str] = set()


def load() -> list[str]:
    """Import the plugin modules not imported yet (see the module doc); the names imported now."""
    names = [n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()]
    entries = [e.value.split(":", 1)[0] for e in metadata.entry_points(group=GROUP)]
    new = [n for n in dict.fromkeys([*entries, *names]) if n not in _loaded]
    for name in new:
        if not _MODULE.fullmatch(name):  # a module name, never a path
            raise ConfigError(f"{ENV}={name!r} is invalid: allowed dotted module names (a,b.c)")
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"the plugin module {name!r} cannot be imported: {e}") from None
        _loaded.add(name)
    return new
