"""FOREVER: the pure schedule against a hand-worked trace, its config, and the plugin on real ZeRO engines."""

import csv
import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest

from aim_ds.config import ConfigError, ForeverConfig
from aim_ds.control.forever import ForeverSchedule
from tests.mp import TRAIN, deepspeed_cmd, run_logged, run_ranks

TIMEOUT = 300


def _trace(cfg, deltas, task=1):
    s = ForeverSchedule(cfg)
    s.start_task(task)
    return [s.observe(d) for d in deltas]


def test_schedule_follows_a_hand_worked_trace():
    cfg = ForeverConfig(day_steps=2, days=(1, 2, 4), intensity_ema=0.5, beta_base=0.1, gamma=1.0)
    got = _trace(cfg, [1, 3, 2, 4, 0.5, 10, 30])
    # step: tau, one day, mu / mu_0, beta, event
    want = [
        (1, None, 1.0, 0.1, None),  # the first day is still running: no day, ratio 1
        (4, 4, 1.0, 0.1, 0),  # day = tau(2) = 4, mu_0 = 2; tau >= 1 day: event 0
        (6, 4, 1.0, 0.1, None),  # mu = 0.5 * 2 + 0.5 * 2 = 2; 6 < 2 days
        (10, 4, 1.5, 0.15, 1),  # mu = 3; 10 >= 2 days (8): event 1
        (10.5, 4, 0.875, 0.0875, None),  # mu = 1.75
        (20.5, 4, 2.9375, 0.29375, 2),  # mu = 5.875; 20.5 >= 4 days (16): event 2
        (50.5, 4, 8.96875, 0.3, None),  # ratio past the clip: 3 x beta_base; no day left
    ]
    for d, (tau, day, ratio, beta, event) in zip(got, want, strict=True):
        assert (d.tau, d.day, d.event) == (tau, day, event)
        assert d.ratio == pytest.approx(ratio) and d.beta == pytest.approx(beta)
    assert [d.step for d in got] == list(range(1, 8)) and all(d.task == 1 for d in got)


def test_a_step_over_several_marks_fires_once_and_a_task_restarts_the_clock():
    cfg = ForeverConfig(day_steps=1, days=(1, 2, 4), gamma=0.0)
    s = ForeverSchedule(cfg)
    s.start_task(0)
    first, second = s.observe(1.0), s.observe(5.0)
    assert (first.event, first.crossed) == (0, 1)
    assert (second.event, second.crossed, second.tau) == (1, 2, 6.0)  # crossed days 2 and 4: one event
    assert s.observe(100.0).event is None  # no day left
    assert second.beta == cfg.beta_base  # gamma 0: the intensity term is off
    s.start_task(1)
    assert (s.observe(2.0).event, s.tau, s.day) == (0, 2.0, 2.0)


def test_schedule_state_round_trips_and_refuses_bad_input():
    cfg = ForeverConfig(day_steps=3)
    a = ForeverSchedule(cfg)
    a.start_task(2)
    for d in (0.5, 0.25, 0.75, 0.1):
        a.observe(d)
    b = ForeverSchedule(cfg)
    b.load_state_dict(a.state_dict())
    assert a.observe(2.0) == b.observe(2.0)
    with pytest.raises(ValueError, match="update size"):
        a.observe(float("nan"))
    with pytest.raises(RuntimeError, match="before start_task"):
        ForeverSchedule(cfg).observe(1.0)


def test_forever_config_is_strict():
    assert ForeverConfig.from_dict(ForeverConfig().to_dict()) == ForeverConfig()
    for bad, match in [
        ({"dayz": [1]}, "did you mean 'days'"),
        ({"days": [2, 1]}, "not increasing"),
        ({"days": []}, "non-empty list"),
        ({"day_steps": 0}, "forever.day_steps"),
        ({"beta_min_factor": 4.0}, "beta_max_factor"),
        ({"intensity_ema": 0}, r"\(0, 1\]"),
        ({"anchor": "nvme"}, "forever.anchor"),
    ]:
        with pytest.raises(ConfigError, match=match):
            ForeverConfig.from_dict(bad)


def test_model_time_is_exact_and_the_same_at_world_1_2_and_3(tmp_path):
    by_world = {}
    for world in (1, 2, 3):
        r = run_ranks("tests.scenarios_forever:model_time", world, tmp_path, TIMEOUT)[0]
        compared = [(m, e) for m, e in zip(r["measured"], r["expected"], strict=True) if m is not None]
        assert len(compared) >= 7
        for m, e in compared:  # float64 sums of the shards' squares against the gathered masters' change
            assert m == pytest.approx(e, rel=1e-9)
        replays = r["replays"]  # (task, step, event, steps): day 1 ends at step 2 by definition, then the data
        assert replays[0] == [1, 2, 0, 2] and replays[-1] == [1, 5, "end", 1]
        assert [e for _, _, e, _ in replays[:-1]] == list(range(len(replays) - 1))  # no replay on task 0
        assert r["work"]["replay_events"] == len(replays)
        assert r["work"]["rehearsal_steps"] == 2 * (len(replays) - 1) + 1
        by_world[world] = r
    for world in (2, 3):  # the same global batches: the same updates up to fp32 reduction order, until the
        # first replay (each rank replays its own memory): task 0's 4 steps and task 1's first 2
        for a, b in zip(by_world[world]["tau"][:6], by_world[1]["tau"][:6], strict=True):
            assert a == pytest.approx(b, rel=1e-4)
        assert math.isclose(by_world[world]["measured"][0], by_world[1]["measured"][0], rel_tol=1e-4)


@pytest.mark.parametrize("stage,offload", [(3, False), (3, True), (2, False), (1, False), (0, False)])
def test_the_l2_pull_adds_its_gradient_in_the_replay_step(tmp_path, stage, offload):
    r = run_ranks("tests.scenarios_forever:pull_gradient", 2, tmp_path, TIMEOUT, stage=stage, offload=offload)[0]
    assert r["same_start"] == 0.0  # both runs reach the replay with the same weights
    assert r["scale"] > 1e-4  # the pull moves the weights measurably
    assert r["worst"] <= 1e-6 * max(1.0, r["scale"]) + 2e-7


def _drive(tmp_path, out, *extra, timeout=600):
    """launch/train.py --method forever on 2 CPU ranks (ZeRO-3, the default ds_config); the log on failure."""
    cmd = deepspeed_cmd(TRAIN, "--method", "forever", "--seed", "0", "--no-progress", "--output-dir", out, *extra)
    rc, log = run_logged(cmd, tmp_path, Path(out).name, timeout)
    assert rc == 0, log[-3000:]


@pytest.fixture(scope="module")
def forever_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("forever_driver")
    out = tmp / "ref"
    _drive(tmp, out, "--checkpoint-every", "7", "--keep-checkpoints", "100")
    return tmp, out


def test_driver_runs_forever_and_records_model_time(forever_run):
    _, out = forever_run
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "forever" and 0 <= res["OP"] <= 100 and res["merges"] == 0
    assert res["config"]["forever"] == ForeverConfig().to_dict() and res["config"]["aim_merging"] is None
    rows = list(csv.DictReader(open(out / "trajectory.csv")))
    steps = [r for r in rows if r["delta"]]
    assert len(steps) == sum(res["steps"]["per_task"])  # one model-time row per training step
    for task in range(4):
        tau = [float(r["tau"]) for r in steps if int(r["task"]) == task]
        assert all(b > a for a, b in zip(tau, tau[1:]))  # model time only moves forward within a task
        assert tau[0] == pytest.approx(float(steps[[int(r["task"]) for r in steps].index(task)]["delta"]))
    replays = [r for r in rows if r["replay"]]
    assert [int(r["task"]) for r in replays if r["replay"] == "end"] == [1, 2, 3]  # none after task 0
    assert all(int(r["task"]) >= 1 and r["replay_loss"] for r in replays)
    assert res["work"]["replay_events"] == len(replays)
    assert (out / "losses.csv").read_text().count("\n") > 100


def test_forever_resumes_bit_identically_through_a_replay_event(forever_run):
    tmp, ref = forever_run
    ckpts = ref / "checkpoints"
    rows = list(csv.DictReader(open(ref / "trajectory.csv")))
    first = next(r for r in rows if r["replay"] and r["replay"] != "end")  # task 1's day-1 replay
    tags = sorted(d for d in os.listdir(ckpts) if d.startswith("task001") and not d.endswith("end"))
    before = [t for t in tags if int(re.search(r"step(\d+)", t).group(1)) < int(first["step"])]
    assert before, tags
    out = tmp / "resumed"
    _drive(tmp, out, "--checkpoint-every", "7", "--resume", ckpts / before[-1])
    assert f"resuming from {ckpts / before[-1]}" in (tmp / "resumed.log").read_text()  # not a fresh start
    for f in ("trajectory.csv", "losses.csv"):
        assert (out / f).read_text() == (ref / f).read_text(), f
    a, b = (json.loads((d / "results.json").read_text()) for d in (ref, out))
    assert (a["matrix"], a["work"]) == (b["matrix"], b["work"])


@pytest.mark.parametrize("stage", [0, 1])
def test_model_time_is_exact_at_stages_0_and_1(tmp_path, stage):
    """Stage 0 replicates every master (each rank counts a slice), stage 1 cuts flat groups across ranks."""
    r = run_ranks("tests.scenarios_forever:model_time", 2, tmp_path, TIMEOUT, stage=stage)[0]
    compared = [(m, e) for m, e in zip(r["measured"], r["expected"], strict=True) if m is not None]
    assert len(compared) >= 7 and all(m == pytest.approx(e, rel=1e-9) for m, e in compared)


def test_model_time_and_replay_with_lora_adapters(tmp_path):
    """With peft LoRA the masters are the adapters: model time is theirs, replay and pull leave the base frozen."""
    r = run_ranks("tests.scenarios_forever:model_time", 2, tmp_path, TIMEOUT, lora=["q_proj", "v_proj"])[0]
    compared = [(m, e) for m, e in zip(r["measured"], r["expected"], strict=True) if m is not None]
    assert len(compared) >= 7 and all(m == pytest.approx(e, rel=1e-9) for m, e in compared)
    assert r["replays"][0] == [1, 2, 0, 2] and r["frozen_moved"] == 0.0


def test_replaying_the_recorded_updates_reproduces_the_events(forever_run):
    from aim_ds.control.forever import recorded_events, replay_events

    _, out = forever_run
    rows = list(csv.DictReader(open(out / "trajectory.csv")))
    recorded = recorded_events(rows)
    assert recorded and replay_events(rows, ForeverConfig()) == recorded
    later = replay_events(rows, ForeverConfig(day_steps=30))  # a what-if: another day length moves every event
    assert later and all(step >= 30 for _, step, _ in later) and later != recorded


def test_forever_through_the_trainer_callback(tmp_path):
    r = run_ranks("tests.scenarios_hf:forever_trainer", 2, tmp_path, TIMEOUT, tmp=str(tmp_path))[0]
    assert r["method"] == "ForeverPlugin"
    per_task = 64 // (4 * 2)  # 64 rows, 4 per device, 2 ranks
    assert r["steps"] == [[t, s] for t in (0, 1) for s in range(1, per_task + 1)]
    assert r["replays"][0] == [1, 2, 0] and r["replays"][-1] == [1, per_task, "end"]
    assert r["work"]["replay_events"] == len(r["replays"])


def test_aim_ds_replay_reproduces_a_forever_run(forever_run, tmp_path):
    from tests.mp import aim_ds_cmd

    _, out = forever_run
    p = subprocess.run([*aim_ds_cmd(), "replay", str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "reproduces the recorded replay events exactly" in p.stdout
    what_if = tmp_path / "ds.json"
    what_if.write_text(json.dumps({"forever": {"day_steps": 30}}))
    p = subprocess.run([*aim_ds_cmd(), "replay", str(out), "--config", str(what_if)], capture_output=True, text=True)
    assert p.returncode == 0 and "differs from the recorded events" in p.stdout, p.stdout + p.stderr
