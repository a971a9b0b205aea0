"""Model-state memory per GPU and per node for ZeRO stages 1-3, with and without the AimMerging plugin.

ZeRO-1/2 (`--stage 1|2`): DeepSpeed's `deepspeed.runtime.zero.stage_1_and_2.
estimate_zero2_model_states_mem_needs` unchanged (DeepSpeed has one estimator for stages 1 and 2; it counts
the 16-bit gradients partitioned, as stage 2 does; stage 1 keeps them whole, 2 P (1 - 1/N) bytes more per
GPU): GPU = 2 P + 18 P / N, host/node = 4 P g 1.5; with the optimizer offloaded GPU = 2 P,
host/node = max(4 N, 16) P 1.5. Parameters are never offloaded at these stages.

The ZeRO-3 part is DeepSpeed's own estimator (`deepspeed.runtime.zero.stage3.
estimate_zero3_model_states_mem_needs`, the function behind `estimate_zero3_model_states_mem_needs_all_cold`),
called with the same arguments and returned unchanged. Its model (deepspeed 0.19):

    offload none:       GPU = 4 L + 18 P / N          host/node = 4 L g 1.5 (zero.Init) | 4 P g 1.5
    offload optimizer:  GPU = 4 L +  2 P / N          host/node = 16 P / n 1.5 (zero.Init) | max(4 g, 16 / n) P 1.5
    offload both:       GPU = 4 L                     host/node = 18 P / n 1.5 (zero.Init) | max(4 g, 18 / n) P 1.5

with P parameters, L the largest layer's parameters, N = n g GPUs (n nodes, g GPUs per node) and 1.5 its
`additional_buffer_factor`. DeepSpeed's table has no row for parameter offload alone; for `--offload
param` this module takes its decomposition (2 bytes of bf16/fp16 parameter + 16 bytes of gradients,
fp32 master and Adam moments per parameter) and moves the 2 parameter bytes to the host:
GPU = 4 L + 16 P / N, host/node = 2 P / n 1.5 (zero.Init) | max(4 g, 2 / n) P 1.5. Such rows say
"derived" in the output.

Pipelines (`--pipeline-parallel-size P`, ZeRO-1 only, as DeepSpeed's pipeline engine allows): a rank holds its
stage's parameters P_s, cut over the stage's D = N / P data-parallel ranks. The rows are those of the heaviest
stage: DeepSpeed's ZeRO-1/2 estimator on P_s with D GPUs for the GPU bytes and with the node's g GPUs for the
host bytes. P_s is the largest stage's share of the layers split the way DeepSpeed's `partition_method
"parameters"` splits them (`deepspeed.runtime.utils.partition_balanced` of the embedding, each decoder layer,
the norm and the head; a tied embedding counts on the first and the last stage) with --model-config, else
ceil(P / stages).

The plugin's own bytes (what `AimPlugin.held_bytes()` reports on each rank):
  * scalar weight policies ("signals", "fixed"): ONE fp32 buffer shaped like the rank's fp32 master
    partition (the anchor, reused as the fusion buffer): 4 P / N bytes per rank;
  * the importance policy: the anchor + a theta_k snapshot + 4 EMA buffers, all fp32: 24 P / N per rank.
The buffers live next to the optimizer's fp32 master partitions ("anchor": "device"), which are in
host memory when the optimizer is offloaded, or always in host memory with "anchor": "host". Host
bytes per node are the per-rank bytes times the GPUs per node. Partition padding (< N elements per
parameter) is ignored, as DeepSpeed's estimator ignores it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

OFFLOAD_CHOICES = ("none", "optimizer", "param", "both")
STAGE_CHOICES = (1, 2, 3)
ANCHOR_CHOICES = ("device", "host")
POLICY_CHOICES = ("scalar", "importance")
UNDO_CHOICES = ("host", "nvme", "off")
PLUGIN_BYTES_PER_PARAM = {"scalar": 4, "importance": 24}
UNDO_BYTES_PER_PARAM = 12  # theta_k + Adam's exp_avg and exp_avg_sq, fp32
GiB = 2**30


class EstimateError(ValueError):
    """Bad input to the estimator; the message names the argument, the value and what is accepted."""


@dataclass(frozen=True)
class Estimate:
    stage: int
    total_params: int
    largest_layer_params: int
    world_size: int
    nodes: int
    gpus_per_node: int
    offload: str
    anchor: str
    policy: str
    zero_init: bool
    buffer_factor: float
    source: str  # "deepspeed" (DeepSpeed's estimator) or "derived" (param-only offload, see module doc)
    zero_gpu_bytes: int  # per GPU, ZeRO-3 model states
    zero_host_bytes_per_node: int
    plugin_bytes_per_rank: int
    plugin_location: str  # "device" or "host"
    plugin_gpu_bytes: int  # per GPU
    plugin_host_bytes_per_node: int
    undo: str = "host"
    undo_bytes_per_rank: int = 0  # the undo record's peak, during a merge
    undo_host_bytes_per_node: int = 0
    undo_disk_bytes_per_node: int = 0
    pipeline_parallel_size: int = 1
    stage_params: int = 0  # parameters of the heaviest pipeline stage (the whole model without pipelines)

    @property
    def with_plugin_gpu_bytes(self) -> int:
        return self.zero_gpu_bytes + self.plugin_gpu_bytes

    @property
    def with_plugin_host_bytes_per_node(self) -> int:
        return self.zero_host_bytes_per_node + self.plugin_host_bytes_per_node

    @property
    def merge_peak_host_bytes_per_node(self) -> int:
        """Host memory per node while a merge runs: ZeRO + plugin + the undo record (with undo "host")."""
        return self.with_plugin_host_bytes_per_node + self.undo_host_bytes_per_node

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            with_plugin_gpu_bytes=self.with_plugin_gpu_bytes,
            with_plugin_host_bytes_per_node=self.with_plugin_host_bytes_per_node,
            merge_peak_host_bytes_per_node=self.merge_peak_host_bytes_per_node,
            zero_gpu_bytes_per_node=self.zero_gpu_bytes * self.gpus_per_node,
            with_plugin_gpu_bytes_per_node=self.with_plugin_gpu_bytes * self.gpus_per_node,
            plugin_bytes_per_param_per_rank=PLUGIN_BYTES_PER_PARAM[self.policy] / self.world_size,
        )
        return d


# ---------------------------------------------------------------------------------------- checks
def _check(
    total_params,
    largest_layer_params,
    world_size,
    nodes,
    offload,
    anchor,
    policy,
    buffer_factor,
    stage=3,
    undo="host",
    pipeline_parallel_size=1,
) -> None:
    def bad(name, value, accepted):
        raise EstimateError(f"{name}={value!r} is invalid: expected {accepted}.")

    pp = pipeline_parallel_size
    if isinstance(pp, bool) or not isinstance(pp, int) or pp < 1:
        bad("pipeline_parallel_size", pp, "an integer >= 1 (1 = no pipeline)")
    if pp > 1 and stage != 1:
        bad("stage", stage, "1 with pipeline_parallel_size > 1 (DeepSpeed's pipeline engine runs ZeRO-1 at most)")
    if pp > 1 and isinstance(world_size, int) and world_size % pp:
        bad("pipeline_parallel_size", pp, f"a divisor of world_size={world_size} (stages x data-parallel ranks)")
    if stage not in STAGE_CHOICES:
        bad("stage", stage, " | ".join(map(str, STAGE_CHOICES)))
    if stage < 3 and offload in ("param", "both"):
        bad("offload", offload, f"none | optimizer at ZeRO stage {stage} (parameter offload needs stage 3)")
    if (
        isinstance(total_params, bool)
        or not isinstance(total_params, (int, float))
        or not math.isfinite(total_params)
        or total_params <= 0
    ):
        bad("params", total_params, "a positive number of parameters (e.g. 13e9)")
    if (
        isinstance(largest_layer_params, bool)
        or not isinstance(largest_layer_params, (int, float))
        or not math.isfinite(largest_layer_params)
        or largest_layer_params < 0
    ):
        bad("largest_layer_params", largest_layer_params, "a number >= 0")
    if largest_layer_params > total_params:
        bad("largest_layer_params", largest_layer_params, f"at most the total parameters ({int(total_params)})")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        bad("world_size", world_size, "an integer >= 1 (the total number of GPUs)")
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        bad("nodes", nodes, "an integer >= 1")
    if world_size % nodes:
        bad("nodes", nodes, f"a divisor of world_size={world_size} (the same number of GPUs on every node)")
    if offload not in OFFLOAD_CHOICES:
        bad("offload", offload, " | ".join(OFFLOAD_CHOICES))
    if anchor not in ANCHOR_CHOICES:
        bad("anchor", anchor, " | ".join(ANCHOR_CHOICES))
    if policy not in POLICY_CHOICES:
        bad("policy", policy, " | ".join(POLICY_CHOICES))
    if undo not in UNDO_CHOICES:
        bad("undo", undo, " | ".join(UNDO_CHOICES))
    if not isinstance(buffer_factor, (int, float)) or not math.isfinite(buffer_factor) or buffer_factor < 1:
        bad("buffer_factor", buffer_factor, "a number >= 1 (DeepSpeed's additional_buffer_factor, default 1.5)")


# ---------------------------------------------------------------------------------------- ZeRO part
def zero3_model_states(
    total_params: int,
    largest_layer_params: int,
    gpus_per_node: int,
    nodes: int,
    offload: str,
    zero_init: bool = True,
    buffer_factor: float = 1.5,
) -> tuple[int, int, str]:
    """(host bytes per node, GPU bytes per GPU, source) for ZeRO-3 model states, from DeepSpeed's estimator."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as ds_estimate

    def ds(cpu_offload: bool, cpu_offload_params: bool) -> tuple[int, int]:
        cpu, gpu, _ = ds_estimate(
            total_params=total_params,
            largest_layer_params=largest_layer_params,
            num_gpus_per_node=gpus_per_node,
            num_nodes=nodes,
            cpu_offload=cpu_offload,
            cpu_offload_params=cpu_offload_params,
            zero_init=zero_init,
            additional_buffer_factor=buffer_factor,
        )
        return int(cpu), int(gpu)

    if offload == "none":
        return (*ds(False, False), "deepspeed")
    if offload == "optimizer":
        return (*ds(True, False), "deepspeed")
    if offload == "both":
        return (*ds(True, True), "deepspeed")
    # "param" alone: not in DeepSpeed's table; its decomposition with the 2 parameter bytes on the host
    world = gpus_per_node * nodes
    gpu = 4 * largest_layer_params + int(16 * total_params / world)
    per_param = 2 / nodes if zero_init else max(4 * gpus_per_node, 2 / nodes)
    return int(total_params * per_param * buffer_factor), int(gpu), "derived"


def zero12_model_states(
    total_params: int, gpus_per_node: int, nodes: int, offload: str, buffer_factor: float = 1.5
) -> tuple[int, int, str]:
    """(host bytes per node, GPU bytes per GPU, source) for ZeRO-1/2 model states, from DeepSpeed's estimator."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as ds_estimate

    cpu, gpu = ds_estimate(
        total_params=total_params,
        num_gpus_per_node=gpus_per_node,
        num_nodes=nodes,
        cpu_offload=offload == "optimizer",
        additional_buffer_factor=buffer_factor,
    )
    return int(cpu), int(gpu), "deepspeed"


# ---------------------------------------------------------------------------------------- plugin part
def plugin_bytes_per_rank(total_params: int, world_size: int, policy: str = "scalar") -> int:
    """Bytes the plugin holds on each rank: 4 P / N (scalar policies) or 24 P / N (importance)."""
    return int(PLUGIN_BYTES_PER_PARAM[policy] * total_params / world_size)


def undo_bytes_per_rank(total_params: int, world_size: int, undo: str = "host") -> int:
    """The undo record's peak on each rank: 12 P / N (theta_k + Adam's moments), none with undo "off"."""
    return 0 if undo == "off" else int(UNDO_BYTES_PER_PARAM * total_params / world_size)


def plugin_location(offload: str, anchor: str) -> str:
    """Where the plugin's buffers live: next to the fp32 masters, or on the host with anchor=host."""
    return "host" if anchor == "host" or offload in ("optimizer", "both") else "device"


def estimate(
    total_params,
    world_size: int,
    nodes: int = 1,
    offload: str = "none",
    anchor: str = "device",
    policy: str = "scalar",
    largest_layer_params=0,
    zero_init: bool = True,
    buffer_factor: float = 1.5,
    stage: int = 3,
    undo: str = "host",
    pipeline_parallel_size: int = 1,
    stage_params=None,
) -> Estimate:
    """stage_params: the heaviest pipeline stage's parameters (default: an even split of total_params)."""
    pp = pipeline_parallel_size
    _check(
        total_params, largest_layer_params, world_size, nodes, offload, anchor, policy, buffer_factor, stage, undo, pp
    )
    total_params, largest_layer_params = int(total_params), int(largest_layer_params)
    g = world_size // nodes
    held = total_params if pp == 1 else int(stage_params or math.ceil(total_params / pp))
    dp = world_size // pp  # the ranks each stage's ZeRO partitions are cut over
    if stage == 3:
        host, gpu, source = zero3_model_states(
            total_params, largest_layer_params, g, nodes, offload, zero_init, buffer_factor
        )
    elif pp == 1:
        host, gpu, source = zero12_model_states(total_params, g, nodes, offload, buffer_factor)
    else:
        host, _, _ = zero12_model_states(held, g, nodes, offload, buffer_factor)
        _, gpu, _ = zero12_model_states(held, dp, 1, offload, buffer_factor)
        source = "deepspeed, per stage"
    per_rank = plugin_bytes_per_rank(held, dp, policy)
    where = plugin_location(offload, anchor)
    undo_rank = undo_bytes_per_rank(held, dp, undo)
    return Estimate(
        stage=stage,
        total_params=total_params,
        largest_layer_params=largest_layer_params,
        world_size=world_size,
        nodes=nodes,
        gpus_per_node=g,
        offload=offload,
        anchor=anchor,
        policy=policy,
        zero_init=zero_init,
        buffer_factor=buffer_factor,
        source=source,
        zero_gpu_bytes=gpu,
        zero_host_bytes_per_node=host,
        plugin_bytes_per_rank=per_rank,
        plugin_location=where,
        plugin_gpu_bytes=per_rank if where == "device" else 0,
        plugin_host_bytes_per_node=per_rank * g if where == "host" else 0,
        undo=undo,
        undo_bytes_per_rank=undo_rank,
        undo_host_bytes_per_node=undo_rank * g if undo == "host" else 0,
        undo_disk_bytes_per_node=undo_rank * g if undo == "nvme" else 0,
        pipeline_parallel_size=pp,
        stage_params=held,
    )


# ---------------------------------------------------------------------------------------- model configs
def load_model_config(path: str):
    """A transformers config from a model folder (config.json inside) or a config JSON file."""
    if not os.path.exists(path):
        raise EstimateError(f"model-config={path!r} does not exist: give a model folder or a config JSON file.")
    from transformers import AutoConfig

    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise EstimateError(f"model-config={path!r} is a folder without config.json.")
        return AutoConfig.from_pretrained(path)
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise EstimateError(f"model-config={path!r} is not readable JSON: {e}") from None
    if not isinstance(d, dict) or "model_type" not in d:
        raise EstimateError(
            f'model-config={path!r} has no "model_type" (e.g. "llama"); it must be a transformers config.json.'
        )
    d = dict(d)
    try:
        return AutoConfig.for_model(d.pop("model_type"), **d)
    except ValueError as e:
        raise EstimateError(f"model-config={path!r}: {e}") from None


def count_params(config) -> tuple[int, int]:
    """(total parameters, largest layer's parameters) of a causal LM built on the meta device.

    Same definition as deepspeed.runtime.zero.stage3.model_to_params (shared parameters once, a
    layer = a module's own parameters), which cannot be used on the meta device because it
    deduplicates by data_ptr (0 for every meta tensor); Module.parameters() deduplicates tied ones.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return int(total), int(largest)


def heaviest_stage_params(config, stages: int) -> int:
    """The parameters of the heaviest of `stages` pipeline stages of a causal LM, its layers (embedding, each
    decoder layer, final norm, head) split as DeepSpeed's partition_method "parameters" splits them; a tied
    embedding counts on the first and the last stage (each holds a copy)."""
    import torch
    from deepspeed.runtime.utils import partition_balanced
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    body = model.get_decoder()

    def count(m):
        return sum(p.numel() for p in m.parameters())

    embed = count(model.get_input_embeddings())
    tied = bool(getattr(config, "tie_word_embeddings", False))
    weights = [
        embed,
        *(count(layer) for layer in body.layers),
        count(body.norm),
        embed if tied else count(model.lm_head),
    ]
    bounds = partition_balanced(weights, stages)
    return int(max(sum(weights[bounds[i] : bounds[i + 1]]) for i in range(stages)))


# ---------------------------------------------------------------------------------------- output
def _gib(b: int) -> str:
    return f"{b / GiB:9.2f}"


def format_table(e: Estimate) -> str:
    g = e.gpus_per_node
    plug_word = {
        "scalar": "scalar policy: 1 fp32 buffer = 4 B/param / N",
        "importance": "importance policy: anchor + theta_k + 4 EMA buffers = 24 B/param / N",
    }[e.policy]
    z = f"ZeRO-{e.stage}"
    source = {
        3: "DeepSpeed estimate_zero3_model_states_mem_needs",
        2: "DeepSpeed estimate_zero2_model_states_mem_needs",
        1: "DeepSpeed estimate_zero2_model_states_mem_needs (its stage 1-2 estimator: stage 1 keeps the 16-bit "
        "gradients whole, 2 B/param x (1 - 1/N) more per GPU)",
    }[e.stage]
    lines = [
        f"{z} model states: {e.total_params / 1e9:.3f}B params"
        + (f" (largest layer {e.largest_layer_params / 1e6:.1f}M)" if e.stage == 3 else "")
        + f", {e.world_size} GPUs = {e.nodes} node(s) x {g}, offload={e.offload}, "
        + (f"zero.Init={'on' if e.zero_init else 'off'}, " if e.stage == 3 else "")
        + f"buffer factor {e.buffer_factor:g}",
        f"ZeRO numbers: {source if e.source.startswith('deepspeed') else 'derived from DeepSpeed decomposition (param offload alone is not in its table)'}",
        *(
            [
                f"pipeline: {e.pipeline_parallel_size} stages x {e.world_size // e.pipeline_parallel_size} data-parallel "
                f"ranks; rows for the heaviest stage, {e.stage_params / 1e9:.3f}B params, its partitions cut over "
                f"{e.world_size // e.pipeline_parallel_size} ranks"
            ]
            if e.pipeline_parallel_size > 1
            else []
        ),
        f"plugin: {plug_word}; anchor={e.anchor} -> buffers on the {e.plugin_location}"
        + (" (the fp32 masters are offloaded)" if e.anchor == "device" and e.plugin_location == "host" else ""),
        "",
        f"{'GiB':<28}{z:>10}{'+ plugin':>10}{'plugin':>10}",
        f"{'per GPU (device)':<28}{_gib(e.zero_gpu_bytes)} {_gib(e.with_plugin_gpu_bytes)} {_gib(e.plugin_gpu_bytes)}",
        f"{'per node (all GPUs)':<28}{_gib(e.zero_gpu_bytes * g)} {_gib(e.with_plugin_gpu_bytes * g)} "
        f"{_gib(e.plugin_gpu_bytes * g)}",
        f"{'per node (host memory)':<28}{_gib(e.zero_host_bytes_per_node)} {_gib(e.with_plugin_host_bytes_per_node)} "
        f"{_gib(e.plugin_host_bytes_per_node)}",
        f"{'per node (host), in a merge':<28}{_gib(e.zero_host_bytes_per_node)} "
        f"{_gib(e.merge_peak_host_bytes_per_node)} {_gib(e.merge_peak_host_bytes_per_node - e.zero_host_bytes_per_node)}",
        "",
        {
            "host": f"undo record (host memory, during a merge only): theta_k + Adam moments = 12 B/param / N = "
            f"{e.undo_bytes_per_rank / GiB:.2f} GiB per rank, {e.undo_host_bytes_per_node / GiB:.2f} GiB per node "
            '(aim_merging "undo": "nvme" moves it to disk, "off" drops it)',
            "nvme": f"undo record on NVMe (undo_path, memory-mapped): {e.undo_bytes_per_rank / GiB:.2f} GiB per rank, "
            f"{e.undo_disk_bytes_per_node / GiB:.2f} GiB of disk per node; not counted as host memory",
            "off": "undo record: none (undo off: a failed merge stops every rank; restart from a checkpoint)",
        }[e.undo],
        "Model states only: activations, communication buffers and the CUDA context come on top.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- CLI
HELP = "model-state memory per GPU and per node for ZeRO stages 1-3, with and without the plugin"


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--params", type=float, help="total parameters, e.g. 13e9")
    src.add_argument(
        "--model-config",
        metavar="DIR_OR_JSON",
        help="a transformers model folder or config.json: parameters counted on the meta device",
    )
    p.add_argument(
        "--largest-layer-params",
        type=float,
        default=None,
        help="parameters of the largest layer (with --params; default 0, counted with --model-config)",
    )
    p.add_argument("--world-size", type=int, required=True, help="total GPUs (data-parallel ranks)")
    p.add_argument("--stage", type=int, choices=STAGE_CHOICES, default=3, help="ZeRO stage (default 3)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (must divide the world size; default 1)")
    p.add_argument(
        "--offload",
        choices=OFFLOAD_CHOICES,
        default="none",
        help="offload to CPU (default none; param and both need stage 3)",
    )
    p.add_argument(
        "--anchor",
        choices=ANCHOR_CHOICES,
        default="device",
        help='aim_merging "anchor": device (next to the fp32 masters) or host',
    )
    p.add_argument(
        "--policy",
        choices=POLICY_CHOICES,
        default="scalar",
        help="weight policy: scalar (signals/fixed, 4 B/param/N) or importance (24 B/param/N)",
    )
    p.add_argument(
        "--undo",
        choices=UNDO_CHOICES,
        default="host",
        help='aim_merging "undo": where the merge\'s undo record (12 B/param/N) lives (default host)',
    )
    p.add_argument(
        "--pipeline-parallel-size",
        type=int,
        default=1,
        metavar="P",
        help="pipeline stages (ZeRO stage 1): the rows are the heaviest stage's, its partitions cut over "
        "world-size / P ranks (default 1)",
    )
    p.add_argument("--no-zero-init", action="store_true", help="model not built under zero.Init (more host memory)")
    p.add_argument("--buffer-factor", type=float, default=1.5, help="DeepSpeed's additional_buffer_factor (1.5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    import contextlib
    import sys

    # DeepSpeed logs (e.g. the accelerator choice) to stdout: keep stdout for the result only
    with contextlib.redirect_stdout(sys.stderr):
        e = _estimate_from_args(args)
    if args.json:
        print(json.dumps(e.to_dict(), indent=2))
    else:
        print(format_table(e))
        if args.stage == 3 and args.model_config is None and args.largest_layer_params is None:
            print(
                "Largest layer not given: 0 assumed (DeepSpeed adds 4 bytes x its parameters per GPU); "
                "pass --largest-layer-params or --model-config."
            )
    return 0


def _estimate_from_args(args) -> Estimate:
    pp, held = getattr(args, "pipeline_parallel_size", 1), None
    if args.model_config is not None:
        config = load_model_config(args.model_config)
        total, largest = count_params(config)
        if args.largest_layer_params is not None:
            largest = args.largest_layer_params
        if pp > 1 and isinstance(pp, int) and args.stage == 1:
            held = heaviest_stage_params(config, pp)
    else:
        total, largest = args.params, (args.largest_layer_params or 0)
    return estimate(
        total,
        args.world_size,
        nodes=args.nodes,
        offload=args.offload,
        anchor=args.anchor,
        policy=args.policy,
        largest_layer_params=largest,
        zero_init=not args.no_zero_init,
        buffer_factor=args.buffer_factor,
        stage=args.stage,
        undo=args.undo,
        pipeline_parallel_size=pp,
        stage_params=held,
    )
