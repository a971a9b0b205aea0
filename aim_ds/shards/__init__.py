"""The one module that knows DeepSpeed's optimizer internals (ZeRO stages 0-3).

Everything the plugin does to weights goes through `ZeroShards`: the rank's fp32 master partitions
(the optimizer's flat tensors, the truth the next optimizer step starts from), the element ranges
inside them that this rank counts in global statistics, and the write-back that makes a fused value
visible to the next forward. `ZeroShards(engine)` returns the adapter for the engine's optimizer family:

- ZeRO-3 (`DeepSpeedZeroOptimizer_Stage3`): fp32 flat sub-group partitions; per-parameter partitions.
- ZeRO-1/2 (`DeepSpeedZeroOptimizer`) and `BF16_Optimizer`: one fp32 partition of each flat group;
  partition boundaries cut through parameters; every rank holds the whole low-precision flat.
- Stage 0 without a partitioning optimizer: the fp32 parameters themselves (fp32 training), or the
  fp32 copies of `FP16_UnfusedOptimizer` (bf16/fp16 training); every data-parallel rank holds them all.

Statistics are summed over every rank: an element is counted by exactly one rank. Padding is never
counted; a parameter that every tensor-parallel rank holds whole (a norm, a replicated bias) only on
tensor-parallel rank 0 (ZeRO's own gradient-norm rule); a stage-0 parameter, held whole by every
data-parallel rank, by each rank for its 1/N slice.

Private attributes of DeepSpeed's engine and optimizers are read in this package and nowhere else:
`zero.py` (the adapters; the supported DeepSpeed range is pinned there and checked at attach time),
`engine.py` (the engine's accumulation boundary, loss scaler, inner optimizer), `checkpointing.py` (what a
checkpoint records of the ZeRO-3 layout).
"""

from .checkpointing import engine_layout, param_shapes, universal_checkpoint_loading
from .engine import (
    accumulation_boundary,
    inner_optimizer,
    keep_alive,
    kept_alive,
    loss_scaler_snapshot,
    restore_loss_scaler,
    restore_step_report,
    step_report_snapshot,
)
from .zero import (
    SUPPORTED_DEEPSPEED,
    ShardError,
    SubGroup,
    ZeroShards,
    check_deepspeed_version,
    ds_config_dict,
    logical_shape,
    valid_numel,
)

__all__ = [
    "SUPPORTED_DEEPSPEED",
    "ShardError",
    "SubGroup",
    "ZeroShards",
    "accumulation_boundary",
    "check_deepspeed_version",
    "ds_config_dict",
    "engine_layout",
    "inner_optimizer",
    "keep_alive",
    "kept_alive",
    "logical_shape",
    "loss_scaler_snapshot",
    "param_shapes",
    "restore_loss_scaler",
    "restore_step_report",
    "step_report_snapshot",
    "universal_checkpoint_loading",
    "valid_numel",
]
