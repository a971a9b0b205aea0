#!/usr/bin/env python
"""What the adaptive schedule did in finished runs: S per task, where each merge came from, and how close
the forgetting signal came to its threshold.

    .venv/bin/python benchmarks/schedule_study.py runs/quality/<tag>/aim-s0 [RUN_DIR ...]

Reads each run folder's ``trajectory.csv`` and ``results.json`` (made by ``launch/train.py``); trains nothing.
For every merge it tells which rule fired it, re-deriving the controller's own decision from the recorded row
(``aim_ds/control/controller.py``):

- activation: the forgetting signal h reached the threshold delta at least once in the segment;
- forced: no activation, and the merge fell at m + forced_activation_multiple x S (A set to 1 there);
- cap: A reached activation_cap before m + S;
- every S: the "fixed" interval rule (fixed_merge), which reads no signal.

``peak h/delta`` is the segment's largest probe loss over its threshold (1.0 or more = an activation); the
threshold factor that would have fired in a segment is threshold_factor x peak. Prints markdown.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from aim_ds.control.trajectory import read_csv  # noqa: E402

LETTER = {"activation": "a", "forced": "f", "cap": "c"}  # none for the fixed rule's merges


def segments(rows: list[dict], cfg: dict) -> list[dict]:
    """One dict per committed controller merge: task, step, S in force, new S, A, cause, R, peak h/delta."""
    mult = cfg.get("forced_activation_multiple", 2)
    out, task, last, peak, s_in_force = [], None, 0, None, None
    for r in rows:
        if r.get("explicit") == 1:
            continue
        if r["task"] != task:
            task, last, peak = r["task"], 0, None
        h, delta = r.get("forgetting_signal"), r.get("threshold")  # the EMA where forgetting_ema set one
        h = r.get("probe_loss") if h is None else h
        if h is not None and delta:
            peak = max(peak or 0.0, h / delta)
        if r.get("merge") != 1:
            s_in_force = r.get("interval")
            continue
        s_old = s_in_force if s_in_force is not None else cfg.get("initial_interval", 8)
        a = r.get("activations") or 0
        fired = peak is not None and peak >= 1.0
        if cfg.get("interval_rule") == "fixed":
            cause = "every S (fixed rule)"
        elif a >= cfg.get("activation_cap", 1 << 30) and r["step"] < last + s_old:
            cause = "cap"
        elif not fired and a == 1 and r["step"] == last + mult * s_old:
            cause = "forced"
        else:
            cause = "activation"
        out.append(
            dict(
                task=task, step=r["step"], s_old=s_old, s_new=r.get("interval"), activations=a, cause=cause,
                rehearsal=r.get("rehearsal_steps") or 0, peak=peak,
            )
        )  # fmt: skip
        last, peak, s_in_force = r["step"], None, r.get("interval")
    return out


def load(run_dir: Path) -> tuple[dict, list[dict], dict]:
    res = json.loads((run_dir / "results.json").read_text())
    full = res.get("config", {})  # the plugin's resolved config (fixed_merge: the fixed rule), else the ds_config's
    cfg = full.get("aim_merging") or (full.get("deepspeed_config") or {}).get("aim_merging") or {}
    return res, segments(read_csv(str(run_dir / "trajectory.csv")), cfg), cfg


def summary_row(run_dir: Path) -> str:
    res, segs, cfg = load(run_dir)
    causes = {c: sum(1 for s in segs if s["cause"] == c) for c in ("activation", "forced", "cap")}
    if cfg.get("interval_rule") == "fixed":
        causes = {"activation": "—", "forced": "—", "cap": "—"}
    peaks = [s["peak"] for s in segs if s["peak"] is not None]
    factor = cfg.get("threshold_factor", 2.0)
    peak_txt = f"{statistics.median(peaks):.2f} / {max(peaks):.2f}" if peaks else "—"
    need = f"{factor * max(peaks):.2f}" if peaks else "—"
    return (
        f"| {run_dir.parent.name}/{run_dir.name} | {res['OP']:.1f} | {res['BWT']:.1f} | {len(segs)} | {causes['activation']} / "
        f"{causes['forced']} / {causes['cap']} | {sum(s['rehearsal'] for s in segs)} | {res['steps']['engine']} | "
        f"{peak_txt} | {need} |"
    )


def interval_row(run_dir: Path, tasks: list[str]) -> str:
    """S in force at each merge of each task, with the cause (a = activation, f = forced, c = cap)."""
    _, segs, _ = load(run_dir)
    cells = []
    for t in range(len(tasks)):
        got = [f"{s['s_old']}{LETTER.get(s['cause'], '')}" for s in segs if s["task"] == t]
        cells.append(" ".join(got) if got else "—")
    return f"| {run_dir.parent.name}/{run_dir.name} | " + " | ".join(cells) + " |"


def compare(a_runs: list[Path], b_runs: list[Path]) -> str:
    """Paired difference by seed (folder suffix -s<seed>) of OP and BWT: runs A minus runs B."""
    from common import paired_cell

    def by_seed(runs):
        return {d.name.rsplit("-s", 1)[1]: json.loads((d / "results.json").read_text()) for d in runs}

    a, b = by_seed(a_runs), by_seed(b_runs)
    seeds = sorted(set(a) & set(b), key=int)
    if not seeds:
        raise SystemExit("--compare: no seed is in both groups (folders end in -s<seed>)")
    cells = [paired_cell([a[s][k] for s in seeds], [b[s][k] for s in seeds]) for k in ("OP", "BWT")]
    name = f"{a_runs[0].parent.name} − {b_runs[0].parent.name}"
    return f"| {name} | {' '.join(seeds)} | " + " | ".join(cells) + " |"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each with trajectory.csv and results.json)")
    p.add_argument(
        "--versus",
        nargs="+",
        type=Path,
        default=None,
        help="a second group of run folders: print the paired difference (by seed) of RUNS minus these",
    )
    a = p.parse_args(argv)
    missing = [
        str(d)
        for d in a.runs + (a.versus or [])
        if not (d / "trajectory.csv").exists() or not (d / "results.json").exists()
    ]
    if missing:
        p.error(f"no trajectory.csv / results.json in {', '.join(missing)}: give finished run folders")
    print(
        "| run | OP | BWT | merges | activation / forced / cap | rehearsal steps | engine steps | "
        "peak h/delta per segment (median / max) | threshold factor that would fire at the max |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for d in a.runs:
        print(summary_row(d))
    tasks = [t["name"] for t in json.loads((a.runs[0] / "results.json").read_text())["tasks"]]
    print("\nS in force at each merge (a = activation, f = forced, c = cap; no letter: the fixed rule):\n")
    print("| run | " + " | ".join(tasks) + " |")
    print("|---|" + "---|" * len(tasks))
    for d in a.runs:
        print(interval_row(d, tasks))
    if a.versus:
        from common import PAIRED_NOTE

        print(f"\n{PAIRED_NOTE}\n")
        print("| runs − versus | seeds | OP | BWT |\n|---|---|---|---|")
        print(compare(a.runs, a.versus))


if __name__ == "__main__":
    main()
