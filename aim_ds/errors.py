"""The error bad input to the plugin raises (the ds_config section has its own, aim_ds.config.ConfigError)."""

from __future__ import annotations


class AimInputError(ValueError):
    """Bad input to the plugin (memory, arguments); raised on every rank before any collective hangs."""


__all__ = ["AimInputError"]
