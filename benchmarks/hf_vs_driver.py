"""The Trainer path (examples/hf_trainer.py) against the driver (launch/train.py) on the same benchmark, paired by
seed with cl_quality's rule, and the separation of their differences (each `--as-driver` switch on its own).

    python benchmarks/hf_vs_driver.py --root runs/trainer [--seeds 0 1 2 3 4 5 6 7]

Reads ROOT/<arm>-s<seed>/results.json for the arms below (run them first, one at a time, e.g.
`deepspeed --num_gpus 2 examples/hf_trainer.py --seed S --as-driver decay --output-dir ROOT/hfdecay-sS` and
`deepspeed --num_gpus 2 launch/train.py --seed S --fwt-reference none --output-dir ROOT/driver-sS`) and prints
the markdown tables: OP / BWT / merges per arm (mean over the seeds it has), and each arm minus the driver and
minus the Trainer as shipped, paired by seed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cl_quality import PAIRED_NOTE, paired_cell  # noqa: E402

ARMS = {
    "driver": "driver (`launch/train.py`)",
    "hfnew": "Trainer, callback as now (seeded replay draws, memory batches without replay rows)",
    "hfold": "Trainer, callback before (replay rows cycled in order, memory batches with replay rows)",
    "hfdecay": "Trainer + `--as-driver decay` (weight decay on every parameter)",
    "hfloss": "Trainer + `--as-driver loss` (each rank's own token mean)",
    "hforder": "Trainer + `--as-driver order` (the driver's data order)",
}


def load(root: str, seeds: list[int]) -> dict:
    res = {}
    for arm in ARMS:
        for s in seeds:
            p = os.path.join(root, f"{arm}-s{s}", "results.json")
            if os.path.isfile(p):
                with open(p) as f:
                    res[(arm, s)] = json.load(f)
    return res


def tables(res: dict, seeds: list[int]) -> str:
    L = ["| arm | seeds | OP | BWT | merges |", "|---|---|---|---|---|"]
    for arm, label in ARMS.items():
        rs = [res[(arm, s)] for s in seeds if (arm, s) in res]
        if rs:
            op, bwt = statistics.fmean(r["OP"] for r in rs), statistics.fmean(r["BWT"] for r in rs)
            merges = statistics.fmean(r["merges"] for r in rs)
            L.append(f"| {label} | {len(rs)} | {op:.1f} | {bwt:.1f} | {merges:.1f} |")
    L += ["", PAIRED_NOTE, "", "| pair | seeds | OP | BWT |", "|---|---|---|---|"]
    for base in ("driver", "hfnew"):
        for arm in ARMS:
            if arm == base or (base == "hfnew" and arm == "driver"):
                continue
            both = [s for s in seeds if (arm, s) in res and (base, s) in res]
            if not both:
                continue
            cells = [
                paired_cell([res[(arm, s)][k] for s in both], [res[(base, s)][k] for s in both]) for k in ("OP", "BWT")
            ]
            L.append(f"| {arm} − {base} | {len(both)} | " + " | ".join(cells) + " |")
    L.append("")
    L += ["| seed | " + " | ".join(a for a in ARMS) + " |", "|---" * (len(ARMS) + 1) + "|"]
    for s in seeds:
        cells = [f"{res[(a, s)]['OP']:.1f} / {res[(a, s)]['BWT']:.1f}" if (a, s) in res else "not run" for a in ARMS]
        L.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(L)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="runs/trainer")
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    a = p.parse_args(argv)
    print(tables(load(a.root, a.seeds), a.seeds))


if __name__ == "__main__":
    main()
