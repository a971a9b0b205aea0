"""The replay collator of AimMergingCallback.replay_collator(): a training batch's new-task rows followed by the
callback's memory rows, collated together; an evaluation batch (a Trainer's evaluate/predict frame on the call
stack, see aim_ds.hf's docstring) gets none and leaves the replay position where training left it."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING

from transformers import Trainer

if TYPE_CHECKING:
    from .callback import AimMergingCallback

# the Trainer methods that iterate an evaluation dataloader or run an evaluation forward (see aim_ds.hf's docstring)
EVAL_METHODS = frozenset({"evaluate", "predict", "evaluation_loop", "prediction_loop", "prediction_step"})


class ReplayCollator:
    """New-task rows followed by the callback's replay rows, collated together (padding applies to both)."""

    def __init__(self, callback: AimMergingCallback, collator, next_rows: Callable[[], list]):
        # next_rows: the callback's draw of this batch's memory rows (a subclass's override included)
        self.callback, self.collator, self.next_rows = callback, collator, next_rows

    def __call__(self, features):
        if self.callback.trainer_args is None or in_evaluation():
            # an evaluation batch, or one before any train(): the rows alone, the replay position untouched
            return self.collator(features)
        return self.collator(list(features) + self.next_rows())


def in_evaluation() -> bool:
    """Whether a Trainer's evaluation or prediction (EVAL_METHODS) is on the call stack: its dataloader is
    iterated there, and a training loop that evaluates mid-task (eval_strategy "steps") holds it only then."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code.co_name in EVAL_METHODS and isinstance(frame.f_locals.get("self"), Trainer):
                return True
            frame = frame.f_back
        return False
    finally:
        del frame
