"""Pipeline-parallel checkpoints (DeepSpeed PipelineEngine.save_checkpoint of a pipeline from
aim_ds.experiment.pipeline.build_pipeline_model) joined offline into one Hugging Face state dict.

DeepSpeed writes each pipeline layer's module state to its own file in the tag folder,
``layer_XX-model_states.pt`` (``layer_XX-model_YY-model_states.pt`` with tensor-parallel rank YY), holding that
layer's local names (``self_attn.q_proj.weight``). Layer XX's HF names come from
aim_ds.experiment.pipeline.hf_param_name. A tied checkpoint has no file for the head (it is the embedding,
saved with layer 0). No process group needed.
"""

from __future__ import annotations

import os
import re

import torch

from ..experiment.pipeline import hf_name, hf_param_name, tie_head, tp_cut_dim
from .format import CheckpointError
from .layout import gather

_LAYER_FILE = re.compile(r"^layer_(\d+)-(?:model_(\d+)-)?model_states\.pt$")


def layer_file(layer: int) -> str:
    """Layer ``layer``'s file name without tensor parallelism, as DeepSpeed names it."""
    return f"layer_{layer:02d}-model_states.pt"


def _layer_files(tag_dir: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for name in sorted(os.listdir(tag_dir)):
        if m := _LAYER_FILE.match(name):
            out.setdefault(int(m.group(1)), []).append(name)
    return out


def pipeline_hf_state_dict(ckpt_tag_dir: str, num_hidden_layers: int, tied: bool) -> dict[str, torch.Tensor]:
    """The HF LlamaForCausalLM state dict (CPU tensors, ``lm_head.weight`` the embedding's when tied) of the
    pipeline checkpoint in ``ckpt_tag_dir`` (the tag folder DeepSpeed's save_checkpoint wrote). Every layer file
    the layout needs must be there (layers 0..L+1, and L+2 untied), and no other; tensor-parallel slices (one
    file per tensor-parallel rank) are joined along each parameter's cut (``tp_cut_dim``)."""
    if not os.path.isdir(ckpt_tag_dir):
        raise CheckpointError(f"{ckpt_tag_dir}: no such checkpoint folder; give the tag folder of a pipeline save.")
    files = _layer_files(ckpt_tag_dir)
    expected = range(num_hidden_layers + (2 if tied else 3))
    missing = [layer_file(i) for i in expected if i not in files]
    if missing:
        raise CheckpointError(
            f"{ckpt_tag_dir}: pipeline layer file(s) {', '.join(missing)} missing (a {num_hidden_layers}-layer "
            f"{'tied' if tied else 'untied'} Llama has layer files 0..{expected[-1]}); copy the complete save, "
            "or check num_hidden_layers and tie_word_embeddings against the saved model."
        )
    extra = sorted(f for i, names in files.items() if i not in expected for f in names)
    if extra:
        raise CheckpointError(
            f"{ckpt_tag_dir}: layer file(s) {', '.join(extra)} beyond a {num_hidden_layers}-layer "
            f"{'tied' if tied else 'untied'} Llama pipeline (layer files 0..{expected[-1]}); check num_hidden_layers "
            "and tie_word_embeddings against the saved model."
        )
    counts = {len(files[i]) for i in expected}
    odd = [
        f
        for i in expected
        for f in files[i]
        if len(counts) > 1
        or (
            len(files[i]) > 1
            and files[i] != [f"layer_{i:02d}-model_{t:02d}-model_states.pt" for t in range(len(files[i]))]
        )
    ]
    if odd:
        raise CheckpointError(
            f"{ckpt_tag_dir}: the layer files do not form one tensor-parallel layout ({', '.join(odd[:4])}): every "
            "layer needs the same files, model_00 .. model_{T-1} (or one file without tensor parallelism); copy the "
            "complete save."
        )
    out: dict[str, torch.Tensor] = {}
    for i in expected:
        # one file per tensor-parallel rank (model_YY, in rank order): a decoder layer's cut parameters joined
        parts = [torch.load(os.path.join(ckpt_tag_dir, f), map_location="cpu", weights_only=True) for f in files[i]]
        for local, t in parts[0].items():
            dim = tp_cut_dim(local) if 1 <= i <= num_hidden_layers else None
            joined = torch.cat([p[local] for p in parts], dim) if dim is not None and len(parts) > 1 else t
            out[hf_param_name(i, local, num_hidden_layers, tied)] = joined
    return tie_head(out, tied)


def _by_stage(layout: dict, parts_of_rank, positions: list[dict]) -> dict[str, torch.Tensor]:
    """Every stage's flat sub-group shards joined into whole parameters (by pipeline name, flat). positions: each
    rank's {pp_rank, dp_rank}; parts_of_rank(r): rank r's per-sub-group flat shards."""
    full: dict[str, torch.Tensor] = {}
    for stage in range(layout["pp_size"]):
        groups = [g for g in layout["sub_groups"] if g["stage"] == stage]
        ranks = sorted((p["dp_rank"], r) for r, p in enumerate(positions) if p["pp_rank"] == stage)
        full.update(gather([parts_of_rank(r) for _, r in ranks], {**layout, "sub_groups": groups}))
    return full


def _hf(full: dict[str, torch.Tensor], layout: dict, num_hidden_layers: int, tied: bool) -> dict[str, torch.Tensor]:
    shapes = {n: s for g in layout["sub_groups"] for n, s, _, _ in g["params"]}
    return {hf_name(n, num_hidden_layers, tied): t.reshape(shapes[n]) for n, t in full.items()}


def master_weights(tag_dir: str, manifest: dict, num_hidden_layers: int, tied: bool) -> dict[str, torch.Tensor]:
    """The fp32 masters of a ZeRO-1 pipeline checkpoint by HF name, from each stage's optimizer partitions
    (zero_pp_rank_D_mp_rank_SS_optim_states.pt: data-parallel rank D of stage SS). Exact where the layer files
    hold a lower precision (bf16 training). Stage 0 (no partitions) and tensor-parallel pipelines: {} (the layer
    files are the weights, in the training precision)."""
    layout = manifest["layout"]
    if layout.get("kind") != "flat" or layout.get("tp_size", 1) > 1:
        return {}  # under tensor parallelism the layout records no offsets: the layer files are the weights
    pp, world = layout["pp_size"], manifest["world_size"]
    dp = world // pp
    positions = [{"pp_rank": r // dp, "dp_rank": r % dp} for r in range(world)]  # DeepSpeed's pipe-outermost grid

    def parts(r: int):
        pos = positions[r]
        path = os.path.join(tag_dir, f"zero_pp_rank_{pos['dp_rank']}_mp_rank_{pos['pp_rank']:02d}_optim_states.pt")
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing: the checkpoint has no fp32 partition for that rank.")
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]
        return [t.float() for t in state["single_partition_of_fp32_groups"]]

    return _hf(_by_stage(layout, parts, positions), layout, num_hidden_layers, tied)


def anchor_weights(states: list[dict], manifest: dict, key: str, num_hidden_layers: int, tied: bool) -> dict:
    """The plugin's anchor (or another per-sub-group shard list under `key`) of a pipeline checkpoint by HF
    name, joined per stage from every rank's plugin state (each names its stage and data-parallel rank)."""
    layout = manifest["layout"]
    if layout.get("tp_size", 1) > 1:
        raise CheckpointError(
            "aim_merging: the anchor of a pipeline with tensor parallelism is not joined (its layout records no "
            "partition offsets); convert the model (--what model), or resume the run to use the anchor."
        )
    positions = [s["position"] for s in states]
    full = _by_stage(layout, lambda r: states[r][key], positions)
    return tie_head(_hf(full, layout, num_hidden_layers, tied), tied)
