"""benchmarks/decision.py: the decision table stands on report-band seeds only."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import decision  # noqa: E402


def write(root: Path, tag: str, method: str, seed: int, op: float, bwt: float) -> None:
    d = root / tag / f"{method}-s{seed}"
    d.mkdir(parents=True)
    res = {"OP": op, "BWT": bwt, "wall_time_s": 20.0, "work": {"train_tokens": 1000, "rehearsal_tokens": 100}}
    (d / "results.json").write_text(json.dumps(res))


def test_report_band_rows_and_the_verdict(tmp_path):
    for s, (a, r, f) in zip(range(100, 104), [(80, 70, 75), (82, 71, 74), (79, 70, 76), (81, 69, 75)]):
        write(tmp_path, "r16", "aim", s, a, -5)
        write(tmp_path, "r16", "replay", s, r, -9)
        write(tmp_path, "r16-fixed30", "fixed_merge", s, f, -7)
    t = decision.table(tmp_path, ["16 rows=r16:r16-fixed30"])
    assert t.splitlines()[0].startswith("Seed band: **report**")
    row = t.splitlines()[-1]
    assert row.startswith("| 16 rows | 4 | 70.0 / -9.0 | 80.5 / -5.0 | 30: 75.0 / -7.0 | — |")
    assert "+10.5 ± 0.6 (ahead) / +4.0 ± 0.0" in row and row.endswith("| aim |")  # the best, alone
    assert "aim 1.1 k / 20 s" in row


def test_a_regime_off_the_report_band_is_refused(tmp_path):
    for s in (0, 1, 2):
        write(tmp_path, "r16", "aim", s, 80, -5)
        write(tmp_path, "r16", "replay", s, 70, -9)
    with pytest.raises(SystemExit, match="not all in the report band"):
        decision.table(tmp_path, ["16 rows=r16"])


def test_the_cheapest_method_level_with_the_best_is_used(tmp_path):
    # fixed is best by mean, aim is level with it (noisy) and cheaper, replay is behind: aim
    for s, (a, r, f) in zip(range(100, 104), [(80, 70, 75), (70, 69, 82), (79, 70, 86), (81, 69, 80)]):
        write(tmp_path, "r", "aim", s, a, -5)
        write(tmp_path, "r", "replay", s, r, -9)
        write(tmp_path, "f8", "fixed_merge", s, f, -7)
    d = tmp_path / "f8"
    for run in d.iterdir():  # fixed costs more tokens than aim
        res = json.loads((run / "results.json").read_text())
        res["work"]["train_tokens"] = 2000
        (run / "results.json").write_text(json.dumps(res))
    assert decision.table(tmp_path, ["r=r:f8"]).splitlines()[-1].endswith("| aim |")


def test_replay_from_another_tag(tmp_path):
    for s in range(100, 103):
        write(tmp_path, "r4", "aim", s, 60 + s % 2, -5)
        write(tmp_path, "r4", "replay", s, 50, -9)
        write(tmp_path, "r6", "replay", s, 62 + s % 3, -8)
    row = decision.table(tmp_path, ["r=r4::r6"]).splitlines()[-1]
    assert "| 63.0 / -8.0 | 60.3 / -5.0 |" in row and "-2.7 ± 0.3 (behind)" in row and row.endswith("| replay |")
