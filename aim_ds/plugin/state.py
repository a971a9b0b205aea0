"""The plugin's mutable bookkeeping on one rank, with one owner: task index, step in the task, merge count,
trajectory, work counts, the rehearsal memory and the two cursors that walk it, and the in-rehearsal flag.

AimPlugin's checkpoint (``state_dict`` / ``load_state_dict``) and a merge's undo (``snapshot`` / ``restore``)
both go through this object, so what a checkpoint records and what an undo puts back are read and written in
one place. Tensors (anchor, fuser buffers, the undo record) are not here: they live with their owners.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .memory import Cursor

WORK_KEYS = ("rehearsal_steps", "rehearsal_tokens", "probe_forwards", "probe_tokens")


def _no_work() -> dict[str, int]:
    return dict.fromkeys(WORK_KEYS, 0)


@dataclass(frozen=True)
class StateSnapshot:
    """The part of the state a merge changes, as it was before the merge (host objects only)."""

    trajectory_length: int
    last_row: dict[str, Any] | None
    rehearsal_position: int
    work: dict[str, int]
    merge_count: int


@dataclass(eq=False)
class PluginState:
    """One rank's plugin bookkeeping (see the module doc). ``work`` is one dict for the state's lifetime: the
    probe source counts into it."""

    task_index: int = -1
    step_in_task: int = 0
    merge_count: int = 0
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    work: dict[str, int] = field(default_factory=_no_work)  # the plugin's own extra work, counted where it happens
    memory: Any = None
    probe_cursor: Cursor | None = None
    rehearsal_cursor: Cursor | None = None
    in_rehearsal: bool = False  # a merge's rehearsal steps are running (the step hook stays out)

    # ------------------------------------------------------------------ the memory
    def set_memory(self, memory) -> None:
        """A new rehearsal memory; both cursors start at its beginning."""
        self.memory = memory
        self.probe_cursor = Cursor(memory)
        self.rehearsal_cursor = Cursor(memory)

    def next_probe_batch(self) -> dict:
        return self.probe_cursor.next()

    def next_rehearsal_batch(self) -> dict:
        return self.rehearsal_cursor.next()

    @property
    def probe_position(self) -> int:
        return self.probe_cursor.position if self.probe_cursor else 0

    @property
    def rehearsal_position(self) -> int:
        return self.rehearsal_cursor.position if self.rehearsal_cursor else 0

    # ------------------------------------------------------------------ the checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The counters and trajectory, under the keys checkpoints have always used (rows are shared, the lists
        and the work counts copied)."""
        return {
            "task_index": self.task_index,
            "step_in_task": self.step_in_task,
            "merge_count": self.merge_count,
            "trajectory": list(self.trajectory),
            "work": dict(self.work),
        }

    def positions(self) -> dict[str, int]:
        """The cursors' positions in the memory, under the keys checkpoints have always used."""
        return {"probe_position": self.probe_position, "rehearsal_position": self.rehearsal_position}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.task_index, self.step_in_task = sd["task_index"], sd["step_in_task"]
        self.merge_count, self.trajectory = sd["merge_count"], list(sd["trajectory"])
        self.work.update(sd.get("work", {}))  # absent in checkpoints of aim_ds <= 0.1 (counts restart at 0)

    def load_positions(self, sd: dict[str, Any]) -> None:
        """The cursors at the saved positions (nothing without a memory: set_memory comes first on resume)."""
        if self.memory is not None:
            self.probe_cursor = Cursor(self.memory, sd["probe_position"])
            self.rehearsal_cursor = Cursor(self.memory, sd["rehearsal_position"])

    # ------------------------------------------------------------------ a merge's undo
    def snapshot(self) -> StateSnapshot:
        """What a merge may change: the trajectory's length and last row, the rehearsal position, the work
        counts and the merge count."""
        return StateSnapshot(
            trajectory_length=len(self.trajectory),
            last_row=dict(self.trajectory[-1]) if self.trajectory else None,
            rehearsal_position=self.rehearsal_position,
            work=dict(self.work),
            merge_count=self.merge_count,
        )

    def restore(self, s: StateSnapshot) -> None:
        """Back to a snapshot, exactly (rows the merge added are dropped, the row it marked is put back)."""
        del self.trajectory[s.trajectory_length :]
        if s.last_row is not None:
            self.trajectory[-1] = s.last_row
        if self.rehearsal_cursor is not None and self.rehearsal_cursor.position != s.rehearsal_position:
            self.rehearsal_cursor = Cursor(self.memory, s.rehearsal_position)
        self.work.clear()
        self.work.update(s.work)
        self.merge_count = s.merge_count


__all__ = ["PluginState", "StateSnapshot", "WORK_KEYS"]
