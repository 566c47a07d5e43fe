"""Communication model: ring all-reduce bytes, alpha-beta time, the ledger, worker drift."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dpl.comm.cost import CommLedger, Traffic, bytes_sent, param_bytes, sync_time_s
from dpl.comm.point import CommPoint
from dpl.comm.stacked import StackedComm
from dpl.core.state import drift_term


def test_ring_allreduce_bytes_sent():
    assert bytes_sent(1000, 1, "ring") == 0.0
    assert bytes_sent(1000, 2, "ring") == 1000.0  # 2 * 1/2
    assert bytes_sent(1000, 8, "ring") == 1750.0  # 2 * 7/8
    with pytest.raises(ValueError):
        bytes_sent(1000, 0, "ring")


def test_param_bytes_of_one_replica():
    single = [torch.zeros(3, 4), torch.zeros(5, dtype=torch.float64), torch.zeros(2, dtype=torch.float16)]
    assert param_bytes(single) == 12 * 4 + 5 * 8 + 2 * 2
    stacked = [torch.zeros(4, *t.shape, dtype=t.dtype) for t in single]  # K = 4 workers
    assert param_bytes(stacked, per_worker=True) == 92
    assert param_bytes(stacked) == 4 * 92


def test_sync_time_is_ring_latencies_plus_bytes_over_bandwidth():
    # a ring of 2 sends 2 x 1/2 of 1.25e9 bytes = 1e10 bits over 10 Gb/s = 1 s, plus 2 (K - 1) = 2 steps of 50 us
    assert sync_time_s(1.25e9, 2, 10.0, 50.0) == pytest.approx(1.0001, rel=1e-12)
    assert sync_time_s(0.0, 2, 10.0, 50.0) == pytest.approx(2 * 50e-6)
    assert sync_time_s(0.0, 8, 10.0, 50.0) == pytest.approx(14 * 50e-6)  # a ring of 8: 2 x 7 steps
    assert sync_time_s(1000.0, 4, 8.0, 0.0) == pytest.approx(1500 / 1e9)  # 2 x 3/4 x 1000 bytes at 1e9 B/s
    assert sync_time_s(1000.0, 1, 8.0, 50.0) == 0.0  # nobody to talk to


def test_parameter_server_model():
    """One server: push and pull (2 latencies), and its link carries 2 K n bytes."""
    assert sync_time_s(1000.0, 4, 8.0, 50.0, "ps") == pytest.approx(2 * 50e-6 + 2 * 4 * 1000 / 1e9)
    assert bytes_sent(1000.0, 4, "ps") == 1000.0 and bytes_sent(1000.0, 4, "ring") == 1500.0
    with pytest.raises(ValueError, match="network.topology='star'"):
        sync_time_s(1.0, 2, 1.0, 1.0, "star")


def make_ledger(K: int = 4) -> CommLedger:
    # 8 Gb/s = 1e9 bytes/s, 100 us per ring step; 10 steps of 20 samples = 200 samples in 2 s (calibrated)
    return CommLedger(K=K, bandwidth_gbps=8.0, latency_us=100.0, sample_cost_s=0.01)


def params_traffic(syncs: int, replica: float = 1000.0) -> Traffic:
    return Traffic(syncs=syncs, collectives=syncs, replica_bytes=syncs * replica)


def test_localsgd_run_counts():
    """K=4, 10 steps per epoch, H=4: syncs after steps 4, 8 and the partial period ending at 10."""
    ledger = make_ledger()
    rounds = math.ceil(10 / 4)
    assert rounds == 3
    per_round_bytes = 2 * 3 / 4 * 1000  # 1500
    per_round_s = 2 * 3 * 100e-6 + 1500 / 1e9  # 6 ring steps of 100 us + 1.5 us
    metrics = [ledger.record_epoch(params_traffic(rounds), 10, 200, 2.0) for _ in range(3)]
    first, last = metrics[0], metrics[-1]
    assert first["sync_rounds"] == 3 and first["sync_rounds_total"] == 3
    assert first["comm_bytes"] == 3 * per_round_bytes == 4500.0
    assert first["rounds_vs_sync"] == pytest.approx(0.3)
    assert first["comm_time_s"] == pytest.approx(3 * per_round_s)
    assert first["modelled_time_s"] == pytest.approx(2.0 + 3 * 6.015e-4)
    assert last["sync_rounds"] == 3 and last["sync_rounds_total"] == 9
    assert last["comm_bytes"] == 4500.0 and last["comm_bytes_total"] == 13500.0
    assert last["rounds_vs_sync"] == pytest.approx(0.3)
    assert last["modelled_time_s"] == pytest.approx(6.0 + 9 * per_round_s)
    assert (ledger.rounds_total, ledger.steps_total, ledger.bytes_total) == (9, 30, 13500.0)


def test_averaged_optimizer_state_is_counted_as_extra_collectives():
    """local_momentum=average: each sync all-reduces the momentum too (here 1000 bytes a replica)."""
    ledger = make_ledger()
    m = ledger.record_epoch(Traffic(syncs=3, collectives=6, replica_bytes=6 * 1000), 10, 0, 0.0)
    assert m["sync_rounds"] == 3 and m["collectives"] == 6
    assert m["comm_bytes"] == 2 * 4500.0  # the state is the size of the parameters here
    assert m["comm_time_s"] == pytest.approx(6 * (2 * 3 * 100e-6 + 1500 / 1e9))
    assert ledger.collectives_total == 6 and ledger.rounds_total == 3


def test_synchronous_training_communicates_every_step():
    ledger = make_ledger()
    m = ledger.record_epoch(params_traffic(10), 10, 100, 1.0)
    assert m["rounds_vs_sync"] == 1.0 and m["comm_bytes"] == 15000.0


def test_one_worker_sends_nothing_but_counts_rounds():
    ledger = make_ledger(K=1)
    m = ledger.record_epoch(params_traffic(3), 10, 200, 2.0)
    assert m["sync_rounds"] == 3 and m["rounds_vs_sync"] == pytest.approx(0.3)
    assert m["comm_bytes"] == 0.0 and m["comm_time_s"] == 0.0 and m["modelled_time_s"] == 2.0


def test_comm_point_averages_and_counts_every_collective():
    """The one communication point: it averages over the workers and counts one replica's bytes."""
    point = CommPoint(StackedComm(3))
    params = [torch.arange(6.0).view(3, 2), torch.ones(3, 4)]  # [K, ...]: 2 + 4 floats per replica
    point.average_(params, "params")
    assert torch.equal(params[0], torch.tensor([[2.0, 3.0]] * 3))
    point.average_([torch.zeros(3, 5)], "state")
    point.average_([torch.zeros(3, 2)], "grads")
    assert point.all_sum([1.5, 2.0], "metrics") == [1.5, 2.0]  # one process: its sums are the totals
    point.average_copy([torch.zeros(3, 7)], "eval")
    point.average_copy([torch.zeros(3, 9)], "checkpoint")
    traffic = point.take()
    assert (traffic.syncs, traffic.collectives, traffic.replica_bytes) == (2, 3, (6 + 5 + 2) * 4)
    # bookkeeping apart from the algorithm's traffic; checkpoints apart from any epoch
    assert (traffic.bookkeeping_collectives, traffic.bookkeeping_bytes) == (2, 2 * 8 + 7 * 4)
    assert (point.checkpoint.collectives, point.checkpoint.bytes) == (1, 9 * 4)
    assert point.take() == Traffic()  # counters restart each epoch
    with pytest.raises(ValueError, match="kind='weights'"):
        point.average_(params, "weights")


def test_ledger_state_round_trip():
    ledger = make_ledger()
    ledger.record_epoch(params_traffic(3), 10, 200, 2.0)
    ledger.record_epoch(params_traffic(2), 10, 150, 1.5)
    state = json.loads(json.dumps(ledger.state_dict()))  # plain numbers only
    restored = CommLedger.from_state(state)
    assert restored == ledger
    assert restored.record_epoch(params_traffic(3), 10, 200, 2.0) == ledger.record_epoch(params_traffic(3), 10, 200, 2.0)


def _drift(stacked):
    """The drift by its definition, mean_k ||x_k − x̄|| / ||x̄||, from the stacked terms of dpl.core.state."""
    flat = torch.cat([t.reshape(t.shape[0], -1).double() for t in stacked], dim=1)
    return float(drift_term(flat, flat.mean(0), flat.shape[0]))


def test_drift_flattens_all_parameters_of_a_replica():
    # worker 0: (1 | 0, 4), worker 1: (3 | 0, 0); mean (2 | 0, 2), ||mean|| = sqrt(8)
    a = torch.tensor([[1.0], [3.0]])
    b = torch.tensor([[0.0, 4.0], [0.0, 0.0]])
    # ||x_0 - mean|| = sqrt(1 + 4) = ||x_1 - mean||; drift = sqrt(5) / sqrt(8)
    assert _drift([a, b]) == pytest.approx(math.sqrt(5 / 8), rel=1e-12)


def test_drift_terms_of_the_processes_add_up_to_the_mean_over_workers():
    """Each rank holds one row; the sum of the ranks' terms is the simulation's term of all K rows."""
    x = torch.randn(5, 7, dtype=torch.float64)
    mean = x.mean(0)
    whole = drift_term(x, mean, 5)
    assert float(sum(drift_term(x[k:k + 1], mean, 5) for k in range(5))) == pytest.approx(float(whole), rel=1e-12)
    expected = float(sum((x[k] - mean).norm() for k in range(5)) / 5 / mean.norm())
    assert float(whole) == pytest.approx(expected, rel=1e-12)


def test_drift_degenerate_cases():
    assert _drift([torch.tensor([[1.0, 2.0]])]) == 0.0  # K = 1
    assert _drift([torch.tensor([[1.0, -1.0], [-1.0, 1.0]])]) == 0.0  # mean is 0
    assert _drift([torch.ones(4, 3, 2)]) == 0.0  # workers equal


def test_modelled_compute_is_samples_times_cost_times_the_slowest_worker():
    ledger = CommLedger(K=4, bandwidth_gbps=8.0, latency_us=0.0, sample_cost_s=1e-3, step_factor=2.5)
    m = ledger.record_epoch(Traffic(), 10, 640, measured_compute_s=123.0)  # the measurement is ignored
    assert m["compute_time_s"] == pytest.approx(640 * 1e-3 * 2.5) and m["modelled_time_s"] == pytest.approx(1.6)


def test_sample_cost_is_calibrated_once_from_the_first_epoch():
    ledger = CommLedger(K=2, bandwidth_gbps=8.0, latency_us=0.0)
    first = ledger.record_epoch(Traffic(), 10, 500, measured_compute_s=2.0)
    second = ledger.record_epoch(Traffic(), 10, 500, measured_compute_s=9.0)  # a busy machine: ignored
    assert ledger.sample_cost_s == pytest.approx(2.0 / 500)
    assert first["compute_time_s"] == second["compute_time_s"] == pytest.approx(2.0)


def test_worker_speeds_are_seeded_and_follow_their_distribution():
    from dpl.comm.clock import worker_speeds

    assert worker_speeds(4, "constant", 0).tolist() == [1.0] * 4
    a, b = worker_speeds(1000, "lognormal", 7, spread=0.5), worker_speeds(1000, "lognormal", 7, spread=0.5)
    assert (a == b).all() and not (a == worker_speeds(1000, "lognormal", 8, spread=0.5)).all()
    assert abs(float(np.median(a)) - 1.0) < 0.1 and abs(float(np.log(a).std()) - 0.5) < 0.05
    slow = worker_speeds(8, "slow", 3, slow_fraction=0.25, slow_factor=3.0)
    assert sorted(slow.tolist()) == [1.0] * 6 + [3.0] * 2
    with pytest.raises(ValueError, match="clock.speed='fast'"):
        worker_speeds(2, "fast", 0)


def test_modelled_time_is_deterministic_with_a_configured_cost(make_cfg):
    """The trainer's ledger takes the configured cost, network and slowest worker; from the same
    traffic it models the same time to the last bit, whatever the machine was doing; a slow worker
    makes every period longer. The ledger's arithmetic needs no training: the traffic of an epoch of
    K=4 LeNet-5 workers syncing 3 times is fed to ledgers built as the trainer builds them."""
    from dpl.run.build import build_trainer

    def ledger(*extra):
        cfg = make_cfg("method=localsgd", "K=4", "H=4", "epochs=1", "clock.sample_cost_us=50", *extra)
        return build_trainer(cfg, torch.device("cpu")).ledger

    base = ledger()
    assert (base.K, base.sample_cost_s, base.step_factor, base.topology) == (4, pytest.approx(50e-6), 1.0, "ring")
    traffic = params_traffic(3, replica=4 * 62_006)  # three averages of LeNet-5's fp32 replica
    records = [CommLedger.from_state(base.state_dict()).record_epoch(traffic, 57, 225.0, measured_compute_s=s)
               for s in (0.1, 7.0)]  # the measured compute (a busy machine) does not enter
    assert records[0] == records[1]
    a = records[0]
    assert a["compute_time_s"] == pytest.approx(225 * 50e-6)  # 900 images / K=4 per worker
    slow = ledger("clock.speed=slow", "clock.slow_factor=3.0")
    assert slow.step_factor == 3.0
    assert slow.record_epoch(traffic, 57, 225.0, 0.0)["compute_time_s"] == pytest.approx(3 * a["compute_time_s"])
    ps = ledger("network.topology=ps").record_epoch(traffic, 57, 225.0, 0.0)
    assert ps["comm_time_s"] != a["comm_time_s"] and ps["comm_bytes"] < a["comm_bytes"]


def test_drift_stays_on_the_device_as_a_float64_scalar():
    """Returned unread (a 0-dim float64 tensor), so the trainer sums it without a host sync per sync."""
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    d = drift_term(x, x.mean(0), 2)
    assert torch.is_tensor(d) and d.dim() == 0 and d.dtype == torch.float64




# ----------------------------------------------------------------------------- one communication point

# torch.distributed's collectives (and torch's helpers that call them) and worker averages over the
# stacked axis: only dpl/comm/ may use them, so every byte between workers is counted by the point
COLLECTIVES = re.compile(r"\bdist\.(all_reduce|all_gather|all_gather_object|all_to_all|broadcast|"
                         r"broadcast_object_list|gather|gather_object|reduce|reduce_scatter|scatter|barrier)\b|"
                         r"average_parameters|\.mean\(\s*(0|dim\s*=\s*0)\s*[,)]")


def test_no_collective_and_no_worker_average_outside_the_comm_package():
    root = Path(__file__).resolve().parents[1] / "dpl"
    found = [f"{path.relative_to(root.parent)}:{i}: {line.strip()}"
             for path in sorted(root.rglob("*.py")) if "comm" not in path.relative_to(root).parts[:1]
             for i, line in enumerate(path.read_text().splitlines(), 1) if COLLECTIVES.search(line)]
    assert not found, "\n".join(found)


def test_the_grep_finds_what_it_forbids():
    """The pattern above is not vacuous: it catches each form it names."""
    for line in ("dist.all_reduce(t)", "x.mean(0)", "t.mean(dim=0, keepdim=True)", "average_parameters(it, None)",
                 "dist.gather_object(s, out, dst=0)", "dist.broadcast(flat, src=0)"):
        assert COLLECTIVES.search(line), line
    assert not COLLECTIVES.search("x.mean(1)") and not COLLECTIVES.search("dist.get_rank()")


# ----------------------------------------------------------------------------- the two communicators agree

def _collectives(comm, rows: torch.Tensor) -> dict:
    """Each collective of the point on this process's rows of the workers' tensors ([K_local, ...])."""
    point = CommPoint(comm)
    floats, ints = rows.clone(), (rows * 10).long()
    point.average_([floats, ints], "params")
    summed = rows.clone()
    comm.all_reduce_([summed], "sum")
    gathered = point.all_gather([rows, (rows > 2).to(torch.uint8)])
    told = rows.clone()
    point.broadcast_([told], "params")
    totals = point.all_sum([float(rows.sum())], "metrics")
    return {"mean": floats[:1], "int_mean": ints[:1], "sum": summed[:1], "gathered": gathered, "broadcast": told[:1],
            "totals": totals, "traffic": point.take()}


WORKER_ROWS = torch.tensor([[1.0, 2.5, -3.0], [4.0, 0.5, 2.0]])  # worker k's tensor is row k


def _rank_collectives(_cfg, _out_dir, comm):
    return _collectives(comm, WORKER_ROWS[comm.rank:comm.rank + 1])


def test_stacked_and_process_group_communicators_agree(make_cfg, tmp_path):
    """Every collective of the point gives the same numbers and the same counts on two gloo
    processes as on the two stacked workers of the simulation (integer tensors: the mean truncated)."""
    from dpl.launch.ranks import spawn

    sim = _collectives(StackedComm(2), WORKER_ROWS)
    assert torch.equal(sim["mean"], torch.tensor([[2.5, 1.5, -0.5]]))
    assert torch.equal(sim["int_mean"], torch.tensor([[25, 15, -5]]))
    assert torch.equal(sim["broadcast"], WORKER_ROWS[:1]) and sim["totals"] == [7.0]
    dist_run = spawn(_rank_collectives, make_cfg("engine=distributed", "engine.timeout_s=60", "K=2"), tmp_path)
    for key in ("mean", "int_mean", "sum", "broadcast"):
        assert torch.equal(sim[key], dist_run[key]), key
    for a, b in zip(sim["gathered"], dist_run["gathered"]):
        assert torch.equal(a, b)
    # the process group sums the host numbers of its processes; the simulation's one process has them all
    assert dist_run["totals"] == [float(WORKER_ROWS.sum())]
    assert sim["traffic"] == dist_run["traffic"]


# ----------------------------------------------------------------------------- overlap in the modelled clock


def _ledger():
    from dpl.comm.cost import CommLedger

    return CommLedger(K=4, bandwidth_gbps=1.0, latency_us=0.0, sample_cost_s=1e-3)


def test_an_overlapped_sync_hides_behind_the_steps_it_overlaps():
    from dpl.comm.cost import Traffic, transfer_s

    n = 1e6  # bytes per replica
    t_sync = transfer_s(n, 4, 1.0)  # the ring's 2(K-1)/K n over 1 Gb/s
    step_s = 10 * 1e-3  # 10 samples per step at 1 ms
    blocking = _ledger().record_epoch(Traffic(syncs=1, collectives=1, replica_bytes=n, peak_replica_bytes=n),
                                      steps=10, samples=100, measured_compute_s=0.0)
    assert blocking["comm_hidden_s"] == 0.0 and blocking["modelled_time_s"] == 0.1 + t_sync
    for w, hidden in ((1, min(t_sync, step_s)), (1000, t_sync)):
        rec = _ledger().record_epoch(Traffic(syncs=1, collectives=1, replica_bytes=n, overlap_syncs=1, overlap_steps=w,
                                             overlap_collectives=1, overlap_replica_bytes=n, peak_replica_bytes=n,
                                             peak_overlap_steps=w), steps=10, samples=100, measured_compute_s=0.0)
        assert rec["comm_time_s"] == t_sync and rec["comm_hidden_s"] == pytest.approx(hidden)
        assert rec["modelled_time_s"] == pytest.approx(0.1 + t_sync - hidden)
        # the largest sync's bits over (w + 1) steps of compute
        assert rec["peak_bandwidth_gbps"] == pytest.approx(t_sync / ((w + 1) * step_s))
        assert rec["peak_sync_bytes"] == 2 * 3 / 4 * n
    assert blocking["peak_bandwidth_gbps"] == pytest.approx(t_sync / step_s)


@pytest.mark.parametrize("overlap_steps", [0, 1, 3, 1000])  # blocking; hidden in part; in full
def test_an_epoch_rescaled_to_another_bandwidth_is_the_ledger_at_that_bandwidth(overlap_steps):
    """epoch_time_at from the records logged at 10 Gb/s equals a ledger that ran at each other bandwidth,
    with latency, all-gathered payloads and overlapped syncs in the epochs."""
    from dpl.comm.cost import RESCALED_FIELDS, epoch_time_at

    def ledger(gbps):
        return CommLedger(K=4, bandwidth_gbps=gbps, latency_us=20.0, sample_cost_s=1e-4)

    traffic = [Traffic(syncs=3, collectives=5, gathers=2, replica_bytes=3e6, gathered_bytes=1e5,
                       overlap_syncs=2, overlap_steps=overlap_steps, overlap_collectives=2, overlap_gathers=1,
                       overlap_replica_bytes=2e6, overlap_gathered_bytes=5e4),
               Traffic(syncs=1, collectives=1, replica_bytes=1e6)]
    at_10 = ledger(10.0)
    records = [at_10.record_epoch(t, steps=20, samples=640, measured_compute_s=0.0) for t in traffic]
    assert sum(epoch_time_at(r, 10.0, 10.0) for r in records) == pytest.approx(records[-1]["modelled_time_s"])
    for gbps in (0.1, 1.0, 100.0):
        direct = ledger(gbps)
        want = [direct.record_epoch(t, steps=20, samples=640, measured_compute_s=0.0) for t in traffic]
        got = [epoch_time_at({f: r[f] for f in RESCALED_FIELDS}, gbps, 10.0) for r in records]
        assert sum(got) == pytest.approx(want[-1]["modelled_time_s"], rel=1e-12)
        assert got[0] == pytest.approx(want[0]["compute_time_s"] + want[0]["comm_time_s"] - want[0]["comm_hidden_s"])
    slow = epoch_time_at(records[0], 0.1, 10.0)
    assert slow > epoch_time_at(records[0], 100.0, 10.0)  # a slower network never models a faster epoch
    with pytest.raises(ValueError, match="must be > 0"):
        epoch_time_at(records[0], 0.0, 10.0)


def test_a_ledger_checkpointed_before_overlap_existed_loads():
    from dpl.comm.cost import CommLedger

    old = {k: v for k, v in _ledger().state_dict().items() if k != "comm_hidden_total_s"}
    assert CommLedger.from_state(old).comm_hidden_total_s == 0.0
