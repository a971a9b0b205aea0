"""The decision table: per regime, replay against aim and against the fixed interval chosen on the dev band,
paired by seed on the REPORT band only (benchmarks/common.py: choose on one band, report on another).

    python benchmarks/decision.py --root runs/bands \
        --regime "16 rows=report-r16:report-r16-fixed30" --regime "4 rows=report-r4:report-r4-fixed8"

Each --regime is NAME=TAG[:FIXED_TAG[:REPLAY_TAG]]: TAG holds cl_quality.py runs `replay-sS` and `aim-sS` (and
`seqft-sS` when run), FIXED_TAG the `fixed_merge-sS` runs at the interval the dev band chose, REPLAY_TAG (when
given) the replay runs to compare with instead, e.g. replay with more rows at aim's token count. A regime whose paired seeds
are not all in the report band is refused: its figures would not be results. Prints markdown; the last
column says what to use there: the cheapest method (tokens through forward + backward) that is not behind the
best one (highest mean OP) by more than two standard errors of the paired difference."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from common import REPORT_BAND, band, band_label, paired, work_tokens


def load(folder: Path, method: str) -> dict[int, dict]:
    out = {}
    for res in sorted(folder.glob(f"{method}-s*/results.json")):
        out[int(res.parent.name.rsplit("-s", 1)[1])] = json.loads(res.read_text())
    return out


def cell(xs, ys) -> tuple[str, str]:
    mean, se, verdict = paired(xs, ys)
    return f"{mean:+.1f} ± {se:.1f}" if se is not None else f"{mean:+.1f}", verdict


def cost(runs: list[dict]) -> str:
    """Mean tokens through forward + backward (thousands) and wall seconds per run."""
    tok = statistics.fmean(work_tokens(r["work"])[0] for r in runs) / 1000
    wall = statistics.fmean(r["wall_time_s"] for r in runs)
    return f"{tok:.1f} k / {wall:.0f} s"


def use(runs: dict, seeds: list[int], interval: str) -> str:
    """The cheapest method level with (or equal to) the best by mean OP."""
    methods = [m for m in ("replay", "aim", "fixed") if runs[m]]
    op = {m: [runs[m][s]["OP"] for s in seeds] for m in methods}
    top = max(methods, key=lambda m: statistics.fmean(op[m]))
    level = [m for m in methods if m == top or paired(op[m], op[top])[2] != "behind"]
    tokens = {m: statistics.fmean(work_tokens(runs[m][s]["work"])[0] for s in seeds) for m in level}
    pick = min(level, key=lambda m: tokens[m])
    return f"fixed interval {interval}" if pick == "fixed" else pick


def regime_row(root: Path, name: str, spec: str) -> tuple[str, list[int]]:
    tag, _, rest = spec.partition(":")
    fixed_tag, _, replay_tag = rest.partition(":")
    runs = {m: load(root / tag, m) for m in ("replay", "aim", "seqft")}
    if replay_tag:
        runs["replay"] = load(root / replay_tag, "replay")
    runs["fixed"] = load(root / fixed_tag, "fixed_merge") if fixed_tag else {}
    seeds = sorted(set(runs["replay"]) & set(runs["aim"]) & (set(runs["fixed"]) if fixed_tag else set(runs["aim"])))
    if not seeds:
        raise SystemExit(f"decision.py: regime {name!r}: no seed has both replay and aim runs under {root / tag}")
    if band(seeds) != "report":
        raise SystemExit(
            f"decision.py: regime {name!r} pairs seeds {seeds}, not all in the report band "
            f"{REPORT_BAND.start}-{REPORT_BAND.stop - 1}: {band_label(seeds)}"
        )

    def col(m, k):
        return [runs[m][s][k] for s in seeds]

    def op_bwt(m):
        return f"{statistics.fmean(col(m, 'OP')):.1f} / {statistics.fmean(col(m, 'BWT')):.1f}" if runs[m] else "—"

    ar_op, ar_v = cell(col("aim", "OP"), col("replay", "OP"))
    ar_bwt, _ = cell(col("aim", "BWT"), col("replay", "BWT"))
    af_op, af_v = cell(col("aim", "OP"), col("fixed", "OP")) if fixed_tag else ("—", "")
    fr_op, fr_v = cell(col("fixed", "OP"), col("replay", "OP")) if fixed_tag else ("—", "")
    interval = fixed_tag.rsplit("fixed", 1)[-1] if fixed_tag else "—"
    best = use(runs, seeds, interval)
    costs = " · ".join(
        f"{m} {cost([runs[m][s] for s in seeds])}" for m in ("replay", "aim", "fixed") if runs[m] and seeds
    )
    seq = op_bwt("seqft") if all(s in runs["seqft"] for s in seeds) else "—"
    row = (
        f"| {name} | {len(seeds)} | {op_bwt('replay')} | {op_bwt('aim')} | {interval}: {op_bwt('fixed')} | {seq} | "
        f"{ar_op} ({ar_v}) / {ar_bwt} | {af_op} ({af_v}) | {fr_op} ({fr_v}) | {costs} | {best} |"
    )
    return row, seeds


def table(root: Path, regimes: list[str]) -> str:
    rows, every = [], set()
    for r in regimes:
        name, _, spec = r.partition("=")
        row, seeds = regime_row(root, name, spec)
        rows.append(row)
        every.update(seeds)
    head = (
        "| regime | seeds | replay OP / BWT | aim OP / BWT | fixed (interval): OP / BWT | seqft OP / BWT | "
        "aim − replay: OP / BWT | aim − fixed: OP | fixed − replay: OP | tokens fwd+bwd / wall per run | use |"
    )
    return "\n".join([band_label(every), "", head, "|---" * 11 + "|"] + rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=Path("runs/bands"))
    p.add_argument("--regime", action="append", required=True, help="NAME=TAG[:FIXED_TAG[:REPLAY_TAG]]")
    a = p.parse_args(argv)
    print(table(a.root, a.regime))
    return 0


if __name__ == "__main__":
    sys.exit(main())
