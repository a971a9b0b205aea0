"""FOREVER on the sharded machinery: model time measured on each rank's own shard, replay events through the engine.

One optimizer step, as data flows:

    engine.step()                      (the user's loop, unchanged)
      -> ForeverPlugin._after_step()
           each rank: sum (theta_t - theta_{t-1})^2 over its own fp32 master elements    -> all_reduce  8 B
           rank 0: schedule.observe(Delta) -> replay event? beta_t                       -> broadcast  16 B
           if an event fires: replay_steps optimizer steps on memory batches, the LR frozen, each rank adding
           2 beta_t (theta - theta*) to its own fp32 gradient partition (the L2 pull toward the end of the
           previous task)

theta* is kept like AimMerging's anchor (one fp32 buffer per sub-group, on the device or the host); theta_{t-1}
is one more fp32 buffer beside the masters (the update is read as a difference, which no optimizer exposes).
Replay steps move the weights but are not model time: theta_{t-1} is reset after them. `end_task()` runs the
end-of-task consolidation replay. The schedule itself is pure: aim_ds.control.forever.
"""

from __future__ import annotations

import math

import torch

from ..config import ForeverConfig
from ..control.forever import ForeverSchedule
from ..errors import AimInputError
from ..fileio import write_csv
from ..ops import collectives, fusion
from ..ops.collectives import fatal_error
from ..ops.losses import batch_tokens
from ..shards import ZeroShards, restore_step_report, step_report_snapshot
from ..shards.pipe import PipeSteps
from . import rehearsal
from .memory import check_memory, to_device
from .state import PluginState
from .step_hook import StepHook

TRAJECTORY_FIELDS = [
    "task",
    "step",
    "delta",
    "tau",
    "day",
    "ratio",
    "beta",
    "event",
    "crossed",
    "replay",
    "replay_steps",
    "replay_loss",
]
END_OF_TASK = "end"  # the trajectory's `replay` cell of the consolidation replay


class ForeverPlugin:
    """FOREVER attached to a DeepSpeed engine (ZeRO 0-3). Create with `aim_ds.attach(engine, memory,
    config=ForeverConfig(...))`; the loop calls start_task() before each task and end_task() after it."""

    def __init__(self, engine, memory=None, config: ForeverConfig | dict | None = None, pipe_batch=None):
        self.config = ForeverConfig.from_dict(config)
        self.engine = engine
        self.enabled = bool(self.config.enabled)
        self.state = PluginState()
        self.state.work["replay_events"] = 0
        self._hook: StepHook | None = None
        self.pipe: PipeSteps | None = None
        if not self.enabled:
            return
        self.shards = ZeroShards(engine)
        self.rank, self.world_size = self.shards.rank, self.shards.world_size
        self.pipe = PipeSteps(engine, pipe_batch) if self.shards.pipeline else None  # a pipeline's own steps
        self.schedule = ForeverSchedule(self.config) if self.rank == 0 else None
        alloc = fusion.allocator(self.shards.device if self.config.anchor == "device" else torch.device("cpu"))
        self.anchor = [alloc(g.master) for g in self.shards.groups]  # theta*: the end of the previous task
        self.previous = [torch.empty_like(g.master) for g in self.shards.groups]  # theta_{t-1}, beside the masters
        if memory is not None:
            self.set_memory(memory)
        self._hook = StepHook(engine, self.state, self._after_step, lambda: None)

    # ------------------------------------------------------------------ the state's public views
    @property
    def task_index(self) -> int:
        return self.state.task_index

    @property
    def merge_count(self) -> int:
        return 0  # FOREVER replays; it never merges

    @property
    def trajectory(self) -> list[dict]:
        """Rank 0: one row per training step (model time) and per replay event."""
        return self.state.trajectory

    @property
    def work(self) -> dict[str, int]:
        return self.state.work

    records_probe_loss = False  # FOREVER reads no forgetting signal

    # ------------------------------------------------------------------ public API
    def start_task(self, memory=None, steps: int | None = None) -> None:
        """Begin the next task: theta* becomes the current weights, model time restarts at 0."""
        del steps  # the schedule runs on model time: a task's length is not needed
        if memory is not None:
            self.set_memory(memory)
        self.state.task_index += 1
        self.state.step_in_task = 0
        if not self.enabled:
            return
        missing = self._active() and self.state.memory is None
        collectives.agree(
            f"forever: task {self.task_index} replays but no memory was given; pass the replay memory to "
            "attach(engine, memory) or start_task(memory=...)."
            if missing
            else None,
            exc_type=AimInputError,
        )
        if self.schedule is not None:
            self.schedule.start_task(self.task_index)
        for g, a, p in zip(self.shards.groups, self.anchor, self.previous):
            fusion.copy_into(a, g.master)
            fusion.copy_into(p, g.master)

    def end_task(self) -> list[float]:
        """The end-of-task consolidation replay (consolidation_steps steps at the current beta_t); every rank
        calls it after the task's last step. Returns the replay's losses (none on a task without memory)."""
        if not self.enabled or not self._active() or self.config.consolidation_steps == 0:
            return []
        beta = torch.zeros(1, dtype=torch.float64, device=collectives.comm_device())
        if self.schedule is not None:
            beta[0] = self.schedule.beta
        collectives.broadcast(beta, src=0)
        return self._replay(self.config.consolidation_steps, float(beta.item()), END_OF_TASK)

    def set_memory(self, memory) -> None:
        """Replace the replay memory (a list or iterable of model-input dicts, this rank's own)."""
        error = check_memory(
            self.engine, memory, getattr(self, "rank", 0), self.pipe.pipe_batch if self.pipe is not None else None
        )
        collectives.agree(error, exc_type=AimInputError)
        self.state.set_memory(memory)

    def write_trajectory_csv(self, path: str) -> None:
        if self.enabled and self.rank != 0:
            return
        write_csv(path, self.trajectory, TRAJECTORY_FIELDS)

    def held_bytes(self) -> dict[str, int]:
        out = {"device": 0, "host": 0}
        for t in (self.anchor + self.previous) if self.enabled else []:
            out["host" if t.device.type == "cpu" and self.shards.device.type != "cpu" else "device"] += (
                t.numel() * t.element_size()
            )
        return out

    def state_dict(self) -> dict:
        sd = {"config": self.config.to_dict(), **self.state.state_dict(), "enabled": self.enabled}
        if self.enabled:
            sd.update(
                rank=self.rank,
                world_size=self.world_size,
                position=self.shards.position,
                schedule=self.schedule.state_dict() if self.schedule is not None else None,
                anchor=[t.detach().cpu().clone() for t in self.anchor],
                previous=[t.detach().cpu().clone() for t in self.previous],
                **self.state.positions(),
            )
        return sd

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("config") != self.config.to_dict():
            raise AimInputError(
                "forever: the saved plugin state was made with a different forever config (or another method); "
                "resume with the config the run started with."
            )
        self.state.load_state_dict(sd)
        if not self.enabled:
            return
        if (sd["rank"], sd["world_size"], sd["position"]) != (self.rank, self.world_size, self.shards.position):
            raise AimInputError(
                f"forever: plugin state of rank {sd['rank']}/{sd['world_size']} loaded on rank "
                f"{self.rank}/{self.world_size}; resume at the world size and parallel layout it was saved with."
            )
        for dst, src in zip(self.anchor + self.previous, sd["anchor"] + sd["previous"], strict=True):
            if dst.shape != src.shape:
                raise AimInputError(
                    f"forever: a saved shard has shape {tuple(src.shape)}, this rank's partition is "
                    f"{tuple(dst.shape)}: the checkpoint is of another model or layout."
                )
            dst.copy_(src)
        if self.schedule is not None:
            self.schedule.load_state_dict(sd["schedule"])
        self.state.load_positions(sd)

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def defer_steps(self) -> None:
        """engine.step() only marks an applied step; run_deferred_step() runs the plugin's work for it (a
        framework that steps the engine before it reads the gradient norm: see AimPlugin.defer_steps)."""
        self._hook.defer()

    def run_deferred_step(self) -> None:
        self._hook.run_deferred()

    # ------------------------------------------------------------------ the step
    def _active(self) -> bool:
        """Replay needs old tasks: from task 1 on (start_task checks every rank has a memory then)."""
        return self.task_index >= 1

    def _after_step(self, lr: float) -> None:
        del lr  # the schedule runs on model time
        if self.task_index < 0:
            self.start_task()
        s = self.state
        s.step_in_task += 1
        local = sum(
            fusion.squared_change_and_keep(g.master, p, g.ranges) for g, p in zip(self.shards.groups, self.previous)
        )
        delta = math.sqrt(collectives.sum_over_ranks(local)[0])
        decision = torch.full((2,), -1.0, dtype=torch.float64, device=collectives.comm_device())
        error = None
        if self.schedule is not None:
            try:
                d = self.schedule.observe(delta)
            except Exception as e:
                error = f"forever: the schedule failed at task {s.task_index} step {s.step_in_task}: {e}"
            else:
                s.trajectory.append({**d.as_dict(), "replay": None, "replay_steps": 0, "replay_loss": None})
                decision[0] = -1.0 if d.event is None else float(d.event)
                decision[1] = d.beta
        if not self._active():
            if error is not None:
                raise RuntimeError(error)
            return  # every rank knows no replay can fire: no collective on this step beyond the sum
        collectives.broadcast(decision, src=0)
        if decision[1].item() < 0:  # rank 0's schedule failed (beta is never negative): every rank stops
            collectives.agree(error, exc_type=RuntimeError)
        if decision[0].item() >= 0:
            self._replay(self.config.replay_steps, float(decision[1].item()), int(decision[0].item()))

    def _replay(self, steps: int, beta: float, event) -> list[float]:
        """`steps` optimizer steps on memory batches with the L2 pull toward theta*; the LR is frozen."""
        s, engine = self.state, self.engine
        report = step_report_snapshot(engine)  # the user's view of the last training step stays as it was
        remove = self.shards.gradient_hook(self._pull(beta)) if beta > 0 else None
        s.in_rehearsal = True
        where = f"forever replay at task {s.task_index} step {s.step_in_task}"
        try:
            losses = rehearsal.rehearse(
                engine,
                steps,
                self._replay_batch,
                self._hook.original,
                lambda error: collectives.agree(error, exc_type=RuntimeError),
                lambda e, what: fatal_error(e, self.rank, f"the {where} ({what})"),
                pipe=self.pipe,
            )
        finally:
            s.in_rehearsal = False
            if remove is not None:
                remove()
        restore_step_report(report)
        for g, p in zip(self.shards.groups, self.previous):
            fusion.copy_into(p, g.master)  # replay's motion is not model time
        s.work["rehearsal_steps"] += len(losses)
        s.work["replay_events"] += 1
        if self.rank == 0:
            loss = sum(losses) / len(losses) if losses else None
            row = {"task": s.task_index, "step": s.step_in_task, "beta": beta, "replay_loss": loss}
            if event == END_OF_TASK or not s.trajectory:
                s.trajectory.append({**row, "replay": END_OF_TASK, "replay_steps": len(losses)})
            else:
                s.trajectory[-1].update(replay=event, replay_steps=len(losses), replay_loss=loss)
        return losses

    def _pull(self, beta: float):
        anchor, coeff = self.anchor, 2.0 * beta

        def pull(index: int, master: torch.Tensor, grad: torch.Tensor) -> None:
            fusion.add_pull(grad, master, anchor[index], coeff, self.shards.groups[index].owned)

        return pull

    def _replay_batch(self) -> dict:
        batch = self.state.next_rehearsal_batch()
        self.work["rehearsal_tokens"] += batch_tokens(batch)
        return to_device(batch, self.engine.device)
