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
