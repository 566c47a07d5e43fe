"""Preemption and time limits of a scheduler's job (Slurm, through submitit), met at a step boundary.

Slurm signals a job before it preempts it or before its time limit (``--signal``, submitit's
``signal_delay_s``; SIGUSR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise). submitit's own
handler calls the task's ``checkpoint`` at once, requeues the job and exits, wherever the
training is. :func:`defer` puts a handler in its place that only notes the signal; the run
stops at the end of the step in progress (:class:`dpl.run.recorder.Recorder` checks
:func:`requested` after each step, a host bool, no device sync), writes its checkpoint there
and raises :class:`Preempted`; the launcher then calls submitit's handler (:func:`requeue`),
which resubmits the job with ``resume=`` its job dir (submitit's checkpoint protocol:
``checkpoint`` returns a ``DelayedSubmission``), requeues it (``scontrol requeue``; the local
executor restarts it) and exits. The requeued job continues in the same job dir and MLflow
run from that step, so it ends with the numbers of an uninterrupted run.

A job of several tasks (``engine=distributed``) keeps submitit's handler: stopping K ranks at
one step would need them to agree on it every step. Rank 0 requeues at once, and the requeued
job resumes from the last checkpoint (every epoch, or ``checkpoint_every`` steps): the same
numbers, with the steps since then trained again.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable, Optional

_state: dict[str, Any] = {"signum": None, "handler": None}


class Preempted(BaseException):
    """The scheduler asked the job to stop; its checkpoint is written at ``where`` ("epoch 2, step 7").
    A BaseException, as KeyboardInterrupt is: no ``except Exception`` on the way may swallow it."""

    def __init__(self, where: str) -> None:
        super().__init__(f"stopped by the scheduler (preemption or time limit) at {where}; requeued to resume there")
        self.where = where


def defer(signum: int) -> bool:
    """From now on ``signum`` only marks the run to stop after its step; False where no handler
    could be put in place (off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signum)
    _state.update(signum=signum, handler=previous if callable(previous) else None, noted=False)
    signal.signal(signum, _note)
    return True


def _note(signum: int, frame: Any) -> None:
    _state["noted"] = True


def requested() -> bool:
    """A deferred signal arrived (checked by the Recorder after each step)."""
    return bool(_state.get("noted"))


def requeue() -> None:
    """Hand the noted signal to the handler :func:`defer` replaced (submitit's: checkpoint,
    requeue, exit). Without one, nothing happens: the caller reports the stop."""
    handler: Optional[Callable[[int, Any], None]] = _state.get("handler")
    if handler is not None and _state.get("signum") is not None:
        handler(_state["signum"], None)


def reset() -> None:
    """Forget a noted signal and put the replaced handler back (a job's end)."""
    if _state.get("signum") is not None and threading.current_thread() is threading.main_thread():
        signal.signal(_state["signum"], _state.get("handler") or signal.SIG_DFL)
    _state.update(signum=None, handler=None, noted=False)
