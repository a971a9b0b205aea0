"""benchmarks/common.py: the choose-then-report rule the tabulating scripts carry (dev band for choosing,
report band for results)."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import common  # noqa: E402


def test_bands_and_labels():
    assert common.band(range(100, 116)) == "report"
    assert common.band([0, 7, 15]) == "dev"
    assert common.band([20, 21]) == "other" and common.band([0, 100]) == "other" and common.band([]) == "other"
    assert "are results" in common.band_label([101, 100])
    assert "not results" in common.band_label([0, 1]) and "not results" in common.band_label([20, 27])


def test_a_verdict_off_the_report_band_is_not_a_result():
    xs, ys = [10.0, 11.0, 12.0, 10.5], [1.0, 1.5, 0.5, 1.0]
    assert common.paired_cell(xs, ys, [100, 101, 102, 103]).endswith("(ahead)")
    assert common.paired_cell(xs, ys, [0, 1, 2, 3]).endswith("(ahead, dev band: not a result)")
    assert common.paired_cell(xs, ys, [20, 21, 22, 23]).endswith("(ahead, other band: not a result)")
    assert common.paired_cell([1.0, 2.0, 1.5], [1.2, 1.8, 1.5], [0, 1, 2]).endswith("(level)")  # level stays level
