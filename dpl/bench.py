"""``python -m dpl.bench``: throughput of the training path, as ratios against baselines
measured in the same run.

Each measurement warms up, then repeats and reports the median and spread
(min-max) over repeats, timed with CUDA synchronisation on GPU.

1. ``step``: samples/s of the full training step (batch cut + augmentation + forward +
   backward + optimizer) against forward + backward alone on pre-made tensors.
   Goal: ratio >= 0.9 (the data path costs little).
2. ``local``: one simulated LocalSGD step of K=8 workers x batch 64 against one
   centralized step of batch 512 on the same model (equal FLOPs), per simulation mode.
   Goal: ratio >= 0.9 for the mode ``simulate=auto`` picks.
3. ``distributed``: epoch time of ``engine=distributed`` with K gloo processes on this
   machine's CPU cores against the one-process simulation of the same K workers and
   config (ratio simulated/distributed: > 1 means the processes are faster), and the
   fraction of the distributed epoch spent in collectives (``comm_wall_s``, waiting
   for the slowest rank included). The first epoch (connection setup) is warm-up.
4. ``limit``: the same maths on pre-made tensors (K stacked LeNet-5 replicas through the
   workers' forward/backward and torch SGD with momentum and weight decay: no batch cut,
   augmentation, sync or bookkeeping), eager on CPU and replayed as one captured CUDA
   graph on GPU; against it, real end-to-end epochs through the Trainer (median
   samples/s over epochs after a warm-up epoch) for centralized K=1 and LocalSGD K=4
   (H=8) and K=8 (H=16), in fp32 and bf16, printed as a table of ratios, one column per
   ``engine.compile`` mode (none and compile; graph too on GPU).
   Goal on a GPU: every ratio of the default mode >= 0.8.
5. ``layout``: full training steps with ``engine.memory_format=channels_last`` against
   ``contiguous``, timed in alternation, for centralized K=1 at batch 64 and 512 and LocalSGD
   K=8 x 64, in fp32 and bf16, with ``engine.simulate=loop`` (vmap's stacked batches keep their
   layout): where channels_last pays (what ``auto`` should pick per device).
6. ``compression``: the time of one sync of K=4 LocalSGD workers of LeNet-5 per compressor
   (``compression=...`` with error feedback: each worker's Δ_k compressed, the residual updated,
   the K payloads decoded and averaged, as :meth:`StackedWorkers.pseudo_gradient_` does it)
   against the plain parameter average of ``compression=none``, as a ratio (> 1: slower), beside
   the payload's bytes per worker against the fp32 replica's.
7. ``pack``: the same sweep of R runs (``--pack-runs``, default 8 seeds) as whole processes, start-up
   included, alternating: one ``python -m dpl`` per run; one ``python -m dpl -m`` with Hydra's basic
   launcher (serially, one run after another); and with ``hydra/launcher=packed`` (one group), with the
   engine's default simulation (loop on CPU: nothing fused) and with ``engine.simulate=vmap`` (fused);
   for centralized batch 64 and LocalSGD K=4 H=8. Ratios of wall times against packed (> 1: packing is
   faster). Goals: >= 4x a serial sweep on a GPU at R = 8; >= 1.0x on CPU.
8. ``startup``: what a process costs outside its steps, as whole processes, alternating: ``python -c 'import
   torch'`` (the baseline), ``python -m dpl --help``, and a tiny run (7 steps) with ``logger=none`` and with
   MLflow on an existing store; each run's fixed cost is its wall time less its first to last step (from
   ``DPL_TIMELINE=1``'s marks, :mod:`dpl.timeline`), its ratio the median over rounds of fixed cost / the same
   round's baseline; and the MLflow run's median timeline, phase by phase. Goals: a tiny run's fixed cost
   <= 3x the baseline; ``--help`` under 3 s.
9. ``async``: ``engine=distributed`` with K gloo processes on this machine, half the workers ``--slow-factor``
   times slower (``clock.speed=slow``) and slowed for real (``clock.emulate``: a slow rank sleeps after each
   step it computes), synchronous DiLoCo against asynchronous DiLoCo (Liu et al. 2024) at the same H and
   budget of loop steps: the measured epoch time (median after a warm-up epoch) and the modelled one, and
   the ratio sync / async of each. With the modelled network out of the way (10^6 Gb/s, no latency, against
   100 us of compute per sample), the modelled ratio is the slow factor (a synchronous step waits for the
   slowest worker, an asynchronous tick is the fastest worker's step); the goal is a measured ratio within
   25 % of it: the ranks show the gain the modelled clock models.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from dpl.core.engines import COMPILED, EAGER, GRAPH, memory_format, simulation_mode
from dpl.core.loop import Trainer
from dpl.run.build import build_trainer


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from dpl.config.store import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=["dataset=synthetic", "logger=none", "progress=false", *overrides])


def timed(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int, iters: int) -> list[float]:
    """Seconds per call of ``fn``, one number per repeat of ``iters`` calls, after ``warmup`` calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        out.append((time.perf_counter() - t0) / iters)
    return out


def interleaved(fns: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int,
                iters: int, setup: dict[str, Callable[[], None]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each of ``fns``, timed in turn (A, B, A, B, ...: ``repeats`` blocks of ``iters``
    calls each), so the swings of a shared machine fall on all of them alike; ``setup[name]`` runs untimed
    before each of ``name``'s blocks."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    setup = setup or {}
    for name, fn in fns.items():
        setup.get(name, lambda: None)()
        for _ in range(warmup):
            fn()
    sync()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            setup.get(name, lambda: None)()
            sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            sync()
            out[name].append((time.perf_counter() - t0) / iters)
    return out


def paired(numerator: list[float], denominator: list[float]) -> tuple[float, float, float]:
    """The median of the paired ratios numerator[i] / denominator[i] (blocks timed next to each other), with
    their min and max: steadier under load than a ratio of two medians timed apart."""
    ratios = sorted(a / b for a, b in zip(numerator, denominator))
    return statistics.median(ratios), ratios[0], ratios[-1]


def summary(samples_per_call: int, secs: list[float]) -> str:
    rates = sorted(samples_per_call / s for s in secs)
    return f"{statistics.median(rates):9.0f} samples/s  (min {rates[0]:.0f}, max {rates[-1]:.0f})"


def step_fn(trainer: Trainer) -> Callable[[], None]:
    """One full training step (the trainer's own), wrapping around the epoch so it can run forever."""

    def step() -> None:
        if trainer.state.step >= trainer.steps_per_epoch:
            trainer.rewind_epoch()
        trainer.step()

    return step


def fwd_bwd_fn(trainer: Trainer, batch: int) -> Callable[[], None]:
    """Forward + backward alone on pre-made, pre-normalised tensors."""
    w = trainer.workers
    data = trainer.data
    x = torch.randn(w.k_local, batch, data.channels, data.image_size, data.image_size, device=trainer.device)
    y = torch.randint(0, data.num_classes, (w.k_local, batch), device=trainer.device)

    def step() -> None:
        w.forward_backward(x, y)
        for p in w.params:
            p.grad = None

    return step


BEYOND = ("batch: gather, crop and flip, normalise", "optimizer step (and zero_grad)")


def beyond_fns(trainer: Trainer) -> dict[str, Callable[[], None]]:
    """What the trainer's step does besides forward and backward, each alone: its batch cut from the data
    (as :meth:`dpl.core.step.LocalStep.batch_losses` cuts it) and its inner optimizer's step on the gradients
    one backward left (the momentum buffers move on; the model is not the bench's to keep)."""
    from dpl.components.data.device import make_batch

    local = trainer.local_step
    idx = torch.arange(trainer.hp.batch_size * trainer.workers.k_local, device=trainer.device)
    idx = idx.view(trainer.workers.k_local, -1)
    x, y = make_batch(local.data, idx, local.key, train=True, rows=local.rows)
    trainer.workers.forward_backward(x, y)
    grads = [p.grad.clone() for p in trainer.workers.params]

    def optimizer_step() -> None:
        for p, g in zip(trainer.workers.params, grads):
            p.grad = g
        local.optimizer.step()
        local.optimizer.zero_grad(set_to_none=True)

    return {BEYOND[0]: lambda: make_batch(local.data, idx, local.key, train=True, rows=local.rows),
            BEYOND[1]: optimizer_step}


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB GPU (max allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB host (max RSS)"


def bench_step(device: torch.device, args) -> None:
    cfg = compose(f"device={device.type}", "dataset.num_train=6000", f"batch_size={args.batch}")
    trainer = build_trainer(cfg, device)
    n = args.batch
    t = interleaved({"full": step_fn(trainer), "base": fwd_bwd_fn(trainer, n), **beyond_fns(trainer)}, device,
                    args.warmup, args.step_repeats, args.iters)
    ratio, lo, hi = paired(t["base"], t["full"])
    print(f"[step] batch {n} on {device}, {args.step_repeats} blocks of {args.iters} steps each, interleaved")
    print(f"  forward+backward (baseline) {summary(n, t['base'])}")
    print(f"  full training step          {summary(n, t['full'])}")
    print(f"  ratio full/baseline (samples/s; median of paired blocks): {ratio:.3f} (min {lo:.3f}, max {hi:.3f})"
          f"   (goal >= 0.9)")
    full = statistics.median(t["full"])
    print(f"  where the full step's time goes beyond forward+backward (median per step, share of the full step): "
          f"{full - statistics.median(t['base']):.2e} s in all")
    for part in BEYOND:
        print(f"    {part:<44} {statistics.median(t[part]):.2e} s  {statistics.median(t[part]) / full:6.1%}")
    print(f"  peak memory: {peak_memory(device)}")


def bench_local(device: torch.device, args) -> None:
    K, b = 8, 64
    central = build_trainer(compose(f"device={device.type}", "dataset.num_train=12000", f"batch_size={K * b}"), device)
    fns = {"one batch": step_fn(central)}
    for mode in ("loop", "vmap"):
        cfg = compose(f"device={device.type}", "dataset.num_train=12000", f"batch_size={b}", f"K={K}",
                      "method=localsgd", "H=1000000", f"engine.simulate={mode}")
        fns[mode] = step_fn(build_trainer(cfg, device))
    t = interleaved(fns, device, args.warmup, args.repeats, args.iters)
    print(f"[local] one step of K={K} x batch {b} (localsgd, no sync) vs one centralized step of batch {K * b}, "
          f"interleaved")
    print(f"  centralized batch {K * b:<4}        {summary(K * b, t['one batch'])}")
    auto = simulation_mode("auto", device)
    for mode in ("loop", "vmap"):
        ratio, lo, hi = paired(t["one batch"], t[mode])
        tag = " (auto)" if mode == auto else ""
        print(f"  simulate={mode:<4} K={K} x {b}       {summary(K * b, t[mode])}")
        print(f"    ratio simulated/centralized: {ratio:.3f} (min {lo:.3f}, max {hi:.3f}){tag}   (goal >= 0.9 for auto)")


def _fit_rank(cfg, _out_dir, comm) -> list[dict]:
    """One rank of the [distributed] benchmark: train without recording anything; its history."""
    trainer = build_trainer(cfg, comm.device, comm.rank, comm)
    trainer.fit()
    return trainer.state.history


ASYNC_RUNS = (("sync", "method=diloco"), ("async", "method=async_diloco"))  # [async]: the two methods compared


def async_rows(args) -> list[dict]:
    """Per K of ``args.world``: each method's measured and modelled epoch times (medians after the warm-up
    epoch) on K gloo processes, half the workers slowed for real (see the module doc, [async])."""
    from dpl.launch.ranks import spawn

    rows = []
    for K in args.world:
        ov = ["device=cpu", f"K={K}", "H=8", f"dataset.num_train={args.samples}", f"batch_size={args.batch}",
              f"epochs={1 + args.repeats}", "dataset.num_test=500", "engine=distributed", "clock.speed=slow",
              "clock.slow_fraction=0.5", f"clock.slow_factor={args.slow_factor}", "clock.emulate=true",
              "clock.sample_cost_us=100", "network.bandwidth_gbps=1e6", "network.latency_us=0"]
        for name, method in ASYNC_RUNS:
            with tempfile.TemporaryDirectory() as tmp:
                hist = spawn(_fit_rank, compose(*ov, method), Path(tmp))
            modelled = [r["modelled_time_s"] for r in hist]
            rows.append({"K": K, "name": name, "method": method, "measured_s": [r["epoch_time_s"] for r in hist[1:]],
                         "modelled_s": statistics.median(b - a for a, b in zip(modelled, modelled[1:]))})
    return rows


def bench_async(device: torch.device, args) -> None:
    print(f"[async] synchronous vs asynchronous DiLoCo on K gloo processes, half the workers "
          f"{args.slow_factor:g}x slower and slowed for real (clock.emulate): epoch time measured and modelled "
          f"(median over {args.repeats} epochs after one warm-up epoch)")
    rows = async_rows(args)
    for row in rows:
        print(f"  K={row['K']} {row['method']:<20} measured {_spread(row['measured_s'])} s/epoch, "
              f"modelled {row['modelled_s'] * 1e3:.3f} ms/epoch")
        if row["name"] == "async":
            sync = next(r for r in rows if r["K"] == row["K"] and r["name"] == "sync")
            measured = statistics.median(sync["measured_s"]) / statistics.median(row["measured_s"])
            print(f"    ratio sync/async: measured {measured:.2f}, modelled {sync['modelled_s'] / row['modelled_s']:.2f}"
                  f"   (goal: measured within 25 % of modelled)")


def _spread(xs: list[float], fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(statistics.median(xs))} (min {fmt.format(min(xs))}, max {fmt.format(max(xs))})"


def bench_distributed(device: torch.device, args) -> None:
    from dpl.launch.ranks import spawn

    epochs = 1 + args.repeats  # the first epoch is warm-up
    print(f"[distributed] epoch time of K gloo processes vs the one-process simulation of K workers "
          f"(CPU, {torch.get_num_threads()} threads for the simulation, cores/K per process; "
          f"median over {args.repeats} epochs after one warm-up epoch)")
    for K in args.world:
        for method in (["method=centralized"], ["method=localsgd", "H=8"]):
            ov = ["device=cpu", f"K={K}", *method, f"dataset.num_train={args.samples}",
                  f"batch_size={args.batch}", f"epochs={epochs}", "dataset.num_test=500"]
            sim = build_trainer(compose(*ov), torch.device("cpu"))
            sim.fit()
            with tempfile.TemporaryDirectory() as tmp:
                hist = spawn(_fit_rank, compose(*ov, "engine=distributed"), Path(tmp))
            sim_s = [r["epoch_time_s"] for r in sim.state.history[1:]]
            dist_s = [r["epoch_time_s"] for r in hist[1:]]
            frac = [r["comm_wall_s"] / r["epoch_time_s"] for r in hist[1:]]
            print(f"  K={K} {sim.cfg.method.name:<11} {sim.steps_per_epoch} steps/epoch: simulated {_spread(sim_s)} s, "
                  f"distributed {_spread(dist_s)} s")
            print(f"    ratio simulated/distributed: {statistics.median(sim_s) / statistics.median(dist_s):.2f}   "
                  f"time in collectives: {_spread(frac, '{:.1%}')}")


LIMIT_RUNS = ((1, ["method=centralized"]), (4, ["method=localsgd", "H=8"]), (8, ["method=localsgd", "H=16"]))


def limit_fn(trainer: Trainer, batch: int) -> Callable[[], None]:
    """The step at its limit: forward/backward of the stacked workers and a torch SGD step
    (float lr, so it is capturable) on pre-made tensors; one CUDA graph replay on GPU."""
    w, data, device = trainer.workers, trainer.data, trainer.device
    x = torch.randn(w.k_local, batch, data.channels, data.image_size, data.image_size, device=device)
    y = torch.randint(0, data.num_classes, (w.k_local, batch), device=device)
    opt = torch.optim.SGD(w.params, lr=trainer.base_lr, momentum=0.9, weight_decay=5e-4)

    def step() -> None:
        w.forward_backward(x, y)
        opt.step()
        opt.zero_grad(set_to_none=False)  # graph capture needs the .grad tensors to persist

    if device.type != "cuda":
        return step
    side = torch.cuda.Stream()  # warm up (lazy optimizer state, cuBLAS handles) off the capture stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def e2e_rate(trainer: Trainer) -> list[float]:
    """samples/s of each real epoch through the Trainer after the first (warm-up) one."""
    trainer.fit()
    return [r["samples_per_s"] for r in trainer.state.history[1:]]


def bench_limit(device: torch.device, args) -> None:
    b = args.batch
    # how the Trainer's local step runs (engine.compile): eager and torch.compile everywhere, the CUDA graph on GPU
    modes = (EAGER, GRAPH, COMPILED) if device.type == "cuda" else (EAGER, COMPILED)
    print(f"[limit] end-to-end epochs through the Trainer vs the same maths on pre-made tensors "
          f"({'one CUDA graph' if device.type == 'cuda' else 'eager'}), batch {b} per worker, "
          f"{args.e2e_samples} synthetic images, median over {args.repeats} epochs after a warm-up one "
          f"(which also compiles or captures); columns: samples/s and ratio to the limit per engine.compile")
    print(f"  {'run':<16} {'precision':<9} {'limit':>8} " + " ".join(f"{m:>9} {'ratio':>6}" for m in modes))
    for K, method in LIMIT_RUNS:
        for precision in ("fp32", "bf16"):
            ov = [f"device={device.type}", f"K={K}", *method, f"precision={precision}",
                  f"dataset.num_train={args.e2e_samples}", "dataset.num_test=500", f"batch_size={b}",
                  f"epochs={1 + args.repeats}", "scheduler=constant"]
            limit = timed(limit_fn(build_trainer(compose(*ov), device), b), device, args.warmup, args.repeats,
                          args.iters)
            lim = statistics.median(K * b / t for t in limit)
            cells = []
            for mode in modes:
                e2e = statistics.median(e2e_rate(build_trainer(compose(*ov, f"engine.compile={mode}"), device)))
                cells.append(f"{e2e:9.0f} {e2e / lim:6.2f}")
            print(f"  {method[0].split('=')[1] + f' K={K}':<16} {precision:<9} {lim:8.0f} " + " ".join(cells))
    print("  goal on GPU: ratio >= 0.8 for the default (engine.compile=auto: graph on CUDA, none on CPU)")


LAYOUT_RUNS = (("centralized K=1 x 64", ["K=1", "method=centralized", "batch_size=64"]),
               ("centralized K=1 x 512", ["K=1", "method=centralized", "batch_size=512"]),
               ("localsgd K=8 x 64", ["K=8", "method=localsgd", "H=16", "batch_size=64"]))


def layout_rows(device: torch.device, args) -> list[dict]:
    """Per run and precision: full training steps per second with ``engine.memory_format=contiguous``
    and ``channels_last``, timed in alternation (one repeat of each in turn), so the slow drifts of a
    shared machine fall on both alike; the ratio is channels_last over contiguous (> 1: faster).
    ``engine.simulate=loop`` throughout: the layout applies to a worker's own [B, C, H, W] batch, which
    vmap's stacked batches are not (torch's vmap cannot query channels_last strides)."""
    rows = []
    for label, ov in LAYOUT_RUNS:
        for precision in ("fp32", "bf16"):
            steps = {}
            for fmt in ("contiguous", "channels_last"):
                cfg = compose(f"device={device.type}", "dataset.num_train=12000", f"precision={precision}",
                              f"engine.memory_format={fmt}", "engine.simulate=loop", *ov)
                steps[fmt] = step_fn(build_trainer(cfg, device))
                timed(steps[fmt], device, args.warmup, 0, 1)  # its warm-up steps only
            secs: dict[str, list[float]] = {fmt: [] for fmt in steps}
            for _ in range(args.repeats):
                for fmt, fn in steps.items():
                    secs[fmt] += timed(fn, device, 0, 1, args.iters)
            med = {fmt: statistics.median(v) for fmt, v in secs.items()}
            rows.append({"run": label, "precision": precision, "contiguous_s": med["contiguous"],
                         "channels_last_s": med["channels_last"], "ratio": med["contiguous"] / med["channels_last"]})
    return rows


def bench_layout(device: torch.device, args) -> None:
    print(f"[layout] full training steps with image batches channels_last vs contiguous (engine.memory_format) on "
          f"{device}, engine.simulate=loop, alternating, median over {args.repeats} repeats of {args.iters} steps; "
          f"auto picks {memory_format('auto', device)} here")
    print(f"  {'run':<22} {'precision':<9} {'contiguous ms':>13} {'channels_last ms':>16} {'speed-up':>9}")
    for r in layout_rows(device, args):
        print(f"  {r['run']:<22} {r['precision']:<9} {1e3 * r['contiguous_s']:13.1f} "
              f"{1e3 * r['channels_last_s']:16.1f} {r['ratio']:9.2f}")


def compression_rows(device: torch.device, args, K: int = 4) -> list[dict]:
    """Per compressor: seconds of one compressed sync (median over repeats), their ratio to the plain
    average's, and the payload's bytes per worker against the fp32 replica's."""
    from omegaconf import OmegaConf

    from dpl.comm.codecs import CODECS, build_codec

    trainer = build_trainer(compose(f"device={device.type}", f"K={K}", "method=localsgd", "dataset.num_train=2000"),
                            device)
    w = trainer.workers
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():  # workers a local period apart: Δ_k of the size local steps give
        for p in w.params:
            p.add_(1e-3 * torch.randn(p.shape, generator=gen, device=device))
    anchor = [p.detach()[0].double().clone() for p in w.params]
    saved = [p.detach().clone() for p in w.params]

    def plain() -> None:
        w.pseudo_gradient_(anchor, 0)
        with torch.no_grad():
            for p, s in zip(w.params, saved):
                p.copy_(s)

    replica = sum(p[0].numel() * 4 for p in w.params)
    exact = next(name for name, option in CODECS.items() if option.facts.exact)  # the parameters, averaged exactly
    codecs = {name: build_codec(OmegaConf.structured(option.schema(name=name, error_feedback=True)))
              for name, option in CODECS.items() if not option.facts.exact}  # each with its schema's defaults

    def use(codec) -> Callable[[], None]:
        def setup() -> None:
            w.point.codec = codec
            if codec is not None:
                w.point.start(w.params)
        return setup

    # every codec's blocks interleaved with the plain average's (top-k / random-k: 1 %; chunked formats: 1024)
    fns = {exact: plain, **{name: (lambda: w.pseudo_gradient_(anchor, 0)) for name in codecs}}
    setup = {exact: use(None), **{name: use(codec) for name, codec in codecs.items()}}
    t = interleaved(fns, device, args.warmup, args.repeats, args.iters, setup)
    rows = [{"name": exact, "seconds": statistics.median(t[exact]), "ratio": 1.0, "bytes": replica,
             "bytes_ratio": 1.0}]
    for name in codecs:
        use(codecs[name])()
        nbytes = w.point.payload_bytes(w.params)
        rows.append({"name": name, "seconds": statistics.median(t[name]), "ratio": paired(t[name], t[exact])[0],
                     "bytes": nbytes, "bytes_ratio": nbytes / replica})
    w.point.codec = None
    return rows


def bench_compression(device: torch.device, args) -> None:
    print(f"[compression] one sync of K=4 LeNet-5 workers on {device}: each worker's Δ compressed with error "
          f"feedback, the payloads decoded and averaged (ratio 0.01 for topk/randomk, int8 chunks of 1024), "
          f"against the plain average of compression=none; median over {args.repeats} repeats")
    print(f"  {'compression':<12} {'ms/sync':>9} {'vs none':>8} {'bytes/worker':>13} {'vs fp32':>8}")
    for r in compression_rows(device, args):
        print(f"  {r['name']:<12} {1e3 * r['seconds']:9.2f} {r['ratio']:8.2f} {r['bytes']:13d} {r['bytes_ratio']:8.4f}")


PACK_RUNS = (("centralized K=1 batch 64", ["method=centralized", "K=1"]),
             ("localsgd K=4 H=8", ["method=localsgd", "K=4", "H=8"]))


def _command_seconds(cwd: Path, device: torch.device, overrides: list[str]) -> float:
    """Wall seconds of one whole ``python -m dpl`` process (interpreter start-up included)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "DPL_SWEEP_PARENT_RUN_ID": ""}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dpl", *overrides, f"device={device.type}"], cwd=cwd,
                          env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"python -m dpl failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return seconds


PACK_VARIANTS = {"processes": [], "serial": ["-m"], "packed": ["-m", "hydra/launcher=packed"],
                 "packed vmap": ["-m", "hydra/launcher=packed", "engine.simulate=vmap"]}


def pack_rows(device: torch.device, args) -> list[dict]:
    """Per run kind: median wall seconds of each way to run the R-run sweep (repeats, alternating).

    ``processes``: one ``python -m dpl`` per run, one after another; ``serial``: one ``python -m dpl -m``
    with Hydra's basic launcher; ``packed`` / ``packed vmap``: ``hydra/launcher=packed`` with the
    engine's default simulation (loop on CPU: nothing fused) and with vmap (fused)."""
    seeds = [str(s) for s in range(args.pack_runs)]
    common = ["dataset=synthetic", f"dataset.num_train={args.pack_samples}", "dataset.num_test=500", "batch_size=64",
              f"epochs={args.pack_epochs}", "logger=none", "progress=false"]
    rows = []
    for name, run in PACK_RUNS:
        times: dict[str, list[float]] = {v: [] for v in PACK_VARIANTS}
        with tempfile.TemporaryDirectory() as tmp:
            for rep in range(args.pack_repeats):
                for variant, extra in PACK_VARIANTS.items():
                    where = Path(tmp) / f"{variant.replace(' ', '_')}{rep}"
                    ov = [*common, *run, *extra, f"results_csv={where}.csv"]
                    if variant == "processes":
                        times[variant].append(sum(_command_seconds(Path(tmp), device, [
                            *ov, f"seed={s}", f"hydra.run.dir={where}/{s}"]) for s in seeds))
                    else:
                        times[variant].append(_command_seconds(Path(tmp), device, [
                            *ov, f"seed={','.join(seeds)}", f"hydra.sweep.dir={where}"]))
        medians = {v: statistics.median(t) for v, t in times.items()}
        rows.append({"run": name, **medians, "spread": {v: (min(t), max(t)) for v, t in times.items()}})
    return rows


def bench_pack(device: torch.device, args) -> None:
    print(f"[pack] a sweep of R={args.pack_runs} seeds ({args.pack_epochs} epochs of {args.pack_samples} synthetic "
          f"images, batch 64) on {device}, whole processes, median of {args.pack_repeats} (alternating): one process "
          f"per run, Hydra's basic launcher (serial), hydra/launcher=packed (default simulation; and vmap, fused). "
          f"Ratios: serial / packed (> 1: packing is faster; goal >= 4 on a GPU, >= 1.0 on CPU)")
    print(f"  {'run':<24} {'processes s':>12} {'serial s':>9} {'packed s':>9} {'vmap s':>8} "
          f"{'processes/packed':>17} {'serial/packed':>14} {'serial/vmap':>12}")
    for r in pack_rows(device, args):
        print(f"  {r['run']:<24} {r['processes']:12.1f} {r['serial']:9.1f} {r['packed']:9.1f} {r['packed vmap']:8.1f} "
              f"{r['processes'] / r['packed']:17.2f} {r['serial'] / r['packed']:14.2f} "
              f"{r['serial'] / r['packed vmap']:12.2f}")


# A run so small that nearly all of it is fixed cost (7 steps of 32 images), as a user's first try would be.
STARTUP_RUN = ["dataset=synthetic", "dataset.num_train=200", "dataset.num_test=50", "batch_size=32", "epochs=1",
               "progress=false", "logger.plots=false"]


def _timeline(stderr: str) -> dict[str, float]:
    """{phase: seconds since the process started} from ``DPL_TIMELINE=1``'s lines (dpl.timeline)."""
    marks = {}
    for line in stderr.splitlines():
        if line.startswith("[timeline] "):
            _, seconds, phase = line.split(" ", 2)
            marks[phase] = float(seconds)
    return marks


def startup_rows(device: torch.device, args) -> tuple[list[dict], dict[str, float]]:
    """Whole processes, alternating (baseline, --help, tiny run without and with MLflow, ...), ``args.startup_repeats``
    rounds: per variant the median wall seconds, the fixed cost (wall minus first step to last step) and the
    median over rounds of its ratio to the same round's ``python -c 'import torch'``; and the MLflow run's
    median timeline (seconds per phase)."""
    import os
    import subprocess
    import sys

    py = sys.executable
    variants = {"import torch (baseline)": [py, "-c", "import torch"],
                "--help": [py, "-m", "dpl", "--help"],
                "tiny run, logger=none": [py, "-m", "dpl", *STARTUP_RUN, "logger=none", f"device={device.type}"],
                "tiny run, MLflow (existing store)": [py, "-m", "dpl", *STARTUP_RUN, f"device={device.type}"]}
    env = {**os.environ, "DPL_TIMELINE": "1", "DPL_SWEEP_PARENT_RUN_ID": ""}
    walls: dict[str, list[float]] = {v: [] for v in variants}
    fixed: dict[str, list[float]] = {v: [] for v in variants}
    phases: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(variants["tiny run, MLflow (existing store)"], cwd=tmp, env=env, capture_output=True, check=True)
        for _ in range(args.startup_repeats):
            for name, command in variants.items():
                t0 = time.perf_counter()
                proc = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if proc.returncode != 0:
                    raise RuntimeError(f"{' '.join(command[1:])} failed: {proc.stderr.strip().splitlines()[-1:]}")
                marks = _timeline(proc.stderr)
                steps = marks["last step"] - marks["first step"] if "first step" in marks else 0.0
                walls[name].append(wall)
                fixed[name].append(wall - steps)
                if name.endswith("(existing store)"):
                    phases.append({**marks, "(after exit)": wall})
    base = fixed["import torch (baseline)"]
    rows = [{"variant": v, "wall": statistics.median(walls[v]), "spread": (min(walls[v]), max(walls[v])),
             "fixed": statistics.median(fixed[v]),
             "ratio": statistics.median(f / b for f, b in zip(fixed[v], base))} for v in variants]
    order = list(phases[0])
    timeline = {p: statistics.median(m[p] for m in phases) for p in order if all(p in m for m in phases)}
    return rows, timeline


def bench_startup(device: torch.device, args) -> None:
    print(f"[startup] whole processes, {args.startup_repeats} rounds alternating; fixed cost = wall - (first step "
          f"to last step); ratio = median over rounds of fixed / the round's `python -c 'import torch'` "
          f"(goal: a tiny run <= 3, --help under 3 s)")
    rows, timeline = startup_rows(device, args)
    print(f"  {'':<34} {'wall s':>7} {'(min-max)':>12} {'fixed s':>8} {'/ import torch':>15}")
    for r in rows:
        lo, hi = r["spread"]
        print(f"  {r['variant']:<34} {r['wall']:7.2f} {f'({lo:.1f}-{hi:.1f})':>12} {r['fixed']:8.2f} {r['ratio']:15.2f}")
    print("  where the tiny MLflow run's time goes (median seconds since the process started, and each phase):")
    last = 0.0
    for phase, at in timeline.items():
        print(f"    {at:7.2f}  +{at - last:6.2f}  {phase}")
        last = at


BENCHES = {"step": bench_step, "local": bench_local, "distributed": bench_distributed, "limit": bench_limit,
           "layout": bench_layout, "compression": bench_compression, "pack": bench_pack, "startup": bench_startup,
           "async": bench_async}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dpl.bench", description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="*", help=f"any of {', '.join(BENCHES)} (default: all)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=64, help="batch of the [step] benchmark")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    # 15: two runs at load 2 agreed within 7 % (0.87, 0.93); with 5 blocks, 10.5 % (0.93, 1.02)
    parser.add_argument("--step-repeats", type=int, default=15, help="interleaved blocks of [step]")
    parser.add_argument("--iters", type=int, default=10, help="steps per repeat")
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4], help="process counts of [distributed]")
    parser.add_argument("--samples", type=int, default=4000, help="synthetic images of [distributed]")
    parser.add_argument("--e2e-samples", type=int, default=6000, help="synthetic images of [limit]'s epochs")
    parser.add_argument("--pack-runs", type=int, default=8, help="runs (seeds) of the [pack] sweep")
    parser.add_argument("--pack-epochs", type=int, default=2, help="epochs of each [pack] run")
    parser.add_argument("--pack-samples", type=int, default=2000, help="synthetic images of each [pack] run")
    parser.add_argument("--pack-repeats", type=int, default=2, help="sweeps per variant of [pack], alternating")
    parser.add_argument("--slow-factor", type=float, default=3.0, help="the slow workers' time factor of [async]")
    parser.add_argument("--startup-repeats", type=int, default=5, help="rounds of [startup], alternating")
    args = parser.parse_args(argv)
    unknown = [w for w in args.which if w not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}: choose from {', '.join(BENCHES)}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    print(f"dpl.bench: torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    for name in args.which or list(BENCHES):
        BENCHES[name](device, args)


if __name__ == "__main__":
    main()
