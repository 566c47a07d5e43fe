"""A collective, or a whole sync, in flight: the one future type of dpl's communication.

torch.distributed's collectives with ``async_op=True`` return a work that lands later; the simulation's
land when they are issued. Either way the caller gets a :class:`Flight`: ``wait()`` lands it once and
returns its result (the same result again afterwards), and ``then(f)`` is a flight of ``f`` applied to that
result, run when it lands. A streaming DiLoCo fragment's sync is such a chain (the all-reduce, then the
pseudo-gradient, then the drift), waited for τ inner steps after it was started.

Nothing runs on another thread: a chain runs in the thread that waits, in the order it was built, so
the numbers are the same whether the collective landed early or late (torch's own futures run their
callbacks on the thread that completes them).
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Optional, TypeVar

T = TypeVar("T")
U = TypeVar("U")

_UNSET: Any = object()


class Flight(Generic[T]):
    """What ``land()`` returns, computed once, when first waited for."""

    __slots__ = ("_land", "_result")

    def __init__(self, land: Callable[[], T]) -> None:
        self._land: Optional[Callable[[], T]] = land
        self._result: Any = _UNSET

    @classmethod
    def landed(cls, result: T = None) -> "Flight[T]":
        """A flight that has landed already (a collective of one process, a sync restored from a checkpoint)."""
        flight = cls.__new__(cls)
        flight._land, flight._result = None, result
        return flight

    @property
    def done(self) -> bool:
        return self._land is None

    def wait(self) -> T:
        if self._land is not None:
            self._result = self._land()
            self._land = None  # what it held (the collective's buffers) can go
        return self._result

    def then(self, fn: Callable[[T], U]) -> "Flight[U]":
        """The flight of ``fn(result)``: ``fn`` runs once this one has landed, when it is waited for."""
        return Flight(lambda: fn(self.wait()))
