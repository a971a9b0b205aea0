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
the merge changed (see aim_ds/plugin/journal.py) and the merge returns {"merged": False}. A failure inside a
collective of a rehearsal step (DeepSpeed's gathers in forward/backward/step: its peers are blocked in that
collective, so no agreement is possible) is published in the process group's store and re-raised; the
peers' collective then fails and they raise naming the failing rank (collectives.fatal_error).

A merge is built from an explicit context (MergeContext: the plugin's state, shards, anchor, fuser, controller,
config, the engine and its own step, the rehearsal batch source); it changes the state only through it, and an
undo puts the state back from its snapshot (aim_ds.plugin.state.PluginState.snapshot / restore).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..config import AimConfig
from ..control.controller import MergeController
from ..control.trajectory import TrajectoryRow
from ..errors import MergeAborted, local_error
from ..ops import collectives, fusion
from ..ops.collectives import fatal_error
from ..shards import ZeroShards, restore_step_report, step_report_snapshot
from . import rehearsal
from .fusers import Fuser
from .journal import MergeJournal
from .plan import MergePlan
from .state import PluginState


@dataclass(frozen=True)
class MergeContext:
    """What a merge works on, handed over by the plugin."""

    state: PluginState
    shards: ZeroShards
    anchor: list[torch.Tensor]
    fuser: Fuser
    controller: MergeController | None  # rank 0 only
    config: AimConfig
    engine: Any
    optimizer_step: Callable[[], Any]  # the engine's own step (the plugin's hook wraps engine.step)
    pipe: Any  # a pipeline engine's own steps and forwards (aim_ds.shards.pipe.PipeSteps), else None
    rehearsal_batch: Callable[[], dict]  # the next rehearsal batch, on the device
    global_valid_numel: int  # valid master elements over all ranks (the learning signal's denominator)


class Merge:
    """One merge on this rank: run() goes through the phases and returns the merge's record."""

    def __init__(self, ctx: MergeContext, weights=None, rehearsal_steps=None, explicit: bool = False):
        self.ctx = ctx
        self.weights, self.rehearsal_steps, self.explicit = weights, rehearsal_steps, explicit
        self.journal: MergeJournal | None = None
        self.theta_k: list | None = None
        self.transactional = ctx.config.undo != "off"
        self.where = f"task {ctx.state.task_index} step {ctx.state.step_in_task}"

    def run(self) -> dict:
        t0 = time.perf_counter()
        c = self.ctx
        total = self.learning_signal()
        before = c.state.snapshot(), (c.controller.state_dict() if c.controller is not None else None)
        mine, error = self.plan_on_rank0(total) if c.controller is not None else (None, None)
        plan = MergePlan.broadcast(mine)
        if plan.failed:
            collectives.agree(error, exc_type=RuntimeError)
        if plan.skip:
            return {"merged": False, "reason": "non-finite learning signal"}
        plan = plan.with_fusion(c.fuser.element_wise(explicit_weights=self.weights is not None))
        try:
            _sync()
            t_prep0 = time.perf_counter()
            self.record(plan)
            _sync()
            t_prep = time.perf_counter() - t_prep0
            rehearsal_losses = self.rehearse(plan.rehearsal_steps)
            _sync()
            t1 = time.perf_counter()
            self.fuse(plan)
        except MergeAborted as e:
            return self.undo(e, *before)
        self.commit()
        _sync()
        t_fuse = time.perf_counter() - t1 + t_prep
        c.shards.refresh_working_copies()
        c.state.merge_count += 1
        return self.report(plan, total, rehearsal_losses, t_fuse, time.perf_counter() - t0)

    def report(self, plan: MergePlan, total: float, rehearsal_losses: list[float], t_fuse: float, t: float) -> dict:
        """The record of a committed merge."""
        c = self.ctx
        passes = c.fuser.passes(plan)
        return {
            "merged": True,
            "task": c.state.task_index,
            "step": c.state.step_in_task,
            "rehearsal_steps": plan.rehearsal_steps,
            "w_in": plan.w_in,
            "w_out": plan.w_out,
            "interval": plan.interval,
            "learning_signal": total,
            "rehearsal_losses": rehearsal_losses,
            "fusion_seconds": t_fuse,
            "fusion_passes": passes,
            "fusion_bytes": c.shards.local_numel * 4 * passes,
            "undo_host_bytes": self.journal.host_bytes if self.journal is not None else 0,
            "undo_disk_bytes": self.journal.disk_bytes if self.journal is not None else 0,
            "seconds": t,
        }

    # ------------------------------------------------------------------ phases
    def learning_signal(self) -> float:
        """sum |theta - anchor| over every rank's valid elements (one all-reduce)."""
        c = self.ctx
        local = sum(fusion.abs_change_sum(g.master, a, g.ranges) for g, a in zip(c.shards.groups, c.anchor))
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
        if not math.isfinite(total):
            warnings.warn(
                f"aim_merging: non-finite learning signal at {self.where}: the weights hold NaN/inf; merge skipped.",
                RuntimeWarning,
                stacklevel=3,
            )
            return MergePlan(MergePlan.SKIP, 0, 0.0, 0.0)  # never fuse non-finite weights
        c, numel = self.ctx.controller, self.ctx.global_valid_numel
        # an explicit merge while the controller is inactive (first task): no interval update
        cp = c.on_merge(total, numel) if (c.active or not self.explicit) else c.plan_inactive(total, numel)
        w_in, w_out = self.weights if self.weights is not None else (cp.w_in, cp.w_out)
        r = self.rehearsal_steps if self.rehearsal_steps is not None else cp.rehearsal_steps
        self._mark(cp, w_in, w_out, r, total)
        return MergePlan(cp.interval, r, w_in, w_out)

    def record(self, plan: MergePlan) -> None:
        """The undo record; a rank that cannot make it (e.g. out of host memory) aborts the merge everywhere."""
        c, error = self.ctx, None
        self.step_report = step_report_snapshot(c.engine)  # rehearsal's steps overwrite it, undo record or not
        try:
            if self.transactional:
                self.journal = MergeJournal(c.shards, c.engine, c.config.undo, c.config.undo_path)
                self.theta_k = self.journal.theta_k
            else:
                self.theta_k = c.fuser.keep_theta_k(c.anchor, plan)
        except Exception as e:
            error = f"recording the merge's undo state failed: {type(e).__name__}: {e}"
        agree(error)

    def rehearse(self, steps: int) -> list[float]:
        """R optimizer steps on memory batches through the engine's own step (theta_k -> theta_M)."""
        c = self.ctx
        c.state.in_rehearsal = True  # the plugin's hook stays out; a fuser's gradient hook files under rehearsal
        try:
            losses = rehearsal.rehearse(
                c.engine, steps, c.rehearsal_batch, c.optimizer_step, agree, self.fatal, pipe=c.pipe
            )
        finally:
            c.state.in_rehearsal = False
        c.state.work["rehearsal_steps"] += len(losses)
        return losses

    def fuse(self, plan: MergePlan) -> None:
        c = self.ctx
        plan = c.fuser.prepare(plan, agree)
        theta_k = self.theta_k
        agree(local_error(lambda: c.fuser.fuse(c.anchor, theta_k, plan), "fusion"))

    def commit(self) -> None:
        """The fused masters become the anchor."""
        c = self.ctx
        restore_step_report(self.step_report)
        for g, a in zip(c.shards.groups, c.anchor):
            fusion.copy_into(a, g.master)
        c.fuser.commit(self.theta_k)

    def undo(self, e: MergeAborted, state_before, controller_before) -> dict:
        c = self.ctx
        if not self.transactional:
            raise RuntimeError(
                f"aim_merging: the merge at {self.where} failed ({e}) and cannot be undone: "
                '"undo": "off" keeps no undo record, and the anchor, weights and optimizer state are '
                "half-updated. Every rank stops; restart from the last checkpoint."
            ) from None
        if self.journal is not None:  # None where this rank's own record failed: nothing changed here yet
            self.journal.restore()
        if c.controller is not None:
            c.controller.load_state_dict(controller_before)
        c.state.restore(state_before)
        c.fuser.undo()
        c.shards.refresh_working_copies()  # a collective: every rank is on this path
        if c.controller is not None and not self.explicit:  # the retry budget (merge_retries)
            c.controller.merge_undone()
            c.state.trajectory[-1]["undone"] = 1
        if c.shards.rank == 0:
            warnings.warn(
                f"aim_merging: the merge at {self.where} failed "
                f"and was undone on every rank (weights, optimizer state, anchor, controller and "
                f"trajectory are exactly as before it): {e}",
                RuntimeWarning,
                stacklevel=3,
            )
        return {"merged": False, "reason": str(e), "task": c.state.task_index, "step": c.state.step_in_task}

    def fatal(self, e: BaseException, where: str) -> RuntimeError:
        return fatal_error(e, self.ctx.shards.rank, f"the merge at {self.where} ({where})")

    def _mark(self, cp, w_in, w_out, r, total) -> None:
        s = self.ctx.state
        if s.trajectory and not self.explicit and s.trajectory[-1]["task"] == s.task_index:
            row = s.trajectory[-1]
        else:  # an explicit merge gets its own row
            row = TrajectoryRow(s.task_index, s.step_in_task, explicit=1).as_dict()
            s.trajectory.append(row)
        row.update(
            {
                "merge": 1,
                "learning_signal": cp.learning_signal,
                "w_in": w_in,
                "w_out": w_out,
                "interval": cp.interval,
                "rehearsal_steps": r,
                "abs_change_sum": total,
                "numel": self.ctx.global_valid_numel,
            }
        )


def agree(error: str | None) -> None:
    """Every rank passes its own failure (or None); any failure aborts the merge on every rank."""
    collectives.agree(error, exc_type=MergeAborted)


def _sync() -> None:
    """Wait for queued device work so the fusion timers measure the work, not its launch."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().synchronize()


__all__ = ["Merge", "MergeContext", "MergePlan", "agree"]
