"""Asynchronous DiLoCo: every worker at its own modelled speed, its pseudo-gradient applied the moment it arrives.

Liu et al. 2024, "Asynchronous Local-SGD Training for Language Modeling" (arXiv 2401.09135): each worker
pulls the global model x, takes its own H local steps of the inner optimizer, and pushes its own
pseudo-gradient Δ_k = x_pull,k − x_k; the holder of x applies it at once with the outer optimizer, and the
worker pulls the new x and starts again. Nothing waits for the slowest worker, so fast workers contribute
more updates, and each update is *stale* by the global updates that landed between its pull and its push.

The simulation is exact and a pure function of (config, seed): it runs on the modelled clock of
:mod:`dpl.comm.clock`. The loop's step is a **tick**, one step of the fastest worker (q = its modelled step
time); worker k's step takes u_k = s_k / min_j s_j ticks (s its time factor), so its n-th step of a round
that began at time A_k (in ticks) completes at A_k + n u_k, and it steps in the tick (i, i + 1] where that
falls (at most once a tick, as u_k >= 1). Every worker computes in every tick, stacked as always; a worker
with no step due in the tick gets its row back as it was (parameters, buffers, the inner optimizer's
state: :meth:`AsyncDiLoCo.sync`), so its tick's compute is thrown away, as an idle GPU's would be; a process
none of whose workers has a step due computes nothing (on the ranks of ``engine=distributed``, a worker's
idle ticks cost it no time: with ``clock.emulate`` a slow worker's rank keeps the fast ones' pace).
A round ends when its H_k steps are done, at f_k; its push arrives at r_k = f_k + m and it receives the
new x at r_k + m, m one message of the model over its link (``method.blocking_comm``; the other workers
compute meanwhile). Arrivals are applied in the order of r_k (ties: the lower worker index) at the end of
the tick they fall in, and since u_k >= 1 no later tick can hold an earlier arrival: the order is the
modelled one, whatever order the ticks computed things in.

The paper's remedies, as keys of ``method``:

- **delayed Nesterov** (``nesterov_every`` N, ``momentum_activation`` c; the paper's Sec. 4): the outer
  momentum is updated once every N arrivals with the mean of the N pseudo-gradients buffered since, and
  every arrival in between is a plain step g / N (plus c β m): :class:`DelayedNesterov`. N = 1, c = 0 is
  the outer optimizer as configured (DiLoCo's Nesterov SGD), used as it is.
- **dynamic local updates** (``dynamic_local_updates``): worker k's round has H_k = max(1, ⌊H · min_j s_j / s_k⌋)
  local steps, so every round takes about the modelled time of the fastest worker's H.

What a tick's inner lr is: the lr table's entry of the tick (the schedule follows the modelled clock, the
fastest worker's steps); the budget (``epochs`` / ``max_steps``) counts ticks, and so does the shared step
count of the inner optimizer (AdamW's bias correction), which a worker's own steps would otherwise be.
Each worker's batch is its shard's batch of the tick: a worker skips the batches of the ticks it idles in.

Identities (tests/test_async.py): with K = 1, equal speeds, N = 1 and no time on the network
(``blocking_comm=false``) the run is DiLoCo's step for step; with K workers of equal speed the K arrivals
of the first round land together and, with an outer SGD of lr η / K and no momentum, give x what
synchronous DiLoCo's first sync with lr η gives it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from dpl.comm.clock import WorkerClock
from dpl.comm.drops import Membership
from dpl.core.methods import rows
from dpl.core.methods.base import Now
from dpl.core.methods.outer import OuterStep
from dpl.core.workers import StackedWorkers

EPS = 1e-9  # in ticks: times computed by different sums of the same u_k compare equal within it


class DelayedNesterov(torch.optim.Optimizer):
    """The delayed Nesterov outer update of Liu et al. 2024 (Sec. 4), over the float64 anchor x.

    For the t-th arrival's pseudo-gradient g (t = 1, 2, ...), with d the sum of the g since the last momentum
    update, momentum β, lr η, N = ``every`` and c = ``activation`` (0 <= c <= 1 / N):

        d <- d + g
        t mod N = 0:  m <- β m + d / N;   x <- x − η ((1 − c N + c) β m + g / N);   d <- 0
        otherwise:                         x <- x − η (c β m + g / N)

    N = 1, c = 0 is Nesterov SGD without dampening (torch's ``SGD(nesterov=True)``): m <- β m + g,
    x <- x − η (β m + g). The arrival count t is the optimizer's state, so a checkpoint resumes it.
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float, momentum: float, every: int,
                 activation: float = 0.0) -> None:
        super().__init__(list(params), {"lr": lr, "momentum": momentum, "every": every, "activation": activation})
        self.arrivals = 0

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        self.arrivals += 1
        for group in self.param_groups:
            lr, beta, N, c = group["lr"], group["momentum"], group["every"], group["activation"]
            update = self.arrivals % N == 0
            for x in group["params"]:
                if x.grad is None:
                    continue
                state = self.state[x]
                if not state:
                    state["m"], state["d"] = torch.zeros_like(x), torch.zeros_like(x)
                m, d, g = state["m"], state["d"], x.grad
                d.add_(g)
                if update:
                    m.mul_(beta).add_(d, alpha=1.0 / N)
                    x.add_(m, alpha=-lr * (1.0 - c * N + c) * beta)
                    d.zero_()
                elif c:
                    x.add_(m, alpha=-lr * c * beta)
                x.add_(g, alpha=-lr / N)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "arrivals": self.arrivals}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.arrivals = int(state.pop("arrivals"))
        super().load_state_dict(state)


def local_steps(H: int, speeds: Sequence[float], dynamic: bool) -> list[int]:
    """Each worker's H_k: H for every worker, or with dynamic local updates (Liu et al. 2024, Sec. 4)
    max(1, ⌊H · min_j s_j / s_k⌋), the steps worker k takes in the time the fastest takes H."""
    if not dynamic:
        return [H] * len(speeds)
    fastest = min(speeds)
    return [max(1, int(H * fastest / s + EPS)) for s in speeds]


@dataclass
class WorkerRound:
    """Where one worker stands on the modelled clock (in ticks)."""

    start: float = 0.0  # A_k: when its round's first step began (it had x by then)
    done: int = 0  # local steps of the round taken
    H: int = 0  # its round's local steps (0: not chosen yet: at the first sync, from the run's H)
    version: int = 0  # global updates in x when it pulled it


class AsyncDiLoCo(OuterStep):
    """Asynchronous DiLoCo / LocalSGD (see the module doc): ``method.outer`` per arrival, delayed Nesterov
    with ``nesterov_every`` > 1 or ``momentum_activation`` > 0, ``dynamic_local_updates``, and
    ``blocking_comm``. ``method=async_localsgd`` is this class with an outer SGD of lr 1 and no momentum:
    every arrival adds the worker's progress, x <- x − Δ_k."""

    def __init__(self, cfg: Any, local_momentum: str = "keep") -> None:
        super().__init__(cfg, local_momentum)
        self.every, self.activation = int(cfg.nesterov_every), float(cfg.momentum_activation)
        self.dynamic, self.blocking = bool(cfg.dynamic_local_updates), bool(cfg.blocking_comm)
        self.u: list[float] = []  # each worker's ticks per step
        self.message = 0.0  # ticks of one message of the model (push or pull) on a worker's link
        self.rounds: list[WorkerRound] = []
        self.version = 0  # arrivals applied to x
        self.pulled: list[torch.Tensor] = []  # each worker's x when it pulled it [K, ...], float64
        self.global_buffers: list[torch.Tensor] = []  # x's buffers: the latest arrival's
        self.active: list[bool] = []  # the workers with a step due in the tick in progress
        self._saved: Optional[rows.KeptRows] = None  # the rows of the others, as they were before it
        self._now = Now(epoch=0, period=0, H=1, step=0)
        self._interval = {"arrivals": 0, "staleness_sum": 0, "staleness_max": 0}
        # elastic workers (faults.schedule): who is in the run at each step; None: every worker always
        self.members: Optional[Membership] = None

    # ------------------------------------------------------------------ the clock
    def timeline(self, clock: WorkerClock) -> Optional[float]:
        """Take the workers' speeds; the time factor of one tick (the fastest worker's step, min_k s_k: the
        modelled seconds of a tick are its samples' cost at that factor, so an epoch's shorter last batch
        makes a shorter tick)."""
        fastest = min(clock.speeds)
        self.u = [s / fastest for s in clock.speeds]
        tick_s = clock.step_s * fastest  # a tick of a full batch: what the messages are measured in
        self.message = clock.message_s / tick_s if self.blocking and tick_s > 0 else 0.0
        return fastest

    def make_outer(self, anchor: list[torch.Tensor]) -> torch.optim.Optimizer:
        if self.every == 1 and self.activation == 0.0:
            return super().make_outer(anchor)  # the outer optimizer as configured, every arrival
        return DelayedNesterov(anchor, self.cfg.outer.lr, self.cfg.outer.momentum, self.every, self.activation)

    # ------------------------------------------------------------------ the loop's calls
    def start(self, workers: StackedWorkers, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        super().start(workers, optimizer)
        self.workers, self.optimizer = workers, optimizer
        self.k_local, self.first = workers.k_local, workers.point.comm.rank * workers.k_local
        if not self.u:  # no clock given (a method built alone): every worker at speed 1, messages free
            self.u = [1.0] * workers.K
        self.rounds = [WorkerRound() for _ in range(workers.K)]
        self.pulled = [p.detach().double().clone() for p in workers.params]
        self.global_buffers = [b[0].clone() for b in workers.buffers]
        self.active = self._due(0.0)
        self._snapshot(workers, optimizer)

    def syncs_after(self, now: Now) -> bool:
        self._now = now
        return True  # every tick: the idle rows restored, the steps counted, the arrivals applied

    def period_ends(self, now: Now) -> bool:
        return True  # no shared period: each worker counts its own round

    def stepped(self) -> Optional[list[bool]]:
        return self._local(self.active) if self.active else []

    @torch.no_grad()
    def sync(self, workers: StackedWorkers, optimizer: torch.optim.Optimizer, lr: float) -> Optional[torch.Tensor]:
        """The end of a tick: the rows of the workers that had no step due get back what they held; the
        others count their step; the arrivals that fall in the tick are applied in modelled order, each
        followed by its worker's pull; the next tick's idle rows are kept aside."""
        if self.outer is None:
            raise RuntimeError(f"{type(self).__name__}.start(workers) must be called before the first sync")
        self._restore(workers, optimizer)
        end = float(self._now.step)  # the tick (end − 1, end] is done
        for k, r in enumerate(self.rounds):
            if r.H == 0:
                r.H = self._h(k)
            if self.active[k]:
                r.done += 1
        present = self._present(int(end) - 1)  # in the run during the tick just computed
        arriving = sorted((self._finish(k) + self.message, k) for k, r in enumerate(self.rounds)
                          if present[k] and r.done >= r.H and self._finish(k) + self.message <= end + EPS)
        drifts = [self._arrive(workers, optimizer, k, at) for at, k in arriving]
        if self.members is not None:
            for k in self.members.joining(int(end)):
                self._join(workers, optimizer, k, end)
        self.active = self._due(end)
        self._snapshot(workers, optimizer)
        return torch.stack(drifts).mean() if drifts else None

    def _h(self, k: int) -> int:
        return local_steps(self._now.H, self.u, self.dynamic)[k]

    def _finish(self, k: int) -> float:
        """When worker k's round's last step completes (ticks)."""
        r = self.rounds[k]
        return r.start + r.H * self.u[k]

    def _due(self, end: float) -> list[bool]:
        """Which workers have a step that completes in the tick (end, end + 1] (and are in the run then)."""
        present = self._present(int(end))
        return [here and (r.H == 0 or r.done < r.H) and r.start + (r.done + 1) * u <= end + 1 + EPS
                for r, u, here in zip(self.rounds, self.u, present)]

    def _present(self, step: int) -> list[bool]:
        return [True] * len(self.rounds) if self.members is None else self.members.present(max(step, 0))

    def _join(self, workers: StackedWorkers, optimizer: Optional[torch.optim.Optimizer], k: int, end: float) -> None:
        """Worker k is back from the tick after ``end``: it pulls x (and x's buffers), starts its inner optimizer
        afresh, and its first round starts once the pull has reached it. Its round from before it left, if
        any, was abandoned: a worker away sends nothing."""
        self._pull(workers, optimizer, k, fresh=True)
        self.rounds[k] = WorkerRound(start=end + self.message, H=self._h(k), version=self.version)

    def _pull(self, workers: StackedWorkers, optimizer: Optional[torch.optim.Optimizer], k: int, fresh: bool) -> None:
        """Worker k takes x and x's buffers (one message of the model, counted); ``fresh``: its inner optimizer
        starts afresh too."""
        workers.point.pull([p[0] for p in workers.params])
        row = self._row(k)
        if row is None:
            return
        for p, x, pulled in zip(workers.params, self.anchor, self.pulled):
            p[row].copy_(x)
            pulled[row].copy_(x)
        for b, g in zip(workers.buffers, self.global_buffers):
            b[row].copy_(g)
        if fresh:
            rows.zero_state_rows(optimizer, workers.params, [row])

    def _arrive(self, workers: StackedWorkers, optimizer: torch.optim.Optimizer, k: int, at: float) -> torch.Tensor:
        """Worker k's push lands at ``at``: x <- OuterOpt(x, Δ_k), Δ_k = x_pull,k − x_k; then it pulls x. Every
        process holds x and applies the same arrivals: Δ_k (and the worker's buffers) reach them from worker
        k's process through the point. Returns this process's term of the drift ||x_k − x|| / ||x||."""
        r, row = self.rounds[k], self._row(k)
        staleness = self.version - r.version
        if row is not None:
            own = [p.detach()[row].double() for p in workers.params]
            deltas = [pulled[row] - mine for pulled, mine in zip(self.pulled, own)]
            drift = _relative_distance(own, self.anchor)
            buffers = [b[row].clone() for b in workers.buffers]
        else:  # another process's worker: its values arrive in these
            deltas = [torch.zeros_like(x) for x in self.anchor]
            drift = torch.zeros((), dtype=torch.float64, device=self.anchor[0].device)
            buffers = [torch.zeros_like(b) for b in self.global_buffers]
        # counted as what a cluster sends: the model, in its dtype
        workers.point.push(deltas + buffers, k, counted=[p[0] for p in workers.params])
        for x, delta in zip(self.anchor, deltas):
            x.grad = delta
        for group in self.outer.param_groups:
            group["lr"] = self.outer_lr(0.0)
        self.outer.step()
        for x in self.anchor:
            x.grad = None
        self.version += 1
        for g, b in zip(self.global_buffers, buffers):
            g.copy_(b)  # x's buffers (BatchNorm's statistics): the latest arrival's
        self._pull(workers, optimizer, k, fresh=self.local_momentum == "reset")  # its next round starts from x
        r.start, r.done, r.version = at + self.message, 0, self.version
        r.H = self._h(k)
        self._interval["arrivals"] += 1
        self._interval["staleness_sum"] += staleness
        self._interval["staleness_max"] = max(self._interval["staleness_max"], staleness)
        return drift

    def _row(self, k: int) -> Optional[int]:
        """Worker k's row in this process's stacked tensors (None: another process holds it)."""
        row = k - self.first
        return row if 0 <= row < self.k_local else None

    def _local(self, flags: list[bool]) -> list[bool]:
        return flags[self.first:self.first + self.k_local]

    # ------------------------------------------------------------------ the idle rows
    def _snapshot(self, workers: StackedWorkers, optimizer: Optional[torch.optim.Optimizer]) -> None:
        """Keep the rows of the workers with no step due in the coming tick (given back after it)."""
        self._saved = rows.keep(workers, optimizer, [i for i, a in enumerate(self._local(self.active)) if not a])

    def _restore(self, workers: StackedWorkers, optimizer: torch.optim.Optimizer) -> None:
        saved, self._saved = self._saved, None
        if saved is not None:
            saved.give_back(workers, optimizer)

    # ------------------------------------------------------------------ what the method reads out
    def global_model(self, workers: StackedWorkers, kind: str = "eval") -> dict[str, torch.Tensor]:
        """x, the model the arrivals have built (no worker holds it between its pulls), and its buffers."""
        names = workers.param_names + workers.buffer_names
        params = [x.to(p.dtype).clone() for x, p in zip(self.anchor, workers.params)]
        return dict(zip(names, params + [b.clone() for b in self.global_buffers]))

    def record(self) -> dict[str, float]:
        """The interval's arrivals and their staleness (global updates between a worker's pull and its push)."""
        i, self._interval = self._interval, {"arrivals": 0, "staleness_sum": 0, "staleness_max": 0}
        n = i["arrivals"]
        out = {"arrivals": n, "staleness_mean": i["staleness_sum"] / n if n else 0.0,
               "staleness_max": i["staleness_max"]}
        if self.members is not None:  # how many workers were in the run at the record's last tick
            out["workers_active"] = sum(self._present(int(self._now.step) - 1))
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {**super().state_dict(), "version": self.version, "active": list(self.active),
                "rounds": [[r.start, r.done, r.H, r.version] for r in self.rounds],
                "buffers": [b.clone() for b in self.global_buffers], "interval": dict(self._interval)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.version, self.active = int(state["version"]), [bool(a) for a in state["active"]]
        self.rounds = [WorkerRound(float(a), int(d), int(h), int(v)) for a, d, h, v in state["rounds"]]
        for b, saved in zip(self.global_buffers, state["buffers"]):
            b.copy_(saved)
        self._interval = dict(state["interval"])

    def worker_state(self) -> dict[str, list[torch.Tensor]]:
        return {"async.pulled": [x.clone() for x in self.pulled]}

    def load_worker_state(self, state: dict[str, list[torch.Tensor]]) -> None:
        for x, saved in zip(self.pulled, state["async.pulled"]):
            x.copy_(saved)
        # the coming tick's idle rows, as the checkpoint holds them (the workers and the optimizer are loaded)
        self._snapshot(self.workers, self.optimizer)


def _relative_distance(own: Sequence[torch.Tensor], x: Sequence[torch.Tensor]) -> torch.Tensor:
    """||x_k − x|| / ||x|| of one worker's parameters against the global model (0 when x = 0)."""
    diff = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(own, x)))
    norm = torch.sqrt(sum((b ** 2).sum() for b in x))
    return torch.where(norm > 0, diff / norm, torch.zeros_like(norm))
