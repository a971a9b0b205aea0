"""Batches, learning rate and encodings for the driver: pure functions of the seed and the global position.

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


def lr_at(step: int, total: int, peak: float, warmup_frac: float) -> float:
    """Per-task schedule: linear warm-up over warmup_frac of the task's steps, then cosine decay to 0."""
    warm = max(1, int(round(warmup_frac * total))) if warmup_frac > 0 else 0
    if step < warm:
        return peak * (step + 1) / warm
    prog = (step - warm) / max(1, total - warm)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, prog)))


class EncodingCache:
    """Tokenizes each example once per run (memory rows recur in every mixed batch) and collates batches.

    Keyed by identity, with the example kept beside its encoding so that a recycled id() can never return
    another example's tokens. keeps_logits: the model's forward takes logits_to_keep, so batches carry it."""

    def __init__(self, tokenizer, max_len: int, keeps_logits: bool = False):
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.keeps_logits = keeps_logits
        self._cache: dict[int, tuple] = {}

    def collate(self, examples) -> dict:
        import torch

        from aim_ds.data import collate
        from aim_ds.data.dataset import encode_example

        items = []
        for ex in examples:
            hit = self._cache.get(id(ex))
            if hit is None or hit[0] is not ex:
                ids, labels = encode_example(self.tokenizer, ex, self.max_len)
                hit = self._cache[id(ex)] = (
                    ex,
                    {
                        "input_ids": torch.tensor(ids, dtype=torch.long),
                        "labels": torch.tensor(labels, dtype=torch.long),
                    },
                )
            items.append(hit[1])
        return collate(items, self.tokenizer.pad_token_id, label_logits_only=self.keeps_logits)
