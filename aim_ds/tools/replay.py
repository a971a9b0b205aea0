"""`aim-ds replay RUN_DIR [--config ds.json]`: re-run the merge controller offline on a run's recorded signals.

The controller is a pure state machine, so feeding it the probe losses and learning-signal sums that a
run recorded in trajectory.csv reproduces that run's merge schedule exactly (with the run's own config).
With another config it shows what that config would have scheduled on the SAME signals: a what-if,
not a prediction, because in a real run the signals move with the schedule (every merge resets the
anchor, and rehearsal and fusion change the probe losses that follow). At a merge the run did not make,
the sum |theta - anchor| is unknown; it is estimated from the run's segment covering that step: its
displacement per unit of summed learning rate times the replayed segment's summed learning rate, where
the run recorded its lr (else its Lambda, a per-step rate: sum = Lambda x elements x S).

A FOREVER run (`--method forever`; results.json records its "forever" section) is replayed by its own pure
schedule (aim_ds.control.forever) on the recorded update sizes: its replay events, exactly.
"""

from __future__ import annotations

import csv
import json
import os

from ..config import FOREVER_SECTION, AimConfig, ForeverConfig
from ..control.controller import MergeController, probe_due
from ..control.forever import recorded_events, replay_events
from ..control.trajectory import TrajectoryRow, read_csv

HELP = "re-run the merge controller on a run's recorded trajectory (what-if schedules for other configs)"

CAVEAT = (
    "This is the schedule the controller gives on the RECORDED signals. In a real run the signals move "
    "with the schedule (each merge resets the anchor; rehearsal and fusion change the probe losses that "
    "follow), so for another config it is a what-if on fixed signals, not a prediction. At merges the run "
    "did not make, sum |theta - anchor| is estimated from the recorded displacement per unit of learning "
    "rate (or, without a recorded lr, the learning signal) of the segment covering that step."
)


FOREVER_CAVEAT = (
    "This is where the schedule fires on the RECORDED update sizes. In a real run every replay event changes the "
    "updates that follow, so for another config it is a what-if on fixed updates, not a prediction."
)


def _rate_lookup(rows: list[dict]):
    """Recorded learning rates of displacement per task: (step, rate) of each merge, where rate is the
    segment's sum |theta - anchor| / elements per unit of summed learning rate when the run recorded its
    lr ("model time": a segment of the replay that covers the late, low-lr part of a long recorded segment
    gets the smaller displacement it would have had), else the recorded Lambda (per step of S)."""
    by_task: dict[int, list[tuple[int, float]]] = {}
    per_lr = all(r.get("lr") is not None for r in rows if not r.get("explicit"))
    task, lr_sum = None, 0.0
    for r in rows:
        if r["task"] != task:
            task, lr_sum = r["task"], 0.0
        if not r.get("explicit") and r.get("lr") is not None:
            lr_sum += r["lr"]
        if r.get("merge") == 1 and r.get("learning_signal") is not None:
            if per_lr and lr_sum > 0 and r.get("abs_change_sum") is not None and r.get("numel"):
                rate = float(r["abs_change_sum"]) / int(r["numel"]) / lr_sum
            else:
                rate = float(r["learning_signal"])
            by_task.setdefault(int(r["task"]), []).append((int(r["step"]), rate))
            lr_sum = 0.0
    everything = [x for v in by_task.values() for x in v]

    def rate(task: int, step: int) -> float:
        seg = by_task.get(task) or everything
        if not seg:
            return 1.0  # nothing recorded: a constant signal (every ratio is 1)
        after = [lam for s, lam in seg if s >= step]
        return after[0] if after else seg[-1][1]

    return rate, per_lr


def replay(rows: list[dict], cfg: AimConfig) -> list[dict]:
    """The trajectory the controller gives with `cfg` on the recorded signals, as trajectory rows
    (merge rows carry `estimated` = 1 where the learning-signal sum had to be estimated)."""
    ctrl = MergeController(cfg)
    rate, per_lr = _rate_lookup(rows)
    numels = [int(r["numel"]) for r in rows if r.get("numel")]
    numel = numels[0] if numels else 1
    out: list[dict] = []
    task, lr_sum = None, 0.0  # the replayed segment's summed lr (for estimated displacements)
    steps_of: dict[int, int] = {}  # a task's length: its last recorded training step
    for r in rows:
        if not r.get("explicit"):
            steps_of[int(r["task"])] = max(steps_of.get(int(r["task"]), 0), int(r["step"]))
    for r in rows:
        t, step = int(r["task"]), int(r["step"])
        if t != task:
            task, lr_sum = t, 0.0
            ctrl.start_task(t, steps=steps_of.get(t) or None)
        if not r.get("explicit") and r.get("lr") is not None:
            lr_sum += r["lr"]
        if r.get("explicit") == 1:  # the user's plugin.merge(): merge here whatever the config says
            row = TrajectoryRow(t, step, explicit=1).as_dict()
        else:
            loss = r.get("probe_loss") if probe_due(cfg, ctrl.active, ctrl.step + 1) else None
            d = ctrl.observe(loss, r.get("lr"))
            row = TrajectoryRow.of_step(t, d, d.probe_loss, cfg.forgetting_ema > 0).as_dict()
            if d.merge and r.get("undone") == 1:  # the run's merge here failed and was undone: so does this one
                ctrl.merge_undone()
                row["undone"] = 1
            if not d.merge or row["undone"]:
                out.append(row)
                continue
        recorded = r.get("merge") == 1 and r.get("abs_change_sum") is not None
        n = int(r["numel"]) if recorded and r.get("numel") else numel
        if recorded:
            total = float(r["abs_change_sum"])
        else:
            total = rate(t, step) * n * (lr_sum if per_lr else ctrl.interval)
        lr_sum = 0.0
        p = ctrl.on_merge(total, n) if (ctrl.active or not row["explicit"]) else ctrl.plan_inactive(total, n)
        w_in, w_out = (r["w_in"], r["w_out"]) if row["explicit"] and recorded else (p.w_in, p.w_out)
        row.update(
            merge=1,
            learning_signal=p.learning_signal,
            w_in=w_in,
            w_out=w_out,
            interval=p.interval,
            rehearsal_steps=p.rehearsal_steps,
            abs_change_sum=total,
            numel=n,
            estimated=0 if recorded else 1,
        )
        out.append(row)
    return out


MERGE_KEYS = ("task", "step", "interval", "rehearsal_steps", "w_in", "w_out", "learning_signal")


def merges(rows: list[dict]) -> list[tuple]:
    return [tuple(r.get(k) for k in MERGE_KEYS) for r in rows if r.get("merge") == 1]


def _config(args) -> tuple[AimConfig, str]:
    if args.config:
        with open(args.config) as f:
            d = json.load(f)
        return AimConfig.from_ds_config(d) if "aim_merging" in d else AimConfig.from_dict(d), args.config
    res = os.path.join(args.run_dir, "results.json")
    if not os.path.isfile(res):
        raise ValueError(f"{res} not found: give the run's ds_config with --config (its aim_merging section is used)")
    with open(res) as f:
        section = (json.load(f).get("config") or {}).get("aim_merging")
    if not section:
        raise ValueError(
            f"{res} records no aim_merging config (the run did not use the plugin); give one with --config"
        )
    return AimConfig.from_dict(section), "the run's own config (results.json)"


def add_arguments(p) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's output folder (with trajectory.csv)")
    p.add_argument(
        "--config",
        help="a ds_config (its aim_merging or forever section) or an aim_merging JSON; "
        "default: the run's own, from RUN_DIR/results.json",
    )
    p.add_argument("--plot", metavar="PNG", help="also plot the replayed trajectory like trajectory.png")


def _verdict(got: list, want: list, exactly: str, from_what: str, what_if) -> None:
    """One line: the replay equals the record, or where they first part (a MISMATCH under the run's own config)."""
    if got == want:
        print(f"the replay reproduces the recorded {exactly}")
        return
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    print(
        f"{'differs from' if what_if else 'MISMATCH with'} the recorded {from_what} {first + 1}: "
        f"replayed {got[first] if first < len(got) else None}, recorded {want[first] if first < len(want) else None}"
    )


def _forever_config(args) -> tuple[ForeverConfig, str] | None:
    """The FOREVER config to replay with, when RUN_DIR is a --method forever run or --config holds a "forever"
    section; None for AimMerging."""
    if args.config:
        with open(args.config) as f:
            d = json.load(f)
        return (ForeverConfig.from_dict(d[FOREVER_SECTION]), args.config) if FOREVER_SECTION in d else None
    res = os.path.join(args.run_dir, "results.json")
    if not os.path.isfile(res):
        return None
    with open(res) as f:
        section = (json.load(f).get("config") or {}).get(FOREVER_SECTION)
    return (ForeverConfig.from_dict(section), "the run's own config (results.json)") if section else None


def _run_forever(path: str, cfg: ForeverConfig, source: str, what_if: bool) -> int:
    """FOREVER's schedule reads nothing but the update sizes: the run's own config reproduces its events."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "delta" not in rows[0]:
        raise ValueError(f"{path} has no delta column: it is not the trajectory of a FOREVER run")
    got, want = replay_events(rows, cfg), recorded_events(rows)
    print(f"replay of {path} with {source} (FOREVER: replay events on the recorded update sizes)")
    print(f"{'task':>4} {'step':>6} {'day':>6}")
    for task, step, event in got:
        print(f"{task:>4} {step:>6} {cfg.days[event]:>6g}")
    print(f"replay events: replayed {len(got)}, recorded {len(want)}")
    _verdict(got, want, "replay events exactly (tasks, steps, days)", "events from event", what_if)
    if what_if:
        print(FOREVER_CAVEAT)
        return 0
    return 0 if got == want else 1


def run(args) -> int:
    path = os.path.join(args.run_dir, "trajectory.csv")
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found: RUN_DIR must be a run's output folder (the driver writes trajectory.csv)")
    forever = _forever_config(args)
    if forever is not None:
        return _run_forever(path, *forever, what_if=bool(args.config))
    rows = read_csv(path)
    if (
        rows
        and any(r.get("probe_loss") is not None for r in rows)
        and all(r.get("abs_change_sum") is None for r in rows if r.get("merge") == 1)
    ):
        raise ValueError(
            f"{path} has no abs_change_sum column values at its merges (written by an older aim_ds): "
            "replay needs the raw learning-signal sums"
        )
    cfg, source = _config(args)
    if cfg.learning_signal == "lr_sqrt" and rows and all(r.get("lr") is None for r in rows):
        raise ValueError(
            f'{path} records no learning rate (an older aim_ds wrote it): learning_signal "lr_sqrt" needs it; '
            "replay it with a config that uses the default learning_signal, or record the run again"
        )
    got = replay(rows, cfg)
    print(f"replay of {path} with {source}")
    print(f"{'task':>4} {'step':>6} {'S new':>6} {'R':>4} {'w_in':>5} {'w_out':>5} {'Lambda':>12}  note")
    for r in got:
        if r.get("merge") == 1:
            note = ("explicit " if r["explicit"] else "") + ("estimated Lambda" if r.get("estimated") else "")
            print(
                f"{r['task']:>4} {r['step']:>6} {r['interval']:>6} {r['rehearsal_steps']:>4} {r['w_in']:>5.2f} "
                f"{r['w_out']:>5.2f} {r['learning_signal']:>12.6g}  {note}"
            )
    want, have = merges(rows), merges(got)
    print(f"merges: replayed {len(have)}, recorded {len(want)}")
    if args.plot:
        from ..experiment.report import plot_trajectory

        plot_trajectory(args.plot, got, None, f"replay: {os.path.basename(os.path.abspath(args.run_dir))}")
    _verdict(
        have, want, "merges exactly (steps, intervals, R, weights, learning signals)", "merges from merge", args.config
    )
    if args.config:
        print(CAVEAT)
        return 0
    return 0 if have == want else 1  # the run's own config must reproduce its own merges


__all__ = ["CAVEAT", "merges", "replay"]
