"""DeepSpeed's PipelineEngine as the plugin meets it: a pipeline engine has no forward, backward or step of its
own (each raises); one `train_batch(data_iter)` runs the whole schedule of forwards, backwards and the optimizer
step over `gradient_accumulation_steps()` micro-batches, and `eval_batch(data_iter)` the forwards only, the loss
broadcast to every stage. So under pipelines the plugin's probe is an `eval_batch` and a rehearsal step a
`train_batch` over memory micro-batches, each converted from the plugin's batch dicts by `pipe_batch`.

Each stage owns distinct layers, so a rank's shard is its stage's parameters (cut by ZeRO-1 over the stage's
data-parallel group): sums over every rank still count each element once, except a tied layer (an embedding
used again as the head on the last stage), which DeepSpeed marks `ds_pipe_replicated` on every owner but the
first; `zero.py` counts it there only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def is_pipeline(engine) -> bool:
    """Is this a DeepSpeed PipelineEngine (train_batch / eval_batch only)?"""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def default_pipe_batch(batch: dict) -> tuple:
    """The plugin's batch dict as the micro-batch a pipeline's data iterator yields: (input_ids, labels), the
    form of DeepSpeed's pipeline examples and of aim_ds's own pipeline Llama. Other layouts pass their own
    function to attach(pipe_batch=...)."""
    return batch["input_ids"], batch["labels"]


def pipe_position(engine) -> dict:
    """This rank's pipeline stage and the number of stages (0 and 1 without pipelines)."""
    if not is_pipeline(engine):
        return {"pp_rank": 0, "pp_size": 1}
    return {"pp_rank": int(engine.stage_id), "pp_size": int(engine.num_stages)}


def tensor_parallel_grid(num_stages: int, tensor_parallel: int) -> tuple:
    """(topology, this rank's tensor-parallel rank, the tensor-parallel group) of a pipeline with Megatron-style
    tensor parallelism inside the stages: DeepSpeed's PipeModelDataParallelTopology (stages x data-parallel
    ranks x tensor-parallel ranks, the latter innermost), whose grid the PipelineModule and the engine use as
    their mpu. Every rank calls it (it creates process groups)."""
    import deepspeed.comm as dist
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid, PipeModelDataParallelTopology

    world = dist.get_world_size()
    if world % (num_stages * tensor_parallel):
        raise ValueError(
            f"{world} ranks cannot form {num_stages} stages x {tensor_parallel} tensor-parallel ranks; launch a "
            f"multiple of {num_stages * tensor_parallel}."
        )
    topology = PipeModelDataParallelTopology(
        num_pp=num_stages, num_mp=tensor_parallel, num_dp=world // (num_stages * tensor_parallel)
    )
    grid = PipelineParallelGrid(topology=topology)
    return topology, grid.get_slice_parallel_rank(), grid.get_slice_parallel_group()


class PipeSteps:
    """The plugin's own forwards and optimizer steps through a pipeline engine's schedule.

    Every rank calls each method at the same point (the schedule's sends and receives pair the stages). The
    activation shapes are sent afresh around each call: memory batches may differ in shape from the training
    batches, and a pipeline without `dynamic_shape` would reuse the first shapes it saw.
    """

    def __init__(self, engine, pipe_batch: Callable[[dict], tuple] | None = None):
        self.engine = engine
        # the class's train_batch: the plugin's hook wraps the instance attribute, its own steps bypass it
        self.train_batch = functools.partial(type(engine).train_batch, engine)
        self.pipe_batch = pipe_batch or default_pipe_batch

    def loss(self, batch: dict) -> float:
        """The loss of one memory batch, no gradients, model in eval mode (eval_batch sets it and leaves it so:
        the training mode is restored here). The same value on every stage."""
        was_training = self.engine.module.training
        try:
            return self._fresh_shapes(self.engine.eval_batch, [batch], num_micro_batches=1)
        finally:
            self.engine.module.train(was_training)

    def step(self, batches: list[dict]) -> float:
        """One optimizer step over `batches` (one per accumulation micro-step) through the engine's own
        train_batch; the mean loss of the micro-batches."""
        return self._fresh_shapes(self.train_batch, batches)

    def _fresh_shapes(self, run, batches: list[dict], **kwargs) -> float:
        """run(an iterator of the batches' micro-batches), the activation shapes sent afresh before and after."""
        self.engine.reset_activation_shape()
        try:
            out = run(iter([self.pipe_batch(b) for b in batches]), **kwargs)
        finally:
            self.engine.reset_activation_shape()
        return float(out.detach().float().mean()) if torch.is_tensor(out) else float(out)


__all__ = [
    "PipeSteps",
    "default_pipe_batch",
    "is_pipeline",
    "pipe_position",
    "tensor_parallel_grid",
]
