"""Batched crop + flip: per image, counter-based, exact crops of the zero-padded image, exact mirrors."""

from __future__ import annotations

import pytest
import torch

from dpl.components.data.augment import (
    TRAIN,
    _mix,
    _mix_int,
    augment_bits,
    crop_flip_draws,
    normalize,
    random_crop_flip,
    signed64,
    stream_key,
)
from dpl.components.data.device import DeviceData, make_batch


def bits(seed: int, n: int, device: str = "cpu") -> torch.Tensor:
    return augment_bits(stream_key(seed), 0, n, torch.device(device))


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
    out = random_crop_flip(x, padding=2, bits=bits(1, len(x)))
    assert out.shape == x.shape and out.dtype == torch.uint8
    for img, o in zip(x, out):
        assert any(torch.equal(o, cand) for cand in candidates(img, 2))


def test_padding_area_is_zero_and_offsets_cover_the_range():
    p, n = 3, 2000
    x = torch.full((n, 1, 10, 10), 255, dtype=torch.uint8)
    out = random_crop_flip(x, padding=p, bits=bits(0, n))
    # Zero rows at the top mean the window started dy < p rows into the padded image.
    zero_top = (out[:, 0, :, :] == 0).all(2).int().cumprod(1).sum(1)
    zero_bottom = (out[:, 0, :, :] == 0).all(2).flip(1).int().cumprod(1).sum(1)
    assert set(zero_top.tolist()) == set(range(p + 1)) and set(zero_bottom.tolist()) == set(range(p + 1))
    assert (zero_top * zero_bottom == 0).all()  # a window never reaches both paddings
    assert torch.equal(out == 0, out != 255)  # only 0 (padding) or original pixels


def test_flip_without_padding_is_an_exact_mirror_half_the_time():
    x = images(400, h=5, w=7)
    out = random_crop_flip(x, padding=0, bits=bits(3, len(x)))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all()
    assert 0.4 < mirrored.float().mean().item() < 0.6


def test_augmentation_is_per_image():
    x = images(1).expand(64, -1, -1, -1).contiguous()  # 64 copies of one image
    out = random_crop_flip(x, padding=4, bits=bits(0, len(x)))
    distinct = {bytes(o.flatten().tolist()) for o in out}
    assert len(distinct) > 20


def test_same_seed_same_output_other_seed_other_output():
    x = images(32)
    a = random_crop_flip(x, 4, bits(7, len(x)))
    b = random_crop_flip(x, 4, bits(7, len(x)))
    c = random_crop_flip(x, 4, bits(8, len(x)))
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
    x_train, y = make_batch(data, idx, (0, 5), train=True)
    assert x_train.shape == (2, 3, 3, 8, 8) and torch.equal(y, idx)
    assert not torch.equal(x_train, plain)
    step_bits = augment_bits(stream_key(0, TRAIN, 5), 0, 6, torch.device("cpu"))
    expected = normalize(random_crop_flip(data.train_x[idx.flatten()], 2, step_bits), data.mean, data.std)
    assert torch.equal(x_train, expected.view(2, 3, 3, 8, 8))
    assert torch.equal(make_batch(data, idx, (0, 5), train=False)[0], plain)
    assert torch.equal(make_batch(tiny_data(augment=False), idx, (0, 5), train=True)[0], plain)
    assert not torch.equal(make_batch(data, idx, (0, 6), train=True)[0], x_train)  # the next step redraws
    assert not torch.equal(make_batch(data, idx, (1, 5), train=True)[0], x_train)  # another seed too


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_same_bits_give_the_same_crops_on_cuda():
    x = images(64)
    assert torch.equal(bits(5, 64), bits(5, 64, "cuda").cpu())  # the hash itself agrees across devices
    assert torch.equal(random_crop_flip(x, 4, bits(5, 64)), random_crop_flip(x.cuda(), 4, bits(5, 64, "cuda")).cpu())


def test_rows_of_a_batch_get_the_crops_of_the_full_batch():
    """A rank cutting only its workers' rows sees exactly its part of the jointly drawn batch."""
    from dpl.components.data.device import DeviceData, make_batch

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=g)
    data = DeviceData(x, torch.arange(40), x[:1], torch.zeros(1, dtype=torch.long), x[:1],
                      torch.zeros(1, dtype=torch.long), torch.zeros(3), torch.ones(3), 40, True, 2)
    idx = torch.randperm(40, generator=g)[:24].view(4, 6)
    full_x, full_y = make_batch(data, idx, (5, 17), train=True)
    for rows in (slice(2, 3), slice(1, 3), slice(0, 1)):
        part_x, part_y = make_batch(data, idx, (5, 17), train=True, rows=rows)
        assert torch.equal(part_x, full_x[rows]) and torch.equal(part_y, full_y[rows])


def test_the_device_hash_equals_splitmix64_on_python_ints():
    """int64 tensor ops (wrapping multiply, masked logical shifts) compute SplitMix64 exactly."""
    zs = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 0x9E3779B97F4A7C15, 123456789]
    got = _mix(torch.tensor([signed64(z) for z in zs], dtype=torch.int64)).tolist()
    assert got == [signed64(_mix_int(z)) for z in zs]
    # SplitMix64's first output from seed 0 (Steele et al. 2014 reference implementation)
    assert _mix_int(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF


def test_draws_are_uniform_over_the_offsets_and_flip_half_the_time():
    p, n = 4, 90_000
    dy, dx, flip = crop_flip_draws(bits(11, n), p)
    for d in (dy, dx):
        counts = torch.bincount(d, minlength=2 * p + 1)
        assert counts.numel() == 2 * p + 1 and int(d.min()) == 0 and int(d.max()) == 2 * p
        assert (counts.float() / n - 1 / (2 * p + 1)).abs().max() < 0.01
    assert abs(flip.float().mean().item() - 0.5) < 0.01
    # the fields are independent of each other: every (dy, dx, flip) cell is about equally frequent
    cells = torch.bincount((dy * (2 * p + 1) + dx) * 2 + flip.long(), minlength=2 * (2 * p + 1) ** 2)
    expected = n / cells.numel()
    assert ((cells.float() - expected).abs() / expected).max() < 0.25


def test_neighbouring_steps_and_positions_are_not_correlated():
    """A counter-based stream must not repeat across steps: consecutive keys give unrelated bits."""
    a = augment_bits(stream_key(0, TRAIN, 0), 0, 4096, torch.device("cpu"))
    b = augment_bits(stream_key(0, TRAIN, 1), 0, 4096, torch.device("cpu"))
    shifted = augment_bits(stream_key(0, TRAIN, 0), 1, 4096, torch.device("cpu"))
    assert torch.equal(a[1:], shifted[:-1])  # the counter is the position in the batch
    same = (crop_flip_draws(a, 4)[0] == crop_flip_draws(b, 4)[0]).float().mean().item()
    assert abs(same - 1 / 9) < 0.03  # chance agreement of two independent uniform offsets
