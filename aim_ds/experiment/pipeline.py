"""Pipeline parallelism (DeepSpeed ``PipelineModule``) for a Hugging Face Llama.

The pipeline's layers, in order (``L`` = ``num_hidden_layers``):

====================  ======================================  ====================================
layer index           module                                  HF names of its parameters
====================  ======================================  ====================================
0                     ``EmbeddingPipe`` (input_ids -> hidden)  ``model.embed_tokens.*``
1 .. L                ``DecoderLayerPipe`` (one decoder layer) ``model.layers.{i-1}.*``
L + 1                 ``NormPipe`` (the final RMSNorm)         ``model.norm.*``
L + 2                 ``HeadPipe`` (hidden -> logits)          ``lm_head.*`` (untied only)
====================  ======================================  ====================================

With ``tie_word_embeddings`` layers 0 and L + 2 are one ``TiedLayerSpec`` (key ``"embed"``): the head is a
function of the embedding module (``forward_fn``, as Megatron-DeepSpeed's GPTModelPipe does), DeepSpeed keeps
one copy per stage that needs it and all-reduces its two gradients between those stages. Its parameters are
named ``tied_modules.embed.*`` in the PipelineModule's state dict, and DeepSpeed's ``save_checkpoint`` writes
them only in layer 0's file (a ``forward_fn`` layer has no file), so a tied checkpoint has no file for L + 2.

Micro-batches (what the data iterator given to ``train_batch``/``eval_batch`` yields): ``(input_ids, labels)``,
two LongTensors of shape [B, T]. The first stage embeds input_ids; between stages travels the hidden-state
tensor alone; the last stage's ``loss_fn(logits, labels)`` is the shifted token cross-entropy averaged over
labels != -100, the value ``LlamaForCausalLM(input_ids=..., labels=...).loss`` gives. Attention is causal only
(no padding mask): with right padding and label -100 on the pads the real tokens' loss is unchanged.

DeepSpeed is imported inside the functions that need it: the offline name mapping (``hf_param_name``) is used
by aim_ds.checkpoint.pipe, which runs without DeepSpeed. Only DeepSpeed's public pipeline API is used
(``deepspeed.PipelineModule``, ``deepspeed.pipe.LayerSpec``/``TiedLayerSpec``, the engine's ``grid``).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
TIE_KEY = "embed"
_LAYER_NAME = re.compile(r"^(\d+)\.(.+)$")
_TIED_NAME = re.compile(rf"^tied_modules\.{TIE_KEY}\.(.+)$")


class _Adopted(nn.Module):
    """Holds an HF submodule's own children and parameters (the same objects, no copy) under the submodule's
    local names, so the pipeline's state-dict names are the HF ones after the layer prefix; forward runs the
    HF submodule itself (kept unregistered, so its parameters are not listed twice)."""

    def __init__(self, hf_module: nn.Module):
        super().__init__()
        own_buffers = [name for name, _ in hf_module.named_buffers(recurse=False)]
        if own_buffers:
            # a moved copy of a buffer would not reach the HF module: refuse rather than diverge silently
            raise ValueError(
                f"{type(hf_module).__name__} has buffers of its own ({own_buffers}); "
                "the pipeline can only share modules whose buffers live in submodules."
            )
        object.__setattr__(self, "hf", hf_module)
        for name, child in hf_module.named_children():
            self.add_module(name, child)
        for name, p in hf_module.named_parameters(recurse=False):
            self.register_parameter(name, p)

    def forward(self, x):
        return self.hf(x)


class EmbeddingPipe(_Adopted):
    """input_ids [B, T] -> hidden states [B, T, H]."""


class NormPipe(_Adopted):
    """The final norm."""


class HeadPipe(_Adopted):
    """hidden states -> logits (the untied LM head)."""


class DecoderLayerPipe(_Adopted):
    """One decoder layer on the hidden states alone: positions 0..T-1, the rotary embeddings computed here from
    the model's ``rotary_emb`` and a causal mask for the model's attention implementation."""

    def __init__(self, hf_layer: nn.Module, rotary_emb: nn.Module, config):
        super().__init__(hf_layer)
        object.__setattr__(self, "rotary_emb", rotary_emb)  # shared by every layer; its buffers are not weights
        object.__setattr__(self, "config", config)

    def forward(self, hidden):
        from transformers.masking_utils import create_causal_mask

        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        mask = create_causal_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=position_ids
        )
        return self.hf(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)


# The ds_config "pipeline" section these pipelines need under tensor parallelism: DeepSpeed would cut each
# activation over the tensor-parallel ranks between stages and cache the pieces' shapes from the first batch, so
# a batch of another length fails; whole activations (every tensor-parallel rank holds them anyway) do not
PIPE_CONFIG = {"pipe_partitioned": False, "grad_partitioned": False}

# Megatron-style tensor parallelism inside a decoder layer: these Linears are cut by output rows (column-parallel;
# attention by whole heads) and these by input columns (row-parallel, the partial outputs summed over the ranks)
COLUMN_PARALLEL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")


def tp_cut_dim(local: str) -> int | None:
    """The dimension along which a decoder layer's parameter (its local name, "self_attn.q_proj.weight") is cut
    over the tensor-parallel ranks: 0 (rows), 1 (columns), or None (held whole by every rank)."""
    module = local.rsplit(".", 1)[0]
    return 0 if module in COLUMN_PARALLEL else 1 if module in ROW_PARALLEL else None


class _ToTensorParallel(torch.autograd.Function):
    """Megatron's f: the input of a column-parallel layer; its gradient is summed over the tensor-parallel ranks
    (each rank's slice of the layer contributes a part of it)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        import deepspeed.comm as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _FromTensorParallel(torch.autograd.Function):
    """Megatron's g: a row-parallel layer's partial outputs summed over the tensor-parallel ranks."""

    @staticmethod
    def forward(ctx, x, group):
        import deepspeed.comm as dist

        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def to_tensor_parallel(x, group):
    """Megatron's f on x: the identity forward, the gradient summed over the tensor-parallel group."""
    return _ToTensorParallel.apply(x, group)


def from_tensor_parallel(x, group):
    """Megatron's g on x: the partial outputs summed over the tensor-parallel group, the identity backward."""
    return _FromTensorParallel.apply(x, group)


class _ParallelLinear(nn.Module):
    """This rank's slice of a bias-free Linear (weight [out, in]) along `dim`, marked tensor-parallel for
    DeepSpeed (its gradient norm) and the plugin (counted on every tensor-parallel rank)."""

    def __init__(self, linear: nn.Linear, dim: int, rank: int, size: int, group):
        super().__init__()
        part = linear.weight.shape[dim] // size
        self.weight = nn.Parameter(linear.weight.detach().narrow(dim, rank * part, part).clone())
        self.weight.tensor_model_parallel = True
        self.weight.partition_dim = dim
        self.dim, self.group = dim, group

    def forward(self, x):
        if self.dim == 0:
            return F.linear(to_tensor_parallel(x, self.group), self.weight)
        return from_tensor_parallel(F.linear(x, self.weight), self.group)


def cut_tensor_parallel(layer: nn.Module, config, rank: int, size: int, group) -> None:
    """Cut an HF Llama decoder layer in place for tensor-parallel rank `rank` of `size`: q/k/v by whole heads and
    gate/up by rows, o/down by the matching columns (Megatron's layout). Every rank cuts the same whole layer, so
    any size starts from the same weights."""
    checks = {
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
    }
    bad = {k: v for k, v in checks.items() if v % size}
    if bad or getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError(
            f"tensor parallelism {size}: the model's {bad or 'biases'} cannot be cut evenly; give a tensor-parallel "
            "size that divides the attention heads, the key/value heads and the intermediate size (no biases)."
        )
    for path in COLUMN_PARALLEL + ROW_PARALLEL:
        parent_name, name = path.split(".")
        parent = getattr(layer, parent_name)
        setattr(
            parent, name, _ParallelLinear(getattr(parent, name), 0 if path in COLUMN_PARALLEL else 1, rank, size, group)
        )


def _tied_head(embedding: nn.Module, hidden):
    """The tied LM head: logits from the embedding's weight."""
    return F.linear(hidden, embedding.weight)


def causal_lm_loss(logits, labels):
    """Shifted token cross-entropy averaged over labels != -100 (HF's ForCausalLMLoss without
    num_items_in_batch): position t's logits predict label t + 1."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    logits = logits.float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1).to(logits.device), ignore_index=IGNORE_INDEX
    )


def _check_model(model) -> None:
    missing = [
        a
        for a in ("model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head")
        if not _has(model, a)
    ]
    if missing:
        raise ValueError(
            f"build_pipeline_model: {type(model).__name__} has no {', '.join(missing)}; "
            "give a LlamaForCausalLM (model.embed_tokens, model.layers, model.norm, model.rotary_emb, lm_head)."
        )
    cfg = model.config
    if getattr(cfg, "sliding_window", None) or any(
        t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])
    ):
        raise ValueError(
            "build_pipeline_model: the model uses sliding-window attention; the pipeline layers build a full "
            "causal mask only. Use a Llama model (full attention)."
        )


def _has(obj, path: str) -> bool:
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def build_pipeline_model(
    model,
    num_stages: int,
    *,
    tensor_parallel: int = 1,
    seed_layers: bool = False,
    partition_method: str = "parameters",
    **pipe_kwargs,
):
    """A ``deepspeed.pipe.PipelineModule`` of ``model`` (an HF LlamaForCausalLM) in ``num_stages`` stages.

    The pipeline shares the HF model's parameter tensors (no copy), so pipelines of any stage count built
    from one HF model start identical; training the pipeline changes the HF model's parameters of this
    stage's layers (deep-copy the model first to keep it). The whole HF model stays referenced by the layer
    specs on every rank.

    ``partition_method="parameters"`` (DeepSpeed's default) balances trainable parameter counts, the embedding
    and the head counted: the 2-layer tiny Llama at 2 stages splits embedding + layer 0 | layer 1 + norm + head.
    (``"uniform"`` counts layers: 3 | 2 there, both decoder layers on stage 0.) ``dynamic_shape=True`` unless
    given: DeepSpeed otherwise sizes the inter-stage buffers once, from the first batch, and a batch of another
    sequence length fails or hangs. Other keyword arguments go to PipelineModule.

    ``tensor_parallel=T > 1``: Megatron-style tensor parallelism inside each stage (``cut_tensor_parallel``): the
    grid is DeepSpeed's ``PipeModelDataParallelTopology`` (stages x data-parallel ranks x T, T innermost), the
    engine's mpu. The HF model's decoder layers are cut in place: keep a deep copy to evaluate the whole model.
    """
    import deepspeed

    # deepspeed.pipe is DeepSpeed's public pipeline API (not an internal); `import deepspeed` loads it
    LayerSpec, TiedLayerSpec = deepspeed.pipe.LayerSpec, deepspeed.pipe.TiedLayerSpec
    _check_model(model)
    cfg = model.config
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    hf = model.model
    if tensor_parallel > 1:
        from ..shards.pipe import tensor_parallel_grid

        topology, tp_rank, tp_group = tensor_parallel_grid(num_stages, tensor_parallel)
        for layer in hf.layers[: cfg.num_hidden_layers]:
            cut_tensor_parallel(layer, cfg, tp_rank, tensor_parallel, tp_group)
        pipe_kwargs["topology"] = topology
    else:
        pipe_kwargs["num_stages"] = num_stages
    if tied:
        embed = TiedLayerSpec(TIE_KEY, EmbeddingPipe, hf.embed_tokens, tied_weight_attr="weight")
        head = TiedLayerSpec(TIE_KEY, EmbeddingPipe, hf.embed_tokens, forward_fn=_tied_head, tied_weight_attr="weight")
    else:
        embed = LayerSpec(EmbeddingPipe, hf.embed_tokens)
        head = LayerSpec(HeadPipe, model.lm_head)
    layers = [
        embed,
        *(LayerSpec(DecoderLayerPipe, layer, hf.rotary_emb, cfg) for layer in hf.layers[: cfg.num_hidden_layers]),
        LayerSpec(NormPipe, hf.norm),
        head,
    ]
    pipe_kwargs.setdefault("dynamic_shape", True)
    pipe = deepspeed.PipelineModule(
        layers=layers,
        loss_fn=causal_lm_loss,
        seed_layers=seed_layers,
        partition_method=partition_method,
        **pipe_kwargs,
    )
    pipe.hf_layout = (cfg.num_hidden_layers, tied)  # what hf_name_map needs to name this pipeline's parameters
    pipe.config = cfg  # a checkpoint saves it (hf/config.json): aim-ds convert names the layers from it
    return pipe


def hf_param_name(layer: int, local: str, num_hidden_layers: int, tied: bool) -> str:
    """The HF LlamaForCausalLM name of the parameter ``local`` of pipeline layer ``layer`` (also what that layer's
    checkpoint file ``layer_XX-...-model_states.pt`` calls it). A pure function of the layer layout."""
    last = num_hidden_layers + 2
    if layer == 0:
        return f"model.embed_tokens.{local}"
    if 1 <= layer <= num_hidden_layers:
        return f"model.layers.{layer - 1}.{local}"
    if layer == num_hidden_layers + 1:
        return f"model.norm.{local}"
    if layer == last and not tied:
        return f"lm_head.{local}"
    what = "the tied head (it has no parameters of its own)" if layer == last else "no layer"
    raise ValueError(
        f"pipeline layer {layer} ({local!r}) is {what} of a {num_hidden_layers}-layer "
        f"{'tied' if tied else 'untied'} Llama pipeline (layers 0..{last - tied}); "
        "check num_hidden_layers and tie_word_embeddings against the model that was saved."
    )


def hf_name_map(pipe) -> dict[str, str]:
    """{name in ``pipe.state_dict()`` (``"3.mlp.down_proj.weight"``, ``"tied_modules.embed.weight"``): HF name}
    for this rank's layers of a pipeline from build_pipeline_model."""
    layout = getattr(pipe, "hf_layout", None)
    if layout is None:
        raise ValueError("hf_name_map: the PipelineModule was not built by build_pipeline_model (no hf_layout).")
    num_hidden_layers, tied = layout
    return {name: hf_name(name, num_hidden_layers, tied) for name in pipe.state_dict()}


def hf_name(pipe_name: str, num_hidden_layers: int, tied: bool) -> str:
    """The HF name of a PipelineModule state name ("3.mlp.down_proj.weight", "tied_modules.embed.weight"), as
    checkpoint layouts record them. A pure function of the layer layout."""
    if m := _TIED_NAME.match(pipe_name):
        return hf_param_name(0, m.group(1), num_hidden_layers, tied)
    if m := _LAYER_NAME.match(pipe_name):
        return hf_param_name(int(m.group(1)), m.group(2), num_hidden_layers, tied)
    raise ValueError(f"unexpected PipelineModule state name {pipe_name!r} (not a layer's or a tied module's).")


def tie_head(sd: dict, tied: bool) -> dict:
    """An HF state dict with ``lm_head.weight`` (the embedding's tensor) when tied, as
    LlamaForCausalLM.state_dict() lists it."""
    if tied:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


def _tied_elsewhere(pipe, stage: int) -> set[str]:
    """The tie keys whose module stage ``stage`` holds but does not send: the tied embedding (layers 0 and L + 2)
    is sent once, by the first stage that holds it."""
    num_hidden_layers, tied = pipe.hf_layout
    if not tied:
        return set()
    owners = {pipe.stage_owner(0), pipe.stage_owner(num_hidden_layers + 2)}
    return {TIE_KEY} if stage in owners and stage != min(owners) else set()


def hf_cut_dim(name: str) -> int | None:
    """tp_cut_dim of an HF parameter name ("model.layers.3.mlp.down_proj.weight" -> 1)."""
    parts = name.split(".")
    return tp_cut_dim(".".join(parts[3:])) if name.startswith("model.layers.") and len(parts) > 3 else None


def gather_hf_state_dict(engine) -> dict[str, torch.Tensor]:
    """The whole model as an HF LlamaForCausalLM state dict (CPU tensors, the tied head included) on EVERY rank.

    Consolidates the whole model on each rank: each pipeline stage (its data-parallel rank 0; under tensor
    parallelism each of its tensor-parallel ranks, the cut parameters only after the first) broadcasts its
    layers' weights to the world as one byte buffer, and the tensor-parallel slices are joined. Every rank must
    call it. The weights are the module's (working precision), not the optimizer's fp32 masters.
    """
    import deepspeed.comm as dist

    pipe, grid = engine.module, engine.grid
    tp = grid.get_slice_parallel_world_size()
    names = hf_name_map(pipe)
    tied = pipe.hf_layout[1]
    me, my_tp = dist.get_rank(), grid.get_slice_parallel_rank()
    device = engine.device
    slices: dict[str, list[torch.Tensor]] = {}
    for stage in range(pipe.num_stages):
        for t in range(tp):
            src = grid.stage_to_global(stage_id=stage, data=0, **({"model": t} if tp > 1 else {}))
            meta, tensors = [None], []
            if me == src:
                skip = tuple(f"tied_modules.{key}." for key in _tied_elsewhere(pipe, stage))
                entries = [
                    (names[n], t_.detach())
                    for n, t_ in pipe.state_dict().items()
                    if not n.startswith(skip) and (my_tp == 0 or hf_cut_dim(names[n]) is not None)
                ]
                meta = [[(n, tuple(x.shape), str(x.dtype).removeprefix("torch.")) for n, x in entries]]
                tensors = [x for _, x in entries]
            dist.broadcast_object_list(meta, src=src)
            sizes = [
                torch.Size(shape).numel() * torch.empty((), dtype=getattr(torch, dt)).element_size()
                for _, shape, dt in meta[0]
            ]
            if me == src:
                flat = torch.cat([x.contiguous().reshape(-1).view(torch.uint8) for x in tensors]).to(device)
            else:
                flat = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
            dist.broadcast(flat, src=src)
            flat = flat.cpu()
            offset = 0
            for (name, shape, dt), size in zip(meta[0], sizes, strict=True):
                # a fresh copy: a byte view at an odd offset cannot be reinterpreted as a wider dtype
                slices.setdefault(name, []).append(
                    flat[offset : offset + size].clone().view(getattr(torch, dt)).reshape(shape)
                )
                offset += size
    out = {n: torch.cat(parts, hf_cut_dim(n)) if len(parts) > 1 else parts[0] for n, parts in slices.items()}
    return tie_head(out, tied)
