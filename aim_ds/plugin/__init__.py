"""The plugin on a DeepSpeed engine: `AimPlugin` (module `aim`) and the parts it coordinates.

aim        AimPlugin and attach: the public API, the state dict, a merge's context
forever    ForeverPlugin: FOREVER's model time on the shards and its replay events (aim_ds.control.forever decides)
step_hook  StepHook: engine.step wrapped for both methods (the lr read and checked, deferral)
merge      one merge as a transaction on every rank (plan, record, rehearse, fuse, agree, commit / undo)
probes     the probe sources (memory forward, training batch)
fusers     the fusers of the weight policies (scalar, importance)
rehearsal  R optimizer steps on memory batches with the LR schedule frozen
journal    a merge's undo record
plan       MergePlan: what every rank does in one merge
state      PluginState: the plugin's mutable bookkeeping, one owner
memory     checks of a rehearsal memory and the cursors that walk it
"""

from ..config import AimConfig
from ..control.trajectory import FIELDS as TRAJECTORY_FIELDS
from ..control.trajectory import TrajectoryRow
from ..errors import AimInputError
from ..ops.losses import batch_tokens, mixed_loss, rows_loss
from .aim import AimPlugin, attach
from .forever import ForeverPlugin
from .step_hook import step_lr

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
