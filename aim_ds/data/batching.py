"""The order of examples and memory rows: pure functions of the seed and the global position, shared by the driver
and aim_ds.hf (front ends import no front end).

The data order is decided per GLOBAL batch (a seeded shuffle per epoch, cut into global batches) and each
rank takes its slice, so the examples of global step s do not depend on how many ranks share them: a run
resumed on another number of ranks with the same global batch trains on the same examples per step.
"""

from __future__ import annotations

import functools
import math
import random


def rank_batches(examples: list, n_steps: int, per_rank: int, rank: int, world: int, seed: int) -> list[list]:
    """n_steps batches of per_rank examples for this rank: a seeded shuffle per epoch, ranks take disjoint
    slices of each global batch, and the data wraps around (every rank gets the same number of batches)."""
    if not examples:
        return [[] for _ in range(n_steps)]
    glob = per_rank * world
    return [
        [examples[i] for i in seeded_stream(len(examples), s * glob + rank * per_rank, per_rank, seed)]
        for s in range(n_steps)
    ]


@functools.lru_cache(maxsize=8)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    idx = list(range(n))
    random.Random(seed * 1000003 + epoch).shuffle(idx)
    return tuple(idx)


def seeded_stream(n: int, start: int, count: int, seed: int) -> list[int]:
    """Positions start .. start + count - 1 of the endless stream over n items that takes a fresh seeded
    shuffle per pass: a pure function of (n, position, seed), so any batch of it can be drawn again (resume)."""
    return [_epoch_order(n, seed, p // n)[p % n] for p in range(start, start + count)]


def memory_batches(mem: list, per_rank: int, rank: int, world: int, seed: int) -> list[list]:
    """The memory cut into global batches (at least one), this rank's slice of each."""
    if not mem:
        return []
    n = max(1, math.ceil(len(mem) / (per_rank * world)))
    return rank_batches(mem, n, per_rank, rank, world, seed)


__all__ = ["memory_batches", "rank_batches", "seeded_stream"]
