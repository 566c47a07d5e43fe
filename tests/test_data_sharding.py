"""Worker shards: disjoint, equal size, class-balanced (iid) or skewed (dirichlet), seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpl.components.data.sharding import (
    SHARDINGS,
    _apportion,
    _dirichlet_counts,
    batch_indices,
    epoch_order,
    make_shards,
    steps_per_epoch,
)
from dpl.config import root as config


def test_registry_matches_the_config_choices():
    assert set(SHARDINGS) == set(config.SHARDINGS)


def labels(n: int = 1003, classes: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def class_counts(y: torch.Tensor, shards: torch.Tensor, classes: int = 10) -> torch.Tensor:
    return torch.stack([torch.bincount(y[row], minlength=classes) for row in shards])


@pytest.mark.parametrize("strategy", sorted(SHARDINGS))
@pytest.mark.parametrize("K", [1, 4, 7])
def test_shards_are_disjoint_equal_and_seeded(strategy, K):
    y = labels()
    shards = make_shards(y, K, strategy, seed=3, alpha=0.3)
    assert shards.shape == (K, 1003 // K) and shards.dtype == torch.int64
    flat = shards.flatten()
    assert len(flat.unique()) == len(flat) and 0 <= flat.min() and flat.max() < 1003
    assert torch.equal(shards, make_shards(y, K, strategy, seed=3, alpha=0.3))
    if K > 1:
        assert not torch.equal(shards, make_shards(y, K, strategy, seed=4, alpha=0.3))


def study_dealing(y: torch.Tensor, K: int) -> list[torch.Tensor]:
    """The study's ``iid_sharding`` (src/utils/load_dataset.py), written from its description in the
    study's FIDELITY notes: sort the split's indices by class, deal the sorted list round-robin,
    shard i taking positions i, i+K, i+2K, ... (sizes differ by at most one)."""
    ordered = torch.sort(y, stable=True).indices
    return [ordered[i::K] for i in range(K)]


@pytest.mark.parametrize("K", [2, 4, 8])
def test_iid_is_the_studys_dealing_on_its_45000_split(K):
    """Per worker and class, dpl's iid shards hold what the study's dealing gives them. The class
    counts are uneven and none divisible by 8 (so workers differ by one within a class), the
    split's 45,000 images divide by K = 2, 4, 8 as in every study row."""
    g = torch.Generator().manual_seed(1)
    sizes = 300 + torch.randperm(301, generator=g)[:100]  # 100 classes, 300..600 images each
    sizes[-1] += 45_000 - int(sizes.sum())
    y = torch.repeat_interleave(torch.arange(100), sizes)[torch.randperm(45_000, generator=g)]
    assert (sizes % 8 != 0).sum() >= 80
    mine = make_shards(y, K, "iid", seed=5)
    theirs = study_dealing(y, K)
    assert mine.shape == (K, 45_000 // K) and [len(t) for t in theirs] == [45_000 // K] * K
    assert torch.equal(class_counts(y, mine, 100), torch.stack([torch.bincount(y[t], minlength=100) for t in theirs]))


def test_iid_drops_the_remainder_where_the_studys_shards_would_differ_by_one():
    """N not divisible by K: the study's shards differ in size by one (its budget is the largest);
    dpl's workers are stacked with equal shards, so iid first drops N mod K random images.
    No study row is in this case (45,000 images, K = 2, 4, 8)."""
    y = labels(1003)
    mine = make_shards(y, 4, "iid", seed=0)
    theirs = study_dealing(y, 4)
    assert mine.shape == (4, 250) and sorted(len(t) for t in theirs) == [250, 251, 251, 251]
    dropped = torch.bincount(y, minlength=10) - class_counts(y, mine).sum(0)
    assert dropped.min() >= 0 and dropped.sum() == 1003 % 4  # the only images the study's workers have more of


def test_iid_shards_balance_every_class():
    y = labels(n=2000, seed=1)
    counts = class_counts(y, make_shards(y, 7, "iid", seed=0))
    assert ((counts.max(0).values - counts.min(0).values) <= 1).all()


def max_class_share(y: torch.Tensor, shards: torch.Tensor) -> float:
    """Mean over workers of the largest class's fraction of the shard."""
    return (class_counts(y, shards).max(1).values / shards.shape[1]).mean().item()


def test_dirichlet_shards_are_skewed():
    y = labels(n=4000, seed=2)
    skewed = max_class_share(y, make_shards(y, 8, "dirichlet", seed=0, alpha=0.1))
    mild = max_class_share(y, make_shards(y, 8, "dirichlet", seed=0, alpha=100.0))
    balanced = max_class_share(y, make_shards(y, 8, "iid", seed=0))
    # 1/10 is the balanced share; with every sample used, late shards must take leftovers, so < 1.
    assert skewed > 0.35 and mild < 0.2 and balanced < 0.15


def test_dirichlet_counts_take_from_other_classes_when_one_runs_out():
    """Both workers want only class 0, which has 3 samples; S = 5 (worked by hand)."""
    proportions = np.array([[1.0, 0.0], [1.0, 0.0]])
    counts = _dirichlet_counts(proportions, np.array([3, 10]), S=5)
    # Round 1: requests 5 and 5 of class 0, 3 available -> shared 2 and 1.
    # Round 2: class 0 is empty and the workers' proportions have no mass left: the rest from class 1.
    assert counts.tolist() == [[2, 3], [1, 4]]


def test_apportion_sums_exactly():
    assert _apportion(10, np.array([1.0, 1.0, 1.0])).tolist() == [4, 3, 3]
    assert _apportion(7, np.array([0.5, 0.25, 0.25])).tolist() == [3, 2, 2]
    assert _apportion(0, np.array([2.0, 3.0])).tolist() == [0, 0]


def test_epoch_order_permutes_each_shard_per_epoch():
    shards = make_shards(labels(), 4, "random", seed=0)
    e0, e0_again, e1 = epoch_order(shards, 0, seed=5), epoch_order(shards, 0, seed=5), epoch_order(shards, 1, seed=5)
    assert torch.equal(e0, e0_again) and not torch.equal(e0, e1)
    assert not torch.equal(e0, epoch_order(shards, 0, seed=6))
    assert torch.equal(e0.sort(1).values, shards.sort(1).values)


def test_batches_walk_the_epoch_order():
    order = torch.arange(2 * 10).view(2, 10)
    assert steps_per_epoch(10, 4) == 3 and steps_per_epoch(8, 4) == 2
    batches = [batch_indices(order, s, 4) for s in range(steps_per_epoch(10, 4))]
    assert [b.shape for b in batches] == [(2, 4), (2, 4), (2, 2)]
    assert torch.equal(torch.cat(batches, 1), order)
