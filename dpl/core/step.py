"""The local step of every worker as one callable: eager, through torch.compile, or a replayed CUDA graph.

One local step (Lin et al. 2020, Algorithm 1, the inner loop; the same step for every
method) is: cut each worker's batch from its shard, augment it (crops and flips hashed from
(seed, step, worker, sample), :mod:`dpl.components.data.augment`), forward, backward, the method's
gradient hook (synchronous methods all-reduce the gradients there), the clip of each
worker's gradient (``optimizer.grad_clip_norm``, for every optimizer), and the inner
optimizer's step at the lr of the step. The trainer calls it once per step; the sync
(average, outer step) stays outside it, eager.

``engine.compile`` picks how it runs:

- ``none``: eagerly, op by op.
- ``compile``: batch, augmentation, forward and loss through ``torch.compile`` (the backward
  is then the compiled backward), the inner optimizer's step through a second
  ``torch.compile``; the gradient hook runs eagerly between them. ``dynamic=False``: the
  epoch's last, shorter batch gets its own compiled graph, so nothing is padded and
  BatchNorm's statistics see exactly the real samples.
- ``graph`` (CUDA): after ``WARMUP`` eager steps (real steps of the run, on a side stream,
  which create the optimizer state and the libraries' workspaces), the whole step is
  captured as one CUDA graph and replayed (two graphs, around the gradient hook, for methods
  that edit gradients). The batch indices, the augmentation key and the lr are static
  device tensors written before each replay; the shorter last batch gets its own graph. A
  replaced optimizer state (a restart clears it; a resume loads it) or gradient tensor makes
  the graphs stale: the step warms up and captures again.
- ``auto``: ``graph`` on CUDA when the engine and optimizer allow it (:func:`dpl.core.engines.compile_mode`),
  ``none`` otherwise.

When compiling or capturing fails, one warning line is logged and the step runs eagerly from
then on: the maths is never silently different.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any, Callable, Optional

import torch

from dpl.components.data.device import DeviceData, make_batch, train_key
from dpl.components.optim.clip import GradClip
from dpl.core.engines import COMPILED, EAGER, GRAPH
from dpl.core.workers import StackedWorkers

log = logging.getLogger(__name__)

BACKEND = "inductor"  # torch.compile's backend for engine.compile=compile
Outputs = tuple[torch.Tensor, torch.Tensor]  # each worker's mean loss [K_local] and correct count [K_local]


class LocalStep:
    """The eager local step; :class:`CompiledStep` and :class:`GraphStep` run the same maths faster."""

    def __init__(self, data: DeviceData, workers: StackedWorkers, optimizer: torch.optim.Optimizer,
                 on_gradients: Callable[[int], None], edits_gradients: bool, seed: int, rows: slice,
                 lr_now: torch.Tensor, lr_table: torch.Tensor, clip: Optional[GradClip] = None) -> None:
        self.data, self.workers, self.optimizer = data, workers, optimizer
        self.on_gradients, self.edits_gradients = on_gradients, edits_gradients
        self.clip = clip  # optimizer.grad_clip_norm: every worker's gradient clipped before the step
        self.seed, self.rows = seed, rows
        self.lr_now, self.lr_table = lr_now, lr_table
        self.key = torch.zeros((), dtype=torch.int64, device=lr_now.device)  # the step's augmentation key

    def __call__(self, idx: torch.Tensor, step: int, lr_i: int, epoch: int) -> Outputs:
        """Step ``step`` (global) of every worker on batch ``idx`` [K, B] at entry ``lr_i`` of the lr table."""
        self.set_inputs(step, lr_i)
        return self.eager(idx, epoch)

    def takes_fast_path(self, idx: torch.Tensor) -> bool:
        """Whether a call on batch ``idx`` runs other code than :meth:`eager` (:mod:`dpl.core.selfcheck`)."""
        return False

    @torch.no_grad()
    def idle(self, idx: torch.Tensor, step: int, lr_i: int, epoch: int) -> Outputs:
        """Step ``step`` when none of this process's workers has it due (an asynchronous worker between its
        steps, an elastic worker away): the method gives their rows back after it, so what a computed step
        would leave in them is thrown away, and nothing is computed. The inner optimizer still steps, on
        zero gradients: its scalar step count, shared by the stacked rows, counts the loop's steps as the
        other workers' does (AdamW's bias correction), and state it creates for the first time is what a
        computed step would create (its rows are given back as zeros either way). Losses and correct
        counts are zeros; the method's ``stepped()`` weighs them out. A method that edits gradients may run
        a collective in its hook, which every process must join: its step is computed in full.

        On the ranks of ``engine=distributed`` this is what keeps an idle worker idle in the measured time
        too: the step costs an optimizer update on zeros, not a forward and backward."""
        if self.edits_gradients:
            with torch.enable_grad():
                return self(idx, step, lr_i, epoch)
        self.set_inputs(step, lr_i)
        for p in self.workers.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:  # a captured step's gradient tensors stay where its graphs read them
                p.grad.zero_()
        self.optimizer_step()
        self.zero_grads()
        k, device = self.workers.k_local, self.key.device
        return torch.zeros(k, device=device), torch.zeros(k, dtype=torch.long, device=device)

    def set_inputs(self, step: int, lr_i: int) -> None:
        # device-side writes from host numbers: nothing is read back
        self.key.fill_(train_key(self.seed, step))
        self.lr_now.copy_(self.lr_table[lr_i])

    def eager(self, idx: torch.Tensor, epoch: int) -> Outputs:
        losses, correct = self.gradients(idx)
        self.on_gradients(epoch)
        self.optimizer_step()
        self.zero_grads()
        return losses, correct

    def zero_grads(self) -> None:
        self.clear_grads(set_to_none=True)

    def clear_grads(self, set_to_none: bool) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def graph_tensors(self) -> list[torch.Tensor]:
        """The tensors a captured step reads and writes besides the parameters: the gradients and
        the optimizer state (a restart or a resume replaces them)."""
        params = self.workers.params
        return [p.grad for p in params] + [t for p in params for t in self.optimizer.state.get(p, {}).values()
                                           if torch.is_tensor(t)]

    def gradients(self, idx: torch.Tensor) -> Outputs:
        total, losses, correct = self.batch_losses(idx, self.key)
        total.backward()
        return losses, correct

    def batch_losses(self, idx: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sum of the workers' mean losses (to backpropagate: each slice of a stacked parameter
        gets its own worker's gradient), and each worker's loss and correct count."""
        x, y = make_batch(self.data, idx, key, train=True, rows=self.rows)
        losses, correct = self.workers.losses(x, y)
        return losses.sum(), losses.detach(), correct

    def optimizer_step(self) -> None:
        """The inner optimizer's step, after the clip of each worker's gradient by its own norm (Pascanu et
        al. 2013; :mod:`dpl.components.optim.clip`): after the gradient hook, so a synchronous method clips
        the averaged gradient, as DDP with ``clip_grad_norm_`` does. The clip is device ops only and is
        compiled and captured with the step; ``self.clip`` is fixed for the run, not a branch on data."""
        if self.clip is not None:
            with torch.no_grad():
                self.clip([p.grad for p in self.workers.params if p.grad is not None], per_worker=True)
        self.optimizer.step()


class CompiledStep(LocalStep):
    """The local step with its two compute parts through ``torch.compile`` (one graph per batch shape)."""

    def __init__(self, *args: Any, capturable: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A fresh compiler cache: the code compiled for an earlier trainer in this process (a benchmark,
        # a test run) would otherwise count towards torch's recompile limit, past which it runs eagerly.
        torch._dynamo.reset()
        # the forward part compiles whole (fullgraph): a failure in a later recompile comes before any of it ran
        self._losses = torch.compile(self.batch_losses, fullgraph=True, dynamic=False, backend=BACKEND)
        # torch's optimizers break the graph on purpose (profiling hooks) before their maths; only optimizers
        # whose per-step values are tensors compile (a Python step count would recompile it every step)
        self._update = (torch.compile(self.optimizer_step, dynamic=False, backend=BACKEND)
                        if capturable else None)
        self.shapes: set[tuple[int, ...]] = set()  # batch shapes run compiled once already

    def takes_fast_path(self, idx: torch.Tensor) -> bool:
        return self._losses is not None

    def __call__(self, idx: torch.Tensor, step: int, lr_i: int, epoch: int) -> Outputs:
        self.set_inputs(step, lr_i)
        first = tuple(idx.shape) not in self.shapes
        if self._losses is None:
            losses, correct = self.gradients(idx)
        else:
            losses, correct = self._attempt("_losses", lambda: self._gradients(idx), lambda: self.gradients(idx), first)
        self.on_gradients(epoch)  # eager, and outside the attempts: its errors are the run's
        if self._update is None:
            self.optimizer_step()
        else:
            self._attempt("_update", self._update, self.optimizer_step, first)
        self.zero_grads()
        self.shapes.add(tuple(idx.shape))
        return losses, correct

    def _gradients(self, idx: torch.Tensor) -> Outputs:
        total, losses, correct = self._losses(idx, self.key)
        total.backward()  # the compiled backward
        return losses, correct

    def _attempt(self, part: str, compiled: Callable[[], Any], eager: Callable[[], Any], first: bool) -> Any:
        """``compiled()``, or on a compiler failure: one warning, then ``eager`` for this part from now on.

        On a shape's first call (when it compiles) a failure first undoes what ran of it (the compiled
        backward compiles after the forward ran, and the optimizer's graph breaks split its step).
        """
        saved = snapshot_state(self.workers, self.optimizer) if first else None
        try:
            return compiled()
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager step is the same maths
            if saved is not None:
                restore_state(self.workers, self.optimizer, saved)
            if part == "_losses":  # the compiler fails on the forward: the whole step runs eagerly
                self._losses = self._update = None
            else:  # e.g. an inductor failure on one optimizer's maths: only its step runs eagerly
                self._update = None
            what = "the step" if part == "_losses" else "the optimizer step"
            log.warning("engine.compile=compile failed on %s (%s: %s); it runs eagerly", what,
                        type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            return eager()


class _Captured:
    """The CUDA graphs of one batch shape, their static input and outputs."""

    def __init__(self, idx: torch.Tensor) -> None:
        self.idx = idx.clone()  # static: each replay reads the batch indices from here
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.losses: Optional[torch.Tensor] = None
        self.correct: Optional[torch.Tensor] = None
        self.fingerprint: tuple[int, ...] = ()


class GraphStep(LocalStep):
    """The local step captured as a CUDA graph per batch shape and replayed (see the module doc)."""

    WARMUP = 2  # eager steps per batch shape before its capture

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.captured: dict[tuple[int, ...], _Captured] = {}
        self.warm: dict[tuple[int, ...], int] = {}
        self.failed = False
        self.side = torch.cuda.Stream(device=self.key.device)

    def __call__(self, idx: torch.Tensor, step: int, lr_i: int, epoch: int) -> Outputs:
        self.set_inputs(step, lr_i)
        if self.failed:
            return self.eager(idx, epoch)
        shape = tuple(idx.shape)
        entry = self.captured.get(shape)
        if entry is not None and entry.fingerprint != self._fingerprint():
            self.captured.clear()  # the optimizer state or the gradients were replaced: capture again
            self.warm.clear()
            entry = None
        if entry is None:
            if self.warm.get(shape, 0) < self.WARMUP:
                self.warm[shape] = self.warm.get(shape, 0) + 1
                return self._on_side_stream(lambda: self.eager(idx, epoch))
            entry = self._capture(idx, epoch)
            if entry is None:
                return self.eager(idx, epoch)
        entry.idx.copy_(idx)
        entry.graphs[0].replay()
        if len(entry.graphs) == 2:
            self.on_gradients(epoch)
            entry.graphs[1].replay()
        return entry.losses, entry.correct

    def takes_fast_path(self, idx: torch.Tensor) -> bool:
        shape = tuple(idx.shape)
        return not self.failed and (shape in self.captured or self.warm.get(shape, 0) >= self.WARMUP)

    def zero_grads(self) -> None:
        # in place: the gradient tensors stay the ones every graph reads and writes (0 + g is exactly g)
        self.clear_grads(set_to_none=False)

    def _on_side_stream(self, fn: Callable[[], Outputs]) -> Outputs:
        main = torch.cuda.current_stream()
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            out = fn()
        main.wait_stream(self.side)
        for t in out:  # made on the side stream, read on the main one: not to be reused before that
            t.record_stream(main)
        return out

    def _capture(self, idx: torch.Tensor, epoch: int) -> Optional[_Captured]:
        entry = _Captured(idx)
        pool = torch.cuda.graph_pool_handle()  # this shape's graphs share it (replayed in capture order)
        self.workers.autocast_cache = False
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.zero_grads()
                total, entry.losses, entry.correct = self.batch_losses(entry.idx, self.key)
                total.backward()  # accumulates into the persistent gradient tensors
                if not self.edits_gradients:
                    self.optimizer_step()
            entry.graphs.append(graph)
            if self.edits_gradients:  # the hook runs eagerly between the two replays
                update = torch.cuda.CUDAGraph()
                with torch.cuda.graph(update, pool=pool):
                    self.optimizer_step()
                entry.graphs.append(update)
        except Exception as e:  # noqa: BLE001 - e.g. an op that cannot be captured: eager is the same maths
            self.failed = True  # nothing captured ran: the step is still to be taken, eagerly
            self.captured.clear()
            log.warning("engine.compile=graph could not capture the step (%s: %s); it runs eagerly",
                        type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            return None
        finally:
            self.workers.autocast_cache = True
        entry.fingerprint = self._fingerprint()
        self.captured[tuple(idx.shape)] = entry
        return entry

    def _fingerprint(self) -> tuple[int, ...]:
        """Which tensors the graphs read and write besides the parameters (:meth:`graph_tensors`). A
        restart or a resume replaces them, and the graphs would go on using the old ones."""
        return tuple(id(t) for t in self.graph_tensors())


class SlowedStep:
    """A rank's local step slowed for real by ``factor`` >= 1 (``clock.emulate``: its worker's time factor
    against the fastest worker's, :mod:`dpl.comm.clock`): after each step it computes, it sleeps
    (factor − 1) times the step's measured time (the device synchronised first), so it takes ``factor``
    times as long as it would. An idle step (:meth:`LocalStep.idle`, reached through ``__getattr__``) computes
    nothing and is not slowed."""

    def __init__(self, step: Any, factor: float, device: torch.device) -> None:
        self.step, self.factor, self.device = step, float(factor), device

    def __getattr__(self, name: str) -> Any:  # only for what is not set above
        return getattr(self.step, name)

    def __call__(self, idx: torch.Tensor, step: int, lr_i: int, epoch: int) -> Outputs:
        t0 = time.perf_counter()
        out = self.step(idx, step, lr_i, epoch)
        if self.factor > 1.0:
            if self.device.type == "cuda":  # the step's kernels are queued, not done
                torch.cuda.synchronize(self.device)
            time.sleep((self.factor - 1.0) * (time.perf_counter() - t0))
        return out


def build_local_step(mode: str, *args: Any, capturable: bool = True, **kwargs: Any) -> LocalStep:
    """The step for a resolved ``engine.compile`` mode (:func:`dpl.core.engines.compile_mode`); ``capturable``:
    the optimizer's per-step values live on the device, so torch.compile compiles its step too."""
    if mode == COMPILED:
        return CompiledStep(*args, capturable=capturable, **kwargs)
    return {EAGER: LocalStep, GRAPH: GraphStep}[mode](*args, **kwargs)


def snapshot_state(workers: StackedWorkers, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What a step's compute parts change: BatchNorm's statistics (the forward), the gradients (the backward),
    the parameters, the optimizer's state and its param groups' values (the update)."""
    return {"params": [p.detach().clone() for p in workers.params],
            "buffers": [b.clone() for b in workers.buffers],
            "grads": [None if p.grad is None else p.grad.clone() for p in workers.params],
            "state": [{k: _copy(v) for k, v in optimizer.state.get(p, {}).items()} for p in workers.params],
            "groups": [{k: _copy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]}


def restore_state(workers: StackedWorkers, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """``saved`` back, into the very tensors where they are there: a captured CUDA graph reads and writes
    those (a new gradient or momentum tensor would make it capture again), and the trainer writes the lr
    into its param groups' tensor."""
    with torch.no_grad():
        for p, v in zip(workers.params, saved["params"]):
            p.copy_(v)
        for b, v in zip(workers.buffers, saved["buffers"]):
            b.copy_(v)
        for p, g in zip(workers.params, saved["grads"]):
            if g is None:
                p.grad = None
            elif p.grad is not None and p.grad.shape == g.shape:
                p.grad.copy_(g)
            else:
                p.grad = g.clone()
        for p, state in zip(workers.params, saved["state"]):
            now = optimizer.state[p]
            for k in [k for k in now if k not in state]:  # made by the step (its first): made again by the next
                del now[k]
            for k, v in state.items():
                _put(now, k, v)
        for group, values in zip(optimizer.param_groups, saved["groups"]):
            for k, v in values.items():
                _put(group, k, v)
        if not any(optimizer.state[p] for p in workers.params):
            for p in workers.params:
                optimizer.state.pop(p, None)


def _put(where: dict, key: str, value: Any) -> None:
    old = where.get(key)
    if torch.is_tensor(value) and torch.is_tensor(old) and old.shape == value.shape and old.dtype == value.dtype:
        old.copy_(value)
    else:
        where[key] = _copy(value)


def _copy(value: Any) -> Any:
    return value.clone() if torch.is_tensor(value) else copy.deepcopy(value)
