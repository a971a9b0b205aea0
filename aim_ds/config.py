"""Strict, typed parse of the ``"aim_merging"`` section of a DeepSpeed config.

Every key and its default is listed once, in the :class:`AimConfig` dataclass below, checked in
``_validate`` (type and accepted range), and documented
in ``docs/configuration.md``. Parsing is strict: an unknown key, a value of the wrong type (``true``
is not an integer; an integer is accepted where a float is expected) or a value out of range raises
:class:`ConfigError` with ONE message that names the key, the bad value and what is accepted.

No torch import here: the config is read by the controller, the CLI and tests that run without torch. The
accepted interval rules and weight policies are the names of their registries (aim_ds.control.policies); the probe
sources' names are listed here (the probe classes need torch), and a test ties them to aim_ds.plugin.probes.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .control.policies import INTERVAL_RULES, WEIGHT_POLICIES

SECTION = "aim_merging"

ANCHORS = ("device", "host")
# aim_ds.plugin.probes.PROBE_SOURCES's names (a test ties them)
PROBE_SOURCE_NAMES = ("memory_forward", "training_batch")
UNDO_LOCATIONS = ("host", "nvme", "off")
THRESHOLD_RULES = ("factor", "mean_std")
LEARNING_SIGNALS = ("per_step", "lr_sqrt")
WEIGHT_MAX = 2.0  # w_in, w_out accepted in [0, WEIGHT_MAX]; > 1 extrapolates along a task vector


class ConfigError(ValueError):
    """A bad ``aim_merging`` section. ``key`` is the offending key (``None`` for the section itself)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class AimConfig:
    """The parsed ``aim_merging`` section. Build it with :meth:`from_dict` / :meth:`from_ds_config`
    (which validate); constructing it directly also validates (``__post_init__``)."""

    enabled: bool = True
    interval_rule: str = "paper"
    initial_interval: int = 8
    initial_interval_fraction: float = 0.0
    min_interval: int = 2
    max_interval: int = 128
    cold_start: int = 3
    window: int = 3
    gamma_up: float = 2.0
    gamma_down: float = 2.0
    threshold_factor: float = 2.0
    threshold_rule: str = "factor"
    threshold_std: float = 2.0
    forgetting_ema: float = 0.0
    learning_signal: str = "per_step"
    merge_retries: int = 2
    forced_activation_multiple: int = 2
    activation_cap: int = 3
    weight_policy: str = "signals"
    w_in: float = 0.5
    w_out: float = 0.5
    importance_quantile: float = 0.8
    importance_beta1: float = 0.85
    importance_beta2: float = 0.85
    rehearsal_steps: str | int = "interval"
    rehearsal_fraction: float = 1.0
    probe_interval: int = 1
    probe_batch_size: int = 0
    probe_source: str = "memory_forward"
    anchor: str = "device"
    merge_first_task: bool = False
    undo: str = "host"
    undo_path: str | None = None

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        checked = _validate(values)
        for name, value in checked.items():  # normalise ints given for floats to float
            object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_dict(cls, section: Mapping[str, Any] | AimConfig | None) -> AimConfig:
        """Parse the ``aim_merging`` object. ``None`` (section absent) gives a disabled config with all
        defaults; a present section is enabled unless it says ``"enabled": false``."""
        if isinstance(section, AimConfig):
            return section
        if section is None:
            return cls(enabled=False)
        if not isinstance(section, Mapping):
            raise ConfigError(
                f"{SECTION} = {_show(section)} has the wrong type ({_type_name(section)}): "
                f"expected a JSON object of settings (or leave the section out to disable "
                f"AimMerging)",
                None,
            )
        _check_keys(section, [f.name for f in dataclasses.fields(cls)], SECTION)
        return cls(**dict(section))

    @classmethod
    def from_ds_config(cls, ds_config: Mapping[str, Any] | str | os.PathLike) -> AimConfig:
        """Read the ``aim_merging`` section of a DeepSpeed config (a dict, or a path to its JSON file)."""
        if isinstance(ds_config, (str, os.PathLike)):
            with open(ds_config, encoding="utf-8") as fh:
                ds_config = json.load(fh)
        if not isinstance(ds_config, Mapping):
            raise ConfigError(
                f"the DeepSpeed config has the wrong type ({_type_name(ds_config)}): expected a JSON object", None
            )
        return cls.from_dict(ds_config.get(SECTION))

    def to_dict(self) -> dict[str, Any]:
        """Every key with its value; ``AimConfig.from_dict(cfg.to_dict()) == cfg``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> AimConfig:
        """A copy with some keys changed (validated like :meth:`from_dict`)."""
        return AimConfig.from_dict({**self.to_dict(), **changes})


def _check_keys(section: Mapping[str, Any], known: list[str], name: str) -> None:
    """Unknown keys are refused up front, with the closest known one."""
    for key in section:
        if not isinstance(key, str):
            raise ConfigError(f"{name} has a non-string key {_show(key)}: keys must be strings", None)
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"{name}.{key} is not a known key: {hint}known keys are {', '.join(known)}", key)


# ---------------------------------------------------------------------- validation
def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "string"
    if isinstance(v, Mapping):
        return "object"
    if isinstance(v, (list, tuple)):
        return "list"
    return type(v).__name__


def _show(v: Any) -> str:
    try:
        return json.dumps(v)
    except (TypeError, ValueError):
        return repr(v)


def _fail(
    key: str,
    value: Any,
    expected: str,
    wrong_type: bool = False,
    what: str = "is out of range",
    section: str = SECTION,
) -> ConfigError:
    if wrong_type:
        what = f"has the wrong type ({_type_name(value)})"
    return ConfigError(f"{section}.{key} = {_show(value)} {what}: expected {expected}", key)


def _int(key: str, v: Any, lo: int, expected: str, section: str = SECTION) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(key, v, expected, wrong_type=True, section=section)
    if v < lo:
        raise _fail(key, v, expected, section=section)
    return int(v)


def _float(key: str, v: Any, ok, expected: str, section: str = SECTION) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _fail(key, v, expected, wrong_type=True, section=section)
    f = float(v)
    if not math.isfinite(f) or not ok(f):
        raise _fail(key, v, expected, section=section)
    return f


def _bool(key: str, v: Any, section: str = SECTION) -> bool:
    if not isinstance(v, bool):
        raise _fail(key, v, "true or false", wrong_type=True, section=section)
    return v


def _choice(key: str, v: Any, choices: tuple[str, ...], section: str = SECTION) -> str:
    expected = "one of " + ", ".join(f'"{c}"' for c in choices)
    if not isinstance(v, str):
        raise _fail(key, v, expected, wrong_type=True, section=section)
    if v not in choices:
        raise _fail(key, v, expected, what="is not an accepted value", section=section)
    return v


_INTERVAL_CHAIN = "(and min_interval <= initial_interval <= max_interval)"


def _validate_signals(d: dict[str, Any]) -> dict[str, Any]:
    """The de-noised signal keys (issue 24): threshold rule, EMA, learning-signal normalisation, retries."""
    out: dict[str, Any] = {"threshold_factor": d["threshold_factor"]}
    out["threshold_rule"] = _choice("threshold_rule", d["threshold_rule"], THRESHOLD_RULES)
    out["threshold_std"] = _float(
        "threshold_std", d["threshold_std"], lambda x: x >= 0.0, "a finite number >= 0 (k in mean + k * std)"
    )
    # each threshold rule reads its own key: a value set for the other rule would be silently ignored
    unused = "threshold_std" if out["threshold_rule"] == "factor" else "threshold_factor"
    if out[unused] != _DEFAULTS[unused]:
        rule = "mean_std" if unused == "threshold_std" else "factor"
        raise _fail(
            unused,
            d[unused],
            f'threshold_rule "{rule}" to use it (threshold_rule is "{out["threshold_rule"]}"); remove the key or '
            "change the rule",
            what=f'only applies to threshold_rule "{rule}"',
        )
    out["forgetting_ema"] = _float(
        "forgetting_ema",
        d["forgetting_ema"],
        lambda x: 0.0 <= x < 1.0,
        "a number in [0, 1) (the EMA's weight on its previous value; 0 = the raw probe loss)",
    )
    out["learning_signal"] = _choice("learning_signal", d["learning_signal"], LEARNING_SIGNALS)
    out["merge_retries"] = _int(
        "merge_retries", d["merge_retries"], 0, "an integer >= 0 (retries of an undone merge within a segment)"
    )
    del out["threshold_factor"]
    return out


def _validate_intervals(d: dict[str, Any]) -> dict[str, Any]:
    """S_0, S_min, S_max, and S_0 as a fraction of each task's steps."""
    out: dict[str, Any] = {}
    for key in ("initial_interval", "min_interval", "max_interval"):
        out[key] = _int(key, d[key], 1, f"an integer >= 1 {_INTERVAL_CHAIN}")
    s0, lo, hi = out["initial_interval"], out["min_interval"], out["max_interval"]
    if lo > hi:
        raise _fail("min_interval", lo, f"an integer >= 1 and <= max_interval ({hi})")
    if not lo <= s0 <= hi:
        raise _fail("initial_interval", s0, f"an integer in [min_interval, max_interval] = [{lo}, {hi}]")
    out["initial_interval_fraction"] = _float(
        "initial_interval_fraction",
        d["initial_interval_fraction"],
        lambda x: 0.0 <= x <= 1.0,
        "a number in [0, 1] (S_0 = this fraction of each task's steps; 0 = initial_interval)",
    )
    if out["initial_interval_fraction"] > 0.0 and s0 != _DEFAULTS["initial_interval"]:
        raise _fail(
            "initial_interval",
            s0,
            f"the default ({_DEFAULTS['initial_interval']}) or initial_interval_fraction 0: with "
            f"initial_interval_fraction {out['initial_interval_fraction']:g}, S_0 comes from each task's length",
            what="is ignored when initial_interval_fraction is set",
        )
    return out


def _validate(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["enabled"] = _bool("enabled", d["enabled"])
    out["interval_rule"] = _choice("interval_rule", d["interval_rule"], INTERVAL_RULES)
    out.update(_validate_intervals(d))
    out["cold_start"] = _int(
        "cold_start", d["cold_start"], 0, "an integer >= 0 (merges before the reference rule may change the interval)"
    )
    out["window"] = _int("window", d["window"], 2, "an integer >= 2 (learning-signal values compared)")
    for key in ("gamma_up", "gamma_down"):
        out[key] = _float(key, d[key], lambda x: x >= 1.0, "a finite number >= 1.0")
    out["threshold_factor"] = _float(
        "threshold_factor", d["threshold_factor"], lambda x: x > 0.0, "a finite number > 0"
    )
    out.update(_validate_signals(d))
    out["forced_activation_multiple"] = _int(
        "forced_activation_multiple",
        d["forced_activation_multiple"],
        1,
        "an integer >= 1 (forced activation at m + multiple * S)",
    )
    out["activation_cap"] = _int("activation_cap", d["activation_cap"], 1, "an integer >= 1")
    out["weight_policy"] = _choice("weight_policy", d["weight_policy"], WEIGHT_POLICIES)
    for key in ("w_in", "w_out"):
        out[key] = _float(key, d[key], lambda x: 0.0 <= x <= WEIGHT_MAX, f"a number in [0, {WEIGHT_MAX:g}]")
    out["importance_quantile"] = _float(
        "importance_quantile", d["importance_quantile"], lambda x: 0.0 < x < 1.0, "a number in the open interval (0, 1)"
    )
    for key in ("importance_beta1", "importance_beta2"):
        out[key] = _float(key, d[key], lambda x: 0.0 <= x < 1.0, "a number in [0, 1)")
    r = d["rehearsal_steps"]
    r_expected = '"interval" (R = the interval S in force at the merge) or an integer >= 1'
    if isinstance(r, str):
        if r != "interval":
            raise _fail("rehearsal_steps", r, r_expected, what="is not an accepted value")
        out["rehearsal_steps"] = r
    else:
        out["rehearsal_steps"] = _int("rehearsal_steps", r, 1, r_expected)
    out["rehearsal_fraction"] = _float(
        "rehearsal_fraction",
        d["rehearsal_fraction"],
        lambda x: 0.0 < x <= 1.0,
        "a number in (0, 1] (R = ceil(fraction * S))",
    )
    if out["rehearsal_fraction"] != 1.0 and out["rehearsal_steps"] != "interval":
        raise _fail(
            "rehearsal_fraction",
            d["rehearsal_fraction"],
            '1.0 when rehearsal_steps is a constant (set R directly, or use rehearsal_steps "interval")',
            what='only scales rehearsal_steps "interval"',
        )
    out["probe_interval"] = _int("probe_interval", d["probe_interval"], 1, "an integer >= 1 (probe every k-th step)")
    out["probe_batch_size"] = _int(
        "probe_batch_size", d["probe_batch_size"], 0, "an integer >= 0 (0 = the whole memory batch)"
    )
    out["probe_source"] = _choice("probe_source", d["probe_source"], PROBE_SOURCE_NAMES)
    if out["probe_source"] == "training_batch":
        # the loss comes from memory rows already in every training batch: there is no probe forward to thin
        for key in ("probe_interval", "probe_batch_size"):
            if out[key] != _DEFAULTS[key]:
                raise _fail(
                    key,
                    d[key],
                    f'{_DEFAULTS[key]} (the default) when probe_source is "training_batch": '
                    "the forgetting signal is then read from the memory rows of every training batch, "
                    "with no probe forward of its own to thin out; remove the key or use probe_source "
                    '"memory_forward"',
                    what='only applies to probe_source "memory_forward"',
                )
    out["anchor"] = _choice("anchor", d["anchor"], ANCHORS)
    out["merge_first_task"] = _bool("merge_first_task", d["merge_first_task"])
    out["undo"], out["undo_path"] = _undo(d)
    return out


def _undo(d: dict[str, Any]) -> tuple[str, str | None]:
    """The undo record's location and its folder (required with "nvme", meaningless otherwise)."""
    undo = _choice("undo", d["undo"], UNDO_LOCATIONS)
    path = d["undo_path"]
    if undo == "nvme":
        if not isinstance(path, str) or not path.strip():
            raise _fail(
                "undo_path",
                path,
                'a folder on a local NVMe drive (a non-empty string) when undo is "nvme": each rank keeps its '
                "merge's undo record in a memory-mapped file there",
                wrong_type=path is not None and not isinstance(path, str),
                what="is missing" if path is None else "is empty",
            )
    elif path is not None:
        raise _fail("undo_path", path, 'null unless undo is "nvme"', what=f'has no use with undo "{undo}"')
    return undo, path


# ---------------------------------------------------------------------- FOREVER
FOREVER_SECTION = "forever"
FOREVER_DAYS = (1.0, 2.0, 4.0, 7.0, 15.0, 30.0)


@dataclass(frozen=True)
class ForeverConfig:
    """The ``"forever"`` section of a DeepSpeed config: FOREVER's model-time replay schedule (the same authors'
    follow-up to AimMerging). The paper states day_steps, days, intensity_ema, beta_base and the clip; it does
    not state gamma or the steps of one replay event, so those are keys with chosen defaults
    (docs/configuration.md says why)."""

    enabled: bool = True
    day_steps: int = 24  # one model day = the model time of the task's first day_steps steps
    days: tuple[float, ...] = FOREVER_DAYS  # replay event j fires when tau >= days[j] x one day
    intensity_ema: float = 0.05  # lambda of mu_t = (1 - lambda) mu_{t-1} + lambda Delta_t
    beta_base: float = 1e-3  # the L2 pull's base weight toward the previous task's end
    gamma: float = 1.0  # beta_t = beta_base x clip(1 + gamma (r_t - 1), beta_min_factor, beta_max_factor)
    beta_min_factor: float = 0.5
    beta_max_factor: float = 3.0
    replay_steps: int = 4  # optimizer steps on memory batches per replay event
    consolidation_steps: int = 4  # optimizer steps of the end-of-task replay (0: none)
    anchor: str = "device"  # where the previous task's end (theta*) is kept: "device" or "host"

    def __post_init__(self) -> None:
        for name, value in _validate_forever(dataclasses.asdict(self)).items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_dict(cls, section: Mapping[str, Any] | ForeverConfig | None) -> ForeverConfig:
        """Parse the ``forever`` object; ``None`` (absent) gives the defaults, enabled."""
        if isinstance(section, ForeverConfig):
            return section
        if section is None:
            return cls()
        if not isinstance(section, Mapping):
            raise ConfigError(
                f"{FOREVER_SECTION} = {_show(section)} has the wrong type ({_type_name(section)}): "
                "expected a JSON object of settings",
                None,
            )
        _check_keys(section, [f.name for f in dataclasses.fields(cls)], FOREVER_SECTION)
        return cls(**dict(section))

    @classmethod
    def from_ds_config(cls, ds_config: Mapping[str, Any]) -> ForeverConfig:
        return cls.from_dict(ds_config.get(FOREVER_SECTION))

    def to_dict(self) -> dict[str, Any]:
        """Every key with its value, JSON-shaped (days as a list): what a checkpoint's manifest records."""
        d = dataclasses.asdict(self)
        d["days"] = list(self.days)
        return d


def _validate_forever(d: dict[str, Any]) -> dict[str, Any]:
    sec = FOREVER_SECTION
    out: dict[str, Any] = {"enabled": _bool("enabled", d["enabled"], section=sec)}
    out["day_steps"] = _int("day_steps", d["day_steps"], 1, "an integer >= 1 (steps of the first model day)", sec)
    days = d["days"]
    expected = "a non-empty list of increasing numbers > 0 (the replay days, in model days)"
    if isinstance(days, (str, bytes)) or not isinstance(days, (list, tuple)) or not days:
        raise _fail("days", days, expected, wrong_type=not isinstance(days, (list, tuple)), section=sec)
    values = tuple(_float("days", v, lambda x: x > 0, expected, sec) for v in days)
    if any(b <= a for a, b in zip(values, values[1:])):
        raise _fail("days", days, expected, what="is not increasing", section=sec)
    out["days"] = values
    out["intensity_ema"] = _float("intensity_ema", d["intensity_ema"], lambda x: 0 < x <= 1, "a number in (0, 1]", sec)
    out["beta_base"] = _float("beta_base", d["beta_base"], lambda x: x >= 0, "a finite number >= 0", sec)
    out["gamma"] = _float("gamma", d["gamma"], lambda x: x >= 0, "a finite number >= 0", sec)
    out["beta_min_factor"] = _float("beta_min_factor", d["beta_min_factor"], lambda x: x >= 0, "a number >= 0", sec)
    out["beta_max_factor"] = _float(
        "beta_max_factor",
        d["beta_max_factor"],
        lambda x: x >= out["beta_min_factor"],
        f"a number >= beta_min_factor ({out['beta_min_factor']:g})",
        sec,
    )
    out["replay_steps"] = _int("replay_steps", d["replay_steps"], 1, "an integer >= 1 (steps per replay event)", sec)
    out["consolidation_steps"] = _int(
        "consolidation_steps", d["consolidation_steps"], 0, "an integer >= 0 (0: no end-of-task replay)", sec
    )
    out["anchor"] = _choice("anchor", d["anchor"], ANCHORS, sec)
    return out


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(AimConfig)}

__all__ = [
    "AimConfig",
    "ForeverConfig",
    "FOREVER_SECTION",
    "ConfigError",
    "SECTION",
    "INTERVAL_RULES",
    "WEIGHT_POLICIES",
    "ANCHORS",
    "PROBE_SOURCE_NAMES",
    "UNDO_LOCATIONS",
    "THRESHOLD_RULES",
    "LEARNING_SIGNALS",
]
