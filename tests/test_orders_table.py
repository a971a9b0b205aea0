"""benchmarks/orders.py: per-order and pooled paired differences from results.json files."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import orders  # noqa: E402


def write(root: Path, tag: str, method: str, seed: int, op: float, bwt: float) -> None:
    d = root / tag / f"{method}-s{seed}"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"OP": op, "BWT": bwt, "tasks": [{"name": "a"}, {"name": "b"}]}))


def test_per_order_and_pooled_paired_differences(tmp_path):
    for s, (a, r) in enumerate([(50, 40), (52, 41), (49, 40)]):  # order x: aim 9-11 ahead on every seed
        write(tmp_path, "x", "aim", s, a, -5)
        write(tmp_path, "x", "replay", s, r, -5)
    for s, (a, r) in enumerate([(30, 40), (31, 40)]):  # order y: 9.5 behind, 2 seeds
        write(tmp_path, "y", "aim", s, a, -9)
        write(tmp_path, "y", "replay", s, r, -1)
    write(tmp_path, "y", "aim", 2, 99, 0)  # no replay run for seed 2: left out of the pairs
    t = orders.table(tmp_path, ["x", "y", "z"], "aim", "replay")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in t.splitlines() if line.startswith("| ")}
    assert "a → b" in rows["x"] and "+10.0 ± 0.6 (ahead, dev band: not a result)" in rows["x"]
    assert t.splitlines()[0].startswith("Seed band: **dev**") and "not results" in t.splitlines()[0]
    assert "-9.5 ± 0.5 (level (2 seeds))" in rows["y"] and "-8.0" in rows["y"]
    assert "not run" in rows["z"]
    assert "5 runs" in rows["all orders pooled"] and "+2.2" in rows["all orders pooled"]


def test_report_band_figures_are_results(tmp_path):
    for s, (a, r) in zip(range(100, 103), [(50, 40), (52, 41), (49, 40)]):
        write(tmp_path, "x", "aim", s, a, -5)
        write(tmp_path, "x", "replay", s, r, -5)
    t = orders.table(tmp_path, ["x"], "aim", "replay")
    assert t.splitlines()[0].startswith("Seed band: **report** (seeds 100 101 102)")
    assert "+10.0 ± 0.6 (ahead) |" in t
