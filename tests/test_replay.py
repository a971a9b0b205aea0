"""`aim-ds replay`: the pure controller re-run on a trajectory recorded by the plugin on real ranks."""

import json

import pytest

from aim_ds import cli
from aim_ds import controller_replay as replay
from aim_ds.trajectory import read_csv
from tests.mp import run_ranks


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("replay_run")
    res = run_ranks("tests.scenarios_fidelity:trajectory_for_replay", 2, d, 300, out_dir=str(d))
    assert res[0]["merges"] >= 4, res
    return d


def test_replay_with_the_runs_own_config_reproduces_its_merges(run_dir, capsys):
    rows = read_csv(str(run_dir / "trajectory.csv"))
    recorded = replay.merges(rows)
    assert len({m[2] for m in recorded}) >= 2, recorded  # the interval changed: the rule was exercised
    assert any(r["explicit"] == 1 for r in rows)
    assert cli.main(["replay", str(run_dir), "--plot", str(run_dir / "replay.png")]) == 0
    out = capsys.readouterr().out
    assert "reproduces the recorded merges exactly" in out, out
    assert (run_dir / "replay.png").stat().st_size > 1000
    cfg = json.loads((run_dir / "results.json").read_text())["config"]["aim_merging"]
    assert replay.merges(replay.replay(rows, replay.AimConfig.from_dict(cfg))) == recorded


def test_replay_with_another_config_shows_its_schedule_and_says_what_it_is(run_dir, tmp_path, capsys):
    cfg = json.loads((run_dir / "results.json").read_text())["config"]["aim_merging"]
    other = tmp_path / "ds.json"
    other.write_text(json.dumps({"aim_merging": dict(cfg, initial_interval=5, threshold_factor=1.5)}))
    assert cli.main(["replay", str(run_dir), "--config", str(other)]) == 0
    out = capsys.readouterr().out
    assert "signals move with the schedule" in out and "differs from the recorded merges" in out, out
    assert "estimated Lambda" in out  # merges the run did not make have no recorded sum


def test_replay_reports_a_mismatch_and_fails(run_dir, tmp_path, capsys):
    # a tampered record (one learning-signal sum tripled) no longer reproduces with the run's own config
    text = (run_dir / "trajectory.csv").read_text().splitlines()
    rows = read_csv(str(run_dir / "trajectory.csv"))
    first_merge = next(i for i, r in enumerate(rows) if r["merge"] == 1 and not r["explicit"])
    header = text[0].split(",")
    cells = text[1 + first_merge].split(",")
    cells[header.index("abs_change_sum")] = repr(float(cells[header.index("abs_change_sum")]) * 3)
    text[1 + first_merge] = ",".join(cells)
    (tmp_path / "trajectory.csv").write_text("\n".join(text) + "\n")
    (tmp_path / "results.json").write_text((run_dir / "results.json").read_text())
    assert cli.main(["replay", str(tmp_path)]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_replay_bad_input_is_one_clear_error(tmp_path, capsys):
    assert cli.main(["replay", str(tmp_path)]) == 2
    assert "trajectory.csv not found" in capsys.readouterr().err
