"""The DeepSpeed internals a checkpoint records: the ZeRO-3 partition layout, full parameter shapes, the
partition rule, and the switch that makes engine.load_checkpoint read a universal checkpoint."""

from __future__ import annotations

from .pipe import is_pipeline
from .zero import ZeroShards, logical_shape


def param_shapes(module) -> list[list]:
    """[[name, full shape], ...] of every parameter: the same on every rank, also when ZeRO-3 has partitioned
    it or it is a tensor-parallel slice."""
    return [[n, logical_shape(p)] for n, p in module.named_parameters()]


def _per_stage(engine, mine) -> list:
    """Every pipeline stage's value of `mine` (any rank of the stage: its data-parallel ranks agree), in stage
    order; a collective over the world."""
    import torch.distributed as tdist

    got = [None] * tdist.get_world_size()
    tdist.all_gather_object(got, (int(engine.stage_id), mine))
    by_stage = dict(got)
    return [by_stage[s] for s in range(int(engine.num_stages))]


def engine_param_shapes(engine) -> list[list]:
    """param_shapes of the whole model: under pipelines every stage's parameters, gathered (a collective on
    every rank), so the fingerprint is the model's and not one stage's."""
    if not is_pipeline(engine):
        return param_shapes(engine.module)
    seen, out = set(), []
    for stage in _per_stage(engine, param_shapes(engine.module)):
        for name, shape in stage:
            if name not in seen:  # a tied layer sits on two stages under one name
                seen.add(name)
                out.append([name, shape])
    return out


def engine_layout(engine) -> dict:
    """This run's partition layout: for ZeRO-3 the optimizer sub-groups, each param's name, shape and numel;
    for stages 0-2 the shards adapter's flat layout; under pipelines every stage's, in stage order (a
    collective on every rank)."""
    import deepspeed.comm as dist

    if is_pipeline(engine):
        own = ZeroShards(engine).layout()
        stages = _per_stage(engine, own["sub_groups"])
        return {
            **own,
            "pp_size": len(stages),
            "sub_groups": [{**g, "stage": s} for s, gs in enumerate(stages) for g in gs],
        }
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
