"""The merge controller: a pure state machine (signals in, decisions out). No torch, no distributed.

Per task (``start_task``): step j = 0, last merge m = 0, interval S = S_0, activations A = 0,
threshold delta = None, the learning-signal history empty. Then, once after every training optimizer
step of the task (rehearsal steps are not counted), ``observe(probe_loss)`` advances j by one and
decides:

1. Threshold window: the first W = floor(2S/3) + 1 steps after the last merge (j - m <= W). Probe
   losses seen there are averaged; at j = m + W, delta = threshold_factor * mean. Steps without a
   probe (``None``: not probed, or a non-finite loss) do not contribute. If the window held no probe,
   the first probe after it sets delta = threshold_factor * h (that step adds no activation).
2. After the window (delta known), each probed step with h >= delta adds one activation.
3. Forced activation: if A == 0 at j >= m + forced_activation_multiple * S, A <- 1.
4. Merge when (j >= m + S and A >= 1) or A >= activation_cap.

When a decision says merge, the caller measures sum |theta - anchor| and calls
``on_merge(abs_change_sum, numel)``: Lambda = abs_change_sum / numel / S (S = the interval planned for
the segment that just ended, not the steps that elapsed); the interval rule gives the new S; the
weight policy gives (w_in, w_out) from A and S at merge time (before the update); R = the interval
IN FORCE when the merge fires (the S Lambda was divided by, not the one just computed) with
``rehearsal_steps = "interval"``, or the configured constant. m <- j; A, delta and the window reset.

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

from .config import AimConfig
from .policies import make_interval_rule, make_weight_policy, rehearsal_steps, uses_signal

STATE_VERSION = 1


@dataclass(frozen=True)
class StepDecision:
    step: int
    merge: bool
    probe_loss: float | None
    threshold: float | None
    activations: int
    interval: int
    forced: bool


@dataclass(frozen=True)
class ControllerPlan:
    """The controller's decision at a merge (rank 0); aim_ds.merge.MergePlan is what every rank then does."""

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


class MergeController:
    def __init__(self, cfg: AimConfig):
        if not isinstance(cfg, AimConfig):
            cfg = AimConfig.from_dict(cfg)
        self.cfg = cfg
        self._rule = make_interval_rule(cfg)
        self._weights = make_weight_policy(cfg)
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
        self._window_sum = 0.0
        self._window_count = 0
        self._activations = 0
        self._merges = 0
        self._signals: list[float] = []  # the task's last `_keep` learning-signal values
        self._last_signal: float | None = None

    def start_task(self, task_index: int) -> None:
        """Per-task reset. Merging is active iff task_index >= 1 or cfg.merge_first_task."""
        if isinstance(task_index, bool) or not isinstance(task_index, int) or task_index < 0:
            raise ValueError(f"task_index must be an integer >= 0, got {task_index!r}")
        self._task_index = task_index
        self._reset(active=task_index >= 1 or self.cfg.merge_first_task)

    def _require_task(self) -> None:
        if self._task_index is None:
            raise RuntimeError("MergeController: call start_task(task_index) before observe()/on_merge()")

    # ------------------------------------------------------------------ per step
    def wants_probe(self) -> bool:
        """Would the NEXT observe() use a probe loss?"""
        return self._task_index is not None and probe_due(self.cfg, self._active, self._step + 1)

    def observe(self, probe_loss: float | None) -> StepDecision:
        self._require_task()
        self._step += 1
        j, m, s = self._step, self._last_merge, self._interval
        if not self._active:
            return StepDecision(j, False, None, None, 0, s, False)
        if not self._rule.uses_signal:
            return StepDecision(j, j >= m + s, None, None, 0, s, False)

        h = None if probe_loss is None else float(probe_loss)
        if h is not None and not math.isfinite(h):
            h = None
        w = threshold_window(s)
        if j - m <= w:
            if h is not None:
                self._window_sum += h
                self._window_count += 1
            if j - m == w and self._window_count:
                self._threshold = self.cfg.threshold_factor * (self._window_sum / self._window_count)
        elif self._threshold is None:
            if h is not None:  # the window held no probe: the first one after it sets the threshold
                self._threshold = self.cfg.threshold_factor * h
        elif h is not None and h >= self._threshold:
            self._activations += 1

        forced = False
        if self._activations == 0 and j >= m + self.cfg.forced_activation_multiple * s:
            self._activations = 1
            forced = True
        a = self._activations
        merge = (j >= m + s and a >= 1) or a >= self.cfg.activation_cap
        return StepDecision(j, merge, h, self._threshold, a, s, forced)

    # ------------------------------------------------------------------ merges
    def _signal(self, abs_change_sum: float, numel: int) -> float:
        if isinstance(numel, bool) or not isinstance(numel, int) or numel <= 0:
            raise ValueError(f"numel must be a positive integer, got {numel!r}")
        total = float(abs_change_sum)
        if not math.isfinite(total) or total < 0:
            raise ValueError(f"abs_change_sum must be finite and >= 0, got {abs_change_sum!r}")
        return total / numel / self._interval

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

    def _after_merge(self, lam: float) -> None:
        self._last_signal = lam
        self._last_merge = self._step
        self._threshold = None
        self._window_sum = 0.0
        self._window_count = 0
        self._activations = 0

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
            "window_sum": self._window_sum,
            "window_count": self._window_count,
            "activations": self._activations,
            "merges": self._merges,
            "signals": list(self._signals),
            "last_learning_signal": self._last_signal,
        }

    def load_state_dict(self, d: dict) -> None:
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"MergeController state version {d.get('version')!r} != {STATE_VERSION}")
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
        self._window_sum = float(d["window_sum"])
        self._window_count = int(d["window_count"])
        self._activations = int(d["activations"])
        self._merges = int(d["merges"])
        self._signals = [float(x) for x in d["signals"]][-self._keep :]
        self._last_signal = opt(d["last_learning_signal"])

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
