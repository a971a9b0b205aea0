"""One trajectory row: what the plugin records per training step (and per explicit merge).

The row type is the single definition of the trajectory's layout: the plugin builds rows with it,
``trajectory.csv`` has its fields as columns, the plots and ``aim-ds replay`` read them back.
A merge row also carries the raw learning-signal inputs (sum |theta - anchor| over all ranks and the
element count), so the controller can be re-run offline on exactly the values it saw.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, fields


@dataclass
class TrajectoryRow:
    task: int
    step: int  # training step in the task (rehearsal steps are not counted)
    probe_loss: float | None = None  # the forgetting signal the controller saw (None: not probed / skipped)
    threshold: float | None = None
    activations: int | None = None
    interval: int | None = None  # S in force at this step; on a merge row, the new S
    learning_signal: float | None = None
    merge: int = 0  # 1 when a merge committed at this step
    w_in: float | None = None
    w_out: float | None = None
    rehearsal_steps: int | None = None
    abs_change_sum: float | None = None  # sum |theta - anchor| over every rank's valid elements
    numel: int | None = None  # trainable elements behind abs_change_sum
    explicit: int = 0  # 1: plugin.merge() called by the user (its own row), not the controller
    lr: float | None = None  # the learning rate of this training step
    forgetting_signal: float | None = None  # what met the threshold: the probe loss's EMA (None: the raw loss)
    undone: int = 0  # 1: the merge this step asked for failed and was undone on every rank

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of_step(cls, task: int, d, loss: float | None, ema: bool) -> TrajectoryRow:
        """The row of one controller step (a StepDecision `d`), as the plugin records it and replay rebuilds it."""
        return cls(task, d.step, loss, d.threshold, d.activations, d.interval, lr=d.lr,
                   forgetting_signal=d.signal if ema else None)  # fmt: skip


FIELDS: list[str] = [f.name for f in fields(TrajectoryRow)]
_INTS = {f.name for f in fields(TrajectoryRow) if "int" in str(f.type) and "float" not in str(f.type)}


def read_csv(path: str) -> list[dict]:
    """Rows of a trajectory.csv as dicts: numbers as float (int for integer fields), empty cells None.
    Columns a run did not record (older files) are None. Floats were written with repr, so they read
    back bit-exactly."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))

    def num(k, v):
        if v in ("", None):
            return None
        try:
            x = float(v)
        except ValueError:
            return None
        return int(x) if k in _INTS else x

    return [{k: num(k, r.get(k)) for k in dict.fromkeys(FIELDS + list(r))} for r in rows]


__all__ = ["FIELDS", "TrajectoryRow", "read_csv"]
