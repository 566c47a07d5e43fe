"""Elastic workers (faults.schedule): the membership as a function of the step, a synchronous method's
averages over the workers in the run, a join's pull, the asynchronous method's rounds, the history's count,
and a resume across a join (sim ≡ distributed: tests/test_distributed.py's elastic variants)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpl.comm.drops import Membership, parse_schedule
from dpl.comm.stacked import StackedComm
from dpl.core.methods import build_method
from dpl.core.methods.base import Now
from dpl.core.methods.elastic import Elastic, with_members
from dpl.core.workers import StackedWorkers
from dpl.errors import ConfigError
from dpl.run.build import build_trainer
from tests.conftest import compose_cfg
from tests.resume import assert_resume_is_exact


def test_membership_is_a_function_of_the_step():
    m = Membership(["4:1:leave", "2:2:join", "7:1:join"], K=3)
    assert m.initial == [True, True, False]  # worker 2's first entry is a join: it starts away
    assert [m.present(s) for s in (0, 2, 4, 6, 7)] == [
        [True, True, False], [True, True, True], [True, False, True], [True, False, True], [True, True, True]]
    assert m.joining(7) == [1] and m.joining(6) == [] and m.joining(4) == []
    assert m.arrived(8) is None and m.arrived(5).tolist() == [True, False, True]
    assert parse_schedule(["9:0:leave", " 3 : 1 : join"]) == [(3, 1, "join"), (9, 0, "leave")]


@pytest.mark.parametrize("schedule,message", [
    (["5:1:quit"], "faults.schedule entry '5:1:quit' is invalid: allowed STEP:WORKER:leave|join"),
    (["5:9:leave"], "faults.schedule entry 5:9:leave is invalid: allowed workers 0..2"),
    (["5:1:leave", "6:1:leave"], "faults.schedule entry 6:1:leave is invalid: worker 1 is away then"),
    (["5:1:join"], None),  # starts away, joins: fine
    (["1:0:leave", "2:1:leave", "3:2:leave"], "faults.schedule entry 3:2:leave is invalid: it leaves no worker"),
])
def test_bad_schedules_fail_in_one_line(schedule, message):
    if message is None:
        Membership(schedule, K=3)
        return
    with pytest.raises(ConfigError) as e:
        Membership(schedule, K=3)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("overrides,message", [
    (["method=centralized"], "method=centralized is invalid with faults.schedule"),
    (["method=diloco", "method.eager=true"], "method.eager=true is invalid with faults.schedule"),
    (["method=localsgd", "compression=topk"], "compression=topk is invalid with faults.schedule"),
    (["method=localsgd", "faults.schedule=[3:7:leave]"], "faults.schedule entry 3:7:leave is invalid"),
])
def test_methods_that_cannot_take_a_schedule_are_refused_at_startup(overrides, message):
    from dpl.config.validate import validate

    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[")):
        validate(compose_cfg("K=3", "faults.schedule=[3:1:leave]", *overrides))


def tiny_workers(K: int) -> StackedWorkers:
    torch.manual_seed(0)
    return StackedWorkers(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)), K, StackedComm(K))


def test_a_sync_averages_the_workers_in_the_run_and_a_join_pulls_the_anchor():
    """LocalSGD with worker 1 away from step 1 and back from step 4, H = 2: the sync after step 2 is the mean
    of workers 0 and 2 only; worker 1's rows and momentum stay as they were while it is away (its steps are
    thrown away), and before step 4 it takes the anchor x with fresh momentum."""
    K, H = 3, 2
    workers = tiny_workers(K)
    optimizer = torch.optim.SGD(workers.params, lr=0.1, momentum=0.9)
    method = Elastic(build_method(compose_cfg("method=localsgd", f"K={K}", f"H={H}").method, "keep"),
                     Membership(["1:1:leave", "4:1:join"], K))
    method.start(workers, optimizer)
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        assert method.stepped() == [True, step not in (1, 2, 3), True]
        before = [p.detach().clone() for p in workers.params]
        for p in workers.params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stepped = [p.detach().clone() for p in workers.params]
        now = Now(epoch=0, period=step % H + 1, H=H, step=step + 1)
        method.syncs_after(now)
        drift = method.sync(workers, optimizer, 0.1)
        method.period_ends(now)
        if step == 1:  # the sync: the mean of the workers in the run, for all three
            for p, s in zip(workers.params, stepped):
                mean = (s[0] + s[2]) / 2
                for k in range(K):
                    torch.testing.assert_close(p.detach()[k], mean, atol=1e-6, rtol=0)
            # the drift before it: of the workers in the run, not of the one away (which held its old model)
            flat = torch.cat([s.double().reshape(K, -1) for s in stepped], 1)
            mean = (flat[0] + flat[2]) / 2
            expected = ((flat[0] - mean).norm() + (flat[2] - mean).norm()) / 2 / mean.norm()
            torch.testing.assert_close(drift, expected, atol=0, rtol=1e-6)  # (x̄ averaged in fp32)
        if step == 2:  # away, mid-period: its step given back
            assert all(torch.equal(p.detach()[1], b[1]) for p, b in zip(workers.params, before))
        if step == 3:  # back before step 4: the anchor x (the sync after step 3), momentum zeroed
            for p, x in zip(workers.params, method.inner.anchor):
                torch.testing.assert_close(p.detach()[1], x.float(), atol=0, rtol=0)
            assert all(not optimizer.state[p]["momentum_buffer"][1].any() for p in workers.params)
    assert method.record()["workers_active"] == 3


def test_with_members_wraps_a_synchronous_method_and_hands_an_asynchronous_one_its_schedule():
    members = Membership(["2:1:leave"], 2)
    sync = with_members(build_method(compose_cfg("method=diloco").method, "keep"), members)
    asyn = with_members(build_method(compose_cfg("method=async_diloco").method, "keep"), members)
    assert isinstance(sync, Elastic) and asyn.members is members
    assert with_members(asyn, None) is asyn


def history(*overrides: str) -> list[dict]:
    trainer = build_trainer(compose_cfg(*overrides), torch.device("cpu"))
    trainer.fit()
    return trainer.state.history


@pytest.mark.parametrize("method", [
    ["method=diloco"],
    # ~10 s each on 2 cores: the same bookkeeping through streaming's and the asynchronous method's syncs
    pytest.param(["method=streaming_diloco", "method.delay=1"], marks=pytest.mark.slow),
    pytest.param(["method=async_diloco", "clock.speed=lognormal", "network.bandwidth_gbps=1000"],
                 marks=pytest.mark.slow)])
def test_the_history_counts_the_workers_in_the_run_and_only_their_samples(method):
    # worker 3 away in steps 3 to 9 (counted from 0): a record counts those in the run at its last step
    rows = history(*method, "K=4", "H=2", "epochs=2", "faults.schedule=[3:3:leave,10:3:join]", "eval_every=5")
    assert [r["workers_active"] for r in rows] == [3 if 3 <= r["step"] - 1 <= 9 else 4 for r in rows]
    assert {r["workers_active"] for r in rows} == {3, 4}
    full = history(*method, "K=4", "H=2", "epochs=2", "eval_every=5")
    assert rows[-1]["samples_total"] < full[-1]["samples_total"]
    if "method=async_diloco" not in method:  # a step lasts as long whoever takes it
        assert rows[-1]["modelled_time_s"] == pytest.approx(full[-1]["modelled_time_s"], rel=0.05)


@pytest.mark.parametrize("extra,stop_at", [
    (["method=diloco", "H=3", "faults.schedule=[4:1:leave,9:1:join]"], 8),  # stopped while away, resumed, joins
    pytest.param(["method=async_diloco", "H=3", "clock.speed=lognormal", "network.bandwidth_gbps=1000",
                  "faults.schedule=[4:1:leave,9:1:join]"], 10, marks=pytest.mark.slow),  # stopped right after the join
])
def test_resume_across_a_join_is_exact(make_cfg, tmp_path, monkeypatch, extra, stop_at):
    assert_resume_is_exact(make_cfg, ["K=3", "checkpoint_every=2", *extra], tmp_path, monkeypatch, stop_at=stop_at)
