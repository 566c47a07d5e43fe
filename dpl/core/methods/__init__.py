"""Training methods: what happens to gradients each step and to parameters at a sync.

``centralized`` averages gradients every step; the local methods (``localsgd``,
``slowmo``, ``diloco``, ``streaming_diloco``) take local steps and then an outer step on the pseudo-gradient
with the outer optimizer ``method.outer`` (:mod:`dpl.core.methods.outer`); ``post_local``
switches from the first to the second. The registry :data:`METHODS` is keyed by the file
names in ``conf/method/``: ``localsgd`` and ``diloco`` are one class, :class:`OuterStep`,
with two presets of ``method.outer``; SlowMo scales its outer step by the inner lr.
"""

from __future__ import annotations

from typing import Any

from dpl.core.methods.base import Method
from dpl.core.methods.centralized import Centralized
from dpl.core.methods.slowmo import SlowMo
from dpl.core.methods.outer import OuterStep, sync_inner_state
from dpl.core.methods.post_local import PostLocal
from dpl.core.methods.streaming import StreamingDiLoCo
from dpl.registry import lookup

METHODS: dict[str, type[Method]] = {
    "centralized": Centralized, "localsgd": OuterStep, "slowmo": SlowMo, "diloco": StreamingDiLoCo,
    "streaming_diloco": StreamingDiLoCo, "post_local": PostLocal,
}


def build_method(cfg: Any, local_momentum: str) -> Method:
    return lookup(METHODS, "method", cfg.name)(cfg, local_momentum)


__all__ = ["METHODS", "Centralized", "Method", "OuterStep", "PostLocal", "SlowMo", "StreamingDiLoCo",
           "build_method", "sync_inner_state"]
