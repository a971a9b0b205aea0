"""What DeepSpeed AutoTP does to a model that the driver and the offline tools must know: how each parameter
was cut over the tensor-parallel ranks (recorded in checkpoints so that `aim-ds convert` can join the slices),
and whether the LM head was cut over the vocabulary (its logits then need gathering)."""

from __future__ import annotations

import torch


def parallel_ranks(engine=None) -> tuple[int, int]:
    """(tensor-parallel rank, data-parallel rank) as DeepSpeed placed this process: by its groups (AutoTP), or by
    a pipeline engine's grid (its mpu)."""
    grid = getattr(engine, "grid", None)
    if grid is not None:
        import deepspeed.comm as dist

        return grid.get_slice_parallel_rank(), dist.get_rank(group=grid.get_data_parallel_group())
    from deepspeed.utils import groups

    return groups.get_tensor_model_parallel_rank(), groups.get_data_parallel_rank()


def is_tp_param(p) -> bool:
    from deepspeed.runtime.utils import is_model_parallel_parameter

    return is_model_parallel_parameter(p)


def tp_slice(p) -> list | None:
    """How AutoTP cut a parameter over the tensor-parallel ranks, for reassembly offline: [dim, sizes per
    tensor-parallel rank], None when every rank holds it whole, or [None, None, reason] when it is not one
    plain cut (fused q/k/v or gate/up packs are cut per sub-parameter: aim-ds convert refuses those)."""
    if not is_tp_param(p):
        return None
    meta = getattr(p, "ds_autotp_universal_checkpoint_meta", None) or {}
    conv = meta.get("conversion") or {}
    if conv.get("replicated"):
        return None
    sizes, dim = meta.get("partition_sizes"), conv.get("partition_dim", meta.get("partition_dim"))
    reason = conv.get("unsupported_reason")
    if reason is None and (conv.get("sub_param_shape") is not None or conv.get("sub_param_shard_widths") is not None):
        reason = "fused sub-parameters, each cut separately"
    if reason is None and (dim is None or sizes is None):
        reason = "AutoTP recorded no partition dimension and sizes"
    return [None, None, str(reason)] if reason else [int(dim), [int(x) for x in sizes]]


def param_slices(module) -> dict[str, list | None]:
    """tp_slice of every parameter of the module by name, frozen ones included: they are in no optimizer group
    (so not in the shards' layout), yet a converted model needs them whole too."""
    return {n: tp_slice(p) for n, p in module.named_parameters()}


def vocab_head(model_or_engine):
    """The output layer when AutoTP cut it over the vocabulary (a tied LM head becomes a VocabParallelLinear
    by default): each tensor-parallel rank's forward then returns its vocabulary slice of the logits.
    None otherwise."""
    module = getattr(model_or_engine, "module", model_or_engine)
    get = getattr(module, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if getattr(head, "is_vocab_parallel_lm_head", False) else None


def whole_vocab_logits(model_or_engine, logits: torch.Tensor) -> torch.Tensor:
    """``logits`` over the whole vocabulary: a vocabulary-sliced head's slices gathered over its
    tensor-parallel group (differentiable: each rank's gradient flows back to its own slice); other
    logits unchanged. Every rank of the group calls it at the same point."""
    head = vocab_head(model_or_engine)
    if head is None:
        return logits
    from deepspeed.module_inject.layers import GatherFromTensorParallelRegion

    return GatherFromTensorParallelRegion.apply(head.mp_group, logits, tuple(head._partition_sizes))
