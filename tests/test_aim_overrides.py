"""--aim KEY=VALUE on the driver and on benchmarks/cl_quality.py, and the driver's parser derived from RunConfig
(no training runs)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from aim_ds.config import AimConfig
from aim_ds.driver.args import DEFAULT_DS_CONFIG, InputError, RunConfig, apply_aim_overrides, build_parser, parse_args

REPO = Path(__file__).resolve().parents[1]


def _ds() -> dict:
    return json.loads(Path(DEFAULT_DS_CONFIG).read_text())


def test_overrides_set_the_section_and_are_checked_like_the_file():
    cfg = parse_args(["--aim", "threshold_factor=1.25", "--aim", "rehearsal_steps=3", "--aim", "rehearsal_fraction=1"])
    assert cfg.aim == ("threshold_factor=1.25", "rehearsal_steps=3", "rehearsal_fraction=1")
    ds = _ds()
    out = apply_aim_overrides(ds, cfg.aim)
    section = AimConfig.from_ds_config(out)
    assert (section.threshold_factor, section.rehearsal_steps, section.rehearsal_fraction) == (1.25, 3, 1.0)
    assert section.probe_source == ds["aim_merging"]["probe_source"]  # the file's other keys stay
    assert ds == _ds()  # the loaded ds_config itself is not changed
    assert {k: v for k, v in out.items() if k != "aim_merging"} == {k: v for k, v in ds.items() if k != "aim_merging"}
    # strings need no quotes; JSON values keep their type
    out = apply_aim_overrides(ds, ["interval_rule=reference", "merge_first_task=true"])
    assert out["aim_merging"]["interval_rule"] == "reference" and out["aim_merging"]["merge_first_task"] is True


@pytest.mark.parametrize(
    "pairs, needle",
    [
        (["threshold_factr=1.5"], "did you mean 'threshold_factor'"),  # an unknown key, as in the file
        (["threshold_factor=-1"], "threshold_factor"),  # out of range
        (["rehearsal_steps=3"], "rehearsal_fraction"),  # a constant R with the file's fraction 0.25
        (["threshold_factor"], "expected KEY=VALUE"),
        (["=2"], "expected KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_problem(pairs, needle):
    with pytest.raises(InputError) as e:
        apply_aim_overrides(_ds(), pairs)
    assert str(e.value).startswith("--aim") and needle in str(e.value)


def test_no_overrides_leave_the_config_and_results_as_before():
    ds = _ds()
    assert apply_aim_overrides(ds, ()) is ds
    assert "aim" not in parse_args([]).options()  # results.json's args list stays as it was without --aim
    assert parse_args(["--aim", "window=4"]).options()["aim"] == ("window=4",)


def test_parser_defaults_are_the_config_defaults():
    args = build_parser().parse_args([])
    for f in dataclasses.fields(RunConfig):
        want = f.default
        got = getattr(args, f.name)
        assert got == want or (f.name == "aim" and got is None), f.name
    # every option named once on the command line, in RunConfig's order
    dests = [a.dest for a in build_parser()._actions if a.dest != "help"]
    assert dests == [f.name for f in dataclasses.fields(RunConfig)]


def test_cl_quality_passes_overrides_to_the_driver(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import cl_quality
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    a = cl_quality.parse_args(
        ["--seeds", "0", "--methods", "fixed_merge", "--out-root", str(tmp_path), "--aim", "initial_interval=30"]
    )
    a.aim.append("rehearsal_steps=3")
    ((_, cmd, _, _),) = cl_quality.build_jobs(a)
    i = cmd.index("--aim")
    assert cmd[i : i + 4] == ["--aim", "initial_interval=30", "--aim", "rehearsal_steps=3"]
