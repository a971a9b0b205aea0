#!/usr/bin/env python
"""The memory a method needs: run replay and aim at several memory sizes, tabulate and plot OP / BWT against it.

    .venv/bin/python benchmarks/memory_sweep.py --fractions 0.01 0.02 0.05 0.1 --seeds 0 1 2 -- --benchmark standard
    .venv/bin/python benchmarks/memory_sweep.py --collect-only ... -- ...     # table and plot from finished runs

Arguments after ``--`` go to ``benchmarks/cl_quality.py`` unchanged (benchmark, sizes, ``--out-root``). Each
fraction is one cl_quality call with ``--extra "--memory-fraction F"`` into its own folder
``<out-root>/<prefix>-mem<F>/<method>-s<seed>``; finished runs are kept (``--skip-done``). The figures come
from the driver's results.json; this file trains nothing. Writes ``<plot>`` (PNG) and prints a markdown table
with the paired differences that answer "does aim at a small memory match replay at a large one?".
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import cl_quality  # noqa: E402  (sibling modules: this script's folder is on sys.path)
import common  # noqa: E402


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1])
    p.add_argument("--methods", nargs="+", default=["replay", "aim"], choices=["seqft", "replay", "fixed_merge", "aim"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--prefix", default=None, help="folder prefix (default: the benchmark's tag)")
    p.add_argument("--plot", type=Path, default=None, help="PNG to write (default: docs/memory_sweep_<prefix>.png)")
    p.add_argument("--collect-only", action="store_true")
    a = p.parse_args(own)
    bad = [f for f in a.fractions if not 0 < f <= 1]
    if bad:
        p.error(f"--fractions {bad}: each must be in (0, 1] (0.02 = 2% of each task's training set)")
    base = cl_quality.parse_args(passthrough)
    a.prefix = a.prefix or base.tag
    a.plot = a.plot or ROOT / "docs" / f"memory_sweep_{a.prefix}.png"
    a.passthrough = passthrough
    return a


def tag(a, f: float) -> str:
    return f"{a.prefix}-mem{f * 100:g}"


def quality_args(a, f: float) -> list[str]:
    extra = f"--memory-fraction {f}"
    cq = cl_quality.parse_args(a.passthrough)
    if cq.extra:
        extra = f"{cq.extra} {extra}"
    return [
        *a.passthrough,
        "--tag",
        tag(a, f),
        "--methods",
        *a.methods,
        "--seeds",
        *map(str, a.seeds),
        "--extra",
        extra,
    ]


def collect(a) -> dict:
    """(method, fraction) -> {seed: results}"""
    out = {}
    for f in a.fractions:
        q = cl_quality.parse_args(quality_args(a, f))
        for (m, s), r in cl_quality.collect(q).items():
            out.setdefault((m, f), {})[s] = r
    return out


def table(a, res) -> str:
    L = ["| memory | " + " | ".join(f"{m} OP | {m} BWT" for m in a.methods) + " | seeds |"]
    L.append("|---|" + "---|---|" * len(a.methods) + "---|")
    for f in a.fractions:
        cells, n = [], set()
        for m in a.methods:
            got = res.get((m, f), {})
            n.add(len(got))
            cells += [common.fmt([r[k] for r in got.values()]) if got else "—" for k in ("OP", "BWT")]
        L.append(f"| {f * 100:g}% | " + " | ".join(cells) + f" | {'/'.join(map(str, sorted(n)))} |")
    L += ["", common.PAIRED_NOTE, ""]
    L += ["| comparison | seeds | OP | BWT |", "|---|---|---|---|"]
    comps = [(("aim", f), ("replay", f)) for f in a.fractions]
    comps += [(("aim", f), ("replay", g)) for f in a.fractions for g in a.fractions if g > f]
    for (m1, f1), (m2, f2) in comps:
        x, y = res.get((m1, f1), {}), res.get((m2, f2), {})
        seeds = sorted(set(x) & set(y))
        if not seeds:
            continue
        cells = [common.paired_cell([x[s][k] for s in seeds], [y[s][k] for s in seeds]) for k in ("OP", "BWT")]
        L.append(f"| {m1} {f1 * 100:g}% − {m2} {f2 * 100:g}% | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(L) + "\n"


def plot(a, res) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key in zip(axes, ("OP", "BWT")):
        for m in a.methods:
            pts = [(f * 100, [r[key] for r in res[(m, f)].values()]) for f in a.fractions if res.get((m, f))]
            if not pts:
                continue
            xs = [x for x, _ in pts]
            ys = [statistics.fmean(v) for _, v in pts]
            es = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in pts]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m)
        ax.set_xscale("log")
        ax.set_xticks([f * 100 for f in a.fractions], [f"{f * 100:g}%" for f in a.fractions])
        ax.set_xlabel("memory (share of each task's training set)")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{a.prefix}: mean ± std over seeds {' '.join(map(str, a.seeds))}")
    fig.tight_layout()
    a.plot.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.plot.with_name(a.plot.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(a.plot)
    plt.close(fig)


def main(argv=None):
    a = parse_args(argv)
    if not a.collect_only:
        for f in a.fractions:
            cl_quality.main([*quality_args(a, f), "--skip-done", "--no-markdown"])
    res = collect(a)
    print(table(a, res))
    if res:
        plot(a, res)
        print(f"wrote {a.plot}")


if __name__ == "__main__":
    main()
