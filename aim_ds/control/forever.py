"""FOREVER's replay schedule on model time: a pure state machine (update sizes in, replay decisions out), on rank 0.

Model time counts how far the weights have moved, not how many steps ran:

    Delta_t = ||theta_t - theta_{t-1}||_2        the applied update of training step t (trainable parameters)
    tau_t   = sum of Delta_i since the task began
    one model day = tau after the task's first day_steps steps

Replay event j fires at the first step where tau_t >= days[j] x one day (days = 1, 2, 4, 7, 15, 30 model days);
a step that crosses several marks fires once. Its strength follows the update sizes:

    mu_0 = mean Delta over the first day_steps steps;  mu_t = (1 - lambda) mu_{t-1} + lambda Delta_t afterwards
    beta_t = beta_base x clip(1 + gamma (mu_t / mu_0 - 1), beta_min_factor, beta_max_factor)

and a replay step minimises L_old + beta_t ||theta - theta*||^2, theta* the weights at the end of the previous task.
No torch here: the plugin (aim_ds.plugin.forever) measures Delta_t on the shards and runs the replay.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..config import ForeverConfig


@dataclass(frozen=True)
class ReplayDecision:
    """What one training step's update means for the schedule (one trajectory row)."""

    task: int
    step: int
    delta: float
    tau: float
    day: float | None  # the model time of one day; None until day_steps steps ran
    ratio: float  # mu_t / mu_0 (1 until one day has passed)
    beta: float
    event: int | None  # the replay event that fires after this step (index into days), or None
    crossed: int  # days marks this step crossed (> 1: several marks, one event)

    def as_dict(self) -> dict:
        return asdict(self)


class ForeverSchedule:
    """The schedule of one run; `start_task` resets it at each task, `observe(delta)` once per training step."""

    def __init__(self, cfg: ForeverConfig):
        self.cfg = cfg
        self.task = -1
        self._reset()

    def _reset(self) -> None:
        self.step = 0
        self.tau = 0.0
        self.first_day_sum = 0.0
        self.day: float | None = None
        self.mu0: float | None = None
        self.mu: float | None = None
        self.next_event = 0
        self.beta = self.cfg.beta_base

    def start_task(self, task: int) -> None:
        self.task = task
        self._reset()

    def observe(self, delta: float) -> ReplayDecision:
        if self.task < 0:
            raise RuntimeError("ForeverSchedule.observe() before start_task()")
        if not math.isfinite(delta) or delta < 0:
            raise ValueError(f"update size Delta = {delta!r} at task {self.task} step {self.step + 1}: expected >= 0")
        cfg = self.cfg
        self.step += 1
        self.tau += delta
        if self.step <= cfg.day_steps:
            self.first_day_sum += delta
        if self.step == cfg.day_steps:
            self.day = self.tau
            self.mu0 = self.mu = self.first_day_sum / cfg.day_steps
        elif self.step > cfg.day_steps:
            self.mu = (1.0 - cfg.intensity_ema) * self.mu + cfg.intensity_ema * delta
        ratio = self.mu / self.mu0 if self.mu0 else 1.0
        factor = min(max(1.0 + cfg.gamma * (ratio - 1.0), cfg.beta_min_factor), cfg.beta_max_factor)
        self.beta = cfg.beta_base * factor
        event, crossed = None, 0
        if self.day is not None and self.day > 0:
            while self.next_event < len(cfg.days) and self.tau >= cfg.days[self.next_event] * self.day:
                event = self.next_event if event is None else event
                self.next_event += 1
                crossed += 1
        return ReplayDecision(self.task, self.step, delta, self.tau, self.day, ratio, self.beta, event, crossed)

    def state_dict(self) -> dict:
        keys = ("task", "step", "tau", "first_day_sum", "day", "mu0", "mu", "next_event", "beta")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)


def replay_events(rows: list[dict], cfg: ForeverConfig) -> list[tuple[int, int, int]]:
    """(task, step, event) of each replay event the schedule fires on a run's recorded update sizes (the rows of
    its trajectory.csv, as read by csv; task 0 replays nothing: it has no old task). The schedule reads nothing
    but Delta, so with the run's own config this reproduces the run's events exactly; with another config it
    is a what-if on the same updates (in a real run replay changes the updates that follow)."""
    schedule, task, out = ForeverSchedule(cfg), None, []
    for r in rows:
        if r.get("delta") in (None, ""):
            continue  # an end-of-task replay row
        t = int(r["task"])
        if t != task:
            schedule.start_task(t)
            task = t
        d = schedule.observe(float(r["delta"]))
        if d.event is not None and t >= 1:
            out.append((t, d.step, d.event))
    return out


def recorded_events(rows: list[dict]) -> list[tuple[int, int, int]]:
    """(task, step, event) of each replay event a run recorded (end-of-task replays aside)."""
    return [
        (int(r["task"]), int(r["step"]), int(r["replay"])) for r in rows if r.get("replay") not in (None, "", "end")
    ]
