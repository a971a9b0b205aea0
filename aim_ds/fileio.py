"""Atomic file writes shared by the plugin, the driver's reports and checkpoints.

Write to a temporary file in the target's folder, fsync, then os.replace: a reader (or a crash)
sees the old file or the new one, never a partial one. Kept free of torch so every module can use it.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Iterable

TMP_PREFIX = ".tmp-"


class OutputDirError(ValueError):
    """An output folder that would overwrite something; raised before anything is written."""


def check_output_dir(
    path: str, overwrite: bool = False, fix: str = "choose another folder", ignore: tuple[str, ...] = ()
) -> None:
    """Refuse an output folder that exists and is not empty (unless overwrite), or that is a file.

    Call it before the first write: the message promises that nothing was written. `fix` is the remedy the
    message names (e.g. "pass --overwrite or choose another folder"). Names in `ignore` (a dead run's lock
    file) do not make a folder "not empty".
    """
    if os.path.isdir(path):
        if not overwrite and [n for n in os.listdir(path) if n not in ignore]:
            raise OutputDirError(f"{path} exists and is not empty; {fix} (nothing was written)")
    elif os.path.exists(path):
        raise OutputDirError(f"{path} exists and is not a folder; {fix} (nothing was written)")


def fsync_dir(path: str) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def exchange_paths(a: str, b: str) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the C library or the
    file system cannot, and then nothing was changed. Replacing a non-empty folder otherwise needs two renames,
    with a moment between them when neither version is in place."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def atomic_write_bytes(path: str, data: bytes, durable_dir: bool = False) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=TMP_PREFIX, suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if durable_dir:
        fsync_dir(d)


def atomic_write_text(path: str, text: str, durable_dir: bool = False) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), durable_dir)


def write_csv(path: str, rows: Iterable[dict], fields: list[str]) -> None:
    """Rows as CSV (None -> empty cell), written atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    atomic_write_text(path, buf.getvalue())
