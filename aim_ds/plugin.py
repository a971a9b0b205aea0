"""The engine hook: probe, decide on rank 0 and broadcast, rehearse, fuse each rank's own shard.

One optimizer step, as data flows (see the README's design section):

    engine.step()                      (the user's loop, unchanged)
      -> AimPlugin._after_step()
           probe: forward on one memory batch per rank, no grad   -> all_reduce(sum, count)   16 B
                  (probe_source "training_batch": the loss of the memory rows of the step's own
                   training batch, recorded by the caller with record_probe_loss(); no forward)
           rank 0: controller.observe(loss) -> merge?             -> broadcast(flag)          8 B
           if merge:
             learning signal: sum |theta - anchor| on valid shard elements -> all_reduce   16 B
             rank 0: controller.on_merge(signal) -> S, R, weights  -> broadcast            32 B
             buffer <- (1 - w_in) anchor + (w_in - w_out) theta_k          (scalar policies)
             rehearsal: R optimizer steps on memory batches, LR schedule frozen
             theta <- buffer + w_out theta_M ; buffer <- theta (new anchor); refresh working copies
"""
from __future__ import annotations

import inspect
import itertools
import logging
import math
import time
import warnings
from typing import Any

import torch

from . import fusion, statistics
from .fileio import TRAJECTORY_FIELDS, write_csv
from .config import AimConfig
from .controller import MergeController
from .shards import ZeroShards, ds_config_dict

log = logging.getLogger("aim_ds")

class AimInputError(ValueError):
    """Bad input to the plugin (memory, arguments); raised on every rank before any collective hangs."""


def _agree(error: str | None) -> None:
    """Raise on every rank if any rank found an error (one 4-byte all-reduce, reached by all)."""
    if statistics.any_rank(error is not None):
        raise AimInputError(error or "aim_merging: another rank rejected its input (see that rank's error).")


class _Cursor:
    """Cycles through a list (resumable by position) or re-iterates an iterable."""

    def __init__(self, source, position: int = 0):
        self.source = source
        self.position = position
        self._it = None
        if not isinstance(source, (list, tuple)):
            self._it = iter(source)
            for _ in range(position):
                self._next_from_iterable()

    def _next_from_iterable(self):
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.source)
            try:
                return next(self._it)
            except StopIteration:
                raise AimInputError("aim_merging: the memory iterable is empty; give at least one batch.") from None

    def next(self):
        if self._it is None:
            item = self.source[self.position % len(self.source)]
        else:
            item = self._next_from_iterable()
        self.position += 1
        return item


class AimPlugin:
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
        # the plugin's own extra work on this rank, counted where it happens (benchmarks/perf.py reads it)
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
        self.after_rehearsal_callback = None  # tests and debugging: called on every rank before fusion
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
            self._ema = {k: [self._alloc_like(g.master, zero=True) for g in self.shards.groups]
                         for k in ("i_in", "u_in", "i_out", "u_out")}
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
        _agree(None if (self._memory is not None or not self._active()) else
               f"aim_merging: task {self.task_index} will merge but no memory was given; pass the rehearsal "
               "memory to attach(engine, memory) or start_task(memory=...).")

    def set_memory(self, memory) -> None:
        """Replace the rehearsal memory (a list or iterable of model-input dicts, this rank's own)."""
        error = self._check_memory(memory)
        _agree(error)
        self._memory = memory
        self._probe_cursor = _Cursor(memory)
        self._rehearsal_cursor = _Cursor(memory)

    def merge(self, weights: tuple[float, float] | None = None, rehearsal_steps: int | None = None) -> dict:
        """Merge now, on every rank (all ranks must call it). None = the controller's choice."""
        if not self.enabled:
            raise AimInputError("aim_merging is disabled (\"enabled\": false); merge() needs it enabled.")
        if weights is not None:
            if len(weights) != 2 or not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
                raise AimInputError(f"merge(weights={weights!r}): expected a pair of finite numbers (w_in, w_out).")
        if rehearsal_steps is not None and (not isinstance(rehearsal_steps, int) or rehearsal_steps < 0):
            raise AimInputError(f"merge(rehearsal_steps={rehearsal_steps!r}): expected an integer >= 0.")
        if self.task_index < 0:
            self.start_task()
        _agree(None if self._memory is not None else
               "aim_merging: merge() needs a rehearsal memory; pass it to attach() or start_task(memory=...).")
        return self._merge(weights=weights, rehearsal_steps=rehearsal_steps, explicit=True)

    def record_probe_loss(self, loss_sum: float, count: float) -> None:
        """probe_source "training_batch": this step's forgetting signal from memory rows that are already in
        the training batch. loss_sum = the summed per-token loss of those rows, count = their label tokens
        (aim_ds.rows_loss computes both from the forward's logits). Call it on every rank between the forward
        and engine.step(); a rank without memory rows passes (0, 0). The plugin then runs no probe forward:
        the signal costs one 16-byte all-reduce per step. It is the loss before the step's update, in the
        model's training mode (the released code's probe also ran with dropout on)."""
        if not self.enabled or self.config.probe_source != "training_batch":
            raise AimInputError("record_probe_loss() needs aim_merging.probe_source = \"training_batch\" (this "
                                f"config has {self.config.probe_source!r}); set it in the ds_config, or drop the call "
                                "and let the plugin probe with its own forward.")
        s, c = float(loss_sum), float(count)
        if c < 0 or (c == 0 and s != 0):
            raise AimInputError(f"record_probe_loss({loss_sum!r}, {count!r}): count is the number of label tokens "
                                "behind loss_sum (>= 0; 0 only with loss_sum 0).")
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
            out["host" if t.device.type == "cpu" and self.shards.device.type != "cpu" else "device"] += \
                t.numel() * t.element_size()
        return out

    def write_trajectory_csv(self, path: str) -> None:
        """Rank 0 writes the per-step trajectory atomically; other ranks return at once."""
        if self.enabled and self.rank != 0:
            return
        write_csv(path, self.trajectory, TRAJECTORY_FIELDS)

    def state_dict(self) -> dict:
        """Everything the plugin holds on this rank (tensors are this rank's shards)."""
        sd = {"config": self.config.to_dict(), "task_index": self.task_index, "step_in_task": self._step_in_task,
              "merge_count": self.merge_count, "trajectory": list(self.trajectory), "enabled": self.enabled,
              "work": dict(self.work)}
        if not self.enabled:
            return sd
        sd.update({
            "rank": self.rank, "world_size": self.world_size,
            "controller": self.controller.state_dict() if self.controller is not None else None,
            "anchor": [t.detach().cpu().clone() for t in self.anchor],
            "probe_position": self._probe_cursor.position if self._probe_cursor else 0,
            "rehearsal_position": self._rehearsal_cursor.position if self._rehearsal_cursor else 0,
        })
        if self._importance:
            sd["theta_k"] = [t.detach().cpu().clone() for t in self._theta_k]
            sd["ema"] = {k: [t.detach().cpu().clone() for t in v] for k, v in self._ema.items()}
        return sd

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("config") != self.config.to_dict():
            raise AimInputError("aim_merging: the saved plugin state was made with a different aim_merging config; "
                                "resume with the config the run started with.")
        self.task_index, self._step_in_task = sd["task_index"], sd["step_in_task"]
        self.merge_count, self.trajectory = sd["merge_count"], list(sd["trajectory"])
        self.work.update(sd.get("work", {}))  # absent in checkpoints of aim_ds <= 0.1 (counts restart at 0)
        if not self.enabled:
            return
        if sd["world_size"] != self.world_size or sd["rank"] != self.rank:
            raise AimInputError(f"aim_merging: plugin state of rank {sd['rank']}/{sd['world_size']} loaded on rank "
                                f"{self.rank}/{self.world_size}; reshard it first (aim-ds reshard).")
        for dst, src in zip(self.anchor, sd["anchor"], strict=True):
            if dst.shape != src.shape:
                raise AimInputError(f"aim_merging: saved anchor shard has shape {tuple(src.shape)}, this rank's "
                                    f"partition is {tuple(dst.shape)}: the checkpoint is of another model or layout.")
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
                if engine.was_step_applied():
                    plugin._after_step()
                else:
                    plugin._recorded_probe = None  # a skipped (overflowed) step: its probe loss goes with it
            return out

        self._original_step = original
        engine.step = step  # instance attribute: no change to the user's loop or to DeepSpeed's class

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
        c = self.config
        if not self._active() or c.interval_rule == "fixed":
            self._recorded_probe = None
            return False
        if c.probe_source == "training_batch":
            return True  # every step: the loss is already computed, the all-reduce is 16 bytes
        return self._memory is not None and self._step_in_task % c.probe_interval == 0

    def _probe_from_batch(self) -> float | None:
        """The recorded memory-row loss of this step's training batch, token-weighted over ranks."""
        s, c = self._recorded_probe or (0.0, 0.0)
        self._recorded_probe = None
        total, count = statistics.sum_over_ranks(s, c)
        if count <= 0:
            if self.rank == 0 and self._unrecorded_warned != self.task_index:
                self._unrecorded_warned = self.task_index
                warnings.warn(f"aim_merging: probe_source is \"training_batch\" but no rank recorded a memory loss "
                              f"at task {self.task_index} step {self._step_in_task}: the forgetting signal is empty, "
                              "so only forced activations trigger merges. Mix memory rows into the training batches "
                              "and call plugin.record_probe_loss(*aim_ds.rows_loss(...)) before engine.step(), or use "
                              "probe_source \"memory_forward\". (Reported once per task.)", RuntimeWarning)
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
            local = float(self.engine(**_to_device(batch, self.engine.device)).loss.detach())
        finally:
            module.train(was_training)
        self.work["probe_forwards"] += 1
        self.work["probe_tokens"] += batch_tokens(batch)
        return self._finite_probe(statistics.mean_over_ranks(local, 1.0))

    def _finite_probe(self, loss: float) -> float | None:
        if not math.isfinite(loss):
            if self.rank == 0:
                warnings.warn(f"aim_merging: non-finite probe loss at task {self.task_index} step "
                              f"{self._step_in_task}; this step's forgetting signal is skipped.", RuntimeWarning)
            return None
        return loss

    def _active(self) -> bool:
        return self.task_index >= 1 or self.config.merge_first_task

    def _decide(self, loss: float | None) -> bool:
        flag = torch.zeros(1, dtype=torch.float64, device=statistics.comm_device())
        if self.controller is not None:
            d = self.controller.observe(loss)
            self._record(d, loss)
            flag[0] = 1.0 if d.merge else 0.0
        if not self._active():
            return False  # every rank knows nothing can merge now: no collective on this step
        statistics.broadcast(flag, src=0)
        return bool(flag.item())

    def _record(self, d, loss) -> None:
        row = {"task": self.task_index, "step": d.step, "probe_loss": loss, "threshold": d.threshold,
               "activations": d.activations, "interval": d.interval,
               "learning_signal": None, "merge": 0, "w_in": None, "w_out": None}
        self.trajectory.append(row)
        mon = getattr(self.engine, "monitor", None)
        if mon is not None and getattr(mon, "enabled", False) and loss is not None:
            gs = self.engine.global_samples
            mon.write_events([("aim/probe_loss", loss, gs), ("aim/interval", d.interval, gs)])

    # ------------------------------------------------------------------ merge
    def _merge(self, weights, rehearsal_steps, explicit: bool) -> dict:
        t0 = time.perf_counter()
        groups = self.shards.groups
        local = sum(fusion.abs_change_sum(g.master, a, g.ranges) for g, a in zip(groups, self.anchor))
        total = statistics.sum_over_ranks(local)[0]
        plan = torch.zeros(4, dtype=torch.float64, device=statistics.comm_device())  # S, R, w_in, w_out
        if self.controller is not None:
            if math.isfinite(total):
                p = self._plan(total, explicit)
                w_in, w_out = weights if weights is not None else (p.w_in, p.w_out)
                r = rehearsal_steps if rehearsal_steps is not None else p.rehearsal_steps
                plan[:] = torch.tensor([p.interval, r, w_in, w_out], dtype=torch.float64)
                self._mark_merge(p, w_in, w_out, explicit)
            else:
                plan[0] = -1  # skip: never fuse non-finite weights
                warnings.warn(f"aim_merging: non-finite learning signal at task {self.task_index} step "
                              f"{self._step_in_task}: the weights hold NaN/inf; merge skipped.", RuntimeWarning)
        statistics.broadcast(plan, src=0)
        interval, r, w_in, w_out = plan.tolist()
        if interval < 0:
            return {"merged": False, "reason": "non-finite learning signal"}
        r = int(r)
        scalar = not self._importance or weights is not None
        _sync()
        t_prep0 = time.perf_counter()
        if scalar:
            for g, a in zip(groups, self.anchor):
                fusion.prepare_buffer(a, g.master, w_in, w_out)
        else:
            for g, k in zip(groups, self._theta_k):
                fusion.copy_into(k, g.master)
        _sync()
        t_prep = time.perf_counter() - t_prep0
        rehearsal_losses = self._rehearse(r)
        if self.after_rehearsal_callback is not None:
            self.after_rehearsal_callback(self)
        _sync()
        t1 = time.perf_counter()
        if scalar:
            for g, a in zip(groups, self.anchor):
                fusion.fuse_scalar(g.master, a, w_out)
        else:
            self._fuse_importance()
        _sync()
        t_fuse = time.perf_counter() - t1 + t_prep
        self.shards.refresh_working_copies()
        self.merge_count += 1
        n = self.shards.local_numel
        passes = fusion.SCALAR_FUSION_PASSES if scalar else 12
        return {"merged": True, "task": self.task_index, "step": self._step_in_task, "rehearsal_steps": r,
                "w_in": w_in, "w_out": w_out, "interval": int(interval), "learning_signal": total,
                "rehearsal_losses": rehearsal_losses, "fusion_seconds": t_fuse, "fusion_passes": passes,
                "fusion_bytes": n * 4 * passes, "seconds": time.perf_counter() - t0}

    def _plan(self, total: float, explicit: bool):
        c = self.controller
        if c.active or not explicit:
            return c.on_merge(total, self._global_valid_numel)
        # an explicit merge while the controller is inactive (first task): no interval update
        return c.plan_inactive(total, self._global_valid_numel)

    def _mark_merge(self, p, w_in, w_out, explicit) -> None:
        if self.trajectory and not explicit and self.trajectory[-1]["task"] == self.task_index:
            row = self.trajectory[-1]
        else:  # an explicit merge gets its own row
            row = {"task": self.task_index, "step": self._step_in_task, "probe_loss": None, "threshold": None,
                   "activations": None, "interval": p.interval, "learning_signal": None}
            self.trajectory.append(row)
        row.update({"merge": 1, "learning_signal": p.learning_signal, "w_in": w_in, "w_out": w_out,
                    "interval": p.interval})

    def _rehearse(self, steps: int) -> list[float]:
        """R ordinary optimizer steps on memory batches through the same engine; LR schedule frozen."""
        engine = self.engine
        scheduler = engine.lr_scheduler
        lrs = [g["lr"] for g in engine.optimizer.param_groups]
        losses = []
        self._in_rehearsal = True
        engine.lr_scheduler = None  # DeepSpeed steps engine.lr_scheduler in engine.step(): not during rehearsal
        # Accelerate (HF Trainer) sets the accumulation boundary by hand and DeepSpeed keeps it until set again:
        # left as it is, every rehearsal micro-batch would be an optimizer step
        boundary = getattr(engine, "_is_gradient_accumulation_boundary", None)
        gas = engine.gradient_accumulation_steps()
        try:
            for _ in range(steps):
                total = 0.0
                for micro in range(gas):
                    if boundary is not None:
                        engine.set_gradient_accumulation_boundary(micro == gas - 1)
                    batch = self._rehearsal_cursor.next()
                    self.work["rehearsal_tokens"] += batch_tokens(batch)  # on the host copy: no device sync
                    batch = _to_device(batch, engine.device)
                    loss = engine(**batch).loss
                    engine.backward(loss)
                    self._original_step()
                    total += float(loss.detach())
                losses.append(total / engine.gradient_accumulation_steps())
                self.work["rehearsal_steps"] += 1
        finally:
            if boundary is not None:
                engine.set_gradient_accumulation_boundary(boundary)
            engine.lr_scheduler = scheduler
            for g, lr in zip(engine.optimizer.param_groups, lrs):
                g["lr"] = lr
            self._in_rehearsal = False
        if losses and statistics.any_rank(not all(math.isfinite(x) for x in losses)):
            raise FloatingPointError(
                "aim_merging: a rehearsal step produced a non-finite loss; the optimizer has already applied it, "
                "so the merge is aborted. Lower the learning rate or check the memory batches.")
        return losses

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

    # ------------------------------------------------------------------ importance policy
    @torch.no_grad()
    def _track_importance(self, index: int, master: torch.Tensor, grad: torch.Tensor) -> None:
        if self.task_index < 0:
            return
        side = "out" if self._in_rehearsal else "in"
        b1, b2 = self.config.importance_beta1, self.config.importance_beta2
        ema_i, ema_u = self._ema["i_" + side][index], self._ema["u_" + side][index]
        for off, n in fusion.chunks(master.numel()):
            imp = (master.narrow(0, off, n) * grad.narrow(0, off, n).to(master.dtype)).abs_()
            ei = fusion._on(ema_i.narrow(0, off, n), master.device)
            eu = fusion._on(ema_u.narrow(0, off, n), master.device)
            ei.mul_(b1).add_(imp, alpha=1 - b1)
            eu.mul_(b2).add_((imp - ei).abs_(), alpha=1 - b2)
            if ei.data_ptr() != ema_i.narrow(0, off, n).data_ptr():
                ema_i.narrow(0, off, n).copy_(ei)
                ema_u.narrow(0, off, n).copy_(eu)

    @torch.no_grad()
    def _fuse_importance(self) -> None:
        groups = self.shards.groups
        scores = {}
        for side in ("in", "out"):
            # score = EMA(I) * U, computed into the EMA(I) buffer (no new shard-sized tensor)
            for i_buf, u_buf in zip(self._ema["i_" + side], self._ema["u_" + side]):
                i_buf.mul_(u_buf)
            scores[side] = self._ema["i_" + side]
        q = self.config.importance_quantile
        q_in = statistics.global_quantile([(s, g.ranges) for s, g in zip(scores["in"], groups)], q)
        q_out = statistics.global_quantile([(s, g.ranges) for s, g in zip(scores["out"], groups)], q)
        for g, a, k, s_in, s_out in zip(groups, self.anchor, self._theta_k, scores["in"], scores["out"]):
            fusion.fuse_importance(g.master, a, k, s_in, q_in, s_out, q_out, both=(0.4, 0.6), neither=(0.5, 0.5))
        for bufs in self._ema.values():
            for b in bufs:
                b.zero_()

    # ------------------------------------------------------------------ input checks
    def _check_memory(self, memory) -> str | None:
        if memory is None:
            return "aim_merging: memory is None; give a list or iterable of model-input dicts."
        if isinstance(memory, dict):
            return "aim_merging: memory is one dict; give a list (or iterable) of batch dicts."
        if isinstance(memory, (list, tuple)):
            batches = list(memory)
        else:
            try:
                batches = list(itertools.islice(iter(memory), 1))
            except TypeError:
                return f"aim_merging: memory of type {type(memory).__name__} is not iterable; give a list of dicts."
        if not batches:
            return ("aim_merging: the rehearsal memory is empty on rank {r}; every rank needs at least one batch "
                    "(check the memory fraction and the number of ranks).").format(r=getattr(self, "rank", 0))
        module = _input_consumer(self.engine.module)
        sig = inspect.signature(module.forward)
        accepts_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
        vocab = getattr(getattr(module, "config", None), "vocab_size", None)
        for i, b in enumerate(batches):
            where = f"aim_merging: memory batch {i}"
            if not isinstance(b, dict):
                return f"{where} is a {type(b).__name__}; each batch must be a dict of model inputs."
            if "labels" not in b:
                return f"{where} has no 'labels': the probe and rehearsal need a loss (add labels, -100 = ignore)."
            # a key the forward does not name would be swallowed by **kwargs (HF models) and ignored
            unknown = [k for k in b if k not in sig.parameters]
            if unknown:
                return (f"{where} has keys {unknown} that {type(module).__name__}.forward does not name"
                        f"{' (it would silently ignore them via **kwargs)' if accepts_any else ''}; "
                        "remove them or rename them to the model's input names.")
            labels, ids = b["labels"], b.get("input_ids")
            if not torch.is_tensor(labels) or labels.dtype not in (torch.int64, torch.int32):
                return f"{where}: labels must be an integer tensor (token ids, -100 = ignore)."
            keep = b.get("logits_to_keep")
            if torch.is_tensor(keep) and keep.dim() == 2:   # labels gathered at the kept logit positions
                if keep.shape != labels.shape:
                    return (f"{where}: labels shape {tuple(labels.shape)} differs from logits_to_keep "
                            f"{tuple(keep.shape)}; gather labels at the kept positions.")
            elif torch.is_tensor(ids) and ids.shape != labels.shape:
                return f"{where}: labels shape {tuple(labels.shape)} differs from input_ids {tuple(ids.shape)}."
            sizes = {k: v.shape[0] for k, v in b.items() if torch.is_tensor(v) and v.dim() > 0}
            if len(set(sizes.values())) > 1:
                return f"{where} mixes batch sizes {sizes}; all tensors must share the first dimension."
            if any(s == 0 for s in sizes.values()):
                return f"{where} has an empty tensor; every batch needs at least one row."
            if ids is not None:
                if not torch.is_tensor(ids) or ids.dtype not in (torch.int64, torch.int32):
                    return f"{where}: input_ids must be an integer tensor."
                if vocab is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
                    return (f"{where}: input_ids range [{int(ids.min())}, {int(ids.max())}] is outside the model's "
                            f"vocabulary [0, {vocab}); tokenize with the model's tokenizer.")
        return None


def _input_consumer(module):
    """The module whose forward names the model inputs: pass-through wrappers whose forward takes only
    (*args, **kwargs), such as peft's PeftModel without a task_type, are followed to the model they call."""
    for _ in range(8):
        params = inspect.signature(module.forward).parameters.values()
        if any(p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            return module
        inner = module.get_base_model() if callable(getattr(module, "get_base_model", None)) else None
        for name in ("base_model", "model", "module"):
            if inner is None or inner is module:
                inner = getattr(module, name, None)
        if not isinstance(inner, torch.nn.Module) or inner is module:
            return module
        module = inner
    return module


def _sync() -> None:
    """Wait for queued device work so the fusion timers measure the work, not its launch."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().synchronize()


def batch_tokens(batch: dict) -> int:
    """Tokens a forward over this batch processes: the attention mask's ones, else every input id."""
    mask = batch.get("attention_mask")
    if torch.is_tensor(mask):
        return int(mask.sum())
    ids = batch.get("input_ids")
    return int(ids.numel()) if torch.is_tensor(ids) else 0


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _token_losses(logits: torch.Tensor, labels: torch.Tensor, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss [B, W-1] and label mask of a causal-LM batch: the shifted cross-entropy the model's own
    loss uses (position t predicts label t + 1; -100 ignored, loss 0 there)."""
    if logits.shape[:2] != labels.shape[:2]:
        raise AimInputError(f"{who}: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not line up; "
                            "pass the labels at the positions whose logits the model returned.")
    lg, lb = logits[:, :-1].float(), labels[:, 1:].to(logits.device)
    tok = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100,
                                            reduction="none").view(lb.shape)
    return tok, lb != -100


@torch.no_grad()
def rows_loss(logits: torch.Tensor, labels: torch.Tensor, rows) -> tuple[float, int]:
    """(summed token loss, label tokens) of some rows of a causal-LM batch, from the forward's own logits.
    ``labels`` are the ones passed to the model (with ``logits_to_keep`` positions, the labels gathered
    there, as aim_ds.data.collate makes them). For ``AimPlugin.record_probe_loss``."""
    tok, has = _token_losses(logits[rows], labels[rows], "rows_loss")
    return float(tok.sum()), int(has.sum())


def mixed_loss(logits: torch.Tensor, labels: torch.Tensor, n_new: int, memory_weight: float
               ) -> tuple[torch.Tensor, float, int]:
    """The training loss of a mixed batch whose first ``n_new`` rows are the new task's and the rest memory
    rows: (1 - w) x the new rows' mean token loss + w x the memory rows' mean token loss, w = memory_weight.
    The memory rows then pull with weight w however few they are (fewer rows = less compute, same expected
    gradient mix). Also returns the memory rows' (summed token loss, label tokens) for
    ``AimPlugin.record_probe_loss``, from the same cross-entropy (one pass over the logits). Labels as for
    ``rows_loss``."""
    if not (0.0 < memory_weight < 1.0):
        raise AimInputError(f"mixed_loss(memory_weight={memory_weight!r}): must be in (0, 1).")
    tok, has = _token_losses(logits, labels, "mixed_loss")
    new_n, mem_n = has[:n_new].sum(), has[n_new:].sum()
    new_sum, mem_sum = tok[:n_new].sum(), tok[n_new:].sum()
    # a side without label tokens contributes 0 (clamp: no 0/0); the counts stay tensors (no host sync) until here
    loss = (1.0 - memory_weight) * new_sum / new_n.clamp(min=1) + memory_weight * mem_sum / mem_n.clamp(min=1)
    return loss, float(mem_sum.detach()), int(mem_n)


def attach(engine, memory=None, config: AimConfig | dict | None = None) -> AimPlugin:
    """Attach AimMerging to a DeepSpeed engine. The user's training loop is unchanged.

    config None reads the engine's ds_config "aim_merging" section (absent -> disabled: plain DeepSpeed).
    memory: a list or iterable of model-input dicts (with labels) for this rank; it may also be given
    later with `start_task(memory=...)`.
    """
    return AimPlugin(engine, memory, config)
