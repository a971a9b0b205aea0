"""The plugin's errors: AimInputError, the one bad input raises (the ds_config section has its own,
aim_ds.config.ConfigError), and the rank-failure protocol's pure half: MergeAborted and local_error (the half
that needs the process group, fatal_error, is in aim_ds.ops.collectives)."""

from __future__ import annotations


class AimInputError(ValueError):
    """Bad input to the plugin (memory, arguments); raised on every rank before any collective hangs."""


class MergeAborted(RuntimeError):
    """A merge failed on some rank and is undone on every rank."""


def local_error(fn, what: str) -> str | None:
    """Run this rank's own part of a collective step (no collective inside); its error message, or None. Every
    rank then passes its message to collectives.agree, so a failure on one rank stops every rank alike."""
    try:
        return fn()
    except Exception as e:
        return f"{what} failed: {type(e).__name__}: {e}"


__all__ = ["AimInputError", "MergeAborted", "local_error"]
