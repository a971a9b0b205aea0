"""aim_ds: AimMerging (adaptive iterative model merging) for continual learning on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"

from .config import AimConfig, ConfigError, ForeverConfig  # noqa: E402
from .errors import AimInputError  # noqa: E402


def attach(engine, memory=None, config=None, pipe_batch=None):
    """Attach a continual-learning method to a DeepSpeed engine: AimMerging (config None, a dict of the
    "aim_merging" section or an AimConfig), or FOREVER (a ForeverConfig); pipe_batch: for a PipelineEngine,
    a memory dict -> the pipeline's micro-batch (default (input_ids, labels)); see aim_ds.plugin.attach."""
    from .plugin import attach as _attach

    return _attach(engine, memory, config, pipe_batch=pipe_batch)


def rows_loss(logits, labels, rows):
    """(summed token loss, label tokens) of some rows of a causal-LM batch; see aim_ds.ops.losses.rows_loss."""
    from .ops.losses import rows_loss as _rows_loss

    return _rows_loss(logits, labels, rows)


def mixed_loss(logits, labels, n_new, memory_weight):
    """Weighted loss of a mixed batch (new rows, then memory rows) and the memory rows' probe figures; see
    aim_ds.ops.losses.mixed_loss."""
    from .ops.losses import mixed_loss as _mixed_loss

    return _mixed_loss(logits, labels, n_new, memory_weight)


__all__ = [
    "attach",
    "rows_loss",
    "mixed_loss",
    "AimConfig",
    "ForeverConfig",
    "AimInputError",
    "ConfigError",
    "__version__",
]
