"""The modelled clock's compute: FLOPs per sample counted once, a GPU's dense peak and MFU, no measurement."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpl.comm.clock import DEVICES, ClockConfig, peak_flops, sample_cost_s, training_flops
from dpl.comm.cost import CLOCKED_FIELDS, CommLedger
from dpl.config.validate import validate
from dpl.errors import ConfigError
from dpl.run import checkpoint
from dpl.run.build import build_trainer
from dpl.run.job import run

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- counting FLOPs


def test_a_linear_stack_counts_two_flops_per_weight_forward_and_four_backward_but_the_first_layers_input():
    """Per sample, y = W2 relu(W1 x): 2ab + 2bc forward; backward 2ab + 2bc for the weight gradients and 2bc for
    the gradient of the hidden activation; the input's gradient is not formed (training does not need it)."""
    a, b, c = 7, 5, 3
    stack = nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Linear(b, c))
    assert training_flops(stack, torch.zeros(1, a)) == 4 * a * b + 6 * b * c
    assert training_flops(nn.Linear(a, b, bias=False), torch.zeros(1, a)) == 4 * a * b  # a first layer alone
    assert training_flops(stack, torch.zeros(2, a)) == 2 * (4 * a * b + 6 * b * c)  # linear in the batch


def test_a_gpt_counts_six_flops_per_matmul_weight_and_token_plus_its_attention():
    """Every matmul weight (blocks and the tied head; embeddings are lookups) costs 6 per token (its input needs a
    gradient: the embeddings train); attention's two T x T products cost 4 T C per token and layer forward, 12
    with the backward, counted in full (the causal mask halves none of them)."""
    from dpl.components.models import build_model

    n_layer, n_embd, T, vocab = 2, 32, 16, 256
    gpt = build_model("gpt", 1, vocab, T, n_layer=n_layer, n_head=2, n_embd=n_embd, block_size=T)
    N = n_layer * 12 * n_embd**2 + n_embd * vocab  # qkv 3C², proj C², mlp 8C² per block; the head
    flops = training_flops(gpt, torch.zeros(1, T, dtype=torch.long))
    assert flops == 6 * N * T + n_layer * 12 * T * T * n_embd


def test_counting_changes_neither_the_model_nor_the_random_streams():
    """On a meta copy: the weights, their gradients, the training mode and torch's generator stay as they were,
    even for a model with dropout, which in training mode would draw."""
    from dpl.components.models import build_model

    torch.manual_seed(0)
    gpt = build_model("gpt", 1, 256, 16, n_layer=1, n_head=2, n_embd=32, block_size=16, dropout=0.5).train()
    before = {k: v.clone() for k, v in gpt.state_dict().items()}
    rng = torch.get_rng_state()
    training_flops(gpt, torch.zeros(1, 16, dtype=torch.long))
    assert torch.equal(torch.get_rng_state(), rng) and gpt.training
    assert all(torch.equal(before[k], v) for k, v in gpt.state_dict().items())
    assert all(p.grad is None and p.device.type == "cpu" for p in gpt.parameters())
    assert gpt.head.weight is gpt.wte.weight  # still tied


def test_the_sample_cost_is_flops_over_peak_times_mfu_unless_given_or_measured():
    model, x = nn.Linear(10, 10, bias=False), torch.zeros(1, 10)
    flops = 4 * 10 * 10
    a100 = ClockConfig()
    assert a100.device == "a100" and a100.mfu == 0.4
    assert sample_cost_s(a100, "fp32", model, x) == flops / (156e12 * 0.4)
    assert sample_cost_s(a100, "bf16", model, x) == flops / (312e12 * 0.4)
    assert sample_cost_s(ClockConfig(device="h100", mfu=0.5), "bf16", model, x) == flops / (989.4e12 * 0.5)
    assert sample_cost_s(a100, "fp32", model, x, tokens_per_sample=4) == flops / 4 / (156e12 * 0.4)
    assert sample_cost_s(ClockConfig(sample_cost_us=3.0), "fp32", model, x) == pytest.approx(3e-6)  # given: wins
    assert sample_cost_s(ClockConfig(device="measured"), "fp32", model, x) is None  # the ledger measures it
    # every profile's peaks are dense, and bf16 (where it has one) at least fp32's
    assert all(p.bf16 is None or p.bf16 >= p.fp32 for p in DEVICES.values())
    assert peak_flops("v100", "fp32") == 15.7e12


# ----------------------------------------------------------------------------- the config


@pytest.mark.parametrize("overrides,message", [
    (["clock.device=tpu"], "clock.device='tpu' is invalid: allowed one of a100, h100, v100, measured"),
    (["clock.mfu=0"], "clock.mfu=0.0 is invalid: allowed 0 < x <= 1"),
    (["clock.mfu=1.5"], "clock.mfu=1.5 is invalid: allowed 0 < x <= 1"),
    (["clock.device=v100", "precision=bf16"], "clock.device='v100' is invalid with precision=bf16: allowed "
                                               "precision=fp32 on it"),
    (["clock.emulate=true"], "clock.emulate=true is invalid with engine=simulated, whose workers share one process: "
                             "allowed engine=distributed, or clock.emulate=false"),
])
def test_a_bad_clock_is_one_line_naming_the_key(make_cfg, overrides, message):
    with pytest.raises(ConfigError) as e:
        validate(make_cfg(*overrides))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_given_or_measured_cost_needs_no_peak_at_the_precision(make_cfg):
    validate(make_cfg("clock.device=v100", "precision=bf16", "clock.sample_cost_us=2"))
    validate(make_cfg("clock.device=measured", "precision=bf16"))


# ----------------------------------------------------------------------------- runs


def _history(job):
    return checkpoint.load(job / "checkpoint.pt")["state"]["history"]


def test_two_runs_of_the_default_clock_model_the_same_time_to_the_bit_and_measuring_changes_nothing_else(
        make_cfg, tmp_path):
    """With no clock key set the modelled time is a function of the config: two runs give it bit for bit. A run
    with clock.device=measured trains the same numbers (counting FLOPs draws nothing, touches no weight) and
    differs only in the fields that follow its measured compute, which it calibrates in its first epoch."""
    base = ["method=localsgd", "K=2", "H=2", "epochs=1", "dataset.num_train=200", "dataset.num_test=50",
            "batch_size=16"]
    for name in ("a", "b"):
        run(make_cfg(*base), out_dir=tmp_path / name)
    run(make_cfg(*base, "clock.device=measured"), out_dir=tmp_path / "measured")
    a, b, measured = (_history(tmp_path / n) for n in ("a", "b", "measured"))
    assert [r["modelled_time_s"] for r in a] == [r["modelled_time_s"] for r in b]
    assert [r["compute_time_s"] for r in a] == [r["compute_time_s"] for r in b] and a[-1]["compute_time_s"] > 0
    wall = {"epoch_time_s", "samples_per_s", "comm_wall_s"} | CLOCKED_FIELDS
    assert [{k: v for k, v in r.items() if k not in wall} for r in a] == \
        [{k: v for k, v in r.items() if k not in wall} for r in measured]
    cost = checkpoint.load(tmp_path / "measured" / "checkpoint.pt")["comm"]["sample_cost_s"]
    assert cost is not None and cost > 0 and cost != checkpoint.load(tmp_path / "a" / "checkpoint.pt")["comm"][
        "sample_cost_s"]


def test_the_trainers_ledger_takes_the_counted_cost_and_a_checkpoints_own_cost_wins(make_cfg):
    """The ledger's cost is LeNet-5's FLOPs on the default a100; it round-trips a checkpoint exactly, and a
    checkpoint of before (its cost measured) keeps its own when loaded into a trainer of today's defaults."""
    trainer = build_trainer(make_cfg(), CPU)
    lenet = trainer.ledger.sample_cost_s
    x = torch.zeros(1, *trainer.data.train_x.shape[1:])
    assert lenet == training_flops(trainer.workers.model, x) / (156e12 * 0.4)
    assert CommLedger.from_state(trainer.ledger.state_dict()) == trainer.ledger
    assert build_trainer(make_cfg("clock.device=measured"), CPU).ledger.sample_cost_s is None
    state = trainer.state_dict()
    state["comm"]["sample_cost_s"] = 1.25e-4  # measured on the machine of an old run
    resumed = build_trainer(make_cfg(), CPU)
    resumed.load_state_dict(state)
    assert resumed.ledger.sample_cost_s == 1.25e-4
