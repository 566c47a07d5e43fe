"""The one lookup every registry uses: ``registry[name]`` or a one-line error.

One config group = one folder in ``conf/`` = one registry (a plain dict) in the module of
its components, keyed by the same names; :func:`dpl.config.validate.registries` lists them all
(tests/test_config.py checks they agree with ``conf/``). This module imports nothing of
dpl, so every component can use it.
"""

from __future__ import annotations

from typing import Mapping, TypeVar

T = TypeVar("T")


def lookup(registry: Mapping[str, T], key: str, name: str) -> T:
    """``registry[name]``, or a one-line KeyError naming ``key`` and the allowed names."""
    if name not in registry:
        raise KeyError(f"{key}={name!r} is unknown: allowed {', '.join(sorted(registry))}")
    return registry[name]
