"""End-to-end wall of the driver on its default benchmark: aim / seqft and aim / replay, many seeds in one run.

    python benchmarks/e2e_wall.py [--seeds 8] [--json PATH]

The pairs of perf.py (`driver_end_to_end`: per seed, seqft beside aim, then replay beside aim, one process
each, so machine load hits both runs of a pair alike), seed after seed; reports each ratio's median over
seeds with its spread (min, quartiles, max) and the load average at the start and end (the machine may be
shared). Training wall only (results.json train_wall_s; evaluation excluded).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics as _st
import sys
from pathlib import Path

from perf import _loadavg, driver_end_to_end  # this script's own folder is first on sys.path


def spread(xs: list[float]) -> dict:
    q = _st.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": _st.median(xs), "min": min(xs), "q1": q[0], "q3": q[2], "max": max(xs), "n": len(xs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=8, help="seeds 0 .. n-1 (default 8)")
    p.add_argument("--json", metavar="PATH", help="also write the full record here")
    args = p.parse_args(argv)
    d = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "load_start": _loadavg()}
    runs = driver_end_to_end(list(range(args.seeds)), log=lambda m: print(m, file=sys.stderr, flush=True))
    d["load_end"] = _loadavg()
    d["aim_over_seqft"] = spread([r["ratio"] for r in runs])
    d["aim_over_replay"] = spread([r["ratio_over_replay"] for r in runs])
    d["seconds"] = {m: spread([r[f"{m}_train_s"] for r in runs]) for m in ("seqft", "aim", "replay")}
    d["merges"] = [r["aim"]["merges"] for r in runs]
    d["runs"] = runs
    if args.json:
        Path(args.json).write_text(json.dumps(d, indent=2))
    print(json.dumps({k: v for k, v in d.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
