"""The one module that knows DeepSpeed's ZeRO-3 internals.

Everything the plugin does to weights goes through `ZeroShards`: the rank's fp32 master partitions
(the optimizer's flat per-sub-group tensors, the truth the next optimizer step starts from), the
valid (non-padding) element ranges inside them, and the write-back that makes a fused value visible
to the next forward (low-precision flat partitions, persistent parameters, secondary partitions).

Private attributes of `DeepSpeedZeroOptimizer_Stage3` are read here and nowhere else; the supported
DeepSpeed range is pinned below and checked at attach time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_DEEPSPEED = ((0, 18, 0), (0, 20, 0))  # [min, max)


class ShardError(RuntimeError):
    """The engine is not one the plugin can merge on (stage, offload kind, DeepSpeed version)."""


def _version_tuple(v: str) -> tuple[int, int, int]:
    parts = []
    for piece in v.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)  # type: ignore[return-value]


def check_deepspeed_version() -> None:
    import deepspeed

    v = _version_tuple(deepspeed.__version__)
    lo, hi = SUPPORTED_DEEPSPEED
    if not (lo <= v < hi):
        raise ShardError(
            f"aim_ds supports deepspeed >= {'.'.join(map(str, lo))}, < {'.'.join(map(str, hi))}; "
            f"found {deepspeed.__version__}. Install a supported release (pip install 'deepspeed>=0.18,<0.20')."
        )


@dataclass
class SubGroup:
    """One optimizer sub-group: a flat fp32 master partition and its low-precision twin."""

    index: int
    master: torch.Tensor  # fp32 flat partition (optimizer truth)
    working: torch.Tensor | None  # low-precision flat used by forward; None when it aliases master
    ranges: list[tuple[int, int]]  # (start, length) of valid, non-padding elements, merged
    valid_numel: int

    @property
    def numel(self) -> int:
        return self.master.numel()


class ZeroShards:
    """The rank's own ZeRO-3 shards of every trainable parameter, as flat sub-groups."""

    def __init__(self, engine):
        check_deepspeed_version()
        stage = engine.zero_optimization_stage()
        if stage != 3:
            raise ShardError(
                f"aim_merging needs ZeRO stage 3 (zero_optimization.stage = 3); this engine runs stage {stage}. "
                "Stages 0-2 are not supported yet: set \"zero_optimization\": {\"stage\": 3} or disable merging "
                "with \"aim_merging\": {\"enabled\": false}."
            )
        opt = engine.optimizer
        if not hasattr(opt, "fp32_partitioned_groups_flat"):
            raise ShardError(
                "aim_merging found no ZeRO-3 optimizer on the engine (was deepspeed.initialize given an optimizer "
                "or an \"optimizer\" section?). Merging needs the optimizer's fp32 master partitions."
            )
        if getattr(opt, "swap_optimizer", False) or getattr(opt, "params_in_nvme_and_cpu", False):
            raise ShardError(
                "aim_merging does not support NVMe offload (offload_optimizer/offload_param device \"nvme\"): "
                "the master partitions are swapped out between steps. Use device \"cpu\" or none."
            )
        self.engine = engine
        self.optimizer = opt
        import deepspeed.comm as dist

        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.groups: list[SubGroup] = []
        for i, params in enumerate(opt.fp16_groups):
            master = opt.fp32_partitioned_groups_flat[i]
            working = opt.fp16_partitioned_groups_flat[i]
            if working is None:
                raise ShardError("aim_merging: a sub-group has no flat low-precision partition (NVMe offload?).")
            if working.data_ptr() == master.data_ptr() and working.dtype == master.dtype:
                working = None  # same storage: the optimizer refreshes nothing, neither do we
            ranges, valid = self._valid_ranges(params, opt.sub_group_partition_counts[i], opt, i)
            self.groups.append(SubGroup(i, master, working, ranges, valid))

    def _valid_ranges(self, params, partition_count, opt, group_index):
        # Each parameter contributes partition_numel() elements to the flat partition; rank r owns
        # elements [r*pn, (r+1)*pn) of the flattened parameter, so everything past numel is padding.
        # DeepSpeed's own groups_padding charges all padding to the last rank, which is wrong for
        # parameters smaller than the world size: compute it here from first principles.
        import deepspeed.comm as dist

        group_rank = dist.get_rank(group=opt.sub_group_process_groups[group_index])
        ranges: list[tuple[int, int]] = []
        offset = valid = 0
        for p in params:
            pn = p.partition_numel()
            n = max(0, min(pn, p.ds_numel - group_rank * pn))
            if n:
                if ranges and ranges[-1][0] + ranges[-1][1] == offset:
                    ranges[-1] = (ranges[-1][0], ranges[-1][1] + n)
                else:
                    ranges.append((offset, n))
            valid += n
            offset += pn
        if offset != opt.fp32_partitioned_groups_flat[group_index].numel():
            raise ShardError(
                f"aim_merging: sub-group {group_index} flat partition has "
                f"{opt.fp32_partitioned_groups_flat[group_index].numel()} elements but its parameters need {offset}; "
                "this DeepSpeed layout is not supported."
            )
        return ranges, valid

    # ------------------------------------------------------------------ facts
    @property
    def local_valid_numel(self) -> int:
        return sum(g.valid_numel for g in self.groups)

    @property
    def local_numel(self) -> int:
        return sum(g.numel for g in self.groups)

    @property
    def device(self) -> torch.device:
        return self.groups[0].master.device if self.groups else torch.device("cpu")

    def masters(self) -> list[torch.Tensor]:
        return [g.master for g in self.groups]

    # ------------------------------------------------------------------ write-back
    @torch.no_grad()
    def refresh_working_copies(self) -> None:
        """Make the fp32 masters visible to the next forward: low-precision flats, persistent params.

        Mirrors what the ZeRO-3 optimizer does after its own step (`_reassign_or_swap_out_partitioned_
        parameters` then `_post_step`). The persistent-parameter all-gather is a collective: every rank
        calls this at the same point.
        """
        opt = self.optimizer
        for g in self.groups:
            if g.working is not None:
                g.working.copy_(g.master)
            # re-point each param's ds_tensor at its view of the flat (what the optimizer does)
            opt._unflatten_partitioned_parameters(g.index)
        persistent = opt.persistent_parameters
        if len(persistent) > 0:
            # all_gather skips parameters that are already AVAILABLE, and persistent ones always are:
            # release their stale full copies first (as the optimizer's step does), then re-gather.
            persistent[0].partition(persistent)
            persistent[0].all_gather(persistent)
        opt.invalidate_secondary_tensor()

    def gradient_hook(self, fn):
        """Call fn(group_index, master, grad) just before the optimizer updates each sub-group.

        At that point master.grad holds the unscaled, clipped fp32 gradient of the rank's partition:
        the importance policy reads |theta * grad| there without any extra copy of the gradients.
        Returns a function that removes the hook.
        """
        opt = self.optimizer
        original = opt._optimizer_step

        def wrapped(sub_group_id):
            master = opt.fp32_partitioned_groups_flat[sub_group_id]
            if master.grad is not None:
                fn(sub_group_id, master, master.grad)
            return original(sub_group_id)

        opt._optimizer_step = wrapped

        def remove():
            if opt.__dict__.get("_optimizer_step") is wrapped:
                del opt.__dict__["_optimizer_step"]

        return remove


def ds_config_dict(engine) -> dict:
    """The ds_config the engine was built from, as a dict (it may have been given as a path)."""
    param_dict = getattr(getattr(engine, "_config", None), "_param_dict", None)
    if isinstance(param_dict, dict):
        return param_dict
    cfg = engine.config
    if isinstance(cfg, dict):
        return cfg
    import json

    with open(cfg) as f:
        return json.load(f)


# ---------------------------------------------------------------------- checkpoint layout (ZeRO-3 reads)
def valid_numel(numel: int, partition_numel: int, rank: int) -> int:
    """Elements of a flattened parameter that rank `rank` owns: [rank*pn, (rank+1)*pn) cut at numel.

    The rest of the rank's partition_numel() slots are padding (uninitialised; a parameter smaller than
    the world size leaves whole ranks with padding only).
    """
    return max(0, min(partition_numel, numel - rank * partition_numel))


def param_shapes(module) -> list[list]:
    """[[name, full shape], ...] of every parameter, also when ZeRO-3 has partitioned it (ds_shape)."""
    return [[n, list(getattr(p, "ds_shape", p.shape))] for n, p in module.named_parameters()]


def engine_layout(engine) -> dict:
    """This run's ZeRO-3 partition layout: the optimizer sub-groups, each param's name, shape and numel."""
    import deepspeed.comm as dist

    opt = engine.optimizer
    names = getattr(opt, "param_names", None) or {p: n for n, p in engine.module.named_parameters()}
    groups = []
    for i, params in enumerate(opt.fp16_groups):
        groups.append({
            "param_group": int(opt.sub_group_to_group_id[i]),
            "partition_count": int(opt.sub_group_partition_counts[i]),
            "params": [[names[p], list(p.ds_shape), int(p.ds_numel), int(p.partition_numel())] for p in params],
        })
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
