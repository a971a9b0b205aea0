"""Probe sources: where the forgetting signal (the loss of the rehearsal memory) comes from after a training
step. One class per ``probe_source`` name, chosen from ``PROBE_SOURCES``; a new source is one class here.

- :class:`MemoryForwardProbe` ("memory_forward"): the plugin's own forward on one memory batch per rank,
  model in eval mode, no grad; every ``probe_interval``-th step.
- :class:`TrainingBatchProbe` ("training_batch"): the loss of the memory rows already in the step's
  training batch, handed over by the caller (``AimPlugin.record_probe_loss``); every step, no forward.

Both reduce over data parallel (tensor-parallel ranks share their data-parallel rank's batch) and return
the token-weighted mean, or None when the step has no signal.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import ClassVar, Protocol

import torch

from ..errors import local_error
from ..ops import collectives
from ..ops.collectives import fatal_error
from ..ops.losses import batch_tokens
from .memory import to_device


class ProbeSource(Protocol):
    """Where the forgetting signal comes from; built as cls(config, engine, shards, work, pipe=None) (work: the
    plugin's work counts, which a probe's own forwards add to; pipe: a pipeline engine's own forwards)."""

    name: ClassVar[str]
    records_loss: ClassVar[bool]  # the caller hands over the memory rows' loss (AimPlugin.record_probe_loss)

    def due(self, scheduled: bool, has_memory: bool) -> bool: ...

    def read(self, next_batch: Callable[[], dict], task: int, step: int) -> float | None: ...

    def discard(self) -> None: ...


class MemoryForwardProbe:
    """The mean memory loss over ranks from a forward of the plugin's own (model in eval mode: no dropout)."""

    name = "memory_forward"
    records_loss = False  # the caller hands over no loss

    def __init__(self, config, engine, shards, work: dict, pipe=None):
        self.config, self.engine, self.shards, self.work = config, engine, shards, work
        self.pipe = pipe  # under a pipeline engine the forward is its eval_batch (aim_ds.shards.pipe.PipeSteps)

    def due(self, scheduled: bool, has_memory: bool) -> bool:
        return scheduled and has_memory

    def discard(self) -> None:
        """Nothing is held between steps."""

    @torch.no_grad()
    def read(self, next_batch: Callable[[], dict], task: int, step: int) -> float:
        """A rank that cannot read its batch stops every rank alike (agreed before the forward's collectives);
        a failure in the forward or the all-reduce, where the peers wait in a collective, stops every rank
        naming it (collectives.fatal_error)."""
        what = f"the probe at task {task} step {step}"
        got = {}

        def read_batch():
            batch = next_batch()
            n = self.config.probe_batch_size
            if n:
                batch = {k: (v[:n] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in batch.items()}
            got["batch"], got["on_device"] = batch, to_device(batch, self.engine.device)

        collectives.agree(local_error(read_batch, f"aim_merging: {what}: reading its memory batch"))
        module = self.engine.module
        was_training = module.training
        module.eval()
        try:
            if self.pipe is not None:
                local = self.pipe.loss(got["on_device"])
            else:
                local = float(self.engine(**got["on_device"]).loss.detach())
            mean = collectives.mean_over_ranks(local, 1.0, group=self.shards.dp_group)
        except Exception as e:
            raise fatal_error(e, self.shards.rank, what) from e
        finally:
            module.train(was_training)
        self.work["probe_forwards"] += 1
        self.work["probe_tokens"] += batch_tokens(got["batch"])
        return mean


class TrainingBatchProbe:
    """The recorded memory-row loss of this step's training batch, token-weighted over ranks."""

    name = "training_batch"
    records_loss = True  # the caller hands over the memory rows' loss (record_probe_loss)

    def __init__(self, config, engine, shards, work: dict, pipe=None):
        self.shards = shards
        self.recorded: tuple[float, float] | None = None
        self._warned_task = -1  # the task for which a missing record was reported

    def record(self, loss_sum: float, count: float) -> None:
        prev = self.recorded or (0.0, 0.0)
        self.recorded = (prev[0] + loss_sum, prev[1] + count)  # gradient accumulation: micro-steps add up

    def due(self, scheduled: bool, has_memory: bool) -> bool:
        if not scheduled:
            self.recorded = None
        return scheduled

    def discard(self) -> None:
        self.recorded = None

    def read(self, next_batch, task: int, step: int) -> float | None:
        s, c = self.recorded or (0.0, 0.0)
        self.recorded = None
        total, count = collectives.sum_over_ranks(s, c, group=self.shards.dp_group)
        if count > 0:
            return total / count
        if self.shards.rank == 0 and self._warned_task != task:
            self._warned_task = task
            warnings.warn(
                f'aim_merging: probe_source is "training_batch" but no rank recorded a memory loss '
                f"at task {task} step {step}: the forgetting signal is empty, "
                "so only forced activations trigger merges. Mix memory rows into the training batches "
                "and call plugin.record_probe_loss(*aim_ds.rows_loss(...)) before engine.step(), or use "
                'probe_source "memory_forward". (Reported once per task.)',
                RuntimeWarning,
                stacklevel=3,
            )
        return None


# probe_source name -> class; aim_ds.config.PROBE_SOURCE_NAMES lists the same names (tests/test_config.py)
PROBE_SOURCES: dict[str, type[ProbeSource]] = {cls.name: cls for cls in (MemoryForwardProbe, TrainingBatchProbe)}


def probe_source(config) -> type[ProbeSource]:
    """The probe source class a config names (a front end asks it whether to hand over the memory rows' loss)."""
    return PROBE_SOURCES[config.probe_source]


__all__ = ["MemoryForwardProbe", "ProbeSource", "TrainingBatchProbe", "PROBE_SOURCES", "probe_source"]
