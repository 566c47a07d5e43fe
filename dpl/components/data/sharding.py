"""Per-worker shards of the training set, as index tensors ``[K, S]``.

Every shard has the same size ``S = N // K`` (the remainder is dropped) so the K workers
take the same number of local steps per epoch.  Shards are disjoint and a pure function
of ``(labels, K, strategy, seed, alpha)``.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from dpl.registry import lookup


def _iid(labels: torch.Tensor, K: int, g: torch.Generator, rng: np.random.Generator, alpha: float) -> torch.Tensor:
    """Class-balanced: per-class counts differ by at most one between workers.

    Drop ``N mod K`` random samples, sort the rest by class (within a class the order is
    random) and deal the sequence round-robin: a contiguous run of one class of length L
    gives every worker floor(L/K) or ceil(L/K) of it.
    """
    S = len(labels) // K
    keep = torch.randperm(len(labels), generator=g)[: S * K]
    by_class = keep[torch.sort(labels[keep], stable=True).indices]
    return by_class.view(S, K).t()


def _random(labels: torch.Tensor, K: int, g: torch.Generator, rng: np.random.Generator, alpha: float) -> torch.Tensor:
    """A uniform random split."""
    S = len(labels) // K
    return torch.randperm(len(labels), generator=g)[: S * K].view(K, S)


def _dirichlet(
    labels: torch.Tensor, K: int, g: torch.Generator, rng: np.random.Generator, alpha: float
) -> torch.Tensor:
    """Non-IID label skew: worker k's class mix follows p_k ~ Dirichlet(alpha * 1_C).

    The usual partition (Hsu et al. 2019, "Measuring the effects of non-identical data
    distribution") splits each class across workers and yields unequal shards; here each
    shard is filled to exactly S samples by :func:`_dirichlet_counts`.
    """
    S = len(labels) // K
    num_classes = int(labels.max()) + 1
    available = torch.bincount(labels, minlength=num_classes).numpy()
    proportions = rng.dirichlet(np.full(num_classes, alpha), size=K)
    counts = _dirichlet_counts(proportions, available, S)
    rows: list[list[torch.Tensor]] = [[] for _ in range(K)]
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        for k, part in enumerate(torch.split(members[: int(counts[:, c].sum())], counts[:, c].tolist())):
            rows[k].append(part)
    return torch.stack([torch.cat(r) for r in rows])


def _dirichlet_counts(proportions: np.ndarray, available: np.ndarray, S: int) -> np.ndarray:
    """Integer counts ``[K, C]`` with row sums S and column sums <= ``available``.

    Each round every unfilled worker asks for its remaining need split by its proportions
    over the classes that still have samples (by those classes' sizes when its own
    proportions put no mass there); a class asked for more than it has is shared in
    proportion to the requests.  Each round either fills every worker or empties a class,
    so it ends within C + 1 rounds.
    """
    K, C = proportions.shape
    counts = np.zeros((K, C), dtype=np.int64)
    left = available.astype(np.int64).copy()
    while (need := S - counts.sum(1)).any():
        open_classes = left > 0
        requests = np.zeros((K, C), dtype=np.int64)
        for k in np.flatnonzero(need):
            weights = proportions[k] * open_classes
            if weights.sum() <= 0:
                weights = left.astype(np.float64)
            requests[k] = _apportion(int(need[k]), weights)
        for c in np.flatnonzero(requests.sum(0) > left):
            requests[:, c] = _apportion(int(left[c]), requests[:, c].astype(np.float64))
        counts += requests
        left -= requests.sum(0)
    return counts


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Largest-remainder rounding of ``total * weights / sum(weights)``; sums exactly to ``total``."""
    exact = total * weights / weights.sum()
    out = np.floor(exact).astype(np.int64)
    extra = np.argsort(-(exact - out), kind="stable")[: total - out.sum()]
    out[extra] += 1
    return out


SHARDINGS: dict[str, Callable[..., torch.Tensor]] = {"iid": _iid, "random": _random, "dirichlet": _dirichlet}


def make_shards(labels: torch.Tensor, K: int, strategy: str, seed: int, alpha: float = 0.5) -> torch.Tensor:
    """Disjoint equal-size shards: int64 ``[K, N // K]`` indices into ``labels`` (CPU int64 ``[N]``)."""
    shard = lookup(SHARDINGS, "sharding", strategy)
    if not 1 <= K <= len(labels):
        raise ValueError(f"K={K} workers cannot share {len(labels)} training samples")
    labels = labels.detach().cpu().long()
    g = torch.Generator().manual_seed(mix_seed(seed, 0))
    rng = np.random.default_rng(mix_seed(seed, 1))
    shards = shard(labels, K, g, rng, alpha)
    # Within a shard the order is arbitrary (iid is class-sorted): shuffle once so that
    # reading a shard front to back without epoch_order still mixes classes.
    return shards.gather(1, torch.rand(shards.shape, generator=g).argsort(1))


def mix_seed(*parts: int) -> int:
    """A 64-bit seed from several integers (numpy's SeedSequence: distinct inputs, unrelated streams)."""
    words = np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(1, dtype=np.uint64)
    return int(words[0])


def epoch_order(shards: torch.Tensor, epoch: int, seed: int) -> torch.Tensor:
    """Each worker's shard shuffled for ``epoch``: a pure function of ``(seed, epoch)``."""
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, 2))
    perm = torch.rand(shards.shape, generator=g).argsort(1)
    return shards.cpu().gather(1, perm).to(shards.device)


def steps_per_epoch(S: int, batch_size: int) -> int:
    return math.ceil(S / batch_size)


def batch_indices(order: torch.Tensor, step: int, batch_size: int) -> torch.Tensor:
    """Step ``step``'s batch for all workers, ``[K, b]``; the epoch's last batch may be shorter."""
    return order[:, step * batch_size: (step + 1) * batch_size]
