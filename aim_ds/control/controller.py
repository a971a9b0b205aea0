"""The merge controller: a pure state machine (signals in, decisions out). No torch, no distributed.

Per task (``start_task``): step j = 0, last merge m = 0, interval S = S_0, activations A = 0,
threshold delta = None, the learning-signal history empty. Then, once after every training optimizer
step of the task (rehearsal steps are not counted), ``observe(probe_loss, lr)`` advances j by one and
decides:

0. The forgetting signal h is the probe loss, or with ``forgetting_ema`` = beta > 0 its exponential
   moving average over the task's probed steps (h <- beta h + (1 - beta) loss; the first probe of the
   task starts it), so a threshold close to the mean does not fire on single-batch noise.
1. Threshold window: the first W = floor(2S/3) + 1 steps after the last merge (j - m <= W). The signal
   values seen there are collected; at j = m + W, delta = threshold_factor * mean (threshold_rule
   "factor") or mean + threshold_std * std (threshold_rule "mean_std": the threshold scales with the
   signal's own noise, so it can sit close to the mean where the noise is small). std is the standard
   deviation of the window's raw probe losses times sqrt((1 - beta) / (1 + beta)), the stationary
   std of an EMA of independent noise: the EMA values of a short window are correlated, so their own
   spread would understate the noise the EMA keeps. Steps without a
   probe (``None``: not probed, or a non-finite loss) do not contribute. If the window held no probe,
   the first probe after it sets delta from that one value (std 0; that step adds no activation).
2. After the window (delta known), each probed step with h >= delta adds one activation.
3. Forced activation: if A == 0 at j >= m + forced_activation_multiple * S, A <- 1.
4. Merge when (j >= m + S and A >= 1) or A >= activation_cap.

When a decision says merge, the caller measures sum |theta - anchor| and calls
``on_merge(abs_change_sum, numel)``: with learning_signal "per_step", Lambda = abs_change_sum / numel /
S (S = the interval planned for the segment that just ended, not the steps that elapsed); with
"lr_sqrt", Lambda = abs_change_sum / numel / (mean lr of the segment's steps) / sqrt(steps elapsed), the
size of a random walk's step at unit learning rate, so a task that moves at a constant speed keeps a
constant Lambda however the lr schedule decays and whatever S is. The interval rule gives the new S;
the weight policy gives (w_in, w_out) from A and S at merge time (before the update); R = the interval
IN FORCE when the merge fires (the S Lambda was divided by, not the one just computed) with
``rehearsal_steps = "interval"``, or the configured constant. m <- j; A, delta and the window reset.

A merge the caller had to undo (``merge_undone``) is retried at the next step, at most
``merge_retries`` times in a segment; then the segment is given up: m <- j with S unchanged, so a
persistent failure costs one attempt (and its rehearsal) per interval instead of one per step.

Why R = S in force, for every interval rule: the released trainer runs its rehearsal loop with the
interval set at the PREVIOUS merge's update, and updates the interval only after the rehearsal (so
R = S_0 during the cold start); and it is the natural reading of the paper's "R = S" too: the
rehearsal balances the segment that just ended, which ran with that S.

The "fixed" interval rule merges every S_0 steps (j >= m + S_0), never probes, never changes S.
Merging is inactive on task 0 unless ``merge_first_task``: observe() then never asks to merge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import AimConfig
from .policies import WeightPolicy, make_interval_rule, make_weight_policy, rehearsal_steps, uses_signal

STATE_VERSION = 2


@dataclass(frozen=True)
class StepDecision:
    step: int
    merge: bool
    probe_loss: float | None
    threshold: float | None
    activations: int
    interval: int
    forced: bool
    signal: float | None = None  # the forgetting signal compared with the threshold (the EMA, or the probe loss)
    lr: float | None = None


@dataclass(frozen=True)
class ControllerPlan:
    """The controller's decision at a merge (rank 0); aim_ds.plugin.plan.MergePlan is what every rank then does."""

    step: int
    interval: int  # the new S
    rehearsal_steps: int  # R, from the S in force when the merge fired (before the update)
    w_in: float
    w_out: float
    learning_signal: float
    policy: str


def probe_due(cfg: AimConfig, active: bool, step: int) -> bool:
    """The probe schedule: is the forgetting signal measured after training step `step` (1-based) of a
    task? Never on an inactive task or with a rule that does not use the signal ("fixed"); else every
    probe_interval-th step (always 1 with probe_source "training_batch": the loss is already computed).
    A pure function of the config and the step, so every rank evaluates it alike (the probe is a
    collective) while the controller itself lives on rank 0."""
    if not active or not uses_signal(cfg):
        return False
    return step % cfg.probe_interval == 0


def threshold_window(interval: int) -> int:
    """Steps after a merge whose probe losses form the threshold: floor(2S/3) + 1."""
    return (2 * interval) // 3 + 1


def task_steps_error(cfg, steps) -> str | None:
    """Why start_task(steps=...) is refused, or None. A plugin checks it on every rank before rank 0's
    controller would raise alone (the other ranks would wait in the next collective)."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        return f"steps must be an integer >= 1 or None, got {steps!r}"
    if cfg.initial_interval_fraction > 0.0 and steps is None:
        return (
            f"aim_merging.initial_interval_fraction {cfg.initial_interval_fraction:g} needs each task's length: "
            "pass steps= to start_task() (the driver and aim_ds.hf do), or set initial_interval instead"
        )
    return None


class MergeController:
    def __init__(self, cfg: AimConfig, weights: WeightPolicy | None = None):
        """weights: the config's weight policy where the caller has built it already (the plugin builds it once
        for the controller and its fuser)."""
        if not isinstance(cfg, AimConfig):
            cfg = AimConfig.from_dict(cfg)
        self.cfg = cfg
        self._rule = make_interval_rule(cfg)
        self._weights = weights if weights is not None else make_weight_policy(cfg)
        self._keep = max(2, self._rule.history_needed)
        self._task_index: int | None = None
        self._reset(active=False)

    # ------------------------------------------------------------------ lifecycle
    def _reset(self, active: bool) -> None:
        self._active = active
        self._step = 0
        self._last_merge = 0
        self._interval = self.cfg.initial_interval
        self._threshold: float | None = None
        self._window: list[float] = []  # forgetting-signal values of the threshold window
        self._window_raw: list[float] = []  # the probe losses behind them (the noise, for "mean_std")
        self._activations = 0
        self._merges = 0
        self._signals: list[float] = []  # the task's last `_keep` learning-signal values
        self._last_signal: float | None = None
        self._ema: float | None = None  # forgetting_ema: the task's running average of the probe loss
        self._lr_sum = 0.0  # learning rates of the segment's steps (learning_signal "lr_sqrt")
        self._lr_count = 0
        self._last_lr: float | None = None
        self._retries = 0  # undone merges in this segment

    def start_task(self, task_index: int, steps: int | None = None) -> None:
        """Per-task reset. Merging is active iff task_index >= 1 or cfg.merge_first_task. steps: the task's
        training steps, which initial_interval_fraction needs (S_0 = that fraction of them, within
        [min_interval, max_interval]); otherwise unused."""
        if isinstance(task_index, bool) or not isinstance(task_index, int) or task_index < 0:
            raise ValueError(f"task_index must be an integer >= 0, got {task_index!r}")
        error = task_steps_error(self.cfg, steps)
        if error is not None:
            raise ValueError(error)
        frac = self.cfg.initial_interval_fraction
        self._task_index = task_index
        self._reset(active=task_index >= 1 or self.cfg.merge_first_task)
        if frac > 0.0:
            self._interval = min(self.cfg.max_interval, max(self.cfg.min_interval, round(frac * steps)))

    def _require_task(self) -> None:
        if self._task_index is None:
            raise RuntimeError("MergeController: call start_task(task_index) before observe()/on_merge()")

    # ------------------------------------------------------------------ per step
    def wants_probe(self) -> bool:
        """Would the NEXT observe() use a probe loss?"""
        return self._task_index is not None and probe_due(self.cfg, self._active, self._step + 1)

    def observe(self, probe_loss: float | None, lr: float | None = None) -> StepDecision:
        """One training step: `probe_loss` is the forgetting signal's input (None: not probed), `lr` the
        learning rate the step used (needed by learning_signal "lr_sqrt"; recorded for replay)."""
        self._require_task()
        self._step += 1
        lr = self._take_lr(lr)
        j, m, s = self._step, self._last_merge, self._interval
        if not self._active:
            return StepDecision(j, False, None, None, 0, s, False, None, lr)
        if not self._rule.uses_signal:
            return StepDecision(j, j >= m + s, None, None, 0, s, False, None, lr)

        loss = None if probe_loss is None else float(probe_loss)
        if loss is not None and not math.isfinite(loss):
            loss = None
        h = self._smooth(loss)
        w = threshold_window(s)
        if j - m <= w:
            if h is not None:
                self._window.append(h)
                self._window_raw.append(loss)
            if j - m == w and self._window:
                self._threshold = self._threshold_of(self._window, self._window_raw)
        elif self._threshold is None:
            if h is not None:  # the window held no probe: the first one after it sets the threshold
                self._threshold = self._threshold_of([h], [loss])
        elif h is not None and h >= self._threshold:
            self._activations += 1

        forced = False
        if self._activations == 0 and j >= m + self.cfg.forced_activation_multiple * s:
            self._activations = 1
            forced = True
        a = self._activations
        merge = (j >= m + s and a >= 1) or a >= self.cfg.activation_cap
        return StepDecision(j, merge, loss, self._threshold, a, s, forced, h, lr)

    def _take_lr(self, lr: float | None) -> float | None:
        if lr is None:
            return None
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
            raise ValueError(f"lr must be a finite number >= 0 or None, got {lr!r}")
        self._lr_sum += float(lr)
        self._lr_count += 1
        self._last_lr = float(lr)
        return float(lr)

    def _smooth(self, loss: float | None) -> float | None:
        """The forgetting signal: the probe loss, or its EMA (a step without a probe leaves it as it is
        and contributes nothing, like a raw step without a probe)."""
        beta = self.cfg.forgetting_ema
        if loss is None or beta == 0.0:
            return loss
        self._ema = loss if self._ema is None else beta * self._ema + (1.0 - beta) * loss
        return self._ema

    def _threshold_of(self, values: list[float], raw: list[float]) -> float:
        mean = sum(values) / len(values)
        if self.cfg.threshold_rule == "mean_std":
            raw_mean = sum(raw) / len(raw)
            beta = self.cfg.forgetting_ema
            std = math.sqrt(sum((v - raw_mean) ** 2 for v in raw) / len(raw) * (1.0 - beta) / (1.0 + beta))
            return mean + self.cfg.threshold_std * std
        return self.cfg.threshold_factor * mean

    # ------------------------------------------------------------------ merges
    def _signal(self, abs_change_sum: float, numel: int) -> float:
        if isinstance(numel, bool) or not isinstance(numel, int) or numel <= 0:
            raise ValueError(f"numel must be a positive integer, got {numel!r}")
        total = float(abs_change_sum)
        if not math.isfinite(total) or total < 0:
            raise ValueError(f"abs_change_sum must be finite and >= 0, got {abs_change_sum!r}")
        if self.cfg.learning_signal == "per_step":
            return total / numel / self._interval
        # "lr_sqrt": displacement per unit learning rate per sqrt(step) of the steps that elapsed (a forced
        # merge ends a segment of 2S steps, so the planned S would misstate the time by 2x)
        if self._lr_count:
            lr = self._lr_sum / self._lr_count
        elif self._last_lr is not None:  # a merge with no step since the last one (explicit): the last lr
            lr = self._last_lr
        else:
            raise ValueError(
                'learning_signal "lr_sqrt" needs the learning rate of each step: pass lr to observe() '
                "(the plugin does; a trajectory.csv without an lr column cannot be replayed with it)"
            )
        steps = max(1, self._step - self._last_merge)
        return 0.0 if lr <= 0.0 else total / numel / lr / math.sqrt(steps)

    def on_merge(self, abs_change_sum: float, numel: int) -> ControllerPlan:
        """Record a merge at the current step; returns the plan (new S, R, weights, Lambda)."""
        self._require_task()
        lam = self._signal(abs_change_sum, numel)
        old = self._interval
        self._merges += 1
        self._signals = (self._signals + [lam])[-self._keep :]
        new = int(self._rule.next_interval(old, self._signals, self._merges))
        w_in, w_out = self._weights.weights(self._activations, old)
        plan = ControllerPlan(
            self._step, new, rehearsal_steps(self.cfg, old), float(w_in), float(w_out), lam, self._weights.name
        )
        self._interval = new
        self._after_merge(lam)
        return plan

    def plan_inactive(self, abs_change_sum: float, numel: int) -> ControllerPlan:
        """An explicit merge while the controller is inactive (e.g. task 0): the interval is not
        updated and the learning-signal history is untouched; weights from the policy."""
        self._require_task()
        lam = self._signal(abs_change_sum, numel)
        s = self._interval
        w_in, w_out = self._weights.weights(self._activations, s)
        self._merges += 1
        self._after_merge(lam)
        return ControllerPlan(
            self._step, s, rehearsal_steps(self.cfg, s), float(w_in), float(w_out), lam, self._weights.name
        )

    def merge_undone(self) -> bool:
        """The merge this step's decision asked for was undone by the caller (its state restored to
        before on_merge). Returns True when the next step retries it (up to merge_retries times in the
        segment), False when the segment is given up: a new segment starts here with S unchanged."""
        self._require_task()
        self._retries += 1
        if self._retries <= self.cfg.merge_retries:
            return True
        self._start_segment()
        return False

    def _after_merge(self, lam: float) -> None:
        self._last_signal = lam
        self._start_segment()

    def _start_segment(self) -> None:
        self._last_merge = self._step
        self._threshold = None
        self._window = []
        self._window_raw = []
        self._activations = 0
        self._lr_sum = 0.0
        self._lr_count = 0
        self._retries = 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "interval_rule": self.cfg.interval_rule,
            "task_index": self._task_index,
            "active": self._active,
            "step": self._step,
            "last_merge_step": self._last_merge,
            "interval": self._interval,
            "threshold": self._threshold,
            "window": list(self._window),
            "window_raw": list(self._window_raw),
            "activations": self._activations,
            "merges": self._merges,
            "signals": list(self._signals),
            "last_learning_signal": self._last_signal,
            "ema": self._ema,
            "lr_sum": self._lr_sum,
            "lr_count": self._lr_count,
            "last_lr": self._last_lr,
            "retries": self._retries,
        }

    def load_state_dict(self, d: dict) -> None:
        if d.get("version") not in (1, STATE_VERSION):
            raise ValueError(f"MergeController state version {d.get('version')!r} is not 1 or {STATE_VERSION}")
        if d.get("interval_rule") != self.cfg.interval_rule:
            raise ValueError(
                f"MergeController state was saved with interval_rule={d.get('interval_rule')!r}, "
                f"this controller uses {self.cfg.interval_rule!r}"
            )
        opt = lambda v: None if v is None else float(v)  # noqa: E731
        self._task_index = None if d["task_index"] is None else int(d["task_index"])
        self._active = bool(d["active"])
        self._step = int(d["step"])
        self._last_merge = int(d["last_merge_step"])
        self._interval = int(d["interval"])
        self._threshold = opt(d["threshold"])
        if "window" in d:
            self._window = [float(x) for x in d["window"]]
            self._window_raw = [float(x) for x in d["window_raw"]]
        else:  # version 1 kept the window's sum and count; its threshold rule (factor x mean) needs only those
            n = int(d["window_count"])
            self._window = [float(d["window_sum"]) / n] * n if n else []
            self._window_raw = list(self._window)
        self._activations = int(d["activations"])
        self._merges = int(d["merges"])
        self._signals = [float(x) for x in d["signals"]][-self._keep :]
        self._last_signal = opt(d["last_learning_signal"])
        self._ema = opt(d.get("ema"))
        self._lr_sum = float(d.get("lr_sum", 0.0))
        self._lr_count = int(d.get("lr_count", 0))
        self._last_lr = opt(d.get("last_lr"))
        self._retries = int(d.get("retries", 0))

    # ------------------------------------------------------------------ read-only views
    @property
    def step(self) -> int:
        return self._step

    @property
    def interval(self) -> int:
        return self._interval

    @property
    def threshold(self) -> float | None:
        return self._threshold

    @property
    def activations(self) -> int:
        return self._activations

    @property
    def last_learning_signal(self) -> float | None:
        return self._last_signal

    @property
    def task_index(self) -> int | None:
        return self._task_index

    @property
    def active(self) -> bool:
        return self._active

    @property
    def merges(self) -> int:
        return self._merges

    @property
    def last_merge_step(self) -> int:
        return self._last_merge

    @property
    def learning_signals(self) -> tuple[float, ...]:
        """The task's most recent learning-signal values (as many as the interval rule needs)."""
        return tuple(self._signals)


__all__ = ["MergeController", "StepDecision", "ControllerPlan", "probe_due", "threshold_window"]
