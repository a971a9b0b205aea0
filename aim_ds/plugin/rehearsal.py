"""Rehearsal: R ordinary optimizer steps on memory batches through the training engine (theta_k -> theta_M)."""

from __future__ import annotations

import math
from collections.abc import Callable

from ..shards import accumulation_boundary


def rehearse(
    engine,
    steps: int,
    next_batch: Callable[[], dict],
    optimizer_step: Callable[[], None],
    agree: Callable[[str | None], None],
    fatal: Callable[[BaseException, str], BaseException],
    pipe=None,
) -> list[float]:
    """Run `steps` optimizer steps (gradient accumulation respected) and return their mean losses.

    The LR schedule is frozen for the duration (DeepSpeed steps engine.lr_scheduler inside engine.step) and
    the optimizer's learning rates are restored after. Before each step every rank `agree`s that its batches
    are ready and its previous loss was finite, so a rank's failure there stops every rank alike; a failure
    inside a step's collectives cannot be agreed on and is re-raised through `fatal`.
    `optimizer_step` is the engine's own step (the plugin's hook wraps engine.step). Under a pipeline engine
    `pipe` (aim_ds.shards.pipe.PipeSteps) runs each step as one train_batch over the step's micro-batches.
    """
    scheduler = engine.lr_scheduler
    lrs = [g["lr"] for g in engine.optimizer.param_groups]
    losses: list[float] = []
    engine.lr_scheduler = None
    # Accelerate (HF Trainer) sets the accumulation boundary by hand and DeepSpeed keeps it until set again:
    # left as it is, every rehearsal micro-batch would be an optimizer step
    boundary = accumulation_boundary(engine)
    gas = engine.gradient_accumulation_steps()
    try:
        for i in range(steps + 1):
            error = None
            if losses and not math.isfinite(losses[-1]):
                error = f"rehearsal step {i} gave a non-finite loss ({losses[-1]})"
            elif i < steps:
                try:
                    batches = [next_batch() for _ in range(gas)]
                except Exception as e:
                    error = f"preparing rehearsal step {i + 1}'s batch failed: {type(e).__name__}: {e}"
            agree(error)
            if i == steps:
                break
            try:
                if pipe is not None:
                    losses.append(pipe.step(batches))
                    continue
                total = 0.0
                for micro, batch in enumerate(batches):
                    if boundary is not None:
                        engine.set_gradient_accumulation_boundary(micro == gas - 1)
                    loss = engine(**batch).loss
                    engine.backward(loss)
                    optimizer_step()
                    total += float(loss.detach())
            except Exception as e:
                raise fatal(e, f"rehearsal step {i + 1}") from e
            losses.append(total / len(batches))
    finally:
        if boundary is not None:
            engine.set_gradient_accumulation_boundary(boundary)
        engine.lr_scheduler = scheduler
        for g, lr in zip(engine.optimizer.param_groups, lrs):
            g["lr"] = lr
    return losses
