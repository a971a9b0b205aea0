#!/usr/bin/env python
"""What-if schedules of several controller configs on recorded runs, before paying for runs.

    .venv/bin/python benchmarks/replay_grid.py RUN_DIR... --set forgetting_ema=0.8,threshold_rule=mean_std ...

For each run folder (``trajectory.csv`` + ``results.json`` of an aim run) and each ``--set`` (comma-separated
KEY=VALUE overrides of the run's own ``aim_merging`` section; the first row is always the run's own config),
re-runs the controller with ``aim_ds.tools.replay.replay`` on the RECORDED signals and prints, summed over the runs:
merges, how many came from an activation / were forced / hit the cap (``schedule_study.segments``), rehearsal
steps, mean R, and the S in force at each merge of the last run's tasks. A what-if on fixed signals, not a
prediction (see ``aim-ds replay``): it shows which rule a setting lets act, not what quality it gives.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from schedule_study import LETTER, segments

from aim_ds.config import AimConfig
from aim_ds.control.trajectory import read_csv
from aim_ds.tools.replay import replay


def parse_set(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="aim run folders (trajectory.csv, results.json)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE[,KEY=VALUE...] overrides")
    a = p.parse_args(argv)
    loaded = []
    for d in a.runs:
        res = json.loads((d / "results.json").read_text())
        section = (res.get("config") or {}).get("aim_merging")
        if not section or not (d / "trajectory.csv").exists():
            p.error(f"{d}: not a finished aim run (no aim_merging config or no trajectory.csv)")
        loaded.append((d, section, read_csv(str(d / "trajectory.csv"))))
    print(
        "| overrides | runs | merges | activation / forced / cap | rehearsal steps | mean R | S at each merge (last run) |"
    )
    print("|---|---|---|---|---|---|---|")
    for text in [""] + a.sets:
        total = {"merges": 0, "activation": 0, "forced": 0, "cap": 0, "rehearsal": 0}
        shape = ""
        for _d, section, rows in loaded:
            cfg = AimConfig.from_dict({**section, **parse_set(text)})
            segs = segments(replay(rows, cfg), cfg.to_dict())
            total["merges"] += len(segs)
            for s in segs:
                total[s["cause"]] = total.get(s["cause"], 0) + 1
                total["rehearsal"] += s["rehearsal"]
            tasks = sorted({s["task"] for s in segs})
            shape = " / ".join(
                " ".join(f"{s['s_old']}{LETTER.get(s['cause'], '')}" for s in segs if s["task"] == t) for t in tasks
            )
        mean_r = total["rehearsal"] / total["merges"] if total["merges"] else 0.0
        print(
            f"| {text or '(the run’s own)'} | {len(loaded)} | {total['merges']} | {total['activation']} / {total['forced']} / "
            f"{total['cap']} | {total['rehearsal']} | {mean_r:.1f} | {shape} |"
        )


if __name__ == "__main__":
    main()
