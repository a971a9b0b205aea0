"""The driver's learning-rate schedule and encodings. The order of examples and memory rows (rank slices of
global batches, memory batches, the seeded stream) is in aim_ds.data.batching, shared with aim_ds.hf; its names
stay importable from here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ..data.batching import memory_batches, rank_batches, seeded_stream

__all__ = ["BatchSizes", "EncodingCache", "lr_at", "memory_batches", "rank_batches", "seeded_stream"]


class BatchSizes(NamedTuple):
    """Per-rank batch sizes and the ds_config the engines get (per-rank micro batch, no scheduler)."""

    micro: int
    mem_bs: int
    replay_rows: int
    ds_run: dict

    @property
    def client_opt(self) -> bool:
        """The ds_config has no optimizer: the driver builds torch AdamW."""
        return "optimizer" not in self.ds_run


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
