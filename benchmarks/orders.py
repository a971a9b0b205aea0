#!/usr/bin/env python
"""One method against another on several task orders, paired by seed per order and pooled over all orders.

    .venv/bin/python benchmarks/orders.py --root runs/quality --tags standard-o4-pretrained \\
        standard-o5-pretrained standard-o6-pretrained --method aim --versus replay

Reads ``ROOT/<tag>/<method>-s<seed>/results.json`` (made by ``cl_quality.py --tag <tag>``); trains nothing.
The question it answers: does the ordering of the two methods depend on the task order? Each order's row is
the paired difference (method minus versus) over the seeds both have; the pooled row pairs every (order,
seed) run of the two methods.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import PAIRED_NOTE, band_label, paired_cell


def load(folder: Path, method: str) -> dict[int, dict]:
    out = {}
    for res in sorted(folder.glob(f"{method}-s*/results.json")):
        out[int(res.parent.name.rsplit("-s", 1)[1])] = json.loads(res.read_text())
    return out


def table(root: Path, tags: list[str], method: str, versus: str) -> str:
    head = f"| order (tag) | tasks | seeds | {method} OP / BWT | {versus} OP / BWT | OP: {method} − {versus} | BWT |"
    lines = [PAIRED_NOTE, "", head, "|---|---|---|---|---|---|---|"]
    pooled: dict[str, list[float]] = {"a_op": [], "b_op": [], "a_bwt": [], "b_bwt": []}
    every_seed: list[int] = []
    for tag in tags:
        a, b = load(root / tag, method), load(root / tag, versus)
        seeds = sorted(set(a) & set(b))
        if not seeds:
            lines.append(f"| {tag} | — | 0 | not run | not run | — | — |")
            continue
        every_seed += seeds
        tasks = " → ".join(t["name"] for t in a[seeds[0]]["tasks"])
        col = {k: [a[s][k] for s in seeds] for k in ("OP", "BWT")}
        vcol = {k: [b[s][k] for s in seeds] for k in ("OP", "BWT")}
        pooled["a_op"] += col["OP"]
        pooled["b_op"] += vcol["OP"]
        pooled["a_bwt"] += col["BWT"]
        pooled["b_bwt"] += vcol["BWT"]
        mean = statistics.fmean
        lines.append(
            f"| {tag} | {tasks} | {' '.join(map(str, seeds))} | {mean(col['OP']):.1f} / {mean(col['BWT']):.1f} | "
            f"{mean(vcol['OP']):.1f} / {mean(vcol['BWT']):.1f} | {paired_cell(col['OP'], vcol['OP'], seeds)} | "
            f"{paired_cell(col['BWT'], vcol['BWT'], seeds)} |"
        )
    if pooled["a_op"]:
        lines.append(
            f"| all orders pooled | | {len(pooled['a_op'])} runs | {statistics.fmean(pooled['a_op']):.1f} / "
            f"{statistics.fmean(pooled['a_bwt']):.1f} | {statistics.fmean(pooled['b_op']):.1f} / "
            f"{statistics.fmean(pooled['b_bwt']):.1f} | {paired_cell(pooled['a_op'], pooled['b_op'], every_seed)} | "
            f"{paired_cell(pooled['a_bwt'], pooled['b_bwt'], every_seed)} |"
        )
    return "\n".join([band_label(set(every_seed)), ""] + lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="runs/quality")
    p.add_argument("--tags", nargs="+", required=True, help="one cl_quality.py --tag per task order")
    p.add_argument("--method", default="aim")
    p.add_argument("--versus", default="replay")
    a = p.parse_args(argv)
    print(table(Path(a.root), a.tags, a.method, a.versus))


if __name__ == "__main__":
    main()
