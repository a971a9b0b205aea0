"""Checkpoints: atomic save/load of a DeepSpeed ZeRO-3 engine together with the AimMerging plugin,
conversion to a Hugging Face folder, and resharding to another number of ranks.

    format   names, tags, the manifest, `latest`, file checks, fingerprints (file system only)
    layout   partition arithmetic: gather / scatter / re-split of flat per-rank shards (offline)
    runtime  save_checkpoint / load_checkpoint around DeepSpeed's own calls (every rank)
    offline  convert / reshard (`aim-ds convert`, `aim-ds reshard`)

The ZeRO-3 internals a checkpoint records (the partition layout, full parameter shapes) are read by
aim_ds.shards, like every other DeepSpeed internal.

On-disk layout (SAVE_DIR is what `save_checkpoint` is given)::

    SAVE_DIR/
      latest                                   tag of the newest COMPLETE checkpoint (atomic rewrite)
      zero_to_fp32.py                          DeepSpeed's recovery script (written by DeepSpeed)
      TAG/                                     one complete checkpoint (renamed into place last)
        zero_pp_rank_R_mp_rank_00_model_states.pt     DeepSpeed, per rank (client_state inside)
        *zero_pp_rank_R_mp_rank_00_optim_states.pt    DeepSpeed, per rank (fp32 master + Adam moments)
        aim_plugin_rankRRRRR_of_WWWWW.pt              torch.save(plugin.state_dict()) of rank R (anchor
                                                      shards; rank 0 also controller state + trajectory)
        hf/config.json  [hf/tokenizer files]          the model config (and tokenizer) for `convert`
        aim_manifest.json                             rank 0, written last: world size, aim_merging config,
                                                      model fingerprint, task fingerprint, partition
                                                      layout, every file with its size
      .tmp-TAG/                                 a save in progress (never named by `latest`)

A resharded checkpoint (`aim-ds reshard`) has the same layout, but its DeepSpeed part is a universal
checkpoint (TAG/zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt + the model_states files) and its manifest
says "universal": true; `load_checkpoint` then loads it with DeepSpeed's universal loader by itself
(no "checkpoint": {"load_universal": true} needed in the ds_config).

Resharding is explicit (`aim-ds reshard`, or `reshard()`), never automatic on load: a checkpoint of
another world size is refused by `load_checkpoint` with the command to run.
"""

from __future__ import annotations

from ..shards import engine_layout
from .format import (
    DEL_PREFIX,
    FORMAT,
    HF_SUBDIR,
    MANIFEST,
    TMP_PREFIX,
    VERSION,
    CheckpointError,
    check_compatible,
    complete_tags,
    diff_config,
    find_latest,
    fingerprint,
    model_fingerprint,
    plugin_file,
    read_manifest,
    resolve_resume,
    resolve_tag,
)
from .offline import ConvertCommand, ReshardCommand, anchor_state_dict, convert, model_state_dict, reshard
from .runtime import CheckpointSaveError, load_checkpoint, rng_state, save_checkpoint, set_rng_state

__all__ = [
    "DEL_PREFIX",
    "FORMAT",
    "HF_SUBDIR",
    "MANIFEST",
    "TMP_PREFIX",
    "VERSION",
    "CheckpointError",
    "CheckpointSaveError",
    "ConvertCommand",
    "check_compatible",
    "ReshardCommand",
    "anchor_state_dict",
    "complete_tags",
    "convert",
    "diff_config",
    "engine_layout",
    "find_latest",
    "fingerprint",
    "load_checkpoint",
    "model_fingerprint",
    "model_state_dict",
    "plugin_file",
    "read_manifest",
    "reshard",
    "resolve_resume",
    "resolve_tag",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]
