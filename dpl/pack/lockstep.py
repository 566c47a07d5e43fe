"""Several runs' trainers stepped together in one process (a packed group of a sweep).

Each run keeps its own :class:`~dpl.core.loop.Trainer`: its data, shards and seed, its workers, inner
optimizer (with its own lr table, weight decay and momentum), method and state, and it takes its steps
through the trainer's own calls (``next_inputs``, ``end_step``, ``advance``, ``end_epoch``), as
:meth:`~dpl.core.loop.Trainer.fit` does. What is packing's is only this: at every iteration the runs that
are furthest behind (the lowest (epoch, step)) step together, so runs that were resumed at different
points catch up before they step side by side; and the local steps of runs with the same batch shape are
fused into one where the engine allows it (:mod:`dpl.core.packed`). Otherwise each run's own local step
runs in turn, which is the run alone, bit for bit.

A run that diverges or stops early leaves the group; the others go on.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch

from dpl.core.engines import EAGER, GRAPH
from dpl.core.loop import StepInputs, Trainer
from dpl.core.packed import PackedStep, fused_step
from dpl.core.selfcheck import self_checked_fused
from dpl.errors import Diverged

FUSED_MODES = (EAGER, GRAPH)  # engine.compile modes whose steps fuse (torch.compile compiles one run's step)


def fusable(trainer: Trainer) -> bool:
    """Whether ``trainer``'s step can join a fused one: its workers run vmapped in one process and its
    step runs eagerly or as a CUDA graph."""
    workers = trainer.workers
    return workers.mode == "vmap" and workers.k_local == workers.K and trainer.compile in FUSED_MODES


class Lockstep:
    """Trains ``trainers`` together. ``on_diverged(i, error)`` is told of run ``i`` diverging (it has
    left the group then); ``on_step(n)`` after each iteration, with the runs that stepped."""

    def __init__(self, trainers: Sequence[Trainer], fuse: bool = True,
                 on_diverged: Optional[Callable[[int, Diverged], None]] = None,
                 on_step: Optional[Callable[[int], None]] = None) -> None:
        self.trainers = list(trainers)
        self.fuse = fuse
        self.on_diverged = on_diverged or (lambda i, e: None)
        self.on_step = on_step or (lambda n: None)
        self.failed: set[int] = set()
        self._fused: dict[tuple[int, ...], PackedStep] = {}

    def live(self) -> list[int]:
        return [i for i, t in enumerate(self.trainers) if i not in self.failed and not t.finished]

    def fit(self) -> None:
        while True:
            live = self.live()
            if not live:
                return
            position = lambda i: (self.trainers[i].state.epoch, self.trainers[i].state.step)  # noqa: E731
            first = min(position(i) for i in live)
            self.step([i for i in live if position(i) == first])

    def step(self, front: list[int]) -> None:
        """One step of the runs ``front`` (all at the same epoch and step), then their epoch's end where it is."""
        t0 = time.perf_counter()
        inputs = {i: self.trainers[i].next_inputs() for i in front if not self.trainers[i].ends_here()}
        for members in self._fusions(list(inputs), inputs):
            self._run(members, inputs)
        share = (time.perf_counter() - t0) / len(front)  # each run's part of the process's time
        for i in inputs:
            self.trainers[i].advance(share)
        for i in front:
            t = self.trainers[i]
            if not t.ends_here():
                continue
            try:
                t.end_epoch()
            except Diverged as e:
                self.failed.add(i)
                self.on_diverged(i, e)
        self.on_step(len(front))

    def _fusions(self, front: list[int], inputs: dict[int, StepInputs]) -> list[list[int]]:
        """The runs of ``front`` as the steps they take: those that can fuse, by batch shape, together."""
        groups: dict[tuple, list[int]] = {}
        for i in front:
            t = self.trainers[i]
            can = self.fuse and fusable(t)
            key = (tuple(inputs[i].idx.shape), t.compile, t.state.global_step, inputs[i].lr_i) if can else ("alone", i)
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    def _run(self, members: list[int], inputs: dict[int, StepInputs]) -> None:
        if len(members) == 1:
            t = self.trainers[members[0]]
            t.end_step(inputs[members[0]], t.run_step(inputs[members[0]]))
            return
        key = tuple(members)
        step = self._fused.get(key)
        if step is None:
            live = set(self.live())  # a fused step of a run that has left is not taken again: its graphs go
            self._fused = {k: v for k, v in self._fused.items() if live.issuperset(k)}
            own = [self.trainers[i].local_step for i in members]
            step = self._fused[key] = self_checked_fused(fused_step(own, self.trainers[members[0]].compile), own)
        lead = self.trainers[members[0]].state
        idx = torch.stack([inputs[i].idx for i in members])
        losses, correct = step(idx, lead.global_step, inputs[members[0]].lr_i, lead.epoch)
        for i, l, c in zip(members, step.split(losses), step.split(correct)):
            self.trainers[i].end_step(inputs[i], (l, c))
