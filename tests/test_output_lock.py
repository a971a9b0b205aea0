"""One live run per output folder (aim_ds.driver.lock): a live holder is refused with its host and pid, a dead
holder's lock is taken over, a lock written on another host is left to the user; through the driver a second
run into a live run's folder fails at once with one error line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from aim_ds.driver.lock import LOCK_NAME, LockError, OutputLock, check_free

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from test_driver import SMALL, check_outputs, py, run  # noqa: E402

HOLD = (
    "import sys, time; from aim_ds.driver.lock import OutputLock; OutputLock(sys.argv[1]).acquire(); "
    "print('held', flush=True); time.sleep(600)"
)


def hold(d: Path) -> subprocess.Popen:
    """Another process that takes the lock on d and keeps it."""
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(d)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert p.stdout.readline().strip() == "held"
    return p


def stop(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)


def test_live_holder_refused_dead_holder_taken_over(tmp_path):
    d = tmp_path / "run"
    p = hold(d)
    try:
        with pytest.raises(
            LockError,
            match=rf"in use by a live run \(host {socket.gethostname()}, pid {p.pid}, "
            rf"started .*UTC\).*kill {p.pid}",
        ):
            check_free(str(d))
        with pytest.raises(LockError, match=f"pid {p.pid}"):
            OutputLock(str(d)).acquire(attempts=3)
    finally:
        stop(p)  # SIGKILL: no clean-up ran, the file stays
    assert json.loads((d / LOCK_NAME).read_text())["pid"] == p.pid
    check_free(str(d))
    lock = OutputLock(str(d))
    lock.acquire()
    assert json.loads((d / LOCK_NAME).read_text())["pid"] == os.getpid()
    with pytest.raises(LockError, match=f"pid {os.getpid()}"):  # held: a second taker in this process fails too
        OutputLock(str(d)).acquire(attempts=2)
    lock.release()
    assert not (d / LOCK_NAME).exists() and d.is_dir()  # the folder existed before this lock: kept


def test_lock_of_another_host_is_not_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere-node-7", "pid": 4242, "started": "x"}))
    for attempt in (lambda: check_free(str(tmp_path)), lambda: OutputLock(str(tmp_path)).acquire()):
        with pytest.raises(LockError, match=f"another host.*elsewhere-node-7.*delete {tmp_path / LOCK_NAME}"):
            attempt()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "elsewhere-node-7"


def test_a_lock_that_made_its_folder_removes_it_when_nothing_was_written(tmp_path):
    lock = OutputLock(str(tmp_path / "new"))
    lock.acquire()
    assert (tmp_path / "new" / LOCK_NAME).is_file()
    lock.release()
    assert not (tmp_path / "new").exists()


def test_driver_refuses_a_live_runs_folder_and_takes_over_a_dead_ones(tmp_path):
    out = tmp_path / "out"
    p = hold(out)
    try:
        for extra in (["--overwrite"], ["--resume", "auto"]):
            r = run(py("--output-dir", str(out), *extra, *SMALL), tmp_path, timeout=120)
            assert r.returncode == 2, r.stderr[-2000:]
            assert (
                r.stderr.count("error:") == 1
                and f"in use by a live run (host {socket.gethostname()}, pid {p.pid}" in r.stderr
            ), r.stderr[-2000:]
        assert sorted(os.listdir(out)) == [LOCK_NAME]
    finally:
        stop(p)
    # the holder died without cleaning up: a new run takes the lock over, trains and leaves no lock behind
    r = run(py("--output-dir", str(out), "--method", "seqft", "--epochs", "0.25", *SMALL), tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    check_outputs(out, "seqft")
    assert not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("code", ["ENOLCK", "EOPNOTSUPP"])
def test_file_system_without_locks_is_one_clear_error(tmp_path, monkeypatch, code):
    """Issue 29, item 7: flock on NFS without its lock service (or mounted nolock) fails with ENOLCK; that
    escaped as an OSError traceback. Here flock answers as such a file system does."""
    import errno

    import aim_ds.driver.lock as lock

    def no_locks(fd, op):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    d = tmp_path / "run"
    d.mkdir()
    (d / LOCK_NAME).write_text("{}")  # a lock file left by an earlier run: check_free probes it
    monkeypatch.setattr(lock.fcntl, "flock", no_locks)
    for attempt in (lambda: check_free(str(d)), lambda: OutputLock(str(d)).acquire()):
        with pytest.raises(LockError, match="without file locks.*Choose an --output-dir"):
            attempt()


def test_a_lock_that_cannot_be_taken_leaves_nothing(tmp_path, monkeypatch):
    """Issue 33, item 8: on a file system without locks, acquire() refused but left the folder it made and an
    empty lock file; a lock file of an earlier run stays where it was."""
    import errno

    import aim_ds.driver.lock as lock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(lock.fcntl, "flock", no_locks)
    new = tmp_path / "new" / "run"
    with pytest.raises(LockError, match="without file locks"):
        OutputLock(str(new)).acquire()
    assert not new.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(LockError, match="without file locks"):
        OutputLock(str(kept)).acquire()
    assert kept.is_dir() and list(kept.iterdir()) == []  # the folder was the user's: kept, and left empty
    (kept / LOCK_NAME).write_text("{}")
    with pytest.raises(LockError, match="without file locks"):
        OutputLock(str(kept)).acquire()
    assert (kept / LOCK_NAME).read_text() == "{}"
