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

from ..experiment.pipeline import hf_param_name, tie_head
from .format import CheckpointError

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
    the layout needs must be there (layers 0..L+1, and L+2 untied), and no other; tensor-parallel slices are
    refused."""
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
    sliced = sorted(f for names in files.values() if len(names) > 1 for f in names)
    if sliced:
        raise CheckpointError(
            f"{ckpt_tag_dir}: tensor-parallel slices ({', '.join(sliced[:4])}{', ...' if len(sliced) > 4 else ''}) "
            "are not joined for pipeline checkpoints; save the pipeline without tensor parallelism."
        )
    out: dict[str, torch.Tensor] = {}
    for i in expected:
        path = os.path.join(ckpt_tag_dir, files[i][0])
        sd = torch.load(path, map_location="cpu", weights_only=True)
        out.update({hf_param_name(i, local, num_hidden_layers, tied): t for local, t in sd.items()})
    return tie_head(out, tied)
