"""A counter-based hash: randomness as a pure function of integers (seed, sync, worker, ...)."""

from __future__ import annotations


def mix(*ints: int) -> int:
    """A 63-bit seed from integers (splitmix64's finalizer over their sequence): a resumed run and every
    rank draw the same numbers from the same integers."""
    h = 0x9E3779B97F4A7C15
    for v in ints:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF
