"""benchmarks/cl_quality.py: the job list it builds (no training runs)."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import cl_quality  # noqa: E402


def _output_dirs(jobs):
    return [cmd[cmd.index("--output-dir") + 1] for _, cmd, _, _ in jobs]


def test_out_root_outside_the_checkout(tmp_path):
    a = cl_quality.parse_args(["--out-root", str(tmp_path / "q"), "--seeds", "0", "--methods", "single", "seqft"])
    jobs = cl_quality.build_jobs(a)
    assert _output_dirs(jobs) == [str(tmp_path / "q" / a.tag / "single-s0"), str(tmp_path / "q" / a.tag / "seqft-s0")]
    assert all(out == Path(d) for (_, _, out, _), d in zip(jobs, _output_dirs(jobs)))


def test_out_root_inside_the_checkout_stays_relative():
    a = cl_quality.parse_args(["--seeds", "1", "--methods", "aim"])
    ((_, cmd, out, _),) = cl_quality.build_jobs(a)
    assert _output_dirs([(None, cmd, out, None)]) == [str(Path("runs/quality", a.tag, "aim-s1"))]
    assert out == REPO / "runs" / "quality" / a.tag / "aim-s1"


def test_paired_difference_verdicts():
    mean, se, verdict = cl_quality.paired([80.0, 82.0, 81.0], [70.0, 71.0, 72.0])
    assert (round(mean, 6), verdict) == (10.0, "ahead") and 0 < se < 1
    assert cl_quality.paired([70.0, 90.0, 75.0], [80.0, 79.0, 76.0])[2] == "level"  # +0 against a spread of 11
    assert cl_quality.paired([80.0, 82.0], [70.0, 71.0])[2] == "level (2 seeds)"  # one degree of freedom: no verdict
    assert cl_quality.paired([60.0, 61.0, 62.0], [70.0, 70.5, 71.0])[2] == "behind"
    assert cl_quality.paired([50.0], [40.0]) == (10.0, None, "level (1 seed)")


def test_paired_lines_compare_merging_methods_once():
    res = {
        (m, s): {"OP": op + s, "BWT": -5.0 * (s + 1)}
        for m, op in (("replay", 20.0), ("fixed_merge", 30.0), ("aim", 31.0))
        for s in (0, 1, 2)
    }
    lines = cl_quality.paired_lines(res, ["single", "replay", "fixed_merge", "aim"], [0, 1, 2])
    pairs = [ln.split(" | ")[0].strip("| ") for ln in lines if ln.startswith("| ") and "−" in ln]
    assert pairs == ["fixed_merge − replay", "aim − replay", "aim − fixed_merge"]
    assert "| +11.0 ± 0.0 (ahead, dev band: not a result) | +0.0 ± 0.0 (level) |" in lines[-3]  # aim − replay
    assert "| +1.0 ± 0.0 (ahead, dev band: not a result) |" in lines[-2]  # no spread: any difference counts
    report = {(m, s + 100): v for (m, s), v in res.items()}
    lines = cl_quality.paired_lines(report, ["single", "replay", "fixed_merge", "aim"], [100, 101, 102])
    assert "| +11.0 ± 0.0 (ahead) | +0.0 ± 0.0 (level) |" in lines[-3]  # the report band states results


def test_memory_sweep_runs_one_tagged_quality_call_per_fraction(tmp_path):
    import memory_sweep

    a = memory_sweep.parse_args(
        ["--fractions", "0.02", "0.1", "--seeds", "0", "1", "--", "--out-root", str(tmp_path), "--extra", "--lr 3e-4"]
    )
    q = cl_quality.parse_args(memory_sweep.quality_args(a, 0.1))
    assert (q.tag, q.methods, q.seeds) == ("standard-mem10", ["replay", "aim"], [0, 1])
    assert q.extra == "--lr 3e-4 --memory-fraction 0.1"  # the caller's extra driver arguments are kept
    for m, f, op in (("replay", 0.02, 20.0), ("replay", 0.1, 40.0), ("aim", 0.02, 39.0), ("aim", 0.1, 45.0)):
        for s in (0, 1):
            d = tmp_path / memory_sweep.tag(a, f) / f"{m}-s{s}"
            d.mkdir(parents=True)
            (d / "results.json").write_text(f'{{"OP": {op + s}, "BWT": {-op / 10 - s}}}')
    text = memory_sweep.table(a, memory_sweep.collect(a))
    assert "| 10% | 40.5 ± 0.7 | -4.5 ± 0.7 | 45.5 ± 0.7 | -5.0 ± 0.7 | 2 |" in text
    assert "| aim 2% − replay 10% | 2 | -1.0 ± 0.0 (level (2 seeds)) | +0.1 ± 0.0 (level (2 seeds)) |" in text


def test_memory_sweep_rejects_a_fraction_outside_0_1():
    import memory_sweep
    import pytest

    with pytest.raises(SystemExit):
        memory_sweep.parse_args(["--fractions", "2"])


def test_long_preset_evaluates_only_the_tasks_seen():
    a = cl_quality.parse_args(["--benchmark", "long", "--seeds", "0", "--methods", "seqft", "--max-eval", "20"])
    ((_, cmd, _, _),) = cl_quality.build_jobs(a)
    flags = dict(zip(cmd[2::2], cmd[3::2]))
    assert flags["--order"] == "1" and flags["--max-train"] == "320" and flags["--eval-tasks"] == "seen"
    assert flags["--max-eval"] == "20"  # an explicit option beats the preset
    assert "--eval-tasks" not in cl_quality.build_jobs(cl_quality.parse_args(["--seeds", "0"]))[0][1]
