"""`aim-ds replay`: the pure controller re-run on a trajectory recorded by the plugin on real ranks."""

import argparse
import json

import pytest

from aim_ds.control.trajectory import read_csv
from aim_ds.tools import cli, replay
from tests.mp import run_ranks


@pytest.fixture(scope="module", params=["reference", "signals"])
def run_dir(tmp_path_factory, request):
    """A recorded run: the reference rule, and the same with the de-noised signals (forgetting_ema,
    threshold_rule "mean_std", learning_signal "lr_sqrt") under a decaying learning rate."""
    d = tmp_path_factory.mktemp("replay_run")
    signals = request.param == "signals"
    res = run_ranks("tests.scenarios_fidelity:trajectory_for_replay", 2, d, 300, out_dir=str(d), signals=signals)
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
    lrs = [r["lr"] for r in rows if not r["explicit"]]
    assert None not in lrs and lrs[0] > 0  # every step records the lr it used (learning_signal "lr_sqrt" reads it)
    if cfg["forgetting_ema"]:
        assert len({r["lr"] for r in rows if r["task"] == 1}) > 10  # the decaying schedule was recorded
        assert any(r["forgetting_signal"] is not None for r in rows)


def test_replay_of_lr_sqrt_needs_a_recorded_lr(run_dir, tmp_path):
    text = (run_dir / "trajectory.csv").read_text().splitlines()
    header = text[0].split(",")
    keep = [i for i, h in enumerate(header) if h != "lr"]
    (tmp_path / "trajectory.csv").write_text("\n".join(",".join(line.split(",")[i] for i in keep) for line in text))
    cfg = json.loads((run_dir / "results.json").read_text())["config"]["aim_merging"]
    (tmp_path / "ds.json").write_text(json.dumps({"aim_merging": dict(cfg, learning_signal="lr_sqrt")}))
    with pytest.raises(ValueError, match="records no learning rate"):
        replay.run(argparse.Namespace(run_dir=str(tmp_path), config=str(tmp_path / "ds.json"), plot=None))


def test_replay_with_another_config_shows_its_schedule_and_says_what_it_is(run_dir, tmp_path, capsys):
    cfg = json.loads((run_dir / "results.json").read_text())["config"]["aim_merging"]
    other = tmp_path / "ds.json"
    lower = {"threshold_std": 0.5} if cfg["threshold_rule"] == "mean_std" else {"threshold_factor": 1.5}
    other.write_text(json.dumps({"aim_merging": dict(cfg, initial_interval=5, **lower)}))
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
