"""The DeepSpeed internals a checkpoint records: the ZeRO-3 partition layout, full parameter shapes, the
partition rule, and the switch that makes engine.load_checkpoint read a universal checkpoint."""

from __future__ import annotations

from .zero import ZeroShards, logical_shape


def param_shapes(module) -> list[list]:
    """[[name, full shape], ...] of every parameter: the same on every rank, also when ZeRO-3 has partitioned
    it or it is a tensor-parallel slice."""
    return [[n, logical_shape(p)] for n, p in module.named_parameters()]


def engine_layout(engine) -> dict:
    """This run's partition layout: for ZeRO-3 the optimizer sub-groups, each param's name, shape and numel;
    for stages 0-2 the shards adapter's flat layout."""
    import deepspeed.comm as dist

    if engine.zero_optimization_stage() < 3:
        return ZeroShards(engine).layout()
    opt = engine.optimizer
    names = getattr(opt, "param_names", None) or {p: n for n, p in engine.module.named_parameters()}
    groups = []
    for i, params in enumerate(opt.fp16_groups):
        groups.append(
            {
                "param_group": int(opt.sub_group_to_group_id[i]),
                "partition_count": int(opt.sub_group_partition_counts[i]),
                "params": [[names[p], list(p.ds_shape), int(p.ds_numel), int(p.partition_numel())] for p in params],
            }
        )
    return {"world_size": dist.get_world_size(), "sub_group_size": opt.sub_group_size, "sub_groups": groups}


class universal_checkpoint_loading:
    """Within the block, engine.load_checkpoint reads a universal checkpoint (the ds_config's
    "checkpoint": {"load_universal": true}, switched on for one load and restored after it)."""

    def __init__(self, engine, on: bool = True):
        self.config, self.on = engine._config, on

    def __enter__(self):
        self.before = self.config.load_universal_checkpoint
        if self.on:
            self.config.load_universal_checkpoint = True
        return self

    def __exit__(self, *exc):
        self.config.load_universal_checkpoint = self.before
        return False
