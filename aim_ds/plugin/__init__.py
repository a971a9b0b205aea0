"""The plugin on a DeepSpeed engine: `AimPlugin` (module `aim`) and the parts it coordinates.

aim        AimPlugin and attach: the public API, the state dict, a merge's context
forever    ForeverPlugin: FOREVER's model time on the shards and its replay events (aim_ds.control.forever decides)
step_hook  StepHook: engine.step (a pipeline's train_batch) wrapped for both methods (the lr read and checked)
merge      one merge as a transaction on every rank (plan, record, rehearse, fuse, agree, commit / undo)
probes     the probe sources (memory forward, training batch)
fusers     the fusers of the weight policies (scalar, importance)
rehearsal  R optimizer steps on memory batches with the LR schedule frozen
journal    a merge's undo record
plan       MergePlan: what every rank does in one merge
state      PluginState: the plugin's mutable bookkeeping, one owner
memory     checks of a rehearsal memory and the cursors that walk it
"""

from ..config import AimConfig, ForeverConfig
from ..control.trajectory import FIELDS as TRAJECTORY_FIELDS
from ..control.trajectory import TrajectoryRow
from ..errors import AimInputError
from ..ops.losses import batch_tokens, mixed_loss, rows_loss
from .aim import AimPlugin
from .forever import ForeverPlugin
from .step_hook import step_lr


def attach(engine, memory=None, config=None, pipe_batch=None) -> AimPlugin | ForeverPlugin:
    """Attach a method to a DeepSpeed engine: FOREVER for a ForeverConfig, AimMerging otherwise (config None
    reads the engine's ds_config "aim_merging" section; absent: disabled, plain DeepSpeed). The user's training
    loop is unchanged. memory: a list or iterable of model-input dicts (with labels) for this rank; it may also
    be given later with `start_task(memory=...)`. pipe_batch: for a PipelineEngine, the function that turns a
    memory dict into the micro-batch the pipeline's data iterator yields (default: (input_ids, labels))."""
    if isinstance(config, ForeverConfig):
        return ForeverPlugin(engine, memory, config, pipe_batch=pipe_batch)
    return AimPlugin(engine, memory, config, pipe_batch=pipe_batch)


__all__ = [
    "TRAJECTORY_FIELDS",
    "AimConfig",
    "AimInputError",
    "AimPlugin",
    "ForeverPlugin",
    "TrajectoryRow",
    "attach",
    "batch_tokens",
    "mixed_loss",
    "rows_loss",
    "step_lr",
]
