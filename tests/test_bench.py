"""The [limit] baseline runs the workers' real step on pre-made tensors (eager on CPU)."""

from __future__ import annotations

import pytest
import torch

from dpl.bench import limit_fn
from dpl.run.build import build_trainer
from tests.conftest import compose_cfg


def test_limit_baseline_trains_the_stacked_workers_on_cpu():
    t = build_trainer(compose_cfg("K=2", "method=localsgd", "precision=bf16"), torch.device("cpu"))
    before = [p.detach().clone() for p in t.workers.params]
    step = limit_fn(t, 8)
    step()
    step()
    assert all(not torch.equal(a, p) for a, p in zip(before, t.workers.params))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in t.workers.params)


def test_compression_bench_times_a_sync_per_compressor_and_states_its_bytes():
    from types import SimpleNamespace

    from dpl.bench import compression_rows
    from dpl.comm.codecs import CODECS

    rows = {r["name"]: r for r in compression_rows(torch.device("cpu"), SimpleNamespace(warmup=0, repeats=1, iters=1))}
    assert set(rows) == set(CODECS) and rows["none"]["ratio"] == 1.0
    replica = rows["none"]["bytes"]
    assert rows["fp16"]["bytes"] == rows["bf16"]["bytes"] == replica // 2
    assert rows["topk"]["bytes"] == 2 * rows["randomk"]["bytes"]  # the indices top-k sends beside its values
    assert rows["randomk"]["bytes_ratio"] == pytest.approx(0.01, rel=0.05)


def test_layout_bench_times_both_memory_formats_in_each_precision(monkeypatch):
    from types import SimpleNamespace

    from dpl import bench

    monkeypatch.setattr(bench, "LAYOUT_RUNS", bench.LAYOUT_RUNS[:1])  # one run (K=1 x 64) keeps it short
    built = []
    real_build = bench.build_trainer
    monkeypatch.setattr(bench, "build_trainer", lambda cfg, device: built.append(cfg) or real_build(cfg, device))
    rows = bench.layout_rows(torch.device("cpu"), SimpleNamespace(warmup=1, repeats=2, iters=1))
    assert [(r["run"], r["precision"]) for r in rows] == [("centralized K=1 x 64", "fp32"), ("centralized K=1 x 64", "bf16")]
    assert all(r["contiguous_s"] > 0 and r["channels_last_s"] > 0 and r["ratio"] > 0 for r in rows)
    assert [(c.engine.memory_format, c.precision) for c in built] == [
        ("contiguous", "fp32"), ("channels_last", "fp32"), ("contiguous", "bf16"), ("channels_last", "bf16")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_script_refuses_without_cuda(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    done = subprocess.run(["bash", str(script), str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert done.returncode == 1 and "no CUDA device is visible" in done.stderr
    assert not (tmp_path / "out" / "tests.log").exists()  # nothing ran


def test_a_run_s_timeline_marks_its_phases_in_order_and_the_startup_bench_reads_them(tmp_path, monkeypatch):
    from dpl import timeline
    from dpl.bench import STARTUP_RUN, _timeline
    from tests.processes import run_cli

    monkeypatch.setattr(timeline, "ENABLED", True)
    proc = run_cli(tmp_path, [*STARTUP_RUN, "logger=none", "device=cpu"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    marks = _timeline(proc.stderr)
    assert list(marks) == ["imports", "checked", "composed", "imported (torch, the training path)",
                           "built (data, model, method)", "run started (store, checkpoint)", "first step",
                           "last step", "recorded"]
    assert list(marks.values()) == sorted(marks.values()) and marks["imports"] > 0


def test_ratios_are_timed_in_alternating_blocks_and_paired():
    from dpl.bench import interleaved, paired

    calls: list[str] = []
    t = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, torch.device("cpu"),
                    warmup=1, repeats=3, iters=2, setup={"b": lambda: calls.append("setup b")})
    assert calls == ["a", "setup b", "b"] + ["a", "a", "setup b", "b", "b"] * 3  # warm-up, then A B A B ...
    assert len(t["a"]) == len(t["b"]) == 3
    assert paired([2.0, 4.0, 9.0], [1.0, 2.0, 3.0]) == (2.0, 2.0, 3.0)  # the median of the pairs' ratios


@pytest.mark.slow
def test_async_bench_runs_both_methods_on_slowed_ranks_and_models_the_slow_factor():
    """[async]: with the network out of the way, a synchronous step waits for the slowest worker (3x) and an
    asynchronous tick is the fastest's step, so the modelled ratio is the slow factor; measured times are there."""
    from types import SimpleNamespace

    from dpl.bench import async_rows

    args = SimpleNamespace(world=[2], samples=256, batch=32, repeats=1, slow_factor=3.0)
    rows = {r["method"]: r for r in async_rows(args)}
    assert set(rows) == {"method=diloco", "method=async_diloco"}
    assert rows["method=diloco"]["modelled_s"] / rows["method=async_diloco"]["modelled_s"] == pytest.approx(3.0, rel=1e-3)
    assert all(len(r["measured_s"]) == 1 and r["measured_s"][0] > 0 for r in rows.values())
