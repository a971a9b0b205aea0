"""Offline tools on a saved checkpoint (no process group): full weights and anchor, conversion to a Hugging
Face folder, resharding to another number of ranks. Each writes its output folder atomically (a temporary
sibling renamed into place) after one output-folder check."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import tempfile
import time

import torch

from ..fileio import check_output_dir, fsync_dir
from . import pipe, tp
from .format import (
    HF_SUBDIR,
    MANIFEST,
    TMP_PREFIX,
    CheckpointError,
    check_files,
    fsync_file,
    list_files,
    plugin_file,
    read_tag_manifest,
    resolve_tag,
    write_json_synced,
    write_latest,
)
from .layout import gather, get_path, reshard_plugin, split_layout
from .lora import merge_adapters, read_adapter_config
from .runtime import torch_save_synced


def _output_dir(out_dir: str) -> str:
    out_dir = os.path.abspath(out_dir)
    check_output_dir(out_dir, fix="choose a new output folder")
    return out_dir


def _prepare_out(out_dir: str) -> str:
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(dir=parent, prefix=TMP_PREFIX + os.path.basename(out_dir) + "-")


def _commit_out(tmp: str, out_dir: str) -> None:
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty (checked before); fails if something appeared there since
    os.rename(tmp, out_dir)
    fsync_dir(os.path.dirname(out_dir))


def _open_offline(ckpt_dir: str, tag: str | None) -> tuple[str, dict]:
    tag = resolve_tag(ckpt_dir, tag)
    tag_dir = os.path.join(ckpt_dir, tag)
    m = read_tag_manifest(tag_dir)
    check_files(tag_dir, m)
    return tag, m


def _load_plugin_states(tag_dir: str, m: dict) -> list[dict]:
    # mmap: a 13B run's shards are read page by page instead of all landing in host memory at once
    return [
        torch.load(
            os.path.join(tag_dir, plugin_file(r, m["world_size"])), map_location="cpu", weights_only=False, mmap=True
        )
        for r in range(m["world_size"])
    ]


def model_state_dict(ckpt_dir: str, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a checkpoint (DeepSpeed's zero_to_fp32 consolidation; universal: zero/*/fp32.pt;
    stage 0: the module's own state), frozen parameters included."""
    tag, m = _open_offline(ckpt_dir, tag)
    tag_dir = os.path.join(ckpt_dir, tag)
    if m["layout"].get("pp_size", 1) > 1:  # the layer files (frozen parameters too), then the fp32 masters
        layers, tied = _pipeline_shape(tag_dir)
        sd = pipe.pipeline_hf_state_dict(tag_dir, layers, tied)
        sd = {k: v.float() for k, v in sd.items()}
        sd.update(pipe.master_weights(tag_dir, m, layers, tied))
        return pipe.tie_head(sd, tied)
    if m["layout"].get("tp_size", 1) > 1 or m["layout"].get("kind") == "replicated":
        # tensor parallelism, and stage 0 (DeepSpeed's zero_to_fp32 reads stages 1-3 only): each tensor-parallel
        # rank's frozen slices are in its own module state, so they are added per rank before the joining
        local = tp.local_weights(tag_dir, m)
        return tp.whole([_with_frozen(sd, tag_dir, tp.model_states(t)) for t, sd in enumerate(local)], tag_dir, m)
    if m["universal"]:
        out = {}
        for g in m["layout"]["sub_groups"]:
            for n, shape, _, _ in g["params"]:
                t = torch.load(os.path.join(tag_dir, "zero", n, "fp32.pt"), map_location="cpu", weights_only=False)
                t = t["param"] if isinstance(t, dict) else t
                out[n] = t.reshape(shape).float()
        return _with_frozen(out, tag_dir)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    # ZeRO-1/2 consolidation returns views of one flat tensor; safetensors needs each on its own storage
    sd = {k: v.clone() if v.untyped_storage().nbytes() > v.numel() * v.element_size() else v for k, v in sd.items()}
    return _with_frozen(sd, tag_dir)


MODEL_STATES = "mp_rank_00_model_states.pt"  # stages 0-2: the module's whole state dict, on rank 0


def _with_frozen(
    sd: dict[str, torch.Tensor], tag_dir: str, model_states: str = MODEL_STATES
) -> dict[str, torch.Tensor]:
    """sd plus the frozen parameters (LoRA's base weights), which DeepSpeed's fp32 fragments leave out at
    stages 0-1 and a universal checkpoint leaves out entirely: taken from the module state DeepSpeed saved
    (stages 0-2: `model_states`, one file per tensor-parallel rank, each with that rank's slices) or from
    every rank's frozen fragments (ZeRO-3). A parameter found nowhere is refused."""
    import glob

    single = os.path.join(tag_dir, model_states)
    files = [single] if os.path.isfile(single) else glob.glob(os.path.join(tag_dir, "zero_pp_rank_*_model_states.pt"))
    files.sort(key=lambda f: int(os.path.basename(f).split("_")[3]) if f != single else 0)  # by rank
    if not files:
        return sd
    # mmap: only the tensors read here are paged in (stages 0-2 save the whole module on rank 0)
    states = [torch.load(f, map_location="cpu", weights_only=False, mmap=True) for f in files]
    frozen = states[0].get("frozen_param_shapes") or {}
    out = dict(sd)
    if files == [single]:
        module = states[0]["module"]
        out.update({k: v.float().clone() for k, v in module.items() if k not in out and v.is_floating_point()})
    else:  # ZeRO-3: rank r's fragment is elements [r*pn, (r+1)*pn) of the flattened parameter
        for name, shape in frozen.items():
            if name not in out:
                full = torch.cat([s["frozen_param_fragments"][name].reshape(-1) for s in states])
                out[name] = full[: shape.numel()].reshape(shape).float().clone()
    names = [n for group in states[0].get("param_shapes") or [] for n in group] + list(frozen)
    missing = [n for n in names if n not in out]
    if missing:
        raise CheckpointError(
            f"{tag_dir}: parameters {missing[:3]} ({len(missing)} in all) are in no file of the checkpoint; "
            "convert the checkpoint they were saved in (before aim-ds reshard), or pass the full model."
        )
    return out


def _shared_params(tag_dir: str) -> dict[str, str]:
    """DeepSpeed's record of tied weights in rank 0's module state: {second name: the name holding the data}
    (none recorded at stage 0 in fp32)."""
    for name in (MODEL_STATES, "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        path = os.path.join(tag_dir, name)
        if os.path.isfile(path):
            return torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("shared_params") or {}
    return {}


def anchor_state_dict(ckpt_dir: str, tag: str | None = None, key: str = "anchor") -> dict[str, torch.Tensor]:
    """The plugin's full anchor (per-parameter, fp32), reassembled from every rank's anchor shards."""
    tag, m = _open_offline(ckpt_dir, tag)
    tag_dir = os.path.join(ckpt_dir, tag)
    if not m.get("plugin") or not m["plugin"]["enabled"]:
        raise CheckpointError(
            f"{os.path.join(tag_dir, MANIFEST)}: the checkpoint has no plugin anchor (merging was "
            "disabled or no plugin was saved); use --what model."
        )
    if m["plugin"]["task_index"] < 0:
        raise CheckpointError(
            f"{os.path.join(tag_dir, MANIFEST)}: saved before the first start_task(): there is "
            "no anchor yet; use --what model."
        )
    states = _load_plugin_states(tag_dir, m)
    if m["layout"].get("pp_size", 1) > 1:
        return pipe.anchor_weights(states, m, key, *_pipeline_shape(tag_dir))
    if m["layout"].get("tp_size", 1) > 1:
        return tp.anchor(states, m, key, os.path.join(tag_dir, MANIFEST))
    full = gather([get_path(s, (key,)) for s in states], m["layout"])
    shapes = {n: s for g in m["layout"]["sub_groups"] for n, s, _, _ in g["params"]}
    return {n: t.reshape(shapes[n]) for n, t in full.items()}


def _pipeline_shape(tag_dir: str) -> tuple[int, bool]:
    """(num_hidden_layers, tie_word_embeddings) of a pipeline checkpoint's model, from its saved HF config: they
    name its layers."""
    cfg = _model_config(tag_dir, None)
    return int(cfg.num_hidden_layers), bool(getattr(cfg, "tie_word_embeddings", False))


def _model_config(tag_dir: str, config: str | None):
    from transformers import AutoConfig

    hf = os.path.join(tag_dir, HF_SUBDIR)
    src = config or (hf if os.path.isfile(os.path.join(hf, "config.json")) else None)
    if src is None:
        raise CheckpointError(
            f"{os.path.join(hf, 'config.json')} is missing (the engine's module had no HF config "
            "when saving); pass --config MODEL_CONFIG_OR_DIR."
        )
    if os.path.isfile(src):
        with open(src) as f:
            return AutoConfig.for_model(**json.load(f))
    return AutoConfig.from_pretrained(src)


def convert(
    ckpt_dir: str,
    out_dir: str,
    tag: str | None = None,
    what: str = "model",
    config: str | None = None,
    tokenizer: str | None = None,
    dtype: str = "float32",
) -> str:
    """ZeRO-3 checkpoint -> Hugging Face folder (config.json, safetensors, tokenizer files). Returns out_dir."""
    if what not in ("model", "anchor"):
        raise CheckpointError(f"--what {what!r}: expected 'model' or 'anchor'.")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise CheckpointError(f"--dtype {dtype!r}: expected one of {sorted(dtypes)}.")
    out_abs = _output_dir(out_dir)
    tag, m = _open_offline(ckpt_dir, tag)
    tag_dir = os.path.join(ckpt_dir, tag)
    model_config = _model_config(tag_dir, config)
    tok_src = tokenizer
    if tok_src is None:
        for cand in (os.path.join(tag_dir, HF_SUBDIR), os.path.join(ckpt_dir, "tokenizer")):
            if os.path.isdir(cand) and any(f.startswith("tokenizer") for f in os.listdir(cand)):
                tok_src = cand
                break
    sd = model_state_dict(ckpt_dir, tag)
    if what == "anchor":
        anchor = anchor_state_dict(ckpt_dir, tag)
        missing = [n for n in anchor if n not in sd]
        if missing:
            raise CheckpointError(f"anchor parameters {missing[:3]} are not in the model state of {tag_dir}.")
        sd = dict(sd)
        sd.update(anchor)  # frozen parameters (not in the optimizer) keep their never-changing model values
        # a tied weight's second name (a tied LM head) is the same parameter: the anchor's value, else the folder
        # holds two different tensors for it and from_pretrained unties them, keeping the trained head
        sd.update({name: anchor[src] for name, src in _shared_params(tag_dir).items() if src in anchor})
    # a LoRA run: the adapters folded into the base weights (plain HF names, no peft needed to load)
    sd = merge_adapters(sd, read_adapter_config(os.path.join(tag_dir, HF_SUBDIR)), tag_dir)
    sd = {k: (v.to(dtypes[dtype]) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    tmp = _prepare_out(out_abs)
    try:
        from huggingface_hub import save_torch_state_dict

        model_config.dtype = dtype
        model_config.save_pretrained(tmp)
        save_torch_state_dict(sd, tmp, max_shard_size="5GB", safe_serialization=True)
        if tok_src is not None:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tok_src).save_pretrained(tmp)
        for name in os.listdir(tmp):
            fsync_file(os.path.join(tmp, name))
        _commit_out(tmp, out_abs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_abs


def reshard(ckpt_dir: str, out_dir: str, world_size: int, tag: str | None = None) -> str:
    """A checkpoint for `world_size` ranks under out_dir/TAG (DeepSpeed universal checkpoint + the plugin's
    shards re-partitioned). Offline: no process group needed. Returns the new tag directory."""
    if not isinstance(world_size, int) or world_size < 1:
        raise CheckpointError(f"--world-size {world_size!r}: expected an integer >= 1.")
    out_abs = _output_dir(out_dir)
    tag, m = _open_offline(ckpt_dir, tag)
    if m["layout"].get("kind") in ("flat", "replicated"):
        raise CheckpointError(
            f"{os.path.join(ckpt_dir, tag)}: aim-ds reshard handles ZeRO-3 checkpoints; this one is "
            f"of ZeRO stage 0-2 ({m['layout'].get('family')}). Resume it at its world size, or "
            "convert it (aim-ds convert) and start a new run (nothing was written)."
        )
    src = os.path.join(ckpt_dir, tag)
    tmp = _prepare_out(out_abs)
    try:
        dst = os.path.join(tmp, tag)
        if m["universal"]:
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("aim_plugin_rank*", MANIFEST))
        else:
            _ds_to_universal(src, dst)
            if os.path.isdir(os.path.join(src, HF_SUBDIR)):
                shutil.copytree(os.path.join(src, HF_SUBDIR), os.path.join(dst, HF_SUBDIR))
            latest_u = os.path.join(tmp, "latest_universal")
            if os.path.exists(latest_u):
                os.unlink(latest_u)
        new_layout = split_layout(m["layout"], world_size)
        if m.get("plugin") is not None:
            states = _load_plugin_states(src, m)
            for r, sd in enumerate(reshard_plugin(states, m["layout"], new_layout)):
                torch_save_synced(sd, os.path.join(dst, plugin_file(r, world_size)))
        manifest = dict(m)
        manifest.update(
            {
                "world_size": world_size,
                "universal": True,
                "layout": new_layout,
                "saved_at_ns": time.time_ns(),
                "resharded_from": {"dir": os.path.abspath(ckpt_dir), "tag": tag, "world_size": m["world_size"]},
            }
        )
        manifest["files"] = list_files(dst)
        write_json_synced(os.path.join(dst, MANIFEST), manifest)
        write_latest(tmp, tag)
        _commit_out(tmp, out_abs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.join(out_abs, tag)


def _ds_to_universal(src: str, dst: str) -> None:
    from deepspeed.checkpoint import ds_to_universal

    ns = argparse.Namespace(
        input_folder=src,
        output_folder=dst,
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        ds_to_universal.main(ns)


# ---------------------------------------------------------------------------------------------- aim-ds commands
def _add_source_and_output(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="checkpoint directory (the one holding 'latest')")
    p.add_argument("out_dir", metavar="OUT_DIR", help=out_help)
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the one 'latest' names)")


class ConvertCommand:
    HELP = (
        "convert an aim_ds/DeepSpeed checkpoint (ZeRO stages 0-3, tensor-parallel, LoRA adapters merged) to a "
        "Hugging Face model folder (weights or anchor)"
    )

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        _add_source_and_output(p, "new (or empty) output folder")
        p.add_argument(
            "--what",
            choices=["model", "anchor"],
            default="model",
            help="model: the trained weights; anchor: the plugin's merging anchor",
        )
        p.add_argument(
            "--config", default=None, help="model config.json or folder (default: saved with the checkpoint)"
        )
        p.add_argument(
            "--tokenizer", default=None, help="tokenizer folder (default: saved with the checkpoint, if any)"
        )
        p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")

    @staticmethod
    def run(args) -> int:
        print(
            convert(
                args.ckpt_dir,
                args.out_dir,
                tag=args.tag,
                what=args.what,
                config=args.config,
                tokenizer=args.tokenizer,
                dtype=args.dtype,
            )
        )
        return 0


class ReshardCommand:
    HELP = "reshard a checkpoint to another number of ranks (DeepSpeed universal checkpoint + plugin shards)"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        _add_source_and_output(p, "new (or empty) checkpoint directory for the new world size")
        p.add_argument("--world-size", type=int, required=True, help="number of data-parallel ranks to load it on")

    @staticmethod
    def run(args) -> int:
        print(reshard(args.ckpt_dir, args.out_dir, args.world_size, tag=args.tag))
        return 0
