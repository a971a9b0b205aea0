"""The Trainer path (examples/hf_trainer.py) against the driver (launch/train.py) on the same benchmark, paired by
seed with cl_quality's rule, and the separation of their differences: each `--as-driver` switch on its own
(the Trainer moved toward the driver) and each left out of all of them (the driver moved toward the Trainer:
with every switch on, the Trainer reproduces the driver's run).

    python benchmarks/hf_vs_driver.py --root runs/trainer --run [--arms hfnew hfall ...] [--seeds 0 1 ...]
    python benchmarks/hf_vs_driver.py --root runs/trainer                 # tables of the runs already there

--run runs each missing ROOT/<arm>-s<seed> one at a time (2 CPU ranks each, `deepspeed --num_gpus 2`), then
prints the markdown tables: OP / BWT / merges per arm (mean over the seeds it has), each arm minus the driver
and minus the Trainer as shipped, paired by seed, and every seed's scores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from common import PAIRED_NOTE, ROOT, band_label, driver_env, paired_cell

SWITCHES = ("decay", "loss", "order", "schedule", "replay")  # examples/hf_trainer.py's --as-driver
WHAT = {
    "decay": "weight decay on every parameter",
    "loss": "each rank's own token mean",
    "order": "the driver's data order",
    "schedule": "the driver's learning rate per step",
    "replay": "the driver's replay draw, cycled",
}
# arm -> (label, --as-driver switches; None = the driver itself, () = the Trainer as shipped)
ARMS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "driver": ("driver (`launch/train.py`)", None),
    "hfnew": ("Trainer as shipped (the callback's seeded replay stream, the Trainer's defaults)", ()),
    "hfold": ("Trainer, callback before issue 25 (replay rows cycled in each rank's order; not runnable now)", None),
}
ARMS.update({f"hf{s}": (f"Trainer + `--as-driver {s}` ({WHAT[s]})", (s,)) for s in SWITCHES})
ARMS["hfall"] = ("Trainer + `--as-driver all` (every switch: the driver's run)", SWITCHES)
ARMS.update(
    {
        f"hfall-no-{s}": (
            f"Trainer + all but {s} (the driver with the Trainer's {s})",
            tuple(x for x in SWITCHES if x != s),
        )
        for s in SWITCHES
    }
)
# the driver's every choice but another draw of its data order: how much one seed's order alone moves a run
ARMS["hfall-reorder"] = ("Trainer + all, the order drawn with seed + 1000 (the driver, another order draw)", SWITCHES)
EXTRA = {"hfall-reorder": lambda seed: ["--data-seed", str(seed + 1000)]}
RUNNABLE = [a for a, (_, sw) in ARMS.items() if a != "hfold"]


def command(arm: str, seed: int, out: str, port: int) -> list[str]:
    launch = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(port), "--num_gpus", "2"]
    switches = ARMS[arm][1]
    if switches is None:
        return launch + [
            str(ROOT / "launch" / "train.py"),
            "--seed",
            str(seed),
            "--fwt-reference",
            "none",
            "--output-dir",
            out,
        ]
    cmd = launch + [str(ROOT / "examples" / "hf_trainer.py"), "--seed", str(seed), "--output-dir", out]
    extra = EXTRA[arm](seed) if arm in EXTRA else []
    return cmd + (["--as-driver", *switches] if switches else []) + extra


def run(root: str, arms: list[str], seeds: list[int], port: int, timeout: int) -> None:
    env = driver_env()
    for s in seeds:  # seed-major: a cut-short queue leaves every arm with the same seeds
        for arm in arms:
            out = os.path.join(root, f"{arm}-s{s}")
            if os.path.isfile(os.path.join(out, "results.json")):
                continue
            with open(out + ".log", "w") as log:
                try:
                    rc = subprocess.run(
                        command(arm, s, out, port), stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout
                    ).returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
            print(f"{arm}-s{s}: {'done' if rc == 0 else f'FAILED ({rc}), see {out}.log'}", flush=True)


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
    arms = [a for a in ARMS if any((a, s) in res for s in seeds)]
    have = sorted({s for s in seeds if any((a, s) in res for a in arms)})
    L = [band_label(have), "", "| arm | seeds | OP | BWT | merges |", "|---|---|---|---|---|"]
    for arm in arms:
        rs = [res[(arm, s)] for s in seeds if (arm, s) in res]
        op, bwt = statistics.fmean(r["OP"] for r in rs), statistics.fmean(r["BWT"] for r in rs)
        merges = statistics.fmean(r["merges"] for r in rs)
        L.append(f"| {ARMS[arm][0]} | {len(rs)} | {op:.1f} | {bwt:.1f} | {merges:.1f} |")
    L += ["", PAIRED_NOTE, "", "| pair | seeds | OP | BWT |", "|---|---|---|---|"]
    for base in ("driver", "hfnew"):
        for arm in arms:
            if arm == base or (base == "hfnew" and arm == "driver"):
                continue
            both = [s for s in seeds if (arm, s) in res and (base, s) in res]
            if not both:
                continue
            cells = [
                paired_cell([res[(arm, s)][k] for s in both], [res[(base, s)][k] for s in both], both)
                for k in ("OP", "BWT")
            ]
            L.append(f"| {arm} − {base} | {len(both)} | " + " | ".join(cells) + " |")
    L.append("")
    L += ["| seed | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for s in seeds:
        cells = [f"{res[(a, s)]['OP']:.1f} / {res[(a, s)]['BWT']:.1f}" if (a, s) in res else "not run" for a in arms]
        L.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(L)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="runs/trainer")
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    p.add_argument("--run", action="store_true", help="run the missing arms first (one at a time)")
    p.add_argument("--arms", nargs="+", default=RUNNABLE, choices=RUNNABLE, help="the arms --run runs")
    p.add_argument("--master-port", type=int, default=29517)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    a = p.parse_args(argv)
    if a.run:
        os.makedirs(a.root, exist_ok=True)
        run(a.root, a.arms, a.seeds, a.master_port, a.timeout)
    print(tables(load(a.root, a.seeds), a.seeds))


if __name__ == "__main__":
    main()
