"""The engine hook: AimPlugin coordinates the step hook, the probe, the controller and the merge. One
optimizer step, as data flows:

    engine.step()                      (the user's loop, unchanged)
      -> AimPlugin._after_step()
           probe (aim_ds.plugin.probes): the memory loss, summed over ranks                -> all_reduce   16 B
           rank 0: controller.observe(loss) -> merge?                               -> broadcast(flag) 8 B
           if merge: aim_ds.plugin.merge.Merge: plan -> record -> rehearse -> fuse -> agree -> commit / undo

The weight policy's fusion and its buffers live in a fuser (aim_ds.plugin.fusers), the probe in a probe source
(aim_ds.plugin.probes), DeepSpeed's internals in aim_ds.shards.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import torch

from ..config import AimConfig
from ..control.controller import MergeController, probe_due, task_steps_error
from ..control.policies import make_weight_policy
from ..control.trajectory import FIELDS as TRAJECTORY_FIELDS
from ..control.trajectory import TrajectoryRow
from ..errors import AimInputError
from ..fileio import write_csv
from ..ops import collectives, fusion
from ..ops.losses import batch_tokens, mixed_loss, rows_loss  # noqa: F401 (public names stay here)
from ..shards import ZeroShards, ds_config_dict
from ..shards.pipe import PipeSteps
from .fusers import make_fuser
from .journal import undo_path_error
from .memory import check_memory, to_device
from .merge import Merge, MergeContext
from .probes import PROBE_SOURCES
from .state import PluginState
from .step_hook import StepHook

log = logging.getLogger("aim_ds")


def _resolve_config(engine, config: AimConfig | dict | None) -> AimConfig:
    """The given config, else the engine's ds_config section."""
    if config is None:
        return AimConfig.from_ds_config(ds_config_dict(engine))
    return AimConfig.from_dict(config) if isinstance(config, dict) else config


def _check_merge_args(weights, rehearsal_steps) -> None:
    if weights is not None:
        if len(weights) != 2 or not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
            raise AimInputError(f"merge(weights={weights!r}): expected a pair of finite numbers (w_in, w_out).")
    if rehearsal_steps is not None and (not isinstance(rehearsal_steps, int) or rehearsal_steps < 0):
        raise AimInputError(f"merge(rehearsal_steps={rehearsal_steps!r}): expected an integer >= 0.")


class AimPlugin:
    """AimMerging attached to a DeepSpeed ZeRO-3 engine. Create with `aim_ds.attach`."""

    def __init__(self, engine, memory=None, config: AimConfig | dict | None = None, pipe_batch=None):
        config = _resolve_config(engine, config)
        self.config: AimConfig = config
        self.engine = engine
        self.enabled = bool(config.enabled)
        self.state = PluginState()  # task, step, merges, trajectory, work counts, memory and cursors
        self._hook: StepHook | None = None
        self.pipe: PipeSteps | None = None
        self.probe = self.fuser = None
        if not self.enabled:
            return  # nothing touched: training is exactly plain DeepSpeed
        self.shards = ZeroShards(engine)
        collectives.agree(undo_path_error(config), exc_type=ValueError)  # a folder missing on one node: all stop
        self.rank = self.shards.rank
        self.world_size = self.shards.world_size
        policy = make_weight_policy(config)  # one weight policy for the controller and the fuser
        self.controller = MergeController(config, weights=policy) if self.rank == 0 else None
        self._global_valid_numel = int(collectives.sum_over_ranks(float(self.shards.local_valid_numel))[0])
        alloc = fusion.allocator(self.shards.device if config.anchor == "device" else torch.device("cpu"))
        # ONE anchor buffer per sub-group, shaped like the fp32 master partition; the fuser holds its own
        self.anchor = [alloc(g.master) for g in self.shards.groups]
        self.fuser = make_fuser(config, self.shards, policy, alloc, self._statistics_side)
        # a pipeline engine's own forwards and steps, on micro-batches pipe_batch(memory batch) (default
        # (input_ids, labels)); None for other engines
        self.pipe = PipeSteps(engine, pipe_batch) if self.shards.pipeline else None
        self.probe = PROBE_SOURCES[config.probe_source](config, engine, self.shards, self.state.work, pipe=self.pipe)
        if memory is not None:
            self.set_memory(memory)
        self._hook = StepHook(engine, self.state, self._after_step, self.probe.discard)

    # ------------------------------------------------------------------ the state's public views
    @property
    def task_index(self) -> int:
        """The current task (-1 before the first start_task)."""
        return self.state.task_index

    @property
    def merge_count(self) -> int:
        return self.state.merge_count

    @property
    def trajectory(self) -> list[dict[str, Any]]:
        """Rank 0: one row per probed step or merge (trajectory.csv)."""
        return self.state.trajectory

    @property
    def work(self) -> dict[str, int]:
        """The plugin's own extra work on this rank (rehearsal and probe steps and tokens)."""
        return self.state.work

    # ------------------------------------------------------------------ public API
    def start_task(self, memory=None, steps: int | None = None) -> None:
        """Begin the next task: the anchor becomes the current weights; the controller resets. steps: the
        task's training steps (needed by aim_merging.initial_interval_fraction)."""
        if not self.enabled:
            self.state.task_index += 1
            return
        if memory is not None:
            self.set_memory(memory)
        self.state.task_index += 1
        self.state.step_in_task = 0
        error = _task_start_error(self.config, self.task_index, self.state.memory is not None, self._active(), steps)
        collectives.agree(error, exc_type=AimInputError)  # before rank 0 alone can raise
        if self.controller is not None:
            self.controller.start_task(self.task_index, steps=steps)
        for g, a in zip(self.shards.groups, self.anchor):
            fusion.copy_into(a, g.master)
        self.fuser.start_task()

    def end_task(self) -> None:
        """The end of a task: nothing for AimMerging (the controller merges during the task); FOREVER replays
        here. Loops call it on every rank after a task's last step, whichever method runs."""

    def set_memory(self, memory) -> None:
        """Replace the rehearsal memory (a list or iterable of model-input dicts, this rank's own)."""
        error = check_memory(
            self.engine, memory, getattr(self, "rank", 0), self.pipe.pipe_batch if self.pipe is not None else None
        )
        collectives.agree(error, exc_type=AimInputError)
        collectives.agree(self.shards.tp_memory_error(memory), exc_type=AimInputError)
        self.state.set_memory(memory)

    def merge(self, weights: tuple[float, float] | None = None, rehearsal_steps: int | None = None) -> dict:
        """Merge now, on every rank (all ranks must call it). None = the controller's choice."""
        if not self.enabled:
            raise AimInputError('aim_merging is disabled ("enabled": false); merge() needs it enabled.')
        _check_merge_args(weights, rehearsal_steps)
        if self.task_index < 0:
            self.start_task()
        collectives.agree(
            None
            if self.state.memory is not None
            else "aim_merging: merge() needs a rehearsal memory; pass it to attach() or start_task(memory=...).",
            exc_type=AimInputError,
        )
        return self._merge(weights=weights, rehearsal_steps=rehearsal_steps, explicit=True)

    @property
    def records_probe_loss(self) -> bool:
        """Does the caller hand over the memory rows' loss (record_probe_loss) for the forgetting signal?"""
        return self.probe is not None and self.probe.records_loss

    def record_probe_loss(self, loss_sum: float, count: float) -> None:
        """probe_source "training_batch": this step's forgetting signal from memory rows that are already in
        the training batch. loss_sum = the summed per-token loss of those rows, count = their label tokens
        (aim_ds.rows_loss computes both from the forward's logits). Call it on every rank between the forward
        and engine.step(); a rank without memory rows passes (0, 0). The plugin then runs no probe forward:
        the signal costs one 16-byte all-reduce per step. It is the loss before the step's update, in the
        model's training mode (the released code's probe also ran with dropout on)."""
        if not self.records_probe_loss:
            raise AimInputError(
                'record_probe_loss() needs aim_merging.probe_source = "training_batch" (this '
                f"config has {self.config.probe_source!r}); set it in the ds_config, or drop the call "
                "and let the plugin probe with its own forward."
            )
        s, c = float(loss_sum), float(count)
        if c < 0 or (c == 0 and s != 0):
            raise AimInputError(
                f"record_probe_loss({loss_sum!r}, {count!r}): count is the number of label tokens "
                "behind loss_sum (>= 0; 0 only with loss_sum 0)."
            )
        self.probe.record(s, c)

    def held_bytes(self) -> dict[str, int]:
        """Bytes of tensors the plugin holds on this rank, by where they live."""
        out = {"device": 0, "host": 0}
        if not self.enabled:
            return out
        for t in list(self.anchor) + self.fuser.tensors():
            out["host" if t.device.type == "cpu" and self.shards.device.type != "cpu" else "device"] += (
                t.numel() * t.element_size()
            )
        return out

    def write_trajectory_csv(self, path: str) -> None:
        """Rank 0 writes the per-step trajectory atomically; other ranks return at once."""
        if self.enabled and self.rank != 0:
            return
        write_csv(path, self.trajectory, TRAJECTORY_FIELDS)

    def state_dict(self) -> dict:
        """Everything the plugin holds on this rank (tensors are this rank's shards)."""
        counts = self.state.state_dict()
        work = counts.pop("work")
        sd = {"config": self.config.to_dict(), **counts, "enabled": self.enabled, "work": work}  # the saved key order
        if not self.enabled:
            return sd
        sd.update(
            {
                "rank": self.rank,
                "world_size": self.world_size,
                "position": self.shards.position,
                "controller": self.controller.state_dict() if self.controller is not None else None,
                "anchor": [t.detach().cpu().clone() for t in self.anchor],
                **self.state.positions(),
            }
        )
        sd.update(self.fuser.state_dict())
        return sd

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("config") != self.config.to_dict():
            raise AimInputError(
                "aim_merging: the saved plugin state was made with a different aim_merging config; "
                "resume with the config the run started with."
            )
        self.state.load_state_dict(sd)
        if not self.enabled:
            return
        error = _position_error(sd, self)
        if error is not None:
            raise AimInputError(error)
        for dst, src in zip(self.anchor, sd["anchor"], strict=True):
            if dst.shape != src.shape:
                raise AimInputError(
                    f"aim_merging: saved anchor shard has shape {tuple(src.shape)}, this rank's "
                    f"partition is {tuple(dst.shape)}: the checkpoint is of another model or layout."
                )
            dst.copy_(src)
        if self.controller is not None and sd["controller"] is not None:
            self.controller.load_state_dict(sd["controller"])
        self.state.load_positions(sd)
        self.fuser.load_state_dict(sd)

    def detach(self) -> None:
        """Remove the hooks; the engine is plain DeepSpeed again."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.fuser is not None:
            self.fuser.detach()

    # ------------------------------------------------------------------ hook
    def defer_steps(self) -> None:
        """From now on engine.step() only marks an applied optimizer step; the caller runs the plugin's work for
        it (probe, decision, merge) with run_deferred_step(). A framework that steps the engine before it has
        read the step's gradient norm (Accelerate inside accelerator.backward) calls this, so the rehearsal's
        steps come after that read."""
        self._hook.defer()

    def run_deferred_step(self) -> None:
        """The plugin's work for the optimizer step engine.step() marked last (nothing if none is pending).
        Every rank calls it at the same point: the work may be collective."""
        self._hook.run_deferred()

    def _after_step(self, lr: float) -> None:
        if self.task_index < 0:
            self.start_task()  # a user who never called start_task() trains task 0
        s = self.state
        s.step_in_task += 1
        loss = None
        scheduled = probe_due(self.config, self._active(), s.step_in_task)
        if self.probe.due(scheduled, s.memory is not None):
            loss = self.probe.read(s.next_probe_batch, s.task_index, s.step_in_task)
            loss = None if loss is None else _finite_probe(loss, self.rank, s.task_index, s.step_in_task)
        if self._decide(loss, lr):
            self._merge(weights=None, rehearsal_steps=None, explicit=False)

    def _merge(self, weights=None, rehearsal_steps=None, explicit: bool = False) -> dict:
        """One merge on every rank (aim_ds.plugin.merge.Merge: plan, record, rehearse, fuse, agree, commit or undo)."""
        ctx = MergeContext(
            state=self.state,
            shards=self.shards,
            anchor=self.anchor,
            fuser=self.fuser,
            controller=self.controller,
            config=self.config,
            engine=self.engine,
            optimizer_step=self._hook.original,
            pipe=self.pipe,
            rehearsal_batch=self._rehearsal_batch,
            global_valid_numel=self._global_valid_numel,
        )
        return Merge(ctx, weights=weights, rehearsal_steps=rehearsal_steps, explicit=explicit).run()

    def _active(self) -> bool:
        return self.task_index >= 1 or self.config.merge_first_task

    def _statistics_side(self) -> str | None:
        """Which side a fuser's gradient statistics go to: training ("in"), rehearsal ("out"), none before a task."""
        if self.task_index < 0:
            return None
        return "out" if self.state.in_rehearsal else "in"

    def _decide(self, loss: float | None, lr: float) -> bool:
        flag = torch.zeros(1, dtype=torch.float64, device=collectives.comm_device())
        error = None
        if self.controller is not None:
            d, error = _observe(self.controller, loss, lr, self.task_index, self.state.step_in_task)
            if d is not None:
                self._record(d, loss)
            flag[0] = -1.0 if d is None else float(d.merge)
        if not self._active():
            if error is not None:  # inputs were checked on every rank (step_lr): only a controller bug is left
                raise RuntimeError(error)
            return False  # every rank knows nothing can merge now: no collective on this step
        collectives.broadcast(flag, src=0)
        if flag.item() < 0:  # rank 0's controller failed: every rank stops with its message
            collectives.agree(error, exc_type=RuntimeError)
        return bool(flag.item())

    def _record(self, d, loss) -> None:
        self.trajectory.append(
            TrajectoryRow.of_step(self.task_index, d, loss, self.config.forgetting_ema > 0).as_dict()
        )
        mon = getattr(self.engine, "monitor", None)
        if mon is not None and getattr(mon, "enabled", False) and loss is not None:
            gs = self.engine.global_samples
            mon.write_events([("aim/probe_loss", loss, gs), ("aim/interval", d.interval, gs)])

    def _rehearsal_batch(self) -> dict:
        batch = self.state.next_rehearsal_batch()
        self.work["rehearsal_tokens"] += batch_tokens(batch)  # on the host copy: no device sync
        return to_device(batch, self.engine.device)


def _finite_probe(loss: float, rank: int, task: int, step: int) -> float | None:
    if not math.isfinite(loss):
        if rank == 0:
            warnings.warn(
                f"aim_merging: non-finite probe loss at task {task} step {step}; "
                "this step's forgetting signal is skipped.",
                RuntimeWarning,
                stacklevel=2,
            )
        return None
    return loss


def _observe(controller, loss, lr, task, step):
    """Rank 0: (the controller's decision, None), or (None, the failure's message) for every rank to raise."""
    try:
        return controller.observe(loss, lr), None
    except Exception as e:
        return None, f"aim_merging: the controller failed at task {task} step {step}: {type(e).__name__}: {e}"


def _task_start_error(config: AimConfig, task: int, has_memory: bool, active: bool, steps) -> str | None:
    error = task_steps_error(config, steps)
    if error is not None:
        return f"aim_merging: start_task(steps={steps!r}) at task {task}: {error}"
    if not has_memory and active:
        return (
            f"aim_merging: task {task} will merge but no memory was given; pass the rehearsal "
            "memory to attach(engine, memory) or start_task(memory=...)."
        )
    return None


def _position_error(sd: dict, plugin: AimPlugin) -> str | None:
    """Why saved plugin state cannot load on this rank (another rank, world size or tensor-parallel size)."""
    if sd["world_size"] != plugin.world_size or sd["rank"] != plugin.rank:
        return (
            f"aim_merging: plugin state of rank {sd['rank']}/{sd['world_size']} loaded on rank "
            f"{plugin.rank}/{plugin.world_size}; reshard it first (aim-ds reshard)."
        )
    saved_pp = sd.get("position", {}).get("pp_size", 1)
    if saved_pp != plugin.shards.pp["pp_size"]:
        return (
            f"aim_merging: plugin state saved with {saved_pp} pipeline stage(s), this run has "
            f"{plugin.shards.pp['pp_size']}; resume with the pipeline-parallel size the run was saved with."
        )
    saved_tp = sd.get("position", {}).get("tp_size", 1)
    if saved_tp != plugin.shards.tp_size:
        return (
            f"aim_merging: plugin state saved at tensor-parallel size {saved_tp}, this run has "
            f"{plugin.shards.tp_size}; resume with the tensor-parallel size the run was saved with "
            "(plugin state cannot be resharded across tensor-parallel sizes)."
        )
    return None
