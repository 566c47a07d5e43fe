"""Streaming DiLoCo: the model synced one fragment at a time, each sync overlapping inner steps.

Douillard et al. 2025, "Streaming DiLoCo with overlapping communication" (arXiv 2501.18512),
Algorithm 1, with the fragment order of pytorch/torchft's ``local_sgd.py`` (``model_fragments``,
``fragment_sync_delay``, ``fragment_update_alpha``):

1. the model is cut into P fragments (:func:`fragments`), contiguous groups of layers in model
   order balanced by parameter count;
2. the fragments take turns, one every H / P steps, so a sync sends 1 / P of the model and the
   peak bandwidth falls by P (Sec. 2.2): within each period of H steps (counted over the whole
   run) fragment p's slot is the step o_p = (p + 1) H / P, fragment 0 (the first layers) first and
   the last fragment at the period's end. The paper's Algorithm 1 takes the offsets t_p as inputs;
   this order is torchft's (entry i at (i + 1) H / P);
3. a fragment's sync starts with its pseudo-gradient Δ_p = mean_k (x_p − x_{k,p}) put in flight
   (on ranks a real ``async_op=True`` collective); the workers keep training, and τ = ``delay``
   inner steps later (Sec. 2.3) it lands: the outer optimizer steps x_p ← OuterOpt(x_p, Δ_p)
   and every worker mixes the new global fragment into its own (Sec. 2.3, Eq. 2):
   x_{k,p} ← α x_{k,p} + (1 − α) x_p, α = ``alpha``.

Where Δ_p is taken relative to the slot is ``method.schedule``: ``paper`` (the default) takes it at
the slot and lands it τ steps later, as Algorithm 1 does (and torchft did before its change
"simplify streaming diloco"); ``torchft`` takes it τ steps before the slot and lands it at the slot,
as torchft 0.2.0 does. The two are the same schedule shifted by τ steps; with τ = 0 they are one.
Both need H a multiple of P and τ < H / P (torchft refuses the rest; so does
:func:`dpl.config.validate.check_fragments`).

P = 1, τ = 0, α = 0 is DiLoCo step for step. An epoch's end changes nothing unless the run syncs
there (``sync_at_epoch_end``, the study's code): then whatever is in flight lands and every
fragment syncs at once. Validation and test read the outer model x (:meth:`StreamingDiLoCo.global_model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from dpl.comm.flight import Flight
from dpl.comm.point import DeltaResult
from dpl.core.methods.base import Now
from dpl.core.methods.outer import OuterStep
from dpl.core.workers import StackedWorkers
from dpl.errors import ConfigError


@dataclass(frozen=True)
class Fragment:
    """The tensors of one fragment: indices into the workers' parameters and buffers."""

    params: tuple[int, ...]
    buffers: tuple[int, ...]


def balanced_split(sizes: list[int], parts: int) -> list[int]:
    """Where to cut ``sizes`` (in order) into ``parts`` contiguous non-empty groups so that the largest
    group's sum is smallest (ties: the earliest cuts); the index each group starts at."""
    n = len(sizes)
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    # best[j][i]: the smallest possible largest sum when the first i items form j groups
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for j in range(1, parts + 1):
        for i in range(j, n + 1):
            for start in range(j - 1, i):
                cost = max(best[j - 1][start], prefix[i] - prefix[start])
                if cost < best[j][i]:
                    best[j][i], cut[j][i] = cost, start
    starts, i = [], n
    for j in range(parts, 0, -1):
        i = cut[j][i]
        starts.append(i)
    return starts[::-1]


def fragments(param_names: list[str], param_sizes: list[int], buffer_names: list[str], P: int) -> list[Fragment]:
    """P fragments of a model: its layers (the modules that own parameters, in model order) cut into
    contiguous groups balanced by parameter count (:func:`balanced_split`); a buffer belongs to the
    fragment of its layer (BatchNorm's statistics travel with its weights), else to the first."""
    layers: list[str] = []
    for name in param_names:
        layer = name.rpartition(".")[0]
        if not layers or layers[-1] != layer:
            layers.append(layer)
    if P > len(layers):
        raise ConfigError(f"method.fragments={P} is invalid: allowed at most {len(layers)} (the model's layers "
                          f"with parameters)")
    layer_of = [layers.index(name.rpartition(".")[0]) for name in param_names]
    sizes = [sum(s for s, l in zip(param_sizes, layer_of) if l == i) for i in range(len(layers))]
    starts = balanced_split(sizes, P) + [len(layers)]
    part_of_layer = [next(p for p in range(P) if starts[p] <= i < starts[p + 1]) for i in range(len(layers))]

    def part_of_buffer(name: str) -> int:
        module = name.rpartition(".")[0]
        owners = [i for i, layer in enumerate(layers) if module == layer or module.startswith(layer + ".")]
        return part_of_layer[owners[-1]] if owners else 0  # a module without parameters: the first fragment

    return [Fragment(tuple(i for i, l in enumerate(layer_of) if part_of_layer[l] == p),
                     tuple(i for i, b in enumerate(buffer_names) if part_of_buffer(b) == p)) for p in range(P)]


@dataclass
class FragmentSync:
    """A fragment's sync in flight: the step of the run it lands at (None: at the fragment's next sync,
    as an eager sync's average does), and the collective."""

    lands_at: Optional[int]
    pending: Flight  # (DeltaResult, drift term), landed already once restored from a checkpoint


class StreamingDiLoCo(OuterStep):
    """Streaming DiLoCo (see the module doc): ``method.fragments`` P, ``method.delay`` τ, ``method.alpha``
    α, and DiLoCo's outer optimizer ``method.outer`` for every fragment. ``method=diloco`` is this class
    with one fragment, no delay and no mixing (its config has none of the three keys).

    ``method.eager`` (Kale et al. 2025, "Eager updates for overlapped communication and computation in
    DiLoCo", arXiv 2502.12996, Sec. 3): a sync's all-reduce is not waited for; it lands at the fragment's
    next sync, H steps later, hidden behind them. Meanwhile each worker m takes its outer step at once
    with its own fresh pseudo-gradient standing in for its share of the missing average:

        Δ̃_m^(t) = Δ^(t−1) + (Δ_m^(t) − Δ_m^(t−1)) / K

    i.e. the one-step-stale average with worker m's own stale term swapped for its current one (the
    first sync: Δ_m^(1) / K). The workers' global models then differ by their own terms, so in eager
    mode every worker keeps its own anchor x_m and outer state (stacked [K_local, ...]), and its buffers
    (BatchNorm's statistics) are averaged at the sync itself, a small blocking all-reduce.
    """


    def __init__(self, cfg: Any, local_momentum: str = "keep") -> None:
        super().__init__(cfg, local_momentum)
        # diloco's config has none of streaming's keys: one fragment, no delay, no mixing
        self.P, self.delay = int(cfg.get("fragments", 1)), int(cfg.get("delay", 0))
        self.alpha, self.eager = float(cfg.get("alpha", 0.0)), bool(cfg.get("eager", False))
        self.schedule = str(cfg.get("schedule", "paper"))
        self.fragments: list[Fragment] = []
        self.in_flight: dict[int, FragmentSync] = {}
        self.own: dict[int, list[torch.Tensor]] = {}  # eager: each fragment's Δ_m of its last sync [K_local, ...]
        # the step syncs_after was last asked about; before any, a sync() is a full one (every fragment, now)
        self._now = Now(epoch=0, period=0, H=1, step=0, epoch_end=True)

    def start(self, workers: StackedWorkers, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        if self.eager:  # every worker its own anchor x_m and outer state: the stacked [K_local, ...] tensors
            self.anchor = [p.detach().double().clone() for p in workers.params]
            self.outer = self.make_outer(self.anchor)
        else:
            super().start(workers, optimizer)
        sizes = [p[0].numel() for p in workers.params]
        self.fragments = fragments(workers.param_names, sizes, workers.buffer_names, self.P)
        self.K, self.k_local = workers.K, workers.k_local

    def slot(self, p: int, H: int) -> int:
        """o_p = (p + 1) H / P: fragment p's step within each period of H steps (fragment 0 first)."""
        return (p + 1) * H // len(self.fragments)

    def starts_at(self, p: int, H: int) -> int:
        """The step of the period at which fragment p's sync starts: its slot (``paper``), or τ steps
        before it so that it lands at the slot (``torchft``)."""
        return self.slot(p, H) - (self.delay if self.schedule == "torchft" else 0)

    def due(self, period: int, H: int) -> list[int]:
        """The fragments whose sync starts after the step ``period`` of a period of H steps."""
        return [p for p in range(len(self.fragments)) if period == self.starts_at(p, H)]

    def syncs_after(self, now: Now) -> bool:
        self._now = now
        return now.epoch_end or bool(self.due(now.period, now.H)) or any(
            f.lands_at is not None and f.lands_at <= now.step for f in self.in_flight.values())

    def global_model(self, workers: StackedWorkers, kind: str = "eval") -> dict[str, torch.Tensor]:
        """The outer model x: DiLoCo's global model, streaming's with each fragment's last landed outer
        step (an eager run's: the mean of the workers' own x_m); the buffers (BatchNorm's statistics)
        the workers' average. Not a copy of any worker: with α > 0 or mid-period they differ from x."""
        anchors = [x[0] for x in workers.point.average_copy(self.anchor, kind)] if self.eager else self.anchor
        names = workers.param_names + workers.buffer_names
        params = [x.to(p.dtype).clone() for x, p in zip(anchors, workers.params)]
        buffers = [b[0] for b in workers.point.average_copy(workers.buffers, kind)] if workers.buffers else []
        return dict(zip(names, params + buffers))

    @torch.no_grad()
    def sync(self, workers: StackedWorkers, optimizer: torch.optim.Optimizer, lr: float) -> Optional[torch.Tensor]:
        """This step's events: the fragments whose τ steps are up land; the fragments due start (and,
        with τ = 0, land at once). An epoch's end where the run syncs lands everything and syncs every
        fragment at once."""
        if self.outer is None:
            raise RuntimeError(f"{type(self).__name__}.start(workers) must be called before the first sync")
        now = self._now
        starting = list(range(len(self.fragments))) if now.epoch_end else self.due(now.period, now.H)
        if self.eager:
            drifts = [d for p in starting for d in self._eager_sync(workers, optimizer, lr, p, now.H)]
            return torch.stack(drifts).mean() if drifts else None
        drifts = []
        # landings first: those whose time came, and any still in flight that must start again now
        for p in sorted(p for p, f in self.in_flight.items() if f.lands_at <= now.step or p in starting):
            drifts.append(self._land(workers, optimizer, lr, p))
        delay = 0 if now.epoch_end else self.delay
        for p in starting:
            fragment = self.fragments[p]
            with workers.sync(overlap_steps=delay):
                pending = workers.start_pseudo_gradient([self.anchor[i] for i in fragment.params], self.syncs,
                                                        fragment.params, fragment.buffers)
            self.syncs += 1
            self.in_flight[p] = FragmentSync(now.step + delay, pending)
            if delay == 0:
                drifts.append(self._land(workers, optimizer, lr, p))
        return torch.stack(drifts).mean() if drifts else None

    def _land(self, workers: StackedWorkers, optimizer: torch.optim.Optimizer, lr: float, p: int) -> torch.Tensor:
        landed, drift = self.in_flight.pop(p).pending.wait()
        fragment = self.fragments[p]
        self.land(workers, optimizer, lr, landed, fragment.params, fragment.buffers, mix=self.alpha)
        return drift

    def _eager_sync(self, workers: StackedWorkers, optimizer: torch.optim.Optimizer, lr: float, p: int,
                    H: int) -> list[torch.Tensor]:
        """Fragment p's eager sync: its Δ_m^(t) put in flight (to land at its next sync), the previous
        average Δ^(t−1) waited for, and every worker's outer step on Δ̃_m^(t) at once. Returns the drift
        term of the sync that landed (none at the first)."""
        fragment = self.fragments[p]
        own = [self.anchor[i] - workers.params[i].detach().double() for i in fragment.params]  # Δ_m = x_m − θ_m
        with workers.sync(overlap_steps=H):  # its average is waited for at the next sync, H steps on
            pending = workers.start_mean_of_deltas(own, self.syncs, fragment.params)
            if fragment.buffers:
                workers.average_([workers.buffers[i] for i in fragment.buffers], "buffers")
        self.syncs += 1
        previous = self.in_flight.pop(p, None)
        drifts = []
        if previous is not None:
            landed, drift = previous.pending.wait()
            stale, drifts = landed.deltas, [drift]
        else:  # the first sync: no average has landed yet
            stale = [torch.zeros_like(d[0]) for d in own]
        before = self.own.get(p) or [torch.zeros_like(d) for d in own]
        eager = [m.unsqueeze(0) + (now - old) / self.K for m, now, old in zip(stale, own, before)]
        self.own[p], self.in_flight[p] = own, FragmentSync(None, pending)
        self.land(workers, optimizer, lr, DeltaResult(eager, None, [], 1), fragment.params, (), mix=self.alpha)
        return drifts

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The outer step's state and, mid-epoch, each fragment in flight as it will land (waited for
        here: a collective cannot be saved, its result can), so a resumed run lands the same numbers."""
        flights = {}
        for p, flight in self.in_flight.items():
            landed, drift = flight.pending.wait()
            # the drift term is this process's: it travels with the workers' state (worker_state)
            flights[p] = {"lands_at": flight.lands_at, "deltas": [d.clone() for d in landed.deltas],
                          "buffers": [b.clone() for b in landed.buffers], "arrived": landed.arrived}
        return {**super().state_dict(), "in_flight": flights}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.in_flight = {int(p): FragmentSync(f["lands_at"], _landed(f)) for p, f in state["in_flight"].items()}

    def worker_state(self) -> dict[str, list[torch.Tensor]]:
        """What each worker holds of its own, which the multi-process engine stacks over ranks like the
        parameters: each fragment in flight's drift term (this process's share, in its first row, so the
        rows sum to the whole), and in eager mode each worker's anchor, outer state and last Δ_m."""
        out = {}
        for p, flight in self.in_flight.items():
            drift = flight.pending.wait()[1]
            rows = torch.zeros(self.k_local, dtype=drift.dtype, device=drift.device)
            rows[0] = drift
            out[f"flight.drift.{p}"] = [rows]
        if not self.eager:
            return out
        out["eager.anchor"] = [x.clone() for x in self.anchor]
        for p, own in self.own.items():
            out[f"eager.own.{p}"] = [d.clone() for d in own]
        for i, x in enumerate(self.anchor):
            for key, value in self.outer.state.get(x, {}).items():
                if torch.is_tensor(value) and value.dim() >= 1:  # per worker; scalar step counts are shared
                    out[f"eager.outer.{i}.{key}"] = [value.clone()]
        return out

    def load_worker_state(self, state: dict[str, list[torch.Tensor]]) -> None:
        for p, flight in self.in_flight.items():
            rows = state.get(f"flight.drift.{p}")
            if rows is not None:  # restored landed (_landed): its drift term is this process's share
                flight.pending = Flight.landed((flight.pending.wait()[0], rows[0].sum()))
        if not self.eager:
            return
        with torch.no_grad():
            for x, saved in zip(self.anchor, state["eager.anchor"]):
                x.copy_(saved)
        self.own = {int(k.rsplit(".", 1)[1]): list(v) for k, v in state.items() if k.startswith("eager.own.")}
        for k, (value,) in ((k, v) for k, v in state.items() if k.startswith("eager.outer.")):
            _, _, i, key = k.split(".", 3)
            self.outer.state[self.anchor[int(i)]][key] = value.clone()


def _landed(saved: dict) -> Flight:
    """A fragment's sync restored from a checkpoint: landed when it was saved (its drift term:
    :meth:`StreamingDiLoCo.load_worker_state`)."""
    result = DeltaResult(list(saved["deltas"]), None, list(saved["buffers"]), int(saved["arrived"]))
    return Flight.landed((result, torch.zeros((), dtype=torch.float64)))
