"""Interval rules and merge-weight policies: small pure functions of the controller's signals.

Interval rules map (the interval S planned for the segment that just ended, the task's recent
learning-signal values Lambda ending with the one just measured, the 1-based index b of this merge in
the task) to the next interval. See ``docs/configuration.md`` for the exact reading of each rule.

- :class:`PaperRule`     sliding-window trend of Lambda (the paper's rule, made concrete).
- :class:`ReferenceRule` the authors' released code: ratio of the last two Lambdas after a cold start.
- :class:`FixedRule`     S never changes.

Weight policies map (activations A at merge time, interval S at merge time) to (w_in, w_out).

Each family has one registry, built from its classes' ``name`` attributes (``RULES``, ``WEIGHTS``), and a
``Protocol`` (``IntervalRule``, ``WeightPolicy``); aim_ds.config accepts exactly the registries' names
(``INTERVAL_RULES``, ``WEIGHT_POLICIES``). A weight policy names the fuser that applies it (``fusion``, one of
``FUSION_KINDS``; the fusers themselves need torch and live in aim_ds.plugin.fusers). No import of aim_ds.config
here: the config reads its accepted names from this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol


class IntervalRule(Protocol):
    """The next interval S from the one just planned, the task's learning-signal history and the merge index."""

    name: ClassVar[str]
    uses_signal: ClassVar[bool]  # reads the forgetting signal: the steps it runs on are probed

    @property
    def history_needed(self) -> int: ...

    def next_interval(self, interval: int, signals: Sequence[float], merge_index: int) -> int: ...


class WeightPolicy(Protocol):
    """(w_in, w_out) from the activations A and the interval S at merge time; ``fusion`` names its fuser."""

    name: ClassVar[str]
    fusion: ClassVar[str]

    def weights(self, activations: int, interval: int) -> tuple[float, float]: ...


LONG_INTERVAL = 64  # reference rule: S >= 64 is halved again after a rise, and grows with c = 0.5
SIGNALS_LONG_INTERVAL = 70  # signals weight table: S > 70 counts as a long interval


# ---------------------------------------------------------------------- interval rules
@dataclass(frozen=True)
class PaperRule:
    """Keep the last ``window`` values of Lambda; count rises u and falls d between consecutive
    values (equal neighbours count as neither). u > d (learning fast): S <- max(S_min,
    int(S / gamma_down)); d > u (converging): S <- min(S_max, int(S * gamma_up)); u == d: keep S.
    No change until ``window`` values exist in the task."""

    min_interval: int
    max_interval: int
    window: int = 3
    gamma_up: float = 2.0
    gamma_down: float = 2.0

    name = "paper"
    uses_signal = True  # reads the forgetting signal: the steps it runs on are probed

    @classmethod
    def from_config(cls, c) -> PaperRule:
        return cls(c.min_interval, c.max_interval, c.window, c.gamma_up, c.gamma_down)

    @property
    def history_needed(self) -> int:
        return self.window

    def trend(self, signals: Sequence[float]) -> tuple[int, int]:
        """(rises, falls) over the last ``window`` values."""
        w = list(signals)[-self.window :]
        u = sum(1 for a, b in zip(w, w[1:]) if b > a)
        d = sum(1 for a, b in zip(w, w[1:]) if b < a)
        return u, d

    def next_interval(self, interval: int, signals: Sequence[float], merge_index: int) -> int:
        if len(signals) < self.window:
            return interval
        u, d = self.trend(signals)
        if u > d:
            return max(self.min_interval, min(self.max_interval, int(interval / self.gamma_down)))
        if d > u:
            return min(self.max_interval, max(self.min_interval, int(interval * self.gamma_up)))
        return interval


@dataclass(frozen=True)
class ReferenceRule:
    """The released code's rule. Merges 1 .. cold_start + 1 of a task keep S (the cold start: with
    cold_start = 3 the first change is at the 5th merge). From merge b = cold_start + 2 on, with
    r = Lambda_b / Lambda_{b-1}:

    - r >= 1 (Lambda rose or stayed): S' = max(S_min, floor(S / r)); if S' >= 64: S' = floor(S' / 2)
      (clamped to [S_min, S_max] again);
    - r < 1 (Lambda fell): S' = min(S_max, floor(S * (1/r + c))), c = 1 if S < 64 else 0.5 (S = the
      interval before the update).

    Degenerate signals: Lambda_{b-1} = Lambda_b = 0 keeps S; Lambda_{b-1} = 0 < Lambda_b (an infinite
    rise) gives S_min; Lambda_b = 0 < Lambda_{b-1} (an infinite fall) gives S_max."""

    min_interval: int
    max_interval: int
    cold_start: int = 3

    name = "reference"
    uses_signal = True

    @classmethod
    def from_config(cls, c) -> ReferenceRule:
        return cls(c.min_interval, c.max_interval, c.cold_start)

    @property
    def history_needed(self) -> int:
        return 2

    def next_interval(self, interval: int, signals: Sequence[float], merge_index: int) -> int:
        if merge_index < self.cold_start + 2 or len(signals) < 2:
            return interval
        prev, cur = float(signals[-2]), float(signals[-1])
        lo, hi = self.min_interval, self.max_interval
        if cur >= prev:
            if prev == 0.0:
                return interval if cur == 0.0 else lo
            s = max(lo, math.floor(interval / (cur / prev)))
            if s >= LONG_INTERVAL:
                s = s // 2
            return min(hi, max(lo, s))
        if cur == 0.0:
            return hi
        c = 1.0 if interval < LONG_INTERVAL else 0.5
        return max(lo, min(hi, math.floor(interval * (prev / cur + c))))


@dataclass(frozen=True)
class FixedRule:
    """S never changes (merge exactly every initial_interval steps)."""

    name = "fixed"
    history_needed = 1
    uses_signal = False  # merges on the clock alone: nothing is probed

    @classmethod
    def from_config(cls, c) -> FixedRule:
        return cls()

    def next_interval(self, interval: int, signals: Sequence[float], merge_index: int) -> int:
        return interval


# interval_rule name -> rule class (its from_config builds it); a new rule is one class added to this tuple
RULES: dict[str, type[IntervalRule]] = {cls.name: cls for cls in (PaperRule, ReferenceRule, FixedRule)}
INTERVAL_RULES = tuple(RULES)  # the names aim_merging.interval_rule accepts


def make_interval_rule(cfg) -> IntervalRule:
    """The interval rule an AimConfig names."""
    if cfg.interval_rule not in RULES:
        raise ValueError(f"unknown interval_rule {cfg.interval_rule!r}")
    return RULES[cfg.interval_rule].from_config(cfg)


def uses_signal(cfg) -> bool:
    """Does the config's interval rule read the forgetting signal (so its steps are probed)?"""
    return RULES[cfg.interval_rule].uses_signal


# ---------------------------------------------------------------------- weight policies
def signals_weights(activations: int, interval: int) -> tuple[float, float]:
    """The released code's table: strong forgetting (A >= 2) -> more weight on rehearsal; a long
    interval (S > 70, slow learning) -> less weight on the new task."""
    if activations >= 2:
        return (0.5, 0.5) if interval <= SIGNALS_LONG_INTERVAL else (0.4, 0.6)
    return (0.6, 0.4) if interval <= SIGNALS_LONG_INTERVAL else (0.5, 0.5)


@dataclass(frozen=True)
class SignalsWeights:
    name = "signals"
    fusion = "scalar"  # the aim_ds.plugin.fusers entry that applies the weights

    @classmethod
    def from_config(cls, c) -> SignalsWeights:
        return cls()

    def weights(self, activations: int, interval: int) -> tuple[float, float]:
        return signals_weights(activations, interval)


@dataclass(frozen=True)
class FixedWeights:
    w_in: float = 0.5
    w_out: float = 0.5
    name = "fixed"
    fusion = "scalar"

    @classmethod
    def from_config(cls, c) -> FixedWeights:
        return cls(c.w_in, c.w_out)

    def weights(self, activations: int, interval: int) -> tuple[float, float]:
        return (self.w_in, self.w_out)


@dataclass(frozen=True)
class ImportanceWeights:
    """Element-wise weights are computed by the plugin from importance masks; the scalar pair
    returned here is the one used where both masks are 0 (the released code's (0.5, 0.5))."""

    name = "importance"
    fusion = "importance"  # element-wise weights from importance masks
    default = (0.5, 0.5)
    both = (0.4, 0.6)  # where both masks are 1

    @classmethod
    def from_config(cls, c) -> ImportanceWeights:
        return cls()

    def weights(self, activations: int, interval: int) -> tuple[float, float]:
        return self.default


# weight_policy name -> policy class (its from_config builds it); a new policy is one class added to this tuple
WEIGHTS: dict[str, type[WeightPolicy]] = {cls.name: cls for cls in (SignalsWeights, FixedWeights, ImportanceWeights)}
WEIGHT_POLICIES = tuple(WEIGHTS)  # the names aim_merging.weight_policy accepts
# the fusers (aim_ds.plugin.fusers.FUSERS, by their name) a weight policy's `fusion` may name; a test ties the two
FUSION_KINDS = ("scalar", "importance")


def make_weight_policy(cfg) -> WeightPolicy:
    """The weight policy an AimConfig names."""
    if cfg.weight_policy not in WEIGHTS:
        raise ValueError(f"unknown weight_policy {cfg.weight_policy!r}")
    return WEIGHTS[cfg.weight_policy].from_config(cfg)


def rehearsal_steps(cfg, interval: int) -> int:
    """R: the configured constant, or ceil(rehearsal_fraction * S) with S the interval in force when the
    merge fires, before this merge updates it (fraction 1 = the released rule R = S; a smaller fraction
    bounds rehearsal's share of the compute)."""
    if cfg.rehearsal_steps != "interval":
        return int(cfg.rehearsal_steps)
    return max(1, math.ceil(cfg.rehearsal_fraction * interval - 1e-9))


__all__ = [
    "IntervalRule",
    "WeightPolicy",
    "INTERVAL_RULES",
    "WEIGHT_POLICIES",
    "FUSION_KINDS",
    "PaperRule",
    "ReferenceRule",
    "FixedRule",
    "RULES",
    "WEIGHTS",
    "make_interval_rule",
    "uses_signal",
    "signals_weights",
    "SignalsWeights",
    "FixedWeights",
    "ImportanceWeights",
    "make_weight_policy",
    "rehearsal_steps",
]
