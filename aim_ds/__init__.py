"""aim_ds: AimMerging (adaptive iterative model merging) for continual learning on DeepSpeed ZeRO-3."""
__version__ = "0.1.0"

from .config import AimConfig, ConfigError  # noqa: E402


def attach(engine, memory=None, config=None):
    """Attach AimMerging to a DeepSpeed ZeRO-3 engine; see aim_ds.plugin.attach."""
    from .plugin import attach as _attach

    return _attach(engine, memory, config)


__all__ = ["attach", "AimConfig", "ConfigError", "__version__"]
