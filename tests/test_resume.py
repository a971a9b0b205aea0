"""launch/train.py --checkpoint-every / --resume: a 2-rank deepspeed run killed with SIGKILL after its first
checkpoint and resumed with --resume auto ends exactly like an uninterrupted run (matrix, trajectory, losses,
final weights and anchor); bad --resume input fails with one error, exit 2, the output dir untouched.

Every subprocess runs in its own session with a timeout; on timeout the whole process group is killed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "launch" / "train.py")
BIN = Path(sys.executable).parent
# 18 driver steps per task on 2 ranks (72 examples, batch 2 x 2 ranks), 4 tasks: checkpoints every 5 steps
# fall inside tasks 0-3, the plugin merges in tasks 1-3 (the default config forces one by step 2 S_0 = 16)
SMALL = ["--max-train", "72", "--max-eval", "16", "--batch-size", "2", "--eval-batch-size", "16", "--no-progress"]


from tests.mp import deepspeed_cmd
from tests.mp import driver_env as env  # noqa: E402


def start(cmd, tmp_path, log):
    f = open(log, "w")
    p = subprocess.Popen(
        cmd, cwd=str(tmp_path), env=env(tmp_path), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
    )
    p.log = log
    return p


def kill(p) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(timeout=30)


def finish(p, timeout) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(p)
        pytest.fail(f"timed out after {timeout}s: {Path(p.log).read_text()[-3000:]}")


def run(cmd, tmp_path, timeout):
    p = start(cmd, tmp_path, tmp_path / f"log-{time.time_ns()}.txt")
    rc = finish(p, timeout)
    return rc, Path(p.log).read_text()


def ds_cmd(out, *extra):
    return deepspeed_cmd(TRAIN, "--seed", "3", "--checkpoint-every", "5", "--output-dir", out, *SMALL, *extra)


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reference run and the killed run side by side, then the resume of the killed one."""
    tmp = tmp_path_factory.mktemp("resume")
    ref, crash = tmp / "ref", tmp / "crash"
    t0 = time.time()
    p_ref = start(ds_cmd(ref), tmp, tmp / "ref.log")
    p_crash = start(ds_cmd(crash), tmp, tmp / "crash.log")
    try:
        latest = crash / "checkpoints" / "latest"
        deadline = time.time() + 200
        first = None
        # kill inside a merging task (AdamW moments and the plugin's cursors mid-task): 0.5 s after the first
        # checkpoint of task 1 appears (the run's first checkpoint, task000-step000005, comes ~20 s earlier)
        while not (latest.exists() and latest.read_text().startswith("task001-step")):
            if first is None and latest.exists():
                first = latest.read_text()
            if p_crash.poll() is not None or time.time() > deadline:
                pytest.fail("no task-1 checkpoint appeared: " + (tmp / "crash.log").read_text()[-3000:])
            time.sleep(0.1)
        time.sleep(0.5)
        kill(p_crash)
        killed_at = latest.read_text()
        assert not (crash / "results.json").exists()
        rc = finish(p_ref, 240)
        assert rc == 0, (tmp / "ref.log").read_text()[-4000:]
        p_res = start(ds_cmd(crash, "--resume", "auto"), tmp, tmp / "resume.log")
        rc = finish(p_res, 240)
        assert rc == 0, (tmp / "resume.log").read_text()[-4000:]
    finally:
        for p in (p_ref, p_crash):
            if p.poll() is None:
                kill(p)
    print(f"\nfirst checkpoint {first}, latest when killed {killed_at}, fixture {time.time() - t0:.0f}s")
    return dict(
        tmp=tmp, ref=ref, crash=crash, first=first, killed_at=killed_at, resume_log=(tmp / "resume.log").read_text()
    )


def test_killed_run_resumes_bit_identical(runs):
    ref, crash = runs["ref"], runs["crash"]
    log = runs["resume_log"]
    assert f"resuming from {crash / 'checkpoints' / runs['killed_at']}" in log, log[-2000:]
    a = json.loads((ref / "results.json").read_text())
    b = json.loads((crash / "results.json").read_text())
    assert len(a["matrix"]) == 4 and a["matrix"] == b["matrix"]
    assert a["merges"] == b["merges"] and a["merges"] >= 1, (a["merges"], b["merges"])
    assert a["steps"] == b["steps"]
    assert b["checkpoints"]["resumed_from"].endswith(runs["killed_at"])
    # resumed mid-task (not at a boundary) in a task where the plugin merges
    assert re.fullmatch(r"task00[123]-step\d+", runs["killed_at"]), runs["killed_at"]
    for f in ("trajectory.csv", "losses.csv"):
        assert (ref / f).read_text() == (crash / f).read_text(), f
    # final weights and the plugin's anchor (the task-end checkpoints of both runs)
    from aim_ds.checkpoint import anchor_state_dict, model_state_dict

    for fn in (model_state_dict, anchor_state_dict):
        wa, wb = fn(str(ref / "checkpoints"), "task003-end"), fn(str(crash / "checkpoints"), "task003-end")
        assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa), fn.__name__
    kept = [d for d in os.listdir(crash / "checkpoints") if d.startswith("task")]
    assert len(kept) == 2, kept  # --keep-checkpoints default 2


def test_bad_resume_fails_cleanly(runs):
    tmp = runs["tmp"]
    # (1) --resume DIR that is not a checkpoint; the new output dir is not created
    junk = tmp / "junk"
    junk.mkdir(exist_ok=True)
    (junk / "notes.txt").write_text("x")
    rc, log = run([sys.executable, TRAIN, "--resume", str(junk), "--output-dir", str(tmp / "new"), *SMALL], tmp, 120)
    assert rc == 2 and "no complete checkpoint" in log and log.count("error:") == 1, log[-2000:]
    assert not (tmp / "new").exists()
    # (2) the finished run's checkpoint resumed with other options / another aim_merging config
    crash = runs["crash"]
    before = snapshot(crash)
    rc, log = run(
        [
            sys.executable,
            TRAIN,
            "--seed",
            "4",
            "--checkpoint-every",
            "5",
            "--output-dir",
            str(crash),
            "--resume",
            "auto",
            *SMALL,
        ],
        tmp,
        120,
    )
    assert rc == 2 and "other options (--seed: checkpoint 3, now 4)" in log, log[-2000:]
    cfg = json.loads((REPO / "ds_configs" / "cpu_zero3.json").read_text())
    cfg["aim_merging"]["initial_interval"] = 4
    (tmp / "ds4.json").write_text(json.dumps(cfg))
    rc, log = run(
        [
            sys.executable,
            TRAIN,
            "--seed",
            "3",
            "--deepspeed_config",
            str(tmp / "ds4.json"),
            "--output-dir",
            str(crash),
            "--resume",
            "auto",
            *SMALL,
        ],
        tmp,
        120,
    )
    assert rc == 2 and "different aim_merging config (initial_interval: checkpoint 8, now 4)" in log, log[-2000:]
    # (3) the 2-rank checkpoint on 1 rank: refused with the reshard command (after the process group starts)
    rc, log = run(
        [sys.executable, TRAIN, "--seed", "3", "--output-dir", str(crash), "--resume", "auto", *SMALL], tmp, 120
    )
    assert rc == 2 and "saved by 2 ranks, this run has 1" in log and "aim-ds reshard" in log, log[-2000:]
    assert snapshot(crash) == before
