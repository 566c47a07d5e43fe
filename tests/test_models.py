"""Models: shapes, sizes and the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpl.comm.stacked import StackedComm
from dpl.components.models import MODELS, build_model
from dpl.components.models.resnet import ResNet20
from dpl.core.workers import StackedWorkers


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet20_has_the_papers_size():
    model = ResNet20(3, 10, 32)
    # He et al. 2016, Table 6: 0.27M parameters for 10 classes
    assert n_params(model) == 269_722
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == 20  # option A shortcuts add no weighted layer
    assert [c.out_channels for c in convs] == [16] * 7 + [32] * 6 + [64] * 6
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 19 and len(list(model.buffers())) == 3 * 19  # mean, var, batch count each


@pytest.mark.parametrize("channels, size", [(3, 32), (1, 28), (3, 9)])
def test_resnet20_classifies_any_image_size(channels, size):
    model = build_model("resnet20", in_channels=channels, num_classes=7, image_size=size)
    assert model(torch.randn(4, channels, size, size)).shape == (4, 7)


def test_resnet20_downsamples_twice_with_zero_padded_shortcuts():
    model = ResNet20(1, 10, 28)
    x = torch.randn(2, 1, 28, 28)
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[1:])))
    model(x)
    assert seen == [(16, 28, 28)] * 3 + [(32, 14, 14)] * 3 + [(64, 7, 7)] * 3
    # the shortcut of a downsampling block: the input subsampled, new channels zero on both sides
    block = model.blocks[3]
    h = torch.randn(2, 16, 28, 28)
    s = block.shortcut(h)
    assert s.shape == (2, 32, 14, 14)
    assert torch.equal(s[:, 8:24], h[:, :, ::2, ::2])
    assert not s[:, :8].any() and not s[:, 24:].any()


def test_lenet5_takes_16_pixels_and_refuses_fewer_naming_16():
    from dpl.components.models.lenet import LeNet5

    assert LeNet5(1, 10, 16)(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    for size in (15, 12):
        with pytest.raises(ValueError, match="at least 16 for LeNet5"):
            LeNet5(1, 10, size)


def test_resnet20_rejects_images_too_small():
    with pytest.raises(ValueError, match="at least 4 for ResNet20"):
        ResNet20(1, 10, 3)


def test_resnet20_runs_as_stacked_workers_on_fashion_mnist_shapes():
    for mode in ("loop", "vmap"):
        workers = StackedWorkers(build_model("resnet20", 1, 10, 28), 2, StackedComm(2), mode=mode)
        losses, correct = workers.forward_backward(torch.randn(2, 4, 1, 28, 28), torch.randint(0, 10, (2, 4)))
        assert losses.shape == (2,) and correct.shape == (2,)
        assert all(p.grad is not None for p in workers.params)


def test_every_registered_model_has_a_config():
    from tests.conftest import CONF

    assert sorted(MODELS) == sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
