"""One live run per output folder: a lock file naming its holder (host, pid, start time).

A run whose launcher was killed can leave its ranks running and still writing (checkpoints, pruning); a
second run started into the same folder would race them. The holder (the run's rank 0) keeps an exclusive
flock on the lock file for its whole life; the kernel drops it when the process dies however it dies, so
a lock file left by a dead process on this host is stale and simply taken over. The file also names its
holder, for the message. A lock file written on another host is never taken over: where the shared file
system does not carry flocks between hosts, this host cannot tell whether that run still lives.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time

LOCK_NAME = ".aim_ds.lock"


class LockError(Exception):
    """The output folder is held by another run."""


def read_holder(path: str) -> dict:
    try:
        with open(path) as f:
            h = json.load(f)
        return h if isinstance(h, dict) else {}
    except (OSError, ValueError):
        return {}


def describe(h: dict) -> str:
    return f"host {h.get('host', '?')}, pid {h.get('pid', '?')}, started {h.get('started', '?')}"


def _held_message(out_dir: str, h: dict) -> str:
    return (
        f"--output-dir {out_dir} is in use by a live run ({describe(h)}); wait for it to end or stop it (kill "
        f"{h.get('pid', 'PID')} and the other ranks of its launcher), or choose another --output-dir"
    )


def _foreign_message(out_dir: str, path: str, h: dict) -> str:
    return (
        f"--output-dir {out_dir} is locked by a run on another host ({describe(h)}); this host cannot tell "
        f"whether it still runs. If it has ended, delete {path} and start again; otherwise choose another "
        "--output-dir"
    )


# flock's answers on a file system that has no locks (NFS mounted with nolock or without lockd, some FUSE ones)
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


def _flock(fd: int, op: int, out_dir: str) -> None:
    """fcntl.flock, with a file system that cannot lock named as the problem instead of an OSError traceback."""
    try:
        fcntl.flock(fd, op)
    except OSError as e:
        if e.errno not in NO_LOCKS:
            raise
        raise LockError(
            f"--output-dir {out_dir} is on a file system without file locks ({os.strerror(e.errno)}); the driver "
            "locks its output folder so that two runs never write into the same one. Choose an --output-dir on "
            "a file system with locks (a local disk; NFS with its lock service running, not mounted 'nolock')"
        ) from None


def check_free(out_dir: str) -> None:
    """Raise LockError when another run holds out_dir. Pure file reads and a shared probe lock, so every rank
    of a starting run can call it at once, before the process group exists."""
    path = os.path.join(out_dir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):  # no lock; a file in the way is refused by the caller
        return
    try:
        try:
            _flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, out_dir)
        except BlockingIOError:
            raise LockError(_held_message(out_dir, read_holder(path))) from None
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    h = read_holder(path)
    if h.get("host") not in (None, socket.gethostname()):
        raise LockError(_foreign_message(out_dir, path, h))


class OutputLock:
    """Held by one process (the run's rank 0) from acquire() to release() or its death."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, LOCK_NAME)
        self._fd: int | None = None
        self._made_dir = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, attempts: int = 20) -> None:
        if not os.path.isdir(self.out_dir):
            os.makedirs(self.out_dir, exist_ok=True)
            self._made_dir = True
        for _ in range(attempts):
            existed = os.path.exists(self.path)
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, self.out_dir)
            except BlockingIOError:
                os.close(fd)
                time.sleep(0.05)  # another run's check_free probes for an instant; a holder stays
                continue
            except LockError:
                os.close(fd)
                self._remove_own(existed)  # a run that could not start leaves nothing behind
                raise
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            if st is None or st.st_ino != os.fstat(fd).st_ino:  # unlinked by a releasing holder: retry
                os.close(fd)
                continue
            h = read_holder(self.path)
            if h.get("host") not in (None, socket.gethostname()):
                os.close(fd)
                raise LockError(_foreign_message(self.out_dir, self.path, h))
            record = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record, indent=1).encode(), 0)
            os.fsync(fd)
            self._fd = fd
            return
        raise LockError(_held_message(self.out_dir, read_holder(self.path)))

    def _remove_own(self, lock_existed: bool) -> None:
        try:
            if not lock_existed:
                os.unlink(self.path)
            if self._made_dir and not os.listdir(self.out_dir):
                os.rmdir(self.out_dir)
        except OSError:
            pass

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # before unlocking: a waiting run then creates a fresh file
            if self._made_dir and not os.listdir(self.out_dir):
                os.rmdir(self.out_dir)  # a run that wrote nothing leaves nothing
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None
