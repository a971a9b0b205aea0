"""The shard adapters: `ZeroShards(engine)` and one subclass per DeepSpeed optimizer family (ZeRO-3, ZeRO-1/2,
BF16_Optimizer, stage 0 fp32 and unfused), the partition rule and the supported DeepSpeed range."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .pipe import is_pipeline, pipe_position
from .tp import is_tp_param, tp_slice

SUPPORTED_DEEPSPEED = ((0, 18, 0), (0, 20, 0))  # [min, max)


def valid_numel(numel: int, partition_numel: int, rank: int) -> int:
    """Elements of a flattened parameter that rank `rank` owns: [rank*pn, (rank+1)*pn) cut at numel.

    The rest of the rank's partition_numel() slots are padding (uninitialised; a parameter smaller than
    the world size leaves whole ranks with padding only).
    """
    return max(0, min(partition_numel, numel - rank * partition_numel))


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
    """One master tensor: a flat fp32 partition (or stage-0 parameter) and its low-precision twin."""

    index: int
    master: torch.Tensor  # fp32 flat (optimizer truth)
    working: torch.Tensor | None  # low-precision flat used by forward; None when it aliases master
    ranges: list[tuple[int, int]]  # (start, length) of the elements this rank counts, merged
    valid_numel: int  # elements in `ranges`
    # the elements this rank's optimizer updates (padding excluded): `ranges` plus what another rank counts
    # (stage 0's replicas, tensor-parallel duplicates); a change written into a gradient covers these
    owned: list[tuple[int, int]]

    @property
    def numel(self) -> int:
        return self.master.numel()


def _add_range(ranges: list[tuple[int, int]], start: int, length: int) -> None:
    if length <= 0:
        return
    if ranges and ranges[-1][0] + ranges[-1][1] == start:
        ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
    else:
        ranges.append((start, length))


def _slice_ranges(spans, lo: int, hi: int) -> tuple[list[tuple[int, int]], int]:
    """spans: (offset, numel, counted) of each parameter inside a flat tensor; [lo, hi) this rank's
    partition of it. Returns the partition-local ranges of counted parameter elements and their count."""
    ranges: list[tuple[int, int]] = []
    for off, n, counted in spans:
        a, b = max(off, lo), min(off + n, hi)
        if counted and b > a:
            _add_range(ranges, a - lo, b - a)
    return ranges, sum(n for _, n in ranges)


def logical_shape(p) -> list[int]:
    """A parameter's shape before ZeRO-3 or tensor-parallel partitioning: the same on every rank
    (AutoTP records it in its universal-checkpoint metadata)."""
    meta = getattr(p, "ds_autotp_universal_checkpoint_meta", None)
    if isinstance(meta, dict) and meta.get("logical_shape") is not None:
        return [int(x) for x in meta["logical_shape"]]
    return list(getattr(p, "ds_shape", p.shape))


_is_tp_param = is_tp_param


class ZeroShards:
    """The rank's fp32 master partitions of every trainable parameter, as flat sub-groups.

    `ZeroShards(engine)` picks the adapter for the engine's optimizer; all share this interface:
    `groups`, `rank`, `world_size`, `tp_rank`, `tp_size`, `dp_group`, `local_valid_numel`, `local_numel`,
    `device`, `refresh_working_copies()`, `gradient_hook(fn)`.
    """

    family = "?"

    def __new__(cls, engine):
        if cls is not ZeroShards:
            return super().__new__(cls)
        check_deepspeed_version()
        return super().__new__(_adapter_class(engine))

    def __init__(self, engine):
        import deepspeed.comm as dist
        from deepspeed.utils.bwc import (
            bwc_pipeline_parallel_world_size,
            bwc_tensor_model_parallel_group,
            bwc_tensor_model_parallel_rank,
            bwc_tensor_model_parallel_world_size,
        )

        self.engine = engine
        self.optimizer = engine.optimizer
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        mpu = getattr(engine, "mpu", None)
        self.pipeline = is_pipeline(engine)  # at ZeRO 0-1: DeepSpeed's pipeline engine refuses stages 2-3 itself
        if not self.pipeline and mpu is not None and bwc_pipeline_parallel_world_size(mpu) > 1:
            raise ShardError(
                "aim_merging: the model's mpu has pipeline stages but the engine is not DeepSpeed's "
                "PipelineEngine; build the model as a deepspeed.pipe.PipelineModule so the plugin can run its "
                "probe and rehearsal through the pipeline's schedule."
            )
        self.pp = pipe_position(engine)
        self.tp_rank = bwc_tensor_model_parallel_rank(mpu)
        self.tp_size = bwc_tensor_model_parallel_world_size(mpu)
        self.tp_group = bwc_tensor_model_parallel_group(mpu) if self.tp_size > 1 else None
        self.dp_group = engine.seq_data_parallel_group if hasattr(engine, "seq_data_parallel_group") else None
        if self.pipeline:  # the stage's data-parallel group: the ranks that see other rows at the same layers
            self.dp_group = engine.grid.get_data_parallel_group()
        self.dp_rank = dist.get_rank(group=self.dp_group)
        self.dp_size = dist.get_world_size(group=self.dp_group)
        self.groups: list[SubGroup] = []

    @property
    def position(self) -> dict:
        """Where this rank's shards sit in the run: plugin state saved here loads only at the same place."""
        return {
            "tp_rank": self.tp_rank,
            "tp_size": self.tp_size,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            **(self.pp if self.pipeline else {}),  # without pipelines the position is what it always was
        }

    def tp_memory_error(self, memory) -> str | None:
        """Tensor-parallel ranks compute one forward together, so they must probe and rehearse on the same
        batches: compare a fingerprint of the memory over the tensor-parallel group (one 16-byte all-reduce;
        of a list every batch, of another iterable its first). Every rank of the group calls it."""
        if self.tp_size == 1:
            return None
        from ..ops import collectives

        fp = _memory_fingerprint(memory)
        t = torch.tensor([fp, -fp], dtype=torch.float64, device=collectives.comm_device())
        collectives.all_reduce(t, op="max", group=self.tp_group)
        if t[0].item() != -t[1].item():
            return (
                f"aim_merging: the rehearsal memory differs between the tensor-parallel ranks of data-parallel rank "
                f"{self.dp_rank}; give every rank of a tensor-parallel group the same memory batches (those of "
                "its data-parallel rank)."
            )
        return None

    def _counted(self, p) -> bool:
        """A parameter every tensor-parallel rank holds whole is counted on tensor-parallel rank 0 only; a tied
        pipeline layer on its first stage only (DeepSpeed marks the other copies ds_pipe_replicated)."""
        if getattr(p, "ds_pipe_replicated", False):
            return False
        return self.tp_rank == 0 or _is_tp_param(p)

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

    def layout(self) -> dict | None:
        """The partition layout for checkpoint manifests (stages 0-2; ZeRO-3's is aim_ds.checkpoint's):
        kind "flat" (each group's flat tensor cut into equal data-parallel partitions) or "replicated"
        (stage 0: every rank holds each parameter whole), every param as [name, shape, numel, offset]."""
        if not hasattr(self, "_params_at"):
            return None
        names = {p: n for n, p in self.engine.module.named_parameters()}
        tp = self.tp_size > 1  # slices may differ between TP ranks: record only what every TP rank shares

        def entry(p, off, n, shape):
            return [names[p], logical_shape(p), None, None] if tp else [names[p], list(shape), n, off]

        return {
            "kind": self.layout_kind,
            "world_size": self.world_size,
            "tp_size": self.tp_size,
            **({"tp_slices": {names[p]: tp_slice(p) for x in self._params_at for p, *_ in x[0]}} if tp else {}),
            "sub_group_size": None,
            "family": self.family,
            "sub_groups": [
                {
                    "param_group": i,
                    "partition_count": count,
                    "partition_size": None if tp else size,
                    "params": [entry(*x) for x in params],
                }
                for i, (params, count, size) in enumerate(self._params_at)
            ],
        }

    # ------------------------------------------------------------------ write-back (per family)
    def refresh_working_copies(self) -> None:
        """Make the fp32 masters visible to the next forward, as the optimizer does after its step.
        A collective in the partitioned families: every rank calls it at the same point."""
        raise NotImplementedError

    def gradient_hook(self, fn):
        """Call fn(group_index, master, grad) just before the optimizer updates each master.

        At that point grad holds the unscaled, clipped fp32 gradient of the rank's partition: the
        importance policy reads |theta * grad| there without any extra copy of the gradients.
        Returns a function that removes the hook.
        """
        raise NotImplementedError

    def _hook_group_step(self, fn, masters: list):
        """gradient_hook for ZeRO optimizers that step one group at a time with `_optimizer_step(i)`,
        the fp32 gradient of masters[i] set just before."""
        opt = self.optimizer
        original = opt._optimizer_step

        def wrapped(i):
            master = masters[i]
            if master.grad is not None:
                fn(i, master, master.grad.view(-1))
            return original(i)

        opt._optimizer_step = wrapped

        def remove():
            if opt.__dict__.get("_optimizer_step") is wrapped:
                del opt.__dict__["_optimizer_step"]

        return remove

    def _hook_inner_step(self, fn):
        """gradient_hook for optimizers that step every group with one call of the wrapped torch optimizer."""
        inner = self._inner_optimizer()
        original = inner.step

        sources = self._grad_sources()

        def wrapped(*args, **kwargs):
            for g, src in zip(self.groups, sources):
                if src.grad is not None:
                    fn(g.index, g.master, src.grad.view(-1))
            return original(*args, **kwargs)

        inner.step = wrapped

        def remove():
            if inner.__dict__.get("step") is wrapped:
                del inner.__dict__["step"]

        return remove

    def _inner_optimizer(self):
        return self.optimizer.optimizer

    def optimizer_state(self) -> tuple:
        """(the torch optimizer that steps the masters, the tensor it keys its state by for each sub-group)."""
        return self._inner_optimizer(), self._grad_sources()

    def _grad_sources(self) -> list[torch.Tensor]:
        """The tensors whose .grad the optimizer reads, one per sub-group."""
        return [g.master for g in self.groups]


def _memory_fingerprint(memory) -> float:
    import itertools

    batches = memory if isinstance(memory, (list, tuple)) else itertools.islice(iter(memory), 1)
    total = 0.0
    for i, b in enumerate(batches):
        for j, k in enumerate(sorted(b)):
            v = b[k]
            if torch.is_tensor(v) and v.numel():
                w = torch.arange(1, v.numel() + 1, dtype=torch.float64) % 9973  # position-sensitive, exact in fp64
                total += (i + 1) * (j + 1) * float((v.detach().reshape(-1).cpu().double() * w).sum())
    return total


def _adapter_class(engine) -> type:
    stage = engine.zero_optimization_stage()
    opt = engine.optimizer
    if opt is None:
        raise ShardError(
            "aim_merging found no optimizer on the engine (was deepspeed.initialize given an optimizer "
            'or an "optimizer" section?). Merging needs the optimizer\'s fp32 master weights.'
        )
    name = type(opt).__name__
    if stage == 3:
        if not hasattr(opt, "fp32_partitioned_groups_flat"):
            raise ShardError(
                f"aim_merging: ZeRO stage 3 with optimizer {name}, not DeepSpeed's ZeRO-3 optimizer; "
                "this combination is not supported."
            )
        return _Stage3Shards
    if "ZenFlow" in name:
        raise ShardError(
            "aim_merging does not support ZenFlow (its optimizer updates parameters asynchronously); "
            'disable zenflow or merging ("aim_merging": {"enabled": false}).'
        )
    if hasattr(opt, "single_partition_of_fp32_groups"):
        return _Stage12Shards
    if hasattr(opt, "fp32_groups_flat_partition"):
        return _BF16Shards
    if hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups") and not hasattr(opt, "fp32_groups_flat"):
        return _UnfusedShards
    if isinstance(opt, torch.optim.Optimizer) and not engine.bfloat16_enabled() and not engine.fp16_enabled():
        return _Fp32ParamShards
    raise ShardError(
        f"aim_merging: stage {stage} with optimizer {name} is not supported (supported: ZeRO-1/2/3, "
        "BF16_Optimizer, stage 0 in fp32 or with the unfused bf16/fp16 optimizer). Use ZeRO stage 1-3 "
        'or disable merging with "aim_merging": {"enabled": false}.'
    )


class _Stage3Shards(ZeroShards):
    """ZeRO-3: each parameter is partitioned on its own; flat sub-groups concatenate the partitions."""

    family = "zero3"

    def __init__(self, engine):
        super().__init__(engine)
        opt = self.optimizer
        if getattr(opt, "swap_optimizer", False) or getattr(opt, "params_in_nvme_and_cpu", False):
            raise ShardError(
                'aim_merging does not support NVMe offload (offload_optimizer/offload_param device "nvme"): '
                'the master partitions are swapped out between steps. Use device "cpu" or none.'
            )
        for i, params in enumerate(opt.fp16_groups):
            master = opt.fp32_partitioned_groups_flat[i]
            working = opt.fp16_partitioned_groups_flat[i]
            if working is None:
                raise ShardError("aim_merging: a sub-group has no flat low-precision partition (NVMe offload?).")
            if working.data_ptr() == master.data_ptr() and working.dtype == master.dtype:
                working = None  # same storage: the optimizer refreshes nothing, neither do we
            spans = self._spans(params, i)
            ranges, valid = _slice_ranges(spans, 0, master.numel())
            owned, _ = _slice_ranges([(o, n, True) for o, n, _ in spans], 0, master.numel())
            self.groups.append(SubGroup(i, master, working, ranges, valid, owned))

    def _spans(self, params, group_index):
        # Each parameter contributes partition_numel() elements to the flat partition; rank r owns
        # elements [r*pn, (r+1)*pn) of the flattened parameter, so everything past numel is padding.
        # DeepSpeed's own groups_padding charges all padding to the last rank, which is wrong for
        # parameters smaller than the world size: compute it here from first principles.
        import deepspeed.comm as dist

        opt = self.optimizer
        group_rank = dist.get_rank(group=opt.sub_group_process_groups[group_index])
        spans, offset = [], 0
        for p in params:
            pn = p.partition_numel()
            spans.append((offset, valid_numel(p.ds_numel, pn, group_rank), self._counted(p)))
            offset += pn
        if offset != opt.fp32_partitioned_groups_flat[group_index].numel():
            raise ShardError(
                f"aim_merging: sub-group {group_index} flat partition has "
                f"{opt.fp32_partitioned_groups_flat[group_index].numel()} elements but its parameters need {offset}; "
                "this DeepSpeed layout is not supported."
            )
        return spans

    @torch.no_grad()
    def refresh_working_copies(self) -> None:
        # Mirrors the ZeRO-3 step: `_reassign_or_swap_out_partitioned_parameters` then `_post_step`.
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
        return self._hook_group_step(fn, self.optimizer.fp32_partitioned_groups_flat)


class _FlatPartitionShards(ZeroShards):
    """ZeRO-1/2 and BF16_Optimizer: every rank holds each group's whole low-precision flat; the fp32
    master is this rank's equal 1/N slice of it (the last slice padded, boundaries inside parameters)."""

    layout_kind = "flat"

    def _build(self, masters, partitions, dp_groups, params_at):
        """params_at[i]: (param, offset in the flat, numel, shape) of every parameter of group i."""
        import deepspeed.comm as dist

        self._params_at = [
            (params_at[i], dist.get_world_size(group=dp_groups[i]), m.numel()) for i, m in enumerate(masters)
        ]
        for i, master in enumerate(masters):
            if master.dtype != torch.float32:
                raise ShardError(
                    f"aim_merging needs fp32 master weights; this optimizer keeps {master.dtype} "
                    "(fp16_master_weights_and_gradients?). Turn that option off."
                )
            pid = dist.get_rank(group=dp_groups[i])
            size = master.numel()
            if partitions[i][pid].numel() != size:
                raise ShardError(
                    f"aim_merging: group {i}'s fp32 partition has {size} elements but its low-precision "
                    f"partition {partitions[i][pid].numel()}; this DeepSpeed layout is not supported."
                )
            spans = [(off, n, self._counted(p)) for p, off, n, _ in params_at[i]]
            ranges, valid = _slice_ranges(spans, pid * size, (pid + 1) * size)
            owned, _ = _slice_ranges([(o, n, True) for o, n, _ in spans], pid * size, (pid + 1) * size)
            self.groups.append(SubGroup(i, master, partitions[i][pid], ranges, valid, owned))

    @torch.no_grad()
    def refresh_working_copies(self) -> None:
        # The optimizer's own post-step sequence: this rank's low-precision partition <- fp32 partition,
        # then all-gather the partitions (DeepSpeed's update_lp_params, the same calls its step() makes).
        self.optimizer.update_lp_params()


def _refuse_moe(opt, where: str) -> None:
    if getattr(opt, "has_moe_layers", False):
        raise ShardError(
            f"aim_merging does not support mixture-of-experts layers {where} (expert "
            "parameters live in other data-parallel groups). Disable merging for this model."
        )


class _Stage12Shards(_FlatPartitionShards):
    family = "zero1/2"

    def __init__(self, engine):
        super().__init__(engine)
        opt = self.optimizer
        _refuse_moe(opt, "at ZeRO stage 1/2")

        params_at = [
            [
                (p, off, meta.numel(), tuple(meta.shape))
                for p, meta, off in zip(
                    opt.round_robin_bit16_groups[i], opt.round_robin_bit16_meta[i], opt.round_robin_bit16_offsets[i]
                )
            ]
            for i in range(len(opt.single_partition_of_fp32_groups))
        ]
        self._build(
            opt.single_partition_of_fp32_groups,
            opt.parallel_partitioned_bit16_groups,
            opt.real_dp_process_group,
            params_at,
        )

    @torch.no_grad()
    def refresh_working_copies(self) -> None:
        super().refresh_working_copies()
        for i in range(len(self.groups)):
            self.optimizer._update_model_bit16_weights(i)  # the step's last call: params view the flat again

    def gradient_hook(self, fn):
        return self._hook_group_step(fn, self.optimizer.single_partition_of_fp32_groups)


class _BF16Shards(_FlatPartitionShards):
    family = "bf16_optimizer"

    def __init__(self, engine):
        super().__init__(engine)
        opt = self.optimizer
        _refuse_moe(opt, "with BF16_Optimizer")

        params_at = []
        for group in opt.bf16_groups:  # flattened back to back; only the group's end is padded
            offsets = [0]
            for p in group:
                offsets.append(offsets[-1] + p.numel())
            params_at.append([(p, off, p.numel(), tuple(p.shape)) for p, off in zip(group, offsets)])
        self._build(opt.fp32_groups_flat_partition, opt.bf16_partitioned_groups, opt.real_dp_process_group, params_at)

    def gradient_hook(self, fn):
        return self._hook_inner_step(fn)


class _ReplicatedShards(ZeroShards):
    """Stage 0: every data-parallel rank holds every master whole, one sub-group per parameter. Each rank
    counts a 1/N slice of each parameter, so sums over ranks count every element once."""

    layout_kind = "replicated"

    def _build(self, masters, workings, params):
        self._masters = list(masters)  # the tensors the optimizer steps (their .grad is the gradient)
        self._params_at = [([(p, 0, p.numel(), tuple(p.shape))], 1, p.numel()) for p in params]
        for i, (master, working, p) in enumerate(zip(masters, workings, params)):
            flat = master.data.view(-1)
            pn = -(-flat.numel() // self.dp_size)
            lo = min(flat.numel(), self.dp_rank * pn)
            ranges, valid = _slice_ranges([(0, flat.numel(), self._counted(p))], lo, lo + pn)
            ranges = [(s + lo, n) for s, n in ranges]
            working = None if working is None else working.data.view(-1)
            self.groups.append(SubGroup(i, flat, working, ranges, valid, [(0, flat.numel())]))

    def _grad_sources(self) -> list[torch.Tensor]:
        return self._masters

    @torch.no_grad()
    def refresh_working_copies(self) -> None:
        for g in self.groups:
            if g.working is not None:
                g.working.copy_(g.master)  # as the optimizer's step does: fp16_param.data.copy_(fp32_param.data)

    def gradient_hook(self, fn):
        return self._hook_inner_step(fn)


class _Fp32ParamShards(_ReplicatedShards):
    """Stage 0, fp32: the torch optimizer updates the parameters themselves: they are the masters."""

    family = "stage0_fp32"

    def __init__(self, engine):
        super().__init__(engine)
        params = [p for grp in self.optimizer.param_groups for p in grp["params"] if p.requires_grad]
        self._build(params, [None] * len(params), params)

    def _inner_optimizer(self):
        return self.optimizer


class _UnfusedShards(_ReplicatedShards):
    """Stage 0, bf16/fp16: FP16_UnfusedOptimizer keeps one fp32 copy per parameter."""

    family = "stage0_unfused"

    def __init__(self, engine):
        super().__init__(engine)
        opt = self.optimizer
        masters = [m for grp in opt.fp32_groups for m in grp]
        params = [p for grp in opt.fp16_groups for p in grp]
        self._build(masters, params, params)


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
