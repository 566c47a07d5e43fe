"""Batched crop + flip: per image, seeded, exact crops of the zero-padded image, exact mirrors."""

from __future__ import annotations

import pytest
import torch

from dpl.data import DeviceData, make_batch
from dpl.data.augment import normalize, random_crop_flip


def seeded(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def images(n: int, c: int = 3, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    # Values 1..255 so that a zero in the output can only come from the padding.
    return torch.randint(1, 256, (n, c, h, w), generator=seeded(seed), dtype=torch.uint8)


def candidates(img: torch.Tensor, p: int) -> list[torch.Tensor]:
    """Every crop of the zero-padded image and its mirror, built by slicing (not by the code under test)."""
    c, h, w = img.shape
    padded = torch.zeros(c, h + 2 * p, w + 2 * p, dtype=img.dtype)
    padded[:, p:p + h, p:p + w] = img
    crops = [padded[:, dy:dy + h, dx:dx + w] for dy in range(2 * p + 1) for dx in range(2 * p + 1)]
    return crops + [crop.flip(-1) for crop in crops]


def test_each_output_is_a_zero_padded_crop_or_its_mirror():
    x = images(24)
    out = random_crop_flip(x, padding=2, generator=seeded(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    for img, o in zip(x, out):
        assert any(torch.equal(o, cand) for cand in candidates(img, 2))


def test_padding_area_is_zero_and_offsets_cover_the_range():
    p, n = 3, 2000
    x = torch.full((n, 1, 10, 10), 255, dtype=torch.uint8)
    out = random_crop_flip(x, padding=p, generator=seeded(0))
    # Zero rows at the top mean the window started dy < p rows into the padded image.
    zero_top = (out[:, 0, :, :] == 0).all(2).int().cumprod(1).sum(1)
    zero_bottom = (out[:, 0, :, :] == 0).all(2).flip(1).int().cumprod(1).sum(1)
    assert set(zero_top.tolist()) == set(range(p + 1)) and set(zero_bottom.tolist()) == set(range(p + 1))
    assert (zero_top * zero_bottom == 0).all()  # a window never reaches both paddings
    assert torch.equal(out == 0, out != 255)  # only 0 (padding) or original pixels


def test_flip_without_padding_is_an_exact_mirror_half_the_time():
    x = images(400, h=5, w=7)
    out = random_crop_flip(x, padding=0, generator=seeded(3))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all()
    assert 0.4 < mirrored.float().mean().item() < 0.6


def test_augmentation_is_per_image():
    x = images(1).expand(64, -1, -1, -1).contiguous()  # 64 copies of one image
    out = random_crop_flip(x, padding=4, generator=seeded(0))
    distinct = {bytes(o.flatten().tolist()) for o in out}
    assert len(distinct) > 20


def test_same_seed_same_output_other_seed_other_output():
    x = images(32)
    a = random_crop_flip(x, 4, seeded(7))
    b = random_crop_flip(x, 4, seeded(7))
    c = random_crop_flip(x, 4, seeded(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_normalize_by_hand():
    x = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)  # [1, 2, 1, 2]
    out = normalize(x, torch.tensor([0.5, 0.2]), torch.tensor([0.25, 0.1]))
    expected = torch.tensor([[[[-2.0, 2.0]], [[0.0, 2.0]]]])
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-6)


def tiny_data(augment: bool) -> DeviceData:
    x = images(10)
    y = torch.arange(10)
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    return DeviceData(x, y, x[:2], y[:2], x[:2], y[:2], mean, std, 10, augment, 2)


def test_make_batch_augments_only_train_batches_with_augment_on():
    idx = torch.tensor([[0, 1, 2], [3, 4, 5]])
    data = tiny_data(augment=True)
    plain = normalize(data.train_x[idx.flatten()], data.mean, data.std).view(2, 3, 3, 8, 8)
    x_train, y = make_batch(data, idx, seeded(0), train=True)
    assert x_train.shape == (2, 3, 3, 8, 8) and torch.equal(y, idx)
    assert not torch.equal(x_train, plain)
    expected = normalize(random_crop_flip(data.train_x[idx.flatten()], 2, seeded(0)), data.mean, data.std)
    assert torch.equal(x_train, expected.view(2, 3, 3, 8, 8))
    assert torch.equal(make_batch(data, idx, seeded(0), train=False)[0], plain)
    assert torch.equal(make_batch(tiny_data(augment=False), idx, seeded(0), train=True)[0], plain)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_gives_the_same_crops_on_cuda():
    x = images(64)
    on_cpu = random_crop_flip(x, 4, seeded(5))
    on_cuda = random_crop_flip(x.cuda(), 4, seeded(5))
    assert torch.equal(on_cpu, on_cuda.cpu())
    cuda_a = random_crop_flip(x.cuda(), 4, seeded(5, "cuda"))
    cuda_b = random_crop_flip(x.cuda(), 4, seeded(5, "cuda"))
    assert torch.equal(cuda_a, cuda_b)


def test_rows_of_a_batch_get_the_crops_of_the_full_batch():
    """A rank cutting only its workers' rows sees exactly its part of the jointly drawn batch."""
    from dpl.data import DeviceData, make_batch

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=g)
    data = DeviceData(x, torch.arange(40), x[:1], torch.zeros(1, dtype=torch.long), x[:1],
                      torch.zeros(1, dtype=torch.long), torch.zeros(3), torch.ones(3), 40, True, 2)
    idx = torch.randperm(40, generator=g)[:24].view(4, 6)
    full_x, full_y = make_batch(data, idx, torch.Generator().manual_seed(5), train=True)
    part_x, part_y = make_batch(data, idx, torch.Generator().manual_seed(5), train=True, rows=slice(2, 3))
    assert torch.equal(part_x, full_x[2:3]) and torch.equal(part_y, full_y[2:3])
