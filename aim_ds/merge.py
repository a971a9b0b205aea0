"""One merge, as a transaction on every rank, in explicit phases:

    plan      learning signal sum |theta - anchor| (all-reduce); rank 0's controller plans S, R and the
              weights; the MergePlan is broadcast (32 bytes)
    record    the undo record: theta_k, optimizer state, counters (host memory or an NVMe file, this merge
              only; with "undo": "off" none: the fuser keeps theta_k's part without a copy, no transaction)
    rehearse  R optimizer steps on memory batches, LR schedule frozen (4 B agreement per step)
    fuse      the fuser's collectives (importance quantiles), then this rank's fusion into the masters
    agree     every rank reports its own failure (4 B); any failure -> undo everywhere
    commit    anchor <- theta, refresh the working copies          (or undo: everything back, bit-exactly)

Failures found in a rank's own work (the undo record, a rehearsal batch, a non-finite rehearsal loss, the
fusion math) are agreed on at the next sync point, which every rank reaches: every rank then restores what
the merge changed (see aim_ds/journal.py) and the merge returns {"merged": False}. A failure inside a
collective of a rehearsal step (DeepSpeed's gathers in forward/backward/step: its peers are blocked in that
collective, so no agreement is possible) is published in the process group's store and re-raised; the
peers' collective then fails and they raise naming the failing rank (journal.fatal_error).

The merge reads and writes the plugin state a merge changes (controller, trajectory, work counts, the
rehearsal cursor, the merge count): exactly what an undo puts back.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch

from . import collectives, fusion, rehearsal
from .journal import MergeAborted, MergeJournal, fatal_error, local_error
from .memory import _Cursor
from .shards import restore_step_report, step_report_snapshot
from .trajectory import TrajectoryRow


@dataclass(frozen=True)
class MergePlan:
    """What every rank does in one merge; decided on rank 0, broadcast as four float64s."""

    interval: int  # the new S (-1: skip the merge)
    rehearsal_steps: int  # R
    w_in: float
    w_out: float

    SKIP = -1
    FAILED = -2  # rank 0's controller raised: every rank raises its message

    @property
    def skip(self) -> bool:
        return self.interval < 0

    @property
    def failed(self) -> bool:
        return self.interval == self.FAILED

    def to_tensor(self) -> torch.Tensor:
        values = [self.interval, self.rehearsal_steps, self.w_in, self.w_out]
        return torch.tensor(values, dtype=torch.float64, device=collectives.comm_device())

    @classmethod
    def broadcast(cls, plan: MergePlan | None) -> MergePlan:
        """Rank 0's plan on every rank (other ranks pass None)."""
        t = (
            plan.to_tensor()
            if plan is not None
            else torch.zeros(4, dtype=torch.float64, device=collectives.comm_device())
        )
        collectives.broadcast(t, src=0)
        interval, r, w_in, w_out = t.tolist()
        return cls(int(interval), int(r), w_in, w_out)


class Merge:
    """One merge on this rank: run() goes through the phases and returns the merge's record."""

    def __init__(self, plugin, weights=None, rehearsal_steps=None, explicit: bool = False):
        self.plugin = plugin
        self.weights, self.rehearsal_steps, self.explicit = weights, rehearsal_steps, explicit
        self.journal: MergeJournal | None = None
        self.theta_k: list | None = None
        self.transactional = plugin.config.undo != "off"
        self.where = f"task {plugin.task_index} step {plugin._step_in_task}"

    def run(self) -> dict:
        t0 = time.perf_counter()
        p = self.plugin
        total = self.learning_signal()
        before = self._bookkeeping()
        mine, error = self.plan_on_rank0(total) if p.controller is not None else (None, None)
        plan = MergePlan.broadcast(mine)
        if plan.failed:
            collectives.agree(error, exc_type=RuntimeError)
        if plan.skip:
            return {"merged": False, "reason": "non-finite learning signal"}
        element_wise = p.fuser.element_wise(explicit_weights=self.weights is not None)
        try:
            _sync()
            t_prep0 = time.perf_counter()
            self.record(plan, element_wise)
            _sync()
            t_prep = time.perf_counter() - t_prep0
            rehearsal_losses = self.rehearse(plan.rehearsal_steps)
            _sync()
            t1 = time.perf_counter()
            self.fuse(plan, element_wise)
        except MergeAborted as e:
            return self.undo(e, before)
        self.commit()
        _sync()
        t_fuse = time.perf_counter() - t1 + t_prep
        p.shards.refresh_working_copies()
        p.merge_count += 1
        passes = p.fuser.passes(element_wise)
        return {
            "merged": True,
            "task": p.task_index,
            "step": p._step_in_task,
            "rehearsal_steps": plan.rehearsal_steps,
            "w_in": plan.w_in,
            "w_out": plan.w_out,
            "interval": plan.interval,
            "learning_signal": total,
            "rehearsal_losses": rehearsal_losses,
            "fusion_seconds": t_fuse,
            "fusion_passes": passes,
            "fusion_bytes": p.shards.local_numel * 4 * passes,
            "undo_host_bytes": self.journal.host_bytes if self.journal is not None else 0,
            "undo_disk_bytes": self.journal.disk_bytes if self.journal is not None else 0,
            "seconds": time.perf_counter() - t0,
        }

    # ------------------------------------------------------------------ phases
    def learning_signal(self) -> float:
        """sum |theta - anchor| over every rank's valid elements (one all-reduce)."""
        p = self.plugin
        local = sum(fusion.abs_change_sum(g.master, a, g.ranges) for g, a in zip(p.shards.groups, p.anchor))
        return collectives.sum_over_ranks(local)[0]

    def plan_on_rank0(self, total: float) -> tuple[MergePlan, str | None]:
        """The plan, or FAILED and the message: rank 0 must not raise alone before the broadcast."""
        try:
            return self.plan(total), None
        except Exception as e:
            msg = f"aim_merging: planning the merge at {self.where} failed on rank 0: {type(e).__name__}: {e}"
            return MergePlan(MergePlan.FAILED, 0, 0.0, 0.0), msg

    def plan(self, total: float) -> MergePlan:
        """Rank 0: the controller's plan, with the caller's overrides, marked in the trajectory."""
        p = self.plugin
        if not math.isfinite(total):
            warnings.warn(
                f"aim_merging: non-finite learning signal at {self.where}: the weights hold NaN/inf; merge skipped.",
                RuntimeWarning,
                stacklevel=3,
            )
            return MergePlan(MergePlan.SKIP, 0, 0.0, 0.0)  # never fuse non-finite weights
        c, numel = p.controller, p._global_valid_numel
        # an explicit merge while the controller is inactive (first task): no interval update
        cp = c.on_merge(total, numel) if (c.active or not self.explicit) else c.plan_inactive(total, numel)
        w_in, w_out = self.weights if self.weights is not None else (cp.w_in, cp.w_out)
        r = self.rehearsal_steps if self.rehearsal_steps is not None else cp.rehearsal_steps
        self._mark(cp, w_in, w_out, r, total)
        return MergePlan(cp.interval, r, w_in, w_out)

    def record(self, plan: MergePlan, element_wise: bool) -> None:
        """The undo record; a rank that cannot make it (e.g. out of host memory) aborts the merge everywhere."""
        p, error = self.plugin, None
        self.report = step_report_snapshot(p.engine)  # rehearsal's steps overwrite it, undo record or not
        try:
            if self.transactional:
                self.journal = MergeJournal(p.shards, p.engine, p.config.undo, p.config.undo_path)
                self.theta_k = self.journal.theta_k
            else:
                self.theta_k = p.fuser.keep_theta_k(p.anchor, plan.w_in, plan.w_out, element_wise)
        except Exception as e:
            error = f"recording the merge's undo state failed: {type(e).__name__}: {e}"
        agree(error)

    def rehearse(self, steps: int) -> list[float]:
        """R optimizer steps on memory batches through the engine's own step (theta_k -> theta_M)."""
        p = self.plugin
        p._in_rehearsal = True  # the plugin's hook stays out; a fuser's gradient hook files under rehearsal
        try:
            losses = rehearsal.rehearse(p.engine, steps, p._rehearsal_batch, p._original_step, agree, self.fatal)
        finally:
            p._in_rehearsal = False
        p.work["rehearsal_steps"] += len(losses)
        return losses

    def fuse(self, plan: MergePlan, element_wise: bool) -> None:
        p = self.plugin
        prepared = p.fuser.prepare(element_wise, agree)
        theta_k = self.theta_k
        error = local_error(
            lambda: p.fuser.fuse(p.anchor, theta_k, plan.w_in, plan.w_out, element_wise, prepared), "fusion"
        )
        agree(error)

    def commit(self) -> None:
        """The fused masters become the anchor."""
        p = self.plugin
        restore_step_report(self.report)
        for g, a in zip(p.shards.groups, p.anchor):
            fusion.copy_into(a, g.master)
        p.fuser.commit(self.theta_k)

    def undo(self, e: MergeAborted, before: dict) -> dict:
        p = self.plugin
        if not self.transactional:
            raise RuntimeError(
                f"aim_merging: the merge at {self.where} failed ({e}) and cannot be undone: "
                '"undo": "off" keeps no undo record, and the anchor, weights and optimizer state are '
                "half-updated. Every rank stops; restart from the last checkpoint."
            ) from None
        if self.journal is not None:  # None where this rank's own record failed: nothing changed here yet
            self.journal.restore()
        self._restore_bookkeeping(before)
        p.fuser.undo()
        p.shards.refresh_working_copies()  # a collective: every rank is on this path
        if p.controller is not None and not self.explicit:  # the retry budget (merge_retries)
            p.controller.merge_undone()
            p.trajectory[-1]["undone"] = 1
        if p.rank == 0:
            warnings.warn(
                f"aim_merging: the merge at {self.where} failed "
                f"and was undone on every rank (weights, optimizer state, anchor, controller and "
                f"trajectory are exactly as before it): {e}",
                RuntimeWarning,
                stacklevel=3,
            )
        return {"merged": False, "reason": str(e), "task": p.task_index, "step": p._step_in_task}

    def fatal(self, e: BaseException, where: str) -> RuntimeError:
        return fatal_error(e, self.plugin.rank, f"the merge at {self.where} ({where})")

    # ------------------------------------------------------------------ the plugin state a merge changes
    def _bookkeeping(self) -> dict:
        """The plugin-side state a merge changes (host objects only; tensors are in the journal)."""
        p = self.plugin
        return {
            "controller": p.controller.state_dict() if p.controller is not None else None,
            "trajectory": (len(p.trajectory), dict(p.trajectory[-1]) if p.trajectory else None),
            "rehearsal_position": p._rehearsal_cursor.position if p._rehearsal_cursor else 0,
            "work": dict(p.work),
            "merge_count": p.merge_count,
        }

    def _restore_bookkeeping(self, s: dict) -> None:
        p = self.plugin
        if p.controller is not None:
            p.controller.load_state_dict(s["controller"])
        n, last = s["trajectory"]
        del p.trajectory[n:]
        if last is not None:
            p.trajectory[-1] = last
        if p._rehearsal_cursor is not None and p._rehearsal_cursor.position != s["rehearsal_position"]:
            p._rehearsal_cursor = _Cursor(p._memory, s["rehearsal_position"])
        p.work.clear()
        p.work.update(s["work"])
        p.merge_count = s["merge_count"]

    def _mark(self, cp, w_in, w_out, r, total) -> None:
        p = self.plugin
        if p.trajectory and not self.explicit and p.trajectory[-1]["task"] == p.task_index:
            row = p.trajectory[-1]
        else:  # an explicit merge gets its own row
            row = TrajectoryRow(p.task_index, p._step_in_task, explicit=1).as_dict()
            p.trajectory.append(row)
        row.update(
            {
                "merge": 1,
                "learning_signal": cp.learning_signal,
                "w_in": w_in,
                "w_out": w_out,
                "interval": cp.interval,
                "rehearsal_steps": r,
                "abs_change_sum": total,
                "numel": p._global_valid_numel,
            }
        )


def agree(error: str | None) -> None:
    """Every rank passes its own failure (or None); any failure aborts the merge on every rank."""
    collectives.agree(error, exc_type=MergeAborted)


def _sync() -> None:
    """Wait for queued device work so the fusion timers measure the work, not its launch."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().synchronize()


__all__ = ["Merge", "MergePlan", "agree"]
