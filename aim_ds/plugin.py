"""The engine hook: probe, decide on rank 0 and broadcast, rehearse, fuse each rank's own shard. One
optimizer step, as data flows (see the README's design section):

    engine.step()                      (the user's loop, unchanged)
      -> AimPlugin._after_step()
           probe: forward on one memory batch per rank, no grad   -> all_reduce(sum, count)   16 B
                  (probe_source "training_batch": the loss of the memory rows of the step's own
                   training batch, recorded by the caller with record_probe_loss(); no forward)
           rank 0: controller.observe(loss) -> merge?             -> broadcast(flag)          8 B
           if merge:
             learning signal: sum |theta - anchor| on valid shard elements -> all_reduce   16 B
             rank 0: controller.on_merge(signal) -> S, R, weights  -> broadcast            32 B
             undo record: theta_k, optimizer state, counters (host memory, this merge only)
             rehearsal: R optimizer steps on memory batches, LR schedule frozen  -> 4 B agreement per step
             theta <- lerp(anchor, theta_k, w_in) + w_out (theta_M - theta_k)   -> 4 B agreement
             commit: anchor <- theta, refresh working copies   (or, if any rank failed: undo everywhere)
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Any

import torch

from . import fusion, rehearsal, statistics
from .config import AimConfig
from .controller import MergeController, probe_due
from .fileio import write_csv
from .importance import FusionSteps
from .journal import MergeAborted, MergeJournal, fatal_error, local_error
from .losses import AimInputError, batch_tokens, mixed_loss, rows_loss  # noqa: F401 (public names stay here)
from .memory import _Cursor, check_memory, to_device
from .shards import ZeroShards, ds_config_dict
from .trajectory import FIELDS as TRAJECTORY_FIELDS
from .trajectory import TrajectoryRow

log = logging.getLogger("aim_ds")


class AimPlugin(FusionSteps):
    """AimMerging attached to a DeepSpeed ZeRO-3 engine. Create with `aim_ds.attach`."""

    def __init__(self, engine, memory=None, config: AimConfig | dict | None = None):
        if config is None:
            config = AimConfig.from_ds_config(ds_config_dict(engine))
        elif isinstance(config, dict):
            config = AimConfig.from_dict(config)
        self.config: AimConfig = config
        self.engine = engine
        self.enabled = bool(config.enabled)
        self.trajectory: list[dict[str, Any]] = []
        self.merge_count = 0
        # the plugin's own extra work on this rank, counted where it happens
        self.work = {"rehearsal_steps": 0, "rehearsal_tokens": 0, "probe_forwards": 0, "probe_tokens": 0}
        self.task_index = -1
        self._step_in_task = 0
        self._memory = None
        self._probe_cursor = self._rehearsal_cursor = None
        self._in_rehearsal = False
        self._recorded_probe: tuple[float, float] | None = None  # probe_source "training_batch"
        self._unrecorded_warned = -1  # the task for which a missing record_probe_loss() was reported
        self._original_step = None
        self._remove_grad_hook = None
        self._deferred = False  # defer_steps(): engine.step only marks the step, run_deferred_step() runs it
        self._step_pending = False
        if not self.enabled:
            return  # nothing touched: training is exactly plain DeepSpeed
        self.shards = ZeroShards(engine)
        self.rank = self.shards.rank
        self.world_size = self.shards.world_size
        self.controller = MergeController(config) if self.rank == 0 else None
        self._global_valid_numel = int(statistics.sum_over_ranks(float(self.shards.local_valid_numel))[0])
        self._anchor_device = self.shards.device if config.anchor == "device" else torch.device("cpu")
        self._importance = config.weight_policy == "importance"
        # scalar policies: ONE buffer per sub-group, shaped like the fp32 master partition
        self.anchor = [self._alloc_like(g.master) for g in self.shards.groups]
        if self._importance:
            self._theta_k = [self._alloc_like(g.master) for g in self.shards.groups]
            self._ema = {
                k: [self._alloc_like(g.master, zero=True) for g in self.shards.groups]
                for k in ("i_in", "u_in", "i_out", "u_out")
            }
            self._remove_grad_hook = self.shards.gradient_hook(self._track_importance)
        if memory is not None:
            self.set_memory(memory)
        self._install_hook()

    # ------------------------------------------------------------------ public API
    def start_task(self, memory=None) -> None:
        """Begin the next task: the anchor becomes the current weights; the controller resets."""
        if not self.enabled:
            self.task_index += 1
            return
        if memory is not None:
            self.set_memory(memory)
        self.task_index += 1
        self._step_in_task = 0
        if self.controller is not None:
            self.controller.start_task(self.task_index)
        self._snapshot_anchor()
        if self._importance:
            for bufs in self._ema.values():
                for b in bufs:
                    b.zero_()
        statistics.agree(
            None
            if (self._memory is not None or not self._active())
            else f"aim_merging: task {self.task_index} will merge but no memory was given; pass the rehearsal "
            "memory to attach(engine, memory) or start_task(memory=...).",
            exc_type=AimInputError,
        )

    def set_memory(self, memory) -> None:
        """Replace the rehearsal memory (a list or iterable of model-input dicts, this rank's own)."""
        error = check_memory(self.engine, memory, getattr(self, "rank", 0))
        statistics.agree(error, exc_type=AimInputError)
        statistics.agree(self.shards.tp_memory_error(memory), exc_type=AimInputError)
        self._memory = memory
        self._probe_cursor = _Cursor(memory)
        self._rehearsal_cursor = _Cursor(memory)

    def merge(self, weights: tuple[float, float] | None = None, rehearsal_steps: int | None = None) -> dict:
        """Merge now, on every rank (all ranks must call it). None = the controller's choice."""
        if not self.enabled:
            raise AimInputError('aim_merging is disabled ("enabled": false); merge() needs it enabled.')
        if weights is not None:
            if len(weights) != 2 or not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
                raise AimInputError(f"merge(weights={weights!r}): expected a pair of finite numbers (w_in, w_out).")
        if rehearsal_steps is not None and (not isinstance(rehearsal_steps, int) or rehearsal_steps < 0):
            raise AimInputError(f"merge(rehearsal_steps={rehearsal_steps!r}): expected an integer >= 0.")
        if self.task_index < 0:
            self.start_task()
        statistics.agree(
            None
            if self._memory is not None
            else "aim_merging: merge() needs a rehearsal memory; pass it to attach() or start_task(memory=...).",
            exc_type=AimInputError,
        )
        return self._merge(weights=weights, rehearsal_steps=rehearsal_steps, explicit=True)

    def record_probe_loss(self, loss_sum: float, count: float) -> None:
        """probe_source "training_batch": this step's forgetting signal from memory rows that are already in
        the training batch. loss_sum = the summed per-token loss of those rows, count = their label tokens
        (aim_ds.rows_loss computes both from the forward's logits). Call it on every rank between the forward
        and engine.step(); a rank without memory rows passes (0, 0). The plugin then runs no probe forward:
        the signal costs one 16-byte all-reduce per step. It is the loss before the step's update, in the
        model's training mode (the released code's probe also ran with dropout on)."""
        if not self.enabled or self.config.probe_source != "training_batch":
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
        prev = self._recorded_probe or (0.0, 0.0)
        self._recorded_probe = (prev[0] + s, prev[1] + c)  # gradient accumulation: micro-steps add up

    def held_bytes(self) -> dict[str, int]:
        """Bytes of tensors the plugin holds on this rank, by where they live."""
        out = {"device": 0, "host": 0}
        if not self.enabled:
            return out
        tensors = list(self.anchor)
        if self._importance:
            tensors += self._theta_k + [b for bufs in self._ema.values() for b in bufs]
        for t in tensors:
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
        sd = {
            "config": self.config.to_dict(),
            "task_index": self.task_index,
            "step_in_task": self._step_in_task,
            "merge_count": self.merge_count,
            "trajectory": list(self.trajectory),
            "enabled": self.enabled,
            "work": dict(self.work),
        }
        if not self.enabled:
            return sd
        sd.update(
            {
                "rank": self.rank,
                "world_size": self.world_size,
                "position": self.shards.position,
                "controller": self.controller.state_dict() if self.controller is not None else None,
                "anchor": [t.detach().cpu().clone() for t in self.anchor],
                "probe_position": self._probe_cursor.position if self._probe_cursor else 0,
                "rehearsal_position": self._rehearsal_cursor.position if self._rehearsal_cursor else 0,
            }
        )
        if self._importance:
            sd["theta_k"] = [t.detach().cpu().clone() for t in self._theta_k]
            sd["ema"] = {k: [t.detach().cpu().clone() for t in v] for k, v in self._ema.items()}
        return sd

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("config") != self.config.to_dict():
            raise AimInputError(
                "aim_merging: the saved plugin state was made with a different aim_merging config; "
                "resume with the config the run started with."
            )
        self.task_index, self._step_in_task = sd["task_index"], sd["step_in_task"]
        self.merge_count, self.trajectory = sd["merge_count"], list(sd["trajectory"])
        self.work.update(sd.get("work", {}))  # absent in checkpoints of aim_ds <= 0.1 (counts restart at 0)
        if not self.enabled:
            return
        if sd["world_size"] != self.world_size or sd["rank"] != self.rank:
            raise AimInputError(
                f"aim_merging: plugin state of rank {sd['rank']}/{sd['world_size']} loaded on rank "
                f"{self.rank}/{self.world_size}; reshard it first (aim-ds reshard)."
            )
        saved_tp = sd.get("position", {}).get("tp_size", 1)
        if saved_tp != self.shards.tp_size:
            raise AimInputError(
                f"aim_merging: plugin state saved at tensor-parallel size {saved_tp}, this run has "
                f"{self.shards.tp_size}; resume with the tensor-parallel size the run was saved with "
                "(plugin state cannot be resharded across tensor-parallel sizes)."
            )
        for dst, src in zip(self.anchor, sd["anchor"], strict=True):
            if dst.shape != src.shape:
                raise AimInputError(
                    f"aim_merging: saved anchor shard has shape {tuple(src.shape)}, this rank's "
                    f"partition is {tuple(dst.shape)}: the checkpoint is of another model or layout."
                )
            dst.copy_(src)
        if self.controller is not None and sd["controller"] is not None:
            self.controller.load_state_dict(sd["controller"])
        if self._memory is not None:
            self._probe_cursor = _Cursor(self._memory, sd["probe_position"])
            self._rehearsal_cursor = _Cursor(self._memory, sd["rehearsal_position"])
        if self._importance:
            for dst, src in zip(self._theta_k, sd["theta_k"]):
                dst.copy_(src)
            for k, v in sd["ema"].items():
                for dst, src in zip(self._ema[k], v):
                    dst.copy_(src)

    def detach(self) -> None:
        """Remove the hooks; the engine is plain DeepSpeed again."""
        if self._original_step is not None:
            del self.engine.__dict__["step"]
            self._original_step = None
        if self._remove_grad_hook is not None:
            self._remove_grad_hook()
            self._remove_grad_hook = None

    # ------------------------------------------------------------------ hook
    def _install_hook(self) -> None:
        engine = self.engine
        original = engine.step
        plugin = self

        def step(*args, **kwargs):
            boundary = engine.is_gradient_accumulation_boundary()
            out = original(*args, **kwargs)
            if boundary and not plugin._in_rehearsal:
                if engine.was_step_applied() and plugin._deferred:
                    plugin._step_pending = True
                elif engine.was_step_applied():
                    plugin._after_step()
                else:
                    plugin._recorded_probe = None  # a skipped (overflowed) step: its probe loss goes with it
            return out

        self._original_step = original
        engine.step = step  # instance attribute: no change to the user's loop or to DeepSpeed's class

    def defer_steps(self) -> None:
        """From now on engine.step() only marks an applied optimizer step; the caller runs the plugin's work for
        it (probe, decision, merge) with run_deferred_step(). A framework that steps the engine before it has
        read the step's gradient norm (Accelerate inside accelerator.backward) calls this, so the rehearsal's
        steps come after that read."""
        self._deferred = True

    def run_deferred_step(self) -> None:
        """The plugin's work for the optimizer step engine.step() marked last (nothing if none is pending).
        Every rank calls it at the same point: the work may be collective."""
        if self._step_pending:
            self._step_pending = False
            self._after_step()

    def _after_step(self) -> None:
        if self.task_index < 0:
            self.start_task()  # a user who never called start_task() trains task 0
        self._step_in_task += 1
        loss = None
        if self._probe_due():
            loss = self._probe_from_batch() if self.config.probe_source == "training_batch" else self._probe()
        merge = self._decide(loss)
        if merge:
            self._merge(weights=None, rehearsal_steps=None, explicit=False)

    def _probe_due(self) -> bool:
        due = probe_due(self.config, self._active(), self._step_in_task)
        if not due or self.config.probe_source != "training_batch":
            self._recorded_probe = None
        return due and (self.config.probe_source == "training_batch" or self._memory is not None)

    def _probe_from_batch(self) -> float | None:
        """The recorded memory-row loss of this step's training batch, token-weighted over ranks."""
        s, c = self._recorded_probe or (0.0, 0.0)
        self._recorded_probe = None
        # tensor-parallel ranks share their data-parallel rank's batch: the probe is reduced over data parallel
        total, count = statistics.sum_over_ranks(s, c, group=self.shards.dp_group)
        if count <= 0:
            if self.rank == 0 and self._unrecorded_warned != self.task_index:
                self._unrecorded_warned = self.task_index
                warnings.warn(
                    f'aim_merging: probe_source is "training_batch" but no rank recorded a memory loss '
                    f"at task {self.task_index} step {self._step_in_task}: the forgetting signal is empty, "
                    "so only forced activations trigger merges. Mix memory rows into the training batches "
                    "and call plugin.record_probe_loss(*aim_ds.rows_loss(...)) before engine.step(), or use "
                    'probe_source "memory_forward". (Reported once per task.)',
                    RuntimeWarning,
                    stacklevel=2,
                )
            return None
        return self._finite_probe(total / count)

    @torch.no_grad()
    def _probe(self) -> float | None:
        """Mean memory loss over ranks, model in eval mode (no dropout), or None when non-finite."""
        batch = self._probe_cursor.next()
        n = self.config.probe_batch_size
        if n:
            batch = {k: (v[:n] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in batch.items()}
        module = self.engine.module
        was_training = module.training
        module.eval()
        try:
            local = float(self.engine(**to_device(batch, self.engine.device)).loss.detach())
        finally:
            module.train(was_training)
        self.work["probe_forwards"] += 1
        self.work["probe_tokens"] += batch_tokens(batch)
        return self._finite_probe(statistics.mean_over_ranks(local, 1.0, group=self.shards.dp_group))

    def _finite_probe(self, loss: float) -> float | None:
        if not math.isfinite(loss):
            if self.rank == 0:
                warnings.warn(
                    f"aim_merging: non-finite probe loss at task {self.task_index} step "
                    f"{self._step_in_task}; this step's forgetting signal is skipped.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return None
        return loss

    def _active(self) -> bool:
        return self.task_index >= 1 or self.config.merge_first_task

    def _decide(self, loss: float | None) -> bool:
        flag = torch.zeros(1, dtype=torch.float64, device=statistics.comm_device())
        if self.controller is not None:
            d = self.controller.observe(loss, self.engine.optimizer.param_groups[0]["lr"])
            self._record(d, loss)
            flag[0] = 1.0 if d.merge else 0.0
        if not self._active():
            return False  # every rank knows nothing can merge now: no collective on this step
        statistics.broadcast(flag, src=0)
        return bool(flag.item())

    def _record(self, d, loss) -> None:
        ema = d.signal if self.config.forgetting_ema else None
        row = TrajectoryRow(self.task_index, d.step, loss, d.threshold, d.activations, d.interval)
        row.lr, row.forgetting_signal = d.lr, ema
        self.trajectory.append(row.as_dict())
        mon = getattr(self.engine, "monitor", None)
        if mon is not None and getattr(mon, "enabled", False) and loss is not None:
            gs = self.engine.global_samples
            mon.write_events([("aim/probe_loss", loss, gs), ("aim/interval", d.interval, gs)])

    # ------------------------------------------------------------------ merge (a transaction)
    def _merge(self, weights, rehearsal_steps, explicit: bool) -> dict:
        """Plan, rehearse, fuse; commit on every rank, or undo on every rank.

        Failures found in this rank's own work (the undo record, a rehearsal batch, a non-finite
        rehearsal loss, the fusion math) are agreed on at the next sync point, which every rank
        reaches: every rank then restores what the merge changed (see aim_ds/journal.py) and the
        merge returns {"merged": False}. A failure inside a collective of a rehearsal step (DeepSpeed's
        gathers in forward/backward/step: its peers are blocked in that collective, so no agreement is
        possible) is published in the process group's store and re-raised; the peers' collective then
        fails and they raise naming the failing rank (see _fatal)."""
        t0 = time.perf_counter()
        groups = self.shards.groups
        local = sum(fusion.abs_change_sum(g.master, a, g.ranges) for g, a in zip(groups, self.anchor))
        total = statistics.sum_over_ranks(local)[0]
        before = self._plugin_state()
        plan = torch.zeros(4, dtype=torch.float64, device=statistics.comm_device())  # S, R, w_in, w_out
        if self.controller is not None:
            if math.isfinite(total):
                p = self._plan(total, explicit)
                w_in, w_out = weights if weights is not None else (p.w_in, p.w_out)
                r = rehearsal_steps if rehearsal_steps is not None else p.rehearsal_steps
                plan[:] = torch.tensor([p.interval, r, w_in, w_out], dtype=torch.float64)
                self._mark_merge(p, w_in, w_out, r, total, explicit)
            else:
                plan[0] = -1  # skip: never fuse non-finite weights
                warnings.warn(
                    f"aim_merging: non-finite learning signal at task {self.task_index} step "
                    f"{self._step_in_task}: the weights hold NaN/inf; merge skipped.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        statistics.broadcast(plan, src=0)
        interval, r, w_in, w_out = plan.tolist()
        if interval < 0:
            return {"merged": False, "reason": "non-finite learning signal"}
        r = int(r)
        scalar = not self._importance or weights is not None
        journal = None
        try:
            _sync()
            t_prep0 = time.perf_counter()
            error = None
            try:
                journal = MergeJournal(self.shards, self.engine)
            except Exception as e:  # e.g. out of host memory for the undo record
                error = f"recording the merge's undo state failed: {type(e).__name__}: {e}"
            self._agree_merge(error)
            _sync()
            t_prep = time.perf_counter() - t_prep0
            rehearsal_losses = self._rehearse(r)
            _sync()
            t1 = time.perf_counter()
            if not scalar:  # the masks' global quantiles are collectives: agree on the local scores first
                self._agree_merge(local_error(self._importance_scores, "the importance scores"))
                quantiles = self._importance_quantiles()
            error = local_error(
                lambda: self._fuse(scalar, w_in, w_out, journal, None if scalar else quantiles), "fusion"
            )
            self._agree_merge(error)
        except MergeAborted as e:
            if journal is not None:
                journal.restore()
            self._restore_plugin_state(before)
            self.shards.refresh_working_copies()  # a collective: every rank is on this path
            if self.controller is not None and not explicit:  # the retry budget (merge_retries)
                self.controller.merge_undone()
                self.trajectory[-1]["undone"] = 1
            if self.rank == 0:
                warnings.warn(
                    f"aim_merging: the merge at task {self.task_index} step {self._step_in_task} failed "
                    f"and was undone on every rank (weights, optimizer state, anchor, controller and "
                    f"trajectory are exactly as before it): {e}",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return {"merged": False, "reason": str(e), "task": self.task_index, "step": self._step_in_task}
        # commit: the fused masters become the anchor
        for g, a in zip(groups, self.anchor):
            fusion.copy_into(a, g.master)
        if self._importance:  # the state keeps the last committed merge's theta_k, as checkpoints always did
            for t, k in zip(self._theta_k, journal.theta_k):
                fusion.copy_into(t, k)
            for bufs in self._ema.values():
                for b in bufs:
                    b.zero_()
        _sync()
        t_fuse = time.perf_counter() - t1 + t_prep
        self.shards.refresh_working_copies()
        self.merge_count += 1
        n = self.shards.local_numel
        passes = fusion.SCALAR_FUSION_PASSES if scalar else 12
        return {
            "merged": True,
            "task": self.task_index,
            "step": self._step_in_task,
            "rehearsal_steps": r,
            "w_in": w_in,
            "w_out": w_out,
            "interval": int(interval),
            "learning_signal": total,
            "rehearsal_losses": rehearsal_losses,
            "fusion_seconds": t_fuse,
            "fusion_passes": passes,
            "fusion_bytes": n * 4 * passes,
            "undo_host_bytes": journal.host_bytes,
            "seconds": time.perf_counter() - t0,
        }

    def _agree_merge(self, error: str | None) -> None:
        statistics.agree(error, exc_type=MergeAborted)

    def _fatal(self, e: BaseException, where: str) -> RuntimeError:
        return fatal_error(e, self.rank, f"the merge at task {self.task_index} step {self._step_in_task} ({where})")

    def _plugin_state(self) -> dict:
        """The plugin-side state a merge changes (host objects only; tensors are in the journal)."""
        return {
            "controller": self.controller.state_dict() if self.controller is not None else None,
            "trajectory": (len(self.trajectory), dict(self.trajectory[-1]) if self.trajectory else None),
            "rehearsal_position": self._rehearsal_cursor.position if self._rehearsal_cursor else 0,
            "work": dict(self.work),
            "merge_count": self.merge_count,
        }

    def _restore_plugin_state(self, s: dict) -> None:
        if self.controller is not None:
            self.controller.load_state_dict(s["controller"])
        n, last = s["trajectory"]
        del self.trajectory[n:]
        if last is not None:
            self.trajectory[-1] = last
        if self._rehearsal_cursor is not None and self._rehearsal_cursor.position != s["rehearsal_position"]:
            self._rehearsal_cursor = _Cursor(self._memory, s["rehearsal_position"])
        self.work.clear()
        self.work.update(s["work"])
        self.merge_count = s["merge_count"]
        if self._importance:  # rehearsal's side of the statistics; the training side is left untouched
            for b in self._ema["i_out"] + self._ema["u_out"]:
                b.zero_()

    def _plan(self, total: float, explicit: bool):
        c = self.controller
        if c.active or not explicit:
            return c.on_merge(total, self._global_valid_numel)
        # an explicit merge while the controller is inactive (first task): no interval update
        return c.plan_inactive(total, self._global_valid_numel)

    def _mark_merge(self, p, w_in, w_out, r, total, explicit) -> None:
        if self.trajectory and not explicit and self.trajectory[-1]["task"] == self.task_index:
            row = self.trajectory[-1]
        else:  # an explicit merge gets its own row
            row = TrajectoryRow(self.task_index, self._step_in_task, explicit=1).as_dict()
            self.trajectory.append(row)
        row.update(
            {
                "merge": 1,
                "learning_signal": p.learning_signal,
                "w_in": w_in,
                "w_out": w_out,
                "interval": p.interval,
                "rehearsal_steps": r,
                "abs_change_sum": total,
                "numel": self._global_valid_numel,
            }
        )

    def _rehearse(self, steps: int) -> list[float]:
        self._in_rehearsal = True  # the gradient hook files statistics under the rehearsal side
        try:
            losses = rehearsal.rehearse(
                self.engine, steps, self._rehearsal_batch, self._original_step, self._agree_merge, self._fatal
            )
        finally:
            self._in_rehearsal = False
        self.work["rehearsal_steps"] += len(losses)
        return losses

    def _rehearsal_batch(self) -> dict:
        batch = self._rehearsal_cursor.next()
        self.work["rehearsal_tokens"] += batch_tokens(batch)  # on the host copy: no device sync
        return to_device(batch, self.engine.device)

    def _snapshot_anchor(self) -> None:
        for g, a in zip(self.shards.groups, self.anchor):
            fusion.copy_into(a, g.master)

    def _alloc_like(self, master: torch.Tensor, zero: bool = False) -> torch.Tensor:
        dev = self._anchor_device
        pin = dev.type == "cpu" and master.device.type == "cuda"
        t = torch.empty(master.numel(), dtype=torch.float32, device=dev, pin_memory=pin)
        if zero:
            t.zero_()
        return t


def _sync() -> None:
    """Wait for queued device work so the fusion timers measure the work, not its launch."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().synchronize()


def attach(engine, memory=None, config: AimConfig | dict | None = None) -> AimPlugin:
    """Attach AimMerging to a DeepSpeed engine. The user's training loop is unchanged.

    config None reads the engine's ds_config "aim_merging" section (absent -> disabled: plain DeepSpeed).
    memory: a list or iterable of model-input dicts (with labels) for this rank; it may also be given
    later with `start_task(memory=...)`.
    """
    return AimPlugin(engine, memory, config)
