"""Compression at the communication point: round trips within each compressor's stated error,
error feedback carrying exactly the residual, the bytes each payload costs, and runs with it."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from dpl.comm.codecs import CODECS, Key, build_codec
from dpl.comm.codecs.feedback import ErrorFeedback
from dpl.comm.codecs.formats import NoCompression, RandomK, kept
from dpl.comm.cost import CommLedger, bytes_sent, gather_bytes_sent
from dpl.comm.point import CommPoint
from dpl.comm.stacked import StackedComm
from dpl.config.store import typed
from dpl.config.upgrade import upgrade_config
from dpl.config.validate import validate
from dpl.errors import ConfigError
from dpl.run.build import build_trainer
from tests.resume import assert_resume_is_exact

N = 1000
CFG = SimpleNamespace(ratio=0.05, chunk=64)
EF_TOPK = ["method=localsgd", "K=2", "H=3", "compression=topk", "compression.ratio=0.05",
           "compression.error_feedback=true"]


def rows(W: int = 3, n: int = N, seed: int = 0) -> torch.Tensor:
    return torch.randn(W, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def codec(name: str, cfg=CFG):
    """The codec of ``compression=name``; ``none`` (which sends the parameters themselves) as its fp32 format."""
    return NoCompression() if name == "none" else CODECS.build(name, cfg)


def round_trip(name: str, x: torch.Tensor, key=Key(0, 1, 2)) -> torch.Tensor:
    c = codec(name)
    return c.decode(c.encode(x, key), x.shape[1], key)


# ----------------------------------------------------------------------------- each compressor


def test_topk_keeps_the_largest_entries_exactly_to_fp32_and_zeroes_the_rest():
    x = rows()
    d = round_trip("topk", x)
    k = kept(N, CFG.ratio)
    for row, dec in zip(x, d):
        top = row.abs().topk(k).indices
        assert torch.equal(dec[top], row[top].float().double())
        rest = torch.ones(N, dtype=torch.bool)
        rest[top] = False
        assert torch.count_nonzero(dec[rest]) == 0
    # the δ-contraction of top-k: ||x − D(C(x))||² <= (1 − k/n) ||x||² (fp32 rounding aside)
    assert ((x - d).pow(2).sum(1) <= (1 - k / N) * x.pow(2).sum(1) * (1 + 1e-6)).all()


def test_randomk_sends_the_same_coordinates_on_every_worker_from_seed_sync_and_tensor():
    x = rows()
    c = codec("randomk")
    d = round_trip("randomk", x, Key(0, 1, 2))
    nonzero = d != 0
    assert (nonzero == nonzero[0]).all() and nonzero[0].sum() == kept(N, CFG.ratio)  # shared coordinates
    assert torch.equal(d[nonzero], x[nonzero].float().double())
    same = RandomK(CFG.ratio).coordinates(N, (0, 1, 2), x.device)  # a pure function of the key
    assert torch.equal(c.coordinates(N, (0, 1, 2), x.device), same)
    for other in ((1, 1, 2), (0, 2, 2), (0, 1, 3)):  # another seed, sync or tensor: other coordinates
        assert not torch.equal(c.coordinates(N, other, x.device), same)


def test_sign_sends_the_signs_scaled_by_the_mean_magnitude():
    x = rows()
    x[0, 5] = 0.0  # zero counts as +
    d = round_trip("sign", x)
    scale = x.abs().mean(1, keepdim=True).float().double()
    assert torch.equal(d, torch.where(x >= 0, 1.0, -1.0).double() * scale)


def test_int8_error_is_at_most_half_a_step_of_its_chunk():
    x = rows(n=1000) * torch.linspace(0.01, 100, 1000, dtype=torch.float64)  # chunks of different ranges
    d = round_trip("int8", x)
    for start in range(0, N, CFG.chunk):
        chunk = x[:, start:start + CFG.chunk]
        step = chunk.abs().amax(1, keepdim=True) / 127.0
        assert ((chunk - d[:, start:start + CFG.chunk]).abs() <= step / 2 * (1 + 1e-6)).all()
    per_tensor = codec("int8", SimpleNamespace(chunk=0))
    assert per_tensor.encode(x, Key(0, 0, 0))[1].shape == (3, 1)  # chunk 0: one scale per tensor
    assert torch.equal(round_trip("int8", torch.zeros(2, 100)), torch.zeros(2, 100, dtype=torch.float64))


def _chunks(x: torch.Tensor, c: int):
    for start in range(0, x.shape[1], c):
        yield x[:, start:start + c], slice(start, start + c)


def test_fp8_e4m3_is_within_its_rounding_of_the_chunk_scale():
    x = rows(n=1000) * torch.linspace(0.01, 100, 1000, dtype=torch.float64)
    d = round_trip("fp8", x)
    for chunk, where in _chunks(x, CFG.chunk):
        s = chunk.abs().amax(1, keepdim=True) / 448.0
        # normal range (|x/s| >= 2^-6): 3 mantissa bits, half an ulp 2^-4 relative; below: the subnormal step 2^-9, halved
        bound = torch.maximum(chunk.abs() * 2.0**-4, s * 2.0**-10)
        assert ((chunk - d[:, where]).abs() <= bound * (1 + 1e-6)).all()
    exact = torch.tensor([[448.0, -1.0, 0.5, 0.0, 2.0**-9, 240.0, -416.0]], dtype=torch.float64)
    fp8 = codec("fp8", SimpleNamespace(chunk=0))
    assert torch.equal(fp8.decode(fp8.encode(exact, Key(0, 0, 0)), 7, Key(0, 0, 0)), exact)
    assert torch.equal(round_trip("fp8", torch.zeros(2, 100)), torch.zeros(2, 100, dtype=torch.float64))


def test_fp4_e2m1_rounds_to_the_nearest_of_its_eight_magnitudes():
    fp4 = codec("fp4", SimpleNamespace(chunk=0))
    grid = torch.tensor([[0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.5, -6.0, -3.0]], dtype=torch.float64)
    assert torch.equal(fp4.decode(fp4.encode(grid, Key(0, 0, 0)), 11, Key(0, 0, 0)), grid)  # representable: exact
    ties = torch.tensor([[6.0, 0.25, 1.25, 2.5, 5.0, -3.5]], dtype=torch.float64)  # scale 1; ties go down
    assert fp4.decode(fp4.encode(ties, Key(0, 0, 0)), 6, Key(0, 0, 0)).tolist() == [[6.0, 0.0, 1.0, 2.0, 4.0, -3.0]]
    x = rows(n=999)  # odd: the last byte half used
    d = round_trip("fp4", x)
    for chunk, where in _chunks(x, CFG.chunk):
        s = chunk.abs().amax(1, keepdim=True) / 6.0
        y = chunk.abs() / s
        half_gap = torch.where(y < 2, 0.25, torch.where(y < 4, 0.5, 1.0))
        assert ((chunk - d[:, where]).abs() <= half_gap * s * (1 + 1e-6)).all()
    assert torch.equal(round_trip("fp4", torch.zeros(2, 100)), torch.zeros(2, 100, dtype=torch.float64))


@pytest.mark.parametrize("name, eps", [("fp16", 2.0**-11), ("bf16", 2.0**-8), ("none", 2.0**-24)])
def test_floating_formats_round_to_their_precision(name, eps):
    x = rows()
    d = round_trip(name, x)
    assert ((x - d).abs() <= eps * x.abs() + 2.0**-25).all()
    assert not torch.equal(d, x)  # something was rounded


def test_payload_bytes_are_as_specified_and_what_the_payload_holds():
    expected = {"none": 4 * N, "topk": 50 * (4 + 4), "randomk": 50 * 4, "sign": math.ceil(N / 8) + 4,
                "int8": N + 4 * math.ceil(N / 64), "fp8": N + 4 * math.ceil(N / 64),
                "fp4": math.ceil(N / 2) + 4 * math.ceil(N / 64), "fp16": 2 * N, "bf16": 2 * N}
    x = rows()
    for name, nbytes in expected.items():
        c = codec(name)
        assert c.payload_bytes(N) == nbytes, name
        held = sum(part[0].numel() * part.element_size() for part in c.encode(x, Key(0, 0, 0)))
        assert held == nbytes, name  # what one worker's row of the payload occupies
    assert codec("topk").payload_bytes(2**31) == kept(2**31, CFG.ratio) * (4 + 8)  # int64 indices


# ----------------------------------------------------------------------------- error feedback


@pytest.mark.parametrize("name", ["topk", "randomk", "sign", "int8", "fp8", "fp4", "fp16"])
def test_error_feedback_carries_exactly_the_residual(name):
    c = ErrorFeedback(codec(name))
    shape = (2, 40, 25)
    c.start([torch.zeros(shape)])
    sent_total = torch.zeros(2, N, dtype=torch.float64)
    deltas_total = torch.zeros(2, N, dtype=torch.float64)
    for sync in range(4):
        delta = rows(2, N, seed=sync).view(shape)
        before = c.residuals[0].clone().view(2, N)
        payload = c.encode(delta.view(2, N), Key(3, sync, 0))
        u = delta.view(2, N) + before  # what was compressed: Δ_k + e_k
        sent = c.codec.decode(payload, N, Key(3, sync, 0))
        assert torch.equal(c.residuals[0].view(2, N), u - sent)  # e_k <- u_k − D(C(u_k)), exactly
        sent_total += sent
        deltas_total += delta.view(2, N)
    # nothing is lost: what was sent plus what waits equals everything there was to send
    torch.testing.assert_close(sent_total + c.residuals[0].view(2, N), deltas_total, rtol=0, atol=1e-12)


def test_without_error_feedback_nothing_is_kept():
    cfg = OmegaConf.create({"name": "topk", "ratio": CFG.ratio, "error_feedback": False})
    point = CommPoint(StackedComm(2), build_codec(cfg))
    point.start([torch.zeros(2, N)])
    assert not isinstance(point.codec, ErrorFeedback) and point.state_dict() == {}


# ----------------------------------------------------------------------------- the comm point and the ledger


def test_comm_point_averages_the_decoded_payloads_and_counts_what_a_cluster_sends():
    K = 4
    deltas = [rows(K, 600, seed=1).view(K, 20, 30), rows(K, 400, seed=2)]
    for name, collective in (("topk", "allgather"), ("sign", "allgather"), ("randomk", "allreduce"),
                             ("int8", "allreduce"), ("bf16", "allreduce")):
        point = CommPoint(StackedComm(K), codec(name))
        mean = point.start_mean(deltas, sync=7).wait().deltas
        for d, m, i in zip(deltas, mean, range(2)):
            decoded = point.codec.decode(point.codec.encode(d.reshape(K, -1), Key(0, 7, i)), d[0].numel(), Key(0, 7, i))
            assert torch.equal(m, decoded.mean(0).view(d.shape[1:]))
        p = point.payload_bytes(deltas)
        traffic = point.take()
        assert (traffic.syncs, traffic.collectives) == (1, 1)
        ledger = CommLedger(K=K, bandwidth_gbps=1.0, latency_us=10.0, sample_cost_s=0.0)
        record = ledger.record_epoch(traffic, steps=1, samples=1, measured_compute_s=0.0)
        if collective == "allgather":  # ring all-gather: K − 1 payloads out of every worker, K − 1 latencies
            assert record["comm_bytes"] == (K - 1) * p == gather_bytes_sent(p, K)
            assert record["comm_time_s"] == pytest.approx((K - 1) * 10e-6 + (K - 1) * p * 8 / 1e9)
        else:  # ring all-reduce of the compressed size
            assert record["comm_bytes"] == bytes_sent(p, K) == 2 * (K - 1) / K * p
            assert record["comm_time_s"] == pytest.approx(2 * (K - 1) * 10e-6 + 2 * (K - 1) / K * p * 8 / 1e9)
    assert gather_bytes_sent(100, 4, "ps") == 100 and gather_bytes_sent(100, 1) == 0.0


def test_uncompressed_payload_through_the_compressed_path_is_plain_averaging():
    """fp32 payloads of Δ_k = x − x_k: their mean is x − x̄, so the outer step lands on the average
    (to fp32 rounding of each Δ_k) — the plumbing of the compressed sync, checked against the plain one."""
    plain = build_trainer(_cfg("method=localsgd", "K=3", "H=2", "epochs=1"), torch.device("cpu"))
    plain.fit()
    via = build_trainer(_cfg("method=localsgd", "K=3", "H=2", "epochs=1"), torch.device("cpu"))
    via.workers.point.codec = NoCompression()
    via.fit()
    for a, b in zip(plain.workers.params, via.workers.params):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert plain.state.history[0]["comm_bytes"] == via.state.history[0]["comm_bytes"]


# ----------------------------------------------------------------------------- runs


def _cfg(*overrides: str):
    from tests.conftest import compose_cfg

    return compose_cfg("dataset.num_train=400", "dataset.num_test=100", *overrides)


def test_none_is_bit_identical_to_a_run_without_the_key():
    ov = ["method=slowmo", "K=2", "H=3", "epochs=1", "clock.sample_cost_us=1"]
    with_none = build_trainer(_cfg(*ov, "compression=none"), torch.device("cpu"))
    without = _cfg(*ov)
    with open_dict(without):
        del without["compression"]  # as a config composed before the group existed
    bare = build_trainer(typed(upgrade_config(without)), torch.device("cpu"))  # as a resume reads it
    assert with_none.workers.point.codec is None
    with_none.fit()
    bare.fit()
    for a, b in zip(with_none.workers.params, bare.workers.params):
        assert torch.equal(a, b)
    measured = ("epoch_time_s", "samples_per_s")  # wall clock; everything else must match exactly
    strip = lambda h: [{k: v for k, v in r.items() if k not in measured} for r in h]  # noqa: E731
    assert strip(with_none.state.history) == strip(bare.state.history)


def test_compressed_run_learns_and_keeps_its_residuals_in_the_checkpoint():
    t = build_trainer(_cfg(*EF_TOPK, "epochs=1"), torch.device("cpu"))
    t.fit()
    residuals = t.workers.state_dict()["residuals"]
    assert [r.shape for r in residuals] == [p.shape for p in t.workers.params]  # per worker, stacked [K, ...]
    assert all(r.dtype == torch.float64 for r in residuals) and any(r.abs().sum() > 0 for r in residuals)
    assert t.method.state_dict()["syncs"] == t.state.history[0]["sync_rounds_total"]
    rec = t.state.history[0]
    p = t.workers.point.payload_bytes(t.workers.params)
    assert rec["comm_bytes"] == rec["sync_rounds"] * gather_bytes_sent(p, 2)


def test_resume_with_error_feedback_is_exact(make_cfg, tmp_path, monkeypatch):
    ov = [*EF_TOPK, "dataset.num_train=500", "dataset.num_test=100", "checkpoint_every=4"]
    assert_resume_is_exact(make_cfg, ov, tmp_path, monkeypatch, stop_at=5)  # mid-period, residuals non-zero


def test_compression_with_a_method_that_averages_gradients_fails_in_one_line():
    for method in ("centralized", "post_local"):
        with pytest.raises(ConfigError, match=rf"^compression='topk' is invalid with method='{method}', which "
                                              r"averages gradients: allowed compression=none, or method=localsgd"):
            validate(_cfg(f"method={method}", "compression=topk"))
    with pytest.raises(ConfigError, match=r"^compression.ratio=0.0 is invalid: allowed 0 < x <= 1$"):
        validate(_cfg("method=localsgd", "compression=topk", "compression.ratio=0"))
    validate(_cfg("method=centralized", "compression=none"))


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
CLI = ["compression=topk", "compression.ratio=0.01", "compression.error_feedback=true", "method=localsgd",
       "K=4", "H=8", "dataset=synthetic", "epochs=2", "logger=none"]


def _history(job: Path) -> list[dict[str, str]]:
    with open(job / "history.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # ~40 s: two CLI runs, one of them K = 4 spawned processes
def test_cli_topk_with_error_feedback_runs_in_simulation_and_distributed_alike(tmp_path):
    small = ["dataset.num_train=1000", "dataset.num_test=200", "progress=false", f"results_csv={tmp_path / 'r.csv'}"]
    jobs = {"sim": [], "dist": ["engine=distributed", "engine.spawn=true"]}
    for name, extra in jobs.items():
        cmd = [sys.executable, "-m", "dpl", *CLI, *small, *extra, f"hydra.run.dir={tmp_path / name}"]
        proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    sim, dist = _history(tmp_path / "sim"), _history(tmp_path / "dist")
    assert len(sim) == len(dist) == 2
    for a, b in zip(sim, dist):
        for key in ("val_loss", "val_acc", "comm_bytes", "sync_rounds", "drift"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6), key
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-6)
