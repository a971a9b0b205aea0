"""Saving and loading a live DeepSpeed ZeRO-3 engine together with its AimMerging plugin (every rank calls).

A save is atomic: DeepSpeed and the plugin write into SAVE_DIR/.tmp-TAG, every rank fsyncs its files,
rank 0 adds the model config, tokenizer and manifest, renames .tmp-TAG to TAG and only then rewrites
`latest`. A crash (or SIGKILL) at any point leaves the previous checkpoint and `latest` intact. A load
validates everything on every rank and agrees on one error before DeepSpeed's own collectives run.
"""

from __future__ import annotations

import os
import shutil
import time

import torch

from .. import shards
from ..fileio import exchange_paths, fsync_dir
from ..ops.collectives import agree
from .format import (
    DEL_PREFIX,
    FORMAT,
    HF_SUBDIR,
    MANIFEST,
    TMP_PREFIX,
    VERSION,
    CheckpointError,
    check_compatible,
    check_files,
    check_tag,
    complete_tags,
    fsync_file,
    list_files,
    model_fingerprint,
    plugin_file,
    read_tag_manifest,
    resolve_tag,
    write_json_synced,
    write_latest,
)
from .lora import save_adapter_config


class CheckpointSaveError(RuntimeError):
    """A save that failed on some rank (disk full, a write error), raised on every rank alike. Before the
    rename the previous checkpoint and `latest` are left as they were."""


def torch_save_synced(obj, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _failure(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------------- save
def save_checkpoint(
    engine,
    plugin,
    save_dir: str,
    tag: str | None = None,
    client_state: dict | None = None,
    keep_last: int | None = None,
    task_fingerprint: str | None = None,
    tokenizer=None,
    extra: dict | None = None,
) -> str:
    """Atomically save engine + plugin under save_dir/TAG; every rank calls it. Returns the tag directory.

    DeepSpeed writes to save_dir/.tmp-TAG; each rank adds its plugin state (aim_plugin_rank*_of_*.pt) and
    fsyncs its files; once every rank's files are durable rank 0 writes the model config (and tokenizer, if
    given), the manifest, renames .tmp-TAG to TAG and atomically rewrites `latest`. A crash at any point
    leaves the previous checkpoint (and `latest`) intact; a failure on any rank raises CheckpointSaveError on
    every rank. keep_last=K keeps the K newest complete tags.
    client_state: per rank, stored by DeepSpeed in the rank's model_states file, returned by load_checkpoint.
    task_fingerprint: any string (see `fingerprint`); load_checkpoint refuses a different one.
    tokenizer: saved (rank 0) under TAG/hf/ so `aim-ds convert` includes it.
    extra: a small JSON-able dict (rank 0's) kept in the manifest; `read_manifest` returns it BEFORE any
    engine is built (e.g. the task index whose memory must be attached before load_checkpoint).
    """
    import deepspeed.comm as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    tag = check_tag(tag if tag is not None else f"global_step{engine.global_steps}")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise CheckpointError(f"keep_last={keep_last!r}: expected an integer >= 1 (or None to keep all).")
    tmp_tag = TMP_PREFIX + tag
    tmp_dir = os.path.join(save_dir, tmp_tag)
    err = None
    if rank == 0:
        try:
            os.makedirs(save_dir, exist_ok=True)
            if os.path.exists(tmp_dir):  # left by a crashed save of the same tag
                shutil.rmtree(tmp_dir)
        except OSError as e:
            err = _failure(e)
    agree(err, exc_type=CheckpointSaveError)  # also the barrier: nobody writes into a stale .tmp-TAG
    engine.save_checkpoint(save_dir, tag=tmp_tag, client_state=dict(client_state or {}), save_latest=False)
    err = None
    try:
        if plugin is not None:
            torch_save_synced(plugin.state_dict(), os.path.join(tmp_dir, plugin_file(rank, world)))
        # every file of the tag, whatever DeepSpeed named it (stages 0-2 write mp_rank_XX_model_states.pt, and
        # under tensor parallelism names follow the data-parallel rank): one rank per host fsyncs them all (a
        # rank on each host, so that files on host-local disks are covered too); a clean file's fsync is cheap
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            for d, _, names in os.walk(tmp_dir):
                for name in names:
                    fsync_file(os.path.join(d, name))
    except Exception as e:  # noqa: BLE001 - reported on every rank instead of a hang in the next collective
        err = _failure(e)
    agree(err, exc_type=CheckpointSaveError)  # also the barrier: every rank's files are durable
    final = os.path.join(save_dir, tag)
    layout, model = _layout_and_model(engine)  # collectives under pipelines: on every rank, before rank 0 writes
    err = None
    if rank == 0:
        try:
            _write_rank0_files(engine, plugin, tmp_dir, tag, world, task_fingerprint, tokenizer, extra, layout, model)
            _commit(save_dir, tag, keep_last)
        except Exception as e:  # noqa: BLE001
            err = _failure(e)
    agree(err, exc_type=CheckpointSaveError)
    return final


def _layout_and_model(engine) -> tuple[dict, dict]:
    """The partition layout and the model's fingerprint, as the manifest records them; every rank calls it."""
    from ..shards.tp import param_slices

    layout = shards.engine_layout(engine)
    if layout.get("tp_size", 1) > 1:  # the frozen parameters' cuts too: aim-ds convert joins them as well
        layout["tp_slices"] = param_slices(engine.module)
    return layout, model_fingerprint(engine)


def _write_rank0_files(engine, plugin, tmp_dir, tag, world, task_fingerprint, tokenizer, extra, layout, model) -> None:
    """The model config (+ tokenizer) under hf/, then the manifest: the file whose presence makes a tag complete."""
    hf = os.path.join(tmp_dir, HF_SUBDIR)
    cfg = getattr(engine.module, "config", None)
    if cfg is not None and hasattr(cfg, "save_pretrained"):
        os.makedirs(hf, exist_ok=True)
        cfg.save_pretrained(hf)
    peft_config = getattr(engine.module, "peft_config", None)
    if isinstance(peft_config, dict) and peft_config:  # peft adapters: convert merges them with this config
        os.makedirs(hf, exist_ok=True)
        save_adapter_config(peft_config, hf)
    if tokenizer is not None:
        os.makedirs(hf, exist_ok=True)
        tokenizer.save_pretrained(hf)
    if os.path.isdir(hf):
        for name in os.listdir(hf):
            fsync_file(os.path.join(hf, name))
        fsync_dir(hf)  # the folder's entries: its files' names
    import deepspeed

    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "tag": tag,
        "world_size": world,
        "universal": False,
        "global_steps": int(engine.global_steps),
        "saved_at_ns": time.time_ns(),
        "deepspeed_version": deepspeed.__version__,
        "aim_merging": plugin.config.to_dict() if plugin is not None else None,
        "plugin": None
        if plugin is None
        else {"enabled": bool(plugin.enabled), "task_index": plugin.task_index, "merge_count": plugin.merge_count},
        "model": model,
        "task_fingerprint": task_fingerprint,
        "extra": extra,
        "layout": layout,
        "files": list_files(tmp_dir),
    }
    write_json_synced(os.path.join(tmp_dir, MANIFEST), manifest)
    fsync_dir(tmp_dir)


def _commit(save_dir: str, tag: str, keep_last: int | None) -> None:
    """Rank 0: the complete .tmp-TAG becomes TAG, then `latest` names it, then old tags are pruned."""
    tmp_dir, final = os.path.join(save_dir, TMP_PREFIX + tag), os.path.join(save_dir, tag)
    old = None
    if not os.path.exists(final):
        os.rename(tmp_dir, final)
    elif exchange_paths(tmp_dir, final):  # re-saving a tag `latest` may name: it stays complete throughout
        old = tmp_dir
    else:  # no atomic swap here: move the old one aside first
        old = os.path.join(save_dir, f"{DEL_PREFIX}{tag}-{time.time_ns()}")
        os.rename(final, old)
        os.rename(tmp_dir, final)
    fsync_dir(save_dir)
    write_latest(save_dir, tag)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _prune(save_dir, keep_last, tag)


def _prune(save_dir: str, keep_last: int | None, current: str) -> None:
    # stale temporaries of crashed saves (tag folders, `latest` rewrites), half-deleted tags
    for name in os.listdir(save_dir):
        p = os.path.join(save_dir, name)
        if name.startswith(DEL_PREFIX) or (name.startswith(TMP_PREFIX) and name != TMP_PREFIX + current):
            if os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)
    if keep_last is None:
        return
    tags = [t for t in complete_tags(save_dir) if t != current]
    for t in tags[: max(0, len(tags) - (keep_last - 1))]:
        p = os.path.join(save_dir, t)
        gone = os.path.join(save_dir, f"{DEL_PREFIX}{t}-{time.time_ns()}")
        os.rename(p, gone)  # atomic: never a half-deleted dir that looks complete
        shutil.rmtree(gone, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- load
def _validate(engine, plugin, load_dir, tag, task_fingerprint, rank, world, live, now) -> tuple[str, dict]:
    tag = resolve_tag(load_dir, tag)
    tag_dir = os.path.join(load_dir, tag)
    m = read_tag_manifest(tag_dir)
    mpath = os.path.join(tag_dir, MANIFEST)
    check_compatible(tag_dir, m, world_size=world)
    if live.get("pp_size", 1) != m["layout"].get("pp_size", 1):
        raise CheckpointError(
            f"{mpath}: checkpoint was saved with {m['layout'].get('pp_size', 1)} pipeline stage(s), this run has "
            f"{live.get('pp_size', 1)}; resume with the pipeline-parallel size it was saved with."
        )
    if live.get("tp_size", 1) != m["layout"].get("tp_size", 1):
        raise CheckpointError(
            f"{mpath}: checkpoint was saved at tensor-parallel size {m['layout'].get('tp_size', 1)}, "
            f"this run has {live.get('tp_size', 1)}; resume with the tensor_parallel settings it was "
            "saved with (aim_ds cannot reshard across tensor-parallel sizes)."
        )
    saved = m["model"]
    if saved["params_sha256"] != now["params_sha256"]:
        sp, np_ = {n: s for n, s in saved["params"]}, {n: s for n, s in now["params"]}
        diffs = [
            f"{n}: checkpoint {sp.get(n)}, model {np_.get(n)}"
            for n in list(sp) + [x for x in np_ if x not in sp]
            if sp.get(n) != np_.get(n)
        ]
        raise CheckpointError(
            f"{mpath}: the checkpoint is of another model ({saved['class']}, {saved['param_count']} parameters; this "
            f"engine: {now['class']}, {now['param_count']}); first differences: {diffs[:3]}. Build the model the run "
            "was started with (same model config)."
        )
    check_compatible(
        tag_dir,
        m,
        aim_merging=plugin.config.to_dict() if plugin is not None else None,
        task_fingerprint=task_fingerprint,
    )
    check_files(tag_dir, m)
    if live["sub_groups"] != m["layout"]["sub_groups"]:
        raise CheckpointError(
            f"{mpath}: the saved ZeRO-3 partition layout differs from this engine's (sub_group_size "
            f"{m['layout']['sub_group_size']} vs {live['sub_group_size']}, "
            f"{len(m['layout']['sub_groups'])} vs {len(live['sub_groups'])} sub-groups); use the "
            "zero_optimization settings the run was saved with."
        )
    if plugin is not None and plugin.enabled:
        pf = os.path.join(tag_dir, plugin_file(rank, world))
        if not os.path.isfile(pf):
            raise CheckpointError(f"{pf} is missing: the checkpoint has no plugin state for rank {rank}.")
    return tag, m


def load_checkpoint(
    engine,
    plugin,
    load_dir: str,
    tag: str | None = None,
    task_fingerprint: str | None = None,
    load_optimizer_states: bool = True,
    load_lr_scheduler_states: bool = True,
) -> dict:
    """Load a checkpoint written by `save_checkpoint` (or `reshard`) into a FRESH engine and its plugin.

    tag None / "auto" / "latest": the tag `latest` names. Every rank validates first (files, sizes, world
    size, model, aim_merging config, task fingerprint, partition layout) and all ranks raise the same
    CheckpointError before any other collective. Returns this rank's client_state ({} when none).
    Attach the plugin with the in-progress task's memory before loading (the memory cursors are restored);
    do not call plugin.start_task() again for that task.
    """
    import deepspeed.comm as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    err, manifest = None, None
    live, now = _layout_and_model(engine)  # collectives under pipelines: on every rank, before any can raise
    try:
        tag, manifest = _validate(engine, plugin, load_dir, tag, task_fingerprint, rank, world, live, now)
    except CheckpointError as e:
        err = str(e)
    except Exception as e:  # noqa: BLE001 - an unexpected failure on one rank must not hang the others
        err = f"checkpoint validation failed: {_failure(e)}"
    agree(err, exc_type=CheckpointError)
    with shards.universal_checkpoint_loading(engine, manifest["universal"]):
        path, client_state = engine.load_checkpoint(
            load_dir,
            tag=tag,
            load_optimizer_states=load_optimizer_states,
            load_lr_scheduler_states=load_lr_scheduler_states,
        )
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {os.path.join(load_dir, tag)}.")
    if plugin is not None:
        sd = torch.load(os.path.join(load_dir, tag, plugin_file(rank, world)), map_location="cpu", weights_only=False)
        plugin.load_state_dict(sd)
    return dict(client_state or {})


# ---------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """This rank's RNG states (python, numpy, torch CPU, accelerator): put it in save_checkpoint's client_state."""
    import random

    import numpy as np

    out = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned (on the same rank, after load_checkpoint)."""
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
