"""The engine hook every method shares: `engine.step` wrapped, as an instance attribute, so that the method's own
work runs after each optimizer step the engine applies. The user's loop and DeepSpeed's class are unchanged."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import AimInputError
from ..shards.pipe import is_pipeline


class StepHook:
    """After each applied optimizer step (engine.step at an accumulation boundary, or a pipeline's train_batch),
    outside the method's own rehearsal or replay steps, which `state.in_rehearsal` marks, call `on_step(lr)`, lr
    being the step's learning rate; after a skipped (overflowed) one call `on_skipped()`. `original` is the
    engine's own step (or train_batch)."""

    def __init__(
        self,
        engine,
        state,
        on_step: Callable[[float], None],
        on_skipped: Callable[[], None],
    ):
        self.engine = engine
        self._deferred = False  # defer(): engine.step only marks the step, run_deferred() runs it
        self._pending: float | None = None  # the lr of a step engine.step() marked, until it is run
        self._on_step = on_step
        # A pipeline engine steps inside train_batch (its step() raises): that is the call to wrap, and every
        # train_batch ends at an accumulation boundary
        self.name = "train_batch" if is_pipeline(engine) else "step"
        self.original = getattr(engine, self.name)
        hook, original, pipeline = self, self.original, self.name == "train_batch"

        def step(*args, **kwargs):
            boundary = (pipeline or engine.is_gradient_accumulation_boundary()) and not state.in_rehearsal
            lr = step_lr(engine) if boundary else None  # before the step moves a DeepSpeed-managed schedule
            out = original(*args, **kwargs)
            if boundary:
                if engine.was_step_applied() and hook._deferred:
                    hook._pending = lr
                elif engine.was_step_applied():
                    on_step(lr)
                else:
                    on_skipped()
            return out

        setattr(engine, self.name, step)

    def defer(self) -> None:
        """From now on engine.step() only marks an applied step; run_deferred() runs the method's work for it."""
        self._deferred = True

    def run_deferred(self) -> None:
        """The method's work for the step engine.step() marked last (nothing if none is pending)."""
        if self._pending is not None:
            lr, self._pending = self._pending, None
            self._on_step(lr)

    def remove(self) -> None:
        """The engine's own step again."""
        if self.engine.__dict__.get(self.name) is not None:
            del self.engine.__dict__[self.name]


def step_lr(engine) -> float:
    """The learning rate of the optimizer step about to run, as a float, on every rank. Read before
    engine.step(), which steps a DeepSpeed-managed scheduler after the update; torch.optim accepts a Tensor lr.
    Checked here, on every rank alike, so that rank 0's controller never refuses it alone."""
    lr = engine.optimizer.param_groups[0]["lr"]
    value = float(lr.item()) if torch.is_tensor(lr) else lr
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise AimInputError(
            f"aim_merging: the optimizer's learning rate is {lr!r}; the plugin needs a finite number >= 0 "
            "(a float or a one-element tensor) in param_groups[0]['lr']."
        )
    return float(value)
