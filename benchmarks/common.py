"""What the benchmark scripts share: the repository root, the environment of a driver run, and the cells of
their tables (mean ± std over seeds, paired differences by seed, tokens of a run). Each script imports it as
its sibling module (a script's own folder is the first entry of sys.path), so no script edits sys.path."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def driver_env() -> dict:
    """Environment for one single-process driver run side by side with another (cl_quality.py, perf.py):
    one thread each, offline, the project's prebuilt ops, no inherited rank variables."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def fmt(vals, digits=1):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "—"
    m = statistics.fmean(vals)
    if len(vals) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def seeds_text(vals, digits=1):
    return " / ".join("—" if v is None else f"{v:.{digits}f}" for v in vals)


def work_tokens(work: dict) -> tuple[int, int]:
    """A run's tokens on rank 0 (results.json "work"): through forward + backward (training batches and
    rehearsal), and through forward only (the plugin's probe forwards): the compute a GPU pays."""
    return work.get("train_tokens", 0) + work.get("rehearsal_tokens", 0), work.get("probe_tokens", 0)


# Choose on one band, report on another: settings (configs, intervals, variants) are chosen only on the dev
# band's seeds, and a figure is called a result only from the report band's, where nothing was chosen. A
# best-of-many setting carries its band's luck: the driver's settings, picked on seeds 0-7, fell 7.6 OP on fresh
# seeds.
DEV_BAND = range(0, 16)
REPORT_BAND = range(100, 116)


def band(seeds) -> str:
    """'report', 'dev' or 'other' (mixed bands, or seeds in neither)."""
    seeds = list(seeds)
    if seeds and all(s in REPORT_BAND for s in seeds):
        return "report"
    if seeds and all(s in DEV_BAND for s in seeds):
        return "dev"
    return "other"


def band_label(seeds) -> str:
    """One line that heads every table: which band its seeds are from and whether its figures are results."""
    seeds = sorted(seeds)
    shown = " ".join(map(str, seeds))
    return {
        "report": f"Seed band: **report** (seeds {shown}): no setting was chosen on them; these figures are results.",
        "dev": f"Seed band: **dev** (seeds {shown}): settings are chosen on these seeds, so these figures carry the "
        "choice's luck and are **not results**; rerun on the report band "
        f"({REPORT_BAND.start}-{REPORT_BAND.stop - 1}) to state one.",
        "other": f"Seed band: **neither** (seeds {shown}): outside the report band "
        f"({REPORT_BAND.start}-{REPORT_BAND.stop - 1}), so these figures are **not results** by the "
        "choose-then-report rule.",
    }[band(seeds)]


def paired(xs: list[float], ys: list[float]) -> tuple[float, float | None, str]:
    """Mean of the per-seed differences x - y, its standard error (None under 2 seeds) and the verdict:
    "level" when |mean| < 2 standard errors, else "ahead" / "behind". Under 3 seeds it is always "level (n
    seeds)": a standard error from 2 differences has one degree of freedom and says almost nothing."""
    d = [x - y for x, y in zip(xs, ys)]
    mean = statistics.fmean(d)
    if len(d) < 2:
        return mean, None, "level (1 seed)"
    se = statistics.stdev(d) / len(d) ** 0.5
    if len(d) < 3:
        return mean, se, f"level ({len(d)} seeds)"
    if abs(mean) < 2 * se or (se == 0 and mean == 0):
        return mean, se, "level"
    return mean, se, "ahead" if mean > 0 else "behind"


PAIRED_NOTE = (
    'Paired by seed (mean ± standard error of the per-seed difference; "level" when under two standard errors, '
    "or from fewer than 3 seeds):"
)


def paired_cell(xs: list[float], ys: list[float], seeds=None) -> str:
    """One table cell: the paired difference x - y, its standard error and the verdict. Given the seeds, a
    verdict off the report band says it is not a result."""
    mean, se, verdict = paired(xs, ys)
    if seeds is not None and band(seeds) != "report" and verdict in ("ahead", "behind"):
        verdict += f", {band(seeds)} band: not a result"
    return f"{mean:+.1f}" + (f" ± {se:.1f}" if se is not None else "") + f" ({verdict})"
