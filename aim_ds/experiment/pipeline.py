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
    model, num_stages: int, *, seed_layers: bool = False, partition_method: str = "parameters", **pipe_kwargs
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
    """
    import deepspeed

    # deepspeed.pipe is DeepSpeed's public pipeline API (not an internal); `import deepspeed` loads it
    LayerSpec, TiedLayerSpec = deepspeed.pipe.LayerSpec, deepspeed.pipe.TiedLayerSpec
    _check_model(model)
    cfg = model.config
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    hf = model.model
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
        num_stages=num_stages,
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


def gather_hf_state_dict(engine) -> dict[str, torch.Tensor]:
    """The whole model as an HF LlamaForCausalLM state dict (CPU tensors, the tied head included) on EVERY rank.

    Consolidates the whole model on each rank: each pipeline stage (its data-parallel rank 0) broadcasts its
    layers' weights to the world as one byte buffer. Every rank must call it. The weights are the module's
    (working precision), not the optimizer's fp32 masters.
    """
    import deepspeed.comm as dist

    pipe, grid = engine.module, engine.grid
    if grid.get_slice_parallel_world_size() > 1:
        raise NotImplementedError(
            "gather_hf_state_dict: tensor-parallel slices (model parallel size "
            f"{grid.get_slice_parallel_world_size()}) are not joined; run the pipeline without tensor parallelism."
        )
    names = hf_name_map(pipe)
    tied = pipe.hf_layout[1]
    me = dist.get_rank()
    device = engine.device
    out: dict[str, torch.Tensor] = {}
    for stage in range(pipe.num_stages):
        src = grid.stage_to_global(stage_id=stage, data=0)
        meta, tensors = [None], []
        if me == src:
            skip = tuple(f"tied_modules.{key}." for key in _tied_elsewhere(pipe, stage))
            entries = [(names[n], t.detach()) for n, t in pipe.state_dict().items() if not n.startswith(skip)]
            meta = [[(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in entries]]
            tensors = [t for _, t in entries]
        dist.broadcast_object_list(meta, src=src)
        sizes = [
            torch.Size(shape).numel() * torch.empty((), dtype=getattr(torch, dt)).element_size()
            for _, shape, dt in meta[0]
        ]
        if me == src:
            flat = torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in tensors]).to(device)
        else:
            flat = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
        dist.broadcast(flat, src=src)
        flat = flat.cpu()
        offset = 0
        for (name, shape, dt), size in zip(meta[0], sizes, strict=True):
            # a fresh copy: a byte view at an odd offset cannot be reinterpreted as a wider dtype
            out[name] = flat[offset : offset + size].clone().view(getattr(torch, dt)).reshape(shape)
            offset += size
    return tie_head(out, tied)
