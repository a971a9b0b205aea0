#!/usr/bin/env python
"""Regret table of one adaptive config against fixed merge intervals, per task length, paired by seed.

    .venv/bin/python benchmarks/regret.py --root runs/signals --setting e1.25=50 e5=200 e20=800 \\
        --variants fixed8 fixed30 fixed100 aim aim-signals

Reads ``ROOT/default-<setting>-<variant>/<method>-s<seed>/results.json`` (made by ``cl_quality.py --tag
default-<setting>-<variant>``; method ``fixed_merge`` for variants named fixed*, else ``aim``); trains nothing.
Per setting, the best fixed interval is the fixed variant with the highest mean (over the seeds every variant
has) OP, and separately the highest mean BWT; each variant's regret is its OP (BWT) minus that variant's,
paired by seed (``common.paired_cell``). A regret of 0 is the best fixed interval itself; the value of
adaptivity is a regret near 0 at every task length with one config, where each fixed interval is best at
some lengths and behind at others.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import PAIRED_NOTE, band, band_label, paired_cell


def load(root: Path, setting: str, variant: str) -> dict[int, dict]:
    method = "fixed_merge" if variant.startswith("fixed") else "aim"
    folder = root / f"default-{setting}-{variant}"
    out = {}
    for d in sorted(folder.glob(f"{method}-s*")):
        res = d / "results.json"
        if d.is_dir() and res.exists():
            out[int(d.name.rsplit("-s", 1)[1])] = json.loads(res.read_text())
    return out


def work(r: dict) -> tuple[int, int]:
    merges = r.get("merges")
    n = len(merges) if isinstance(merges, list) else (merges or 0)
    return n, r.get("work", {}).get("rehearsal_steps", 0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=Path("runs/signals"))
    p.add_argument("--setting", nargs="+", required=True, help="TAG=STEPS_PER_TASK, e.g. e5=200")
    p.add_argument("--variants", nargs="+", required=True)
    a = p.parse_args(argv)
    fixed = [v for v in a.variants if v.startswith("fixed")]
    if not fixed:
        p.error("--variants needs at least one fixed* variant (the regret is against the best fixed interval)")
    rows, all_seeds = [], set()
    for spec in a.setting:
        tag, _, steps = spec.partition("=")
        res = {v: load(a.root, tag, v) for v in a.variants}
        seeds = sorted(set.intersection(*(set(res[v]) for v in a.variants if res[v])) if any(res.values()) else [])
        if not seeds:
            continue
        all_seeds.update(seeds)

        def mean(v, k, res=res, seeds=seeds):
            return statistics.fmean(res[v][s][k] for s in seeds)

        best = {k: max((v for v in fixed if res[v]), key=lambda v: mean(v, k)) for k in ("OP", "BWT")}
        for v in a.variants:
            if not res[v]:
                continue
            regret = [
                "0 (best)"
                if v == best[k]
                else paired_cell([res[v][s][k] for s in seeds], [res[best[k]][s][k] for s in seeds], seeds)
                for k in ("OP", "BWT")
            ]
            m = statistics.fmean(work(res[v][s])[0] for s in seeds)
            r = statistics.fmean(work(res[v][s])[1] for s in seeds)
            rows.append(
                f"| {steps} | {v} | {len(seeds)} | {mean(v, 'OP'):.1f} | {mean(v, 'BWT'):.1f} | {regret[0]} | "
                f"{regret[1]} | {m:.1f} | {r:.0f} |"
            )
    print(band_label(all_seeds) + "\n")
    if band(all_seeds) == "report":  # the best fixed interval is picked on these very seeds: say so
        print("The 'best' fixed interval is chosen on the seeds it is compared on, so its regret of 0 is optimistic.\n")
    print(PAIRED_NOTE + "\n")
    print("| steps/task | variant | seeds | OP | BWT | OP regret | BWT regret | merges / run | rehearsal steps / run |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
