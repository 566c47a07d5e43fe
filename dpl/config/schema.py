"""How an option's schema is written: its keys with their defaults and one line of documentation
each (:func:`key`), and the range checks its ``__post_init__`` runs.

A schema is a dataclass next to the option's code (its registration, :mod:`dpl.registry`). OmegaConf
types every key when Hydra composes; ``__post_init__`` checks ranges and choices when the composed
config is validated (:mod:`dpl.config.validate`), so a bad value fails before any data is loaded, in
one line naming the key (:class:`~dpl.errors.ConfigError`). Every key carries its documentation
(``key(default, "what it is")``), from which the documentation's key tables are generated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

from dpl.errors import ConfigError

# Numbers become float32 tensors (lr tables, coefficients): beyond this they overflow there.
FLOAT32_MAX = 3.4028234663852886e38
DOC = "doc"  # the metadata entry of a key's documentation


def key(default: Any, doc: str) -> Any:
    """A schema key: its ``default`` and one line saying what it is (a mutable default is copied per
    instance, as ``dataclasses.field(default_factory=...)`` does)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={DOC: doc})
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: dataclasses.replace(default), metadata={DOC: doc})
    return dataclasses.field(default=default, metadata={DOC: doc})


def doc_of(field: dataclasses.Field) -> Optional[str]:
    """A schema key's documentation (None for a key written without :func:`key`)."""
    return field.metadata.get(DOC)


def check(ok: bool, name: str, value: Any, allowed: str) -> None:
    """``name=value`` is invalid unless ``ok``: one line saying what is allowed."""
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: allowed {allowed}")


def finite(value: Any) -> bool:
    """A number a float32 tensor can hold (inf passes every ">= low" test, and an inf lr trains NaNs)."""
    return isinstance(value, (int, float)) and math.isfinite(value) and abs(value) <= FLOAT32_MAX


def _bounds(allowed: str, value: Any) -> str:
    """``allowed``, plus the float32 bound when that is what ``value`` broke (``lr=1e300``)."""
    big = isinstance(value, (int, float)) and math.isfinite(value) and abs(value) > FLOAT32_MAX
    return f"{allowed} and at most {FLOAT32_MAX:.4g} (float32)" if big else allowed


def at_least(name: str, value: Any, low: float, kind: str = "a number") -> None:
    check(finite(value) and value >= low, name, value, _bounds(f"{kind} >= {low}", value))


def positive(name: str, value: Any) -> None:
    check(finite(value) and value > 0, name, value, _bounds("a number > 0", value))


def fraction(name: str, value: Any, allowed: str = "0 <= x < 1", upper_open: bool = True) -> None:
    """A number in [0, 1) (or [0, 1] with ``upper_open=False``)."""
    check(finite(value) and 0.0 <= value and (value < 1.0 if upper_open else value <= 1.0), name, value, allowed)


def one_of(name: str, value: Any, choices: Sequence[str]) -> None:
    check(value in choices, name, value, "one of " + ", ".join(choices))


def betas(name: str, value: Any) -> None:
    """Adam's two decay rates, each in [0, 1)."""
    pair = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
    ok = pair and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in value)
    shown = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
    check(ok, name, shown, "two numbers in [0, 1), e.g. [0.9,0.999]")
