"""The language-model workload: dataset=text (bytes of real text), model=gpt_tiny, and the identities
every method keeps on it. The corpus is Debian's fortunes (apt-get install fortunes; .ci/run installs it):
each test copies the first 12 kB of three of its files into its own folder."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dpl.components.data.device import load_dataset, make_batch
from dpl.components.data.sharding import batch_indices, epoch_order
from dpl.components.data.text import read_corpus
from dpl.core.loop import WALL_CLOCK_FIELDS
from dpl.run.build import build_trainer
from tests.conftest import compose_cfg
from tests.resume import assert_resume_is_exact

FORTUNES = Path("/usr/share/games/fortunes")
needs_corpus = pytest.mark.skipif(not (FORTUNES / "computers").is_file(),
                                  reason="Debian's fortunes is not installed (apt-get install fortunes)")
pytestmark = needs_corpus
CPU = torch.device("cpu")


@pytest.fixture
def corpus(tmp_path):
    where = tmp_path / "corpus"
    where.mkdir()
    for name in ("computers", "cookie", "literature"):
        (where / name).write_bytes((FORTUNES / name).read_bytes()[:12_000])
    (where / "computers.dat").write_bytes(b"\x00\x01binary index")  # as fortune's: left out
    return where


def text_cfg(corpus, *overrides):
    return compose_cfg("dataset=text", f"dataset.path={corpus}", "dataset.block_size=32", "model=gpt_tiny",
                       "batch_size=16", "optimizer=adamw", "lr=3e-3", "scheduler=constant", *overrides)


def test_the_corpus_is_the_text_files_only(corpus):
    assert [name for name, _ in read_corpus(corpus)] == ["computers", "cookie", "literature"]


def test_windows_are_a_pure_function_of_seed_step_worker_sample_and_stay_in_their_split(corpus):
    data = load_dataset(text_cfg(corpus, "K=2").dataset, 0, CPU)
    n = len(data.train_tokens)
    assert len(data.val_tokens) + len(data.test_tokens) + n == 36_000
    idx = torch.tensor([[0, 5, 900], [3, 7, 999]])  # slots of two workers (999: the split's last)
    x, y = make_batch(data, idx, (0, 4), train=True)
    assert x.shape == y.shape == (2, 3, 32) and x.dtype == torch.int64
    assert torch.equal(x[..., 1:], y[..., :-1])  # targets are the next bytes
    again, _ = make_batch(data, idx, (0, 4), train=True)
    assert torch.equal(x, again)  # the same (seed, step): the same windows
    other, _ = make_batch(data, idx, (0, 5), train=True)
    assert not torch.equal(x, other)  # another step: other offsets
    one, _ = make_batch(data, idx, (0, 4), train=True, rows=slice(1, 2))
    assert torch.equal(one[0], x[1])  # worker 1 alone (a rank) gets its windows of the full batch
    tokens = data.train_tokens
    for k in range(2):
        for b in range(3):  # each window is a span of the train split past its slot's start
            start = next(s for s in range(idx[k, b] * 32, min(idx[k, b] * 32 + 32, n - 32)) if
                         torch.equal(tokens[s:s + 32].long(), x[k, b]))
            assert 0 <= start <= n - 33
    val = list(__import__("dpl.components.data.device", fromlist=["eval_batches"]).eval_batches(data, "val", 10))
    assert sum(v[0].shape[0] for v in val) == (len(data.val_tokens) - 1) // 32


def test_gpt_tiny_learns_the_corpus_below_the_unigram_entropy_of_its_bytes(corpus):
    trainer = build_trainer(text_cfg(corpus, "epochs=5"), CPU)
    trainer.fit()
    counts = torch.bincount(trainer.data.train_tokens.long(), minlength=256).double()
    p = counts[counts > 0] / counts.sum()
    unigram_bits = float(-(p * p.log2()).sum())
    val_bpb = trainer.state.history[-1]["val_bpb"]
    assert val_bpb == pytest.approx(trainer.state.history[-1]["val_loss"] / math.log(2))
    assert val_bpb < unigram_bits - 0.2, (val_bpb, unigram_bits)
    assert "test_bpb" in trainer.final_metrics()


def _train(cfg):
    trainer = build_trainer(cfg, CPU)
    trainer.fit()
    return trainer


def _history(trainer):
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK_FIELDS} for r in trainer.state.history]


def test_diloco_with_outer_lr_1_and_no_momentum_is_localsgd_with_adamw(corpus):
    base = ["K=2", "H=4", "epochs=1"]
    diloco = _train(text_cfg(corpus, *base, "method=diloco", "method.outer.lr=1.0", "method.outer.momentum=0",
                             "method.outer.nesterov=false"))
    local = _train(text_cfg(corpus, *base, "method=localsgd"))
    for a, b in zip(diloco.workers.params, local.workers.params):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_vmap_equals_loop(corpus):
    """One step's losses and gradients on the function that carries it, then a run with SGD. (Not AdamW: a
    key bias's gradient is zero but for rounding, since softmax ignores a shift shared by all keys, and
    AdamW scales that noise up to steps of ±lr, which loop and vmap round differently.)"""
    base = ["K=2", "H=4", "epochs=1", "method=localsgd", "optimizer=sgdm", "lr=0.1"]
    loop, vmapped = (build_trainer(text_cfg(corpus, *base, f"engine.simulate={m}"), CPU) for m in ("loop", "vmap"))
    idx = batch_indices(epoch_order(loop.shards, 0, 0), 0, 16)
    grads = []
    for t in (loop, vmapped):
        x, y = make_batch(t.data, idx, (0, 0), train=True)
        losses, _ = t.workers.forward_backward(x, y)
        grads.append((losses, [p.grad.clone() for p in t.workers.params]))
        t.optimizer.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-6, rtol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    loop.fit()
    vmapped.fit()
    a = torch.cat([p.flatten() for p in loop.workers.params])
    b = torch.cat([p.flatten() for p in vmapped.workers.params])
    assert (a - b).norm() <= 1e-6 * a.norm()


def test_resume_is_exact(corpus, tmp_path, monkeypatch):
    overrides = ["dataset=text", f"dataset.path={corpus}", "dataset.block_size=32", "model=gpt_tiny", "batch_size=16",
                 "optimizer=adamw", "method=diloco", "K=2", "H=4", "epochs=2", f"results_csv={tmp_path / 'r.csv'}"]
    assert_resume_is_exact(lambda *o: compose_cfg(*o), overrides, tmp_path, monkeypatch, stop_at=37)


def test_simulation_equals_torch_distributed(corpus, tmp_path):
    from dpl.bench import _fit_rank as fit  # a rank that trains and returns its history
    from dpl.launch.ranks import spawn

    # SGD, as for vmap ≡ loop: AdamW would scale up the rounding of the all-reduce's order
    base = ["K=2", "H=4", "epochs=1", "method=localsgd", "optimizer=sgdm", "lr=0.1"]
    sim = _train(text_cfg(corpus, *base))
    ranks = spawn(fit, text_cfg(corpus, *base, "engine=distributed"), tmp_path)
    for a, b in zip(_history(sim), [{k: v for k, v in r.items() if k not in WALL_CLOCK_FIELDS} for r in ranks]):
        for key in ("train_loss", "val_loss", "val_bpb"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_a_text_dataset_needs_a_sequence_model_and_a_window_it_holds(corpus):
    from dpl.config.validate import validate
    from dpl.errors import ConfigError

    with pytest.raises(ConfigError, match="model=lenet5 is invalid with dataset=text: allowed gpt, gpt_tiny"):
        validate(compose_cfg("dataset=text", f"dataset.path={corpus}"))
    with pytest.raises(ConfigError, match="dataset.block_size=128 is invalid: allowed at most model.block_size=64"):
        build_trainer(text_cfg(corpus, "dataset.block_size=128"), CPU)


@pytest.mark.parametrize("overrides", [
    ["method=centralized"], ["method=localsgd"], ["method=slowmo"], ["method=post_local"],
    ["method=streaming_diloco", "method.fragments=2", "method.delay=1"], ["method=diloco", "compression=fp8"],
    ["method=diloco", "precision=bf16"], ["method=diloco", "optimizer=muon"],
    pytest.param(["method=localsgd", "engine.compile=compile"], marks=pytest.mark.slow),
], ids=lambda o: "-".join(x.split("=")[-1] for x in o))
def test_every_method_trains_the_gpt_on_text(corpus, overrides):
    trainer = _train(text_cfg(corpus, "K=2", "H=4", "epochs=1", *overrides))
    record = trainer.state.history[-1]
    assert math.isfinite(record["val_bpb"]) and record["val_bpb"] < 8.0  # below a uniform byte (8 bits)


def test_dirichlet_sharding_skews_the_workers_by_source_file(corpus):
    """Each slot's label is its file: iid shards mix the files evenly, dirichlet ones do not (non-iid text)."""
    def file_shares(*overrides):
        trainer = build_trainer(text_cfg(corpus, "K=3", *overrides), CPU)
        labels = trainer.data.train_y
        return torch.stack([torch.bincount(labels[s], minlength=3).double() / len(s) for s in trainer.shards])

    iid = file_shares("sharding=iid")
    skewed = file_shares("sharding=dirichlet", "dirichlet_alpha=0.1")
    assert (iid.max(0).values - iid.min(0).values).max() < 0.1
    assert (skewed.max(0).values - skewed.min(0).values).max() > 0.3


# ----------------------------------------------------------------------------- the LM recipe


def test_a_step_budget_with_an_evaluation_every_n_steps(corpus):
    """max_steps ends the run mid-epoch; eval_every records every N steps and at the end; the cosine spans
    the budget; text's best model is by validation loss."""
    trainer = build_trainer(text_cfg(corpus, "K=2", "max_steps=45", "eval_every=20", "scheduler=cosine",
                                     "warmup_steps=5"), CPU)
    assert trainer.steps_per_epoch < 45 < 2 * trainer.steps_per_epoch  # the budget ends in the second epoch
    assert len(trainer.schedule.table) == 45 and trainer.schedule.table[4] == pytest.approx(3e-3)
    trainer.fit()
    history = trainer.state.history
    assert [r["step"] for r in history] == [20, 40, 45] and trainer.state.global_step == 45
    assert trainer.state.epoch == 2 and trainer.finished
    assert trainer.best_metric == "val_loss"
    best = min(history, key=lambda r: r["val_loss"])
    assert trainer.state.best_val_acc == best["val_acc"] and trainer.state.best_epoch == best["epoch"]


def test_the_step_budget_resumes_exactly_between_a_step_and_its_record(corpus, tmp_path, monkeypatch):
    overrides = ["dataset=text", f"dataset.path={corpus}", "dataset.block_size=32", "model=gpt_tiny", "batch_size=16",
                 "optimizer=adamw", "method=diloco", "K=2", "H=4", "max_steps=24", "eval_every=8",
                 "checkpoint_every=8", f"results_csv={tmp_path / 'r.csv'}"]
    # the checkpoint of step 16 is written before that step's record: the resumed run records it once
    assert_resume_is_exact(lambda *o: compose_cfg(*o), overrides, tmp_path, monkeypatch, stop_at=16)


def test_the_step_budget_through_the_cli(corpus, tmp_path):
    """python -m dpl model=gpt_tiny dataset=text max_steps=N eval_every=M: M-step records, MLflow-free."""
    import csv

    from tests.processes import run_cli

    proc = run_cli(tmp_path, ["model=gpt_tiny", "dataset=text", f"dataset.path={corpus}", "dataset.block_size=32",
                              "batch_size=16", "max_steps=30", "eval_every=10", "optimizer.grad_clip_norm=1.0",
                              "logger=none", "progress=false", "device=cpu", f"hydra.run.dir={tmp_path / 'job'}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "job" / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(float(r["step"])) for r in rows] == [10, 20, 30]
    assert "step 30/30" in proc.stdout + proc.stderr and "bytes/s" in proc.stdout + proc.stderr


def _bytes_read() -> int:
    """The bytes this process has read through read() calls so far (Linux; 0 elsewhere)."""
    io = Path("/proc/self/io")
    return int(dict(line.split(": ") for line in io.read_text().splitlines())["rchar"]) if io.is_file() else 0


def test_a_huge_text_file_is_refused_by_its_size_before_it_is_read(corpus):
    from dpl.components.data.sources import DatasetUnavailable

    big = corpus / "zbig.txt"
    with open(big, "wb") as f:  # text first, then a sparse 2 GiB on paper: no disk used
        f.write((FORTUNES / "computers").read_bytes()[:12_000] * 8)
        f.truncate(2 * 2**30)
    before = _bytes_read()
    with pytest.raises(DatasetUnavailable) as e:
        read_corpus(corpus)
    assert f"{big} (2048 MiB) takes the corpus past 1024 MiB" in str(e.value) and "\n" not in str(e.value)
    assert _bytes_read() - before < 2**26  # its head and the small files, not the 2 GiB


def test_a_huge_binary_file_is_left_out_after_reading_its_head(corpus):
    (corpus / "zeros.bin").touch()
    with open(corpus / "zeros.bin", "r+b") as f:  # sparse zeros: a NUL in the first bytes
        f.truncate(2 * 2**30)
    before = _bytes_read()
    assert [name for name, _ in read_corpus(corpus)] == ["computers", "cookie", "literature"]
    assert _bytes_read() - before < 2**26
