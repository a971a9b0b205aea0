"""Checkpoints: atomic save/load of a DeepSpeed ZeRO-3 engine together with the AimMerging plugin,
conversion to a Hugging Face folder, and resharding to another number of ranks.

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

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import torch

from .fileio import atomic_write_text, fsync_dir as _fsync_dir

MANIFEST = "aim_manifest.json"
FORMAT = "aim_ds-checkpoint"
VERSION = 1
HF_SUBDIR = "hf"
TMP_PREFIX = ".tmp-"
DEL_PREFIX = ".del-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be saved/loaded/converted as asked; the message names the file and the fix."""


# ---------------------------------------------------------------------------------------------- names
def plugin_file(rank: int, world: int) -> str:
    return f"aim_plugin_rank{rank:05d}_of_{world:05d}.pt"


def fingerprint(obj: Any) -> str:
    """A short stable hash of any JSON-able object (e.g. the task sequence: names, sizes, order, seed)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_tag(tag: str) -> str:
    tag = str(tag)
    if not tag or "/" in tag or os.sep in tag or tag.startswith(".") or tag in ("latest", "latest_universal"):
        raise CheckpointError(f"checkpoint tag {tag!r} is not usable: it must be a plain directory name that does "
                              "not start with '.' (e.g. global_step100).")
    return tag


# ---------------------------------------------------------------------------------------------- small io
def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: str, text: str) -> None:
    atomic_write_text(path, text, durable_dir=True)


def _torch_save_synced(obj, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _list_files(root: str) -> dict[str, int]:
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            p = os.path.join(d, name)
            out[os.path.relpath(p, root)] = os.path.getsize(p)
    return dict(sorted(out.items()))


def _read_manifest(tag_dir: str) -> dict:
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: {tag_dir} is not a complete aim_ds checkpoint (a save was "
                              "interrupted, or it was written without aim_ds.checkpoint.save_checkpoint). Load "
                              "another tag (see the 'latest' file) or save again.")
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); the checkpoint is damaged: load another tag.") from None
    if m.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an aim_ds checkpoint manifest (format {m.get('format')!r}).")
    return m


def complete_tags(ckpt_dir: str) -> list[str]:
    """Complete checkpoints under ckpt_dir (have a manifest), oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        p = os.path.join(ckpt_dir, name)
        if name.startswith(".") or not os.path.isfile(os.path.join(p, MANIFEST)):
            continue
        try:
            m = _read_manifest(p)
        except CheckpointError:
            continue
        found.append((m.get("saved_at_ns", 0), name))
    return [n for _, n in sorted(found)]


def find_latest(ckpt_dir: str) -> str | None:
    """The tag `--resume auto` should load: the one `latest` names, or None when ckpt_dir holds no checkpoint.

    Raises CheckpointError when `latest` names a tag that is not a complete checkpoint.
    """
    latest = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(latest):
        tags = complete_tags(ckpt_dir)
        return tags[-1] if tags else None
    with open(latest) as f:
        tag = f.read().strip()
    tag_dir = os.path.join(ckpt_dir, tag)
    if not tag or not os.path.isdir(tag_dir) or not os.path.isfile(os.path.join(tag_dir, MANIFEST)):
        have = complete_tags(ckpt_dir)
        raise CheckpointError(
            f"{latest} names tag {tag!r}, but {tag_dir} is not a complete checkpoint. "
            + (f"Complete tags there: {have}; pass one explicitly (--resume {os.path.join(ckpt_dir, have[-1])} or "
               f"tag={have[-1]!r}) or rewrite {latest}." if have else "There is no complete checkpoint there: "
               "start fresh (remove the directory) or point --resume elsewhere."))
    return tag


def resolve_tag(ckpt_dir: str, tag: str | None) -> str:
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist; check the path.")
    if tag in (None, "auto", "latest"):
        t = find_latest(ckpt_dir)
        if t is None:
            raise CheckpointError(f"{ckpt_dir} holds no complete checkpoint (no 'latest' file and no tag with "
                                  f"{MANIFEST}); check the path or start fresh.")
        return t
    tag = str(tag)
    if not os.path.isdir(os.path.join(ckpt_dir, tag)):
        raise CheckpointError(f"checkpoint tag {tag!r} does not exist in {ckpt_dir} (complete tags: "
                              f"{complete_tags(ckpt_dir)}); pass one of them.")
    return tag


def read_manifest(ckpt_dir: str, tag: str | None = None) -> dict:
    """The manifest of a checkpoint (tag None/"auto": the one `latest` names): world_size, aim_merging,
    plugin (enabled, task_index, merge_count), task_fingerprint, extra, global_steps, layout, files."""
    return _read_manifest(os.path.join(ckpt_dir, resolve_tag(ckpt_dir, tag)))


def _check_files(tag_dir: str, manifest: dict, only=None) -> None:
    """Every file the manifest lists exists with its recorded size (a truncated write is caught here)."""
    for rel, size in manifest["files"].items():
        if only is not None and not only(rel):
            continue
        p = os.path.join(tag_dir, rel)
        if not os.path.isfile(p):
            raise CheckpointError(f"{p} is missing: the checkpoint {tag_dir} is incomplete. Restore the file or load "
                                  "an older tag.")
        actual = os.path.getsize(p)
        if actual != size:
            raise CheckpointError(f"{p} has {actual} bytes but the checkpoint recorded {size}: it is truncated or "
                                  "was overwritten. Restore the file or load an older tag.")


# ---------------------------------------------------------------------------------------------- layout
def engine_layout(engine) -> dict:
    """This run's ZeRO-3 partition layout: the optimizer sub-groups, each param's name, shape and numel."""
    import deepspeed.comm as dist

    if engine.zero_optimization_stage() < 3:  # stages 0-2: the shards adapter's flat layout
        from .shards import ZeroShards

        return ZeroShards(engine).layout()
    opt = engine.optimizer
    names = getattr(opt, "param_names", None) or {p: n for n, p in engine.module.named_parameters()}
    world = dist.get_world_size()
    groups = []
    for i, params in enumerate(opt.fp16_groups):
        groups.append({
            "param_group": int(opt.sub_group_to_group_id[i]),
            "partition_count": int(opt.sub_group_partition_counts[i]),
            "params": [[names[p], list(p.ds_shape), int(p.ds_numel), int(p.partition_numel())] for p in params],
        })
    return {"world_size": world, "sub_group_size": opt.sub_group_size, "sub_groups": groups}


def model_fingerprint(engine) -> dict:
    from .shards import logical_shape

    params = []
    for n, p in engine.module.named_parameters():
        shape = logical_shape(p)  # the same on every rank, also with tensor-parallel slices
        params.append([n, shape])
    count = sum(math.prod(s) for _, s in params)
    return {"class": type(engine.module).__name__, "param_count": int(count), "params_sha256": fingerprint(params),
            "params": params}


def _split_layout(layout: dict, world: int) -> dict:
    """The layout DeepSpeed builds for the same parameters on `world` ranks (its _create_fp16_sub_groups)."""
    by_group: dict[int, list] = {}
    for g in layout["sub_groups"]:
        by_group.setdefault(g["param_group"], []).extend(g["params"])
    size = layout["sub_group_size"]
    out = []
    for gid, params in by_group.items():
        params = [[n, s, numel, math.ceil(numel / world)] for n, s, numel, _ in params]
        total = sum(p[3] for p in params)
        if size is None or size >= total:
            chunks = [params]
        else:
            chunks, cur, acc = [], [], 0
            for j, p in enumerate(params):
                cur.append(p)
                acc += p[3]
                if acc >= size or j == len(params) - 1:
                    chunks.append(cur)
                    cur, acc = [], 0
        out += [{"param_group": gid, "partition_count": world, "params": c} for c in chunks]
    return {"world_size": world, "sub_group_size": size, "sub_groups": out}


def _flat_sizes(layout: dict) -> list[int]:
    return [sum(p[3] for p in g["params"]) for g in layout["sub_groups"]]


def _gather(shards_by_rank: list[list[torch.Tensor]], layout: dict) -> dict[str, torch.Tensor]:
    """Per-rank flat sub-group shards -> full flat fp32 tensor per parameter name."""
    if layout.get("kind") in ("flat", "replicated"):
        from .shards import gather_shards

        return gather_shards(shards_by_rank, layout)
    world = layout["world_size"]
    full: dict[str, torch.Tensor] = {}
    for gi, g in enumerate(layout["sub_groups"]):
        for n, _, numel, _ in g["params"]:
            full[n] = torch.zeros(numel, dtype=shards_by_rank[0][gi].dtype)
        for r in range(world):
            flat, off = shards_by_rank[r][gi], 0
            for n, _, numel, pn in g["params"]:
                k = max(0, min(pn, numel - r * pn))
                if k:
                    full[n][r * pn:r * pn + k] = flat[off:off + k]
                off += pn
    return full


def _scatter(full: dict[str, torch.Tensor], layout: dict) -> list[list[torch.Tensor]]:
    """Full per-parameter tensors -> per-rank flat sub-group shards (zero padding) for `layout`."""
    world = layout["world_size"]
    out = []
    for r in range(world):
        shards = []
        for g in layout["sub_groups"]:
            flat = torch.zeros(sum(p[3] for p in g["params"]), dtype=next(iter(full.values())).dtype)
            off = 0
            for n, _, numel, pn in g["params"]:
                k = max(0, min(pn, numel - r * pn))
                if k:
                    flat[off:off + k] = full[n][r * pn:r * pn + k]
                off += pn
            shards.append(flat)
        out.append(shards)
    return out


def _shard_lists(sd: dict, n_groups: int, path=()):
    """Paths in a plugin state dict whose value is a per-sub-group list of flat shard tensors."""
    for k, v in sd.items():
        if isinstance(v, dict):
            yield from _shard_lists(v, n_groups, path + (k,))
        elif isinstance(v, (list, tuple)) and v and all(torch.is_tensor(t) for t in v):
            if len(v) != n_groups:
                raise CheckpointError(f"plugin state entry {'.'.join(path + (k,))} has {len(v)} tensors for "
                                      f"{n_groups} sub-groups; cannot reshard it.")
            yield path + (k,)
        elif torch.is_tensor(v):
            raise CheckpointError(f"plugin state entry {'.'.join(path + (k,))} is a tensor that is not a list of "
                                  "per-sub-group shards; aim_ds.checkpoint does not know how to reshard it.")


def _get(sd, path):
    for k in path:
        sd = sd[k]
    return sd


def _set(sd, path, value):
    for k in path[:-1]:
        sd = sd[k]
    sd[path[-1]] = value


# ---------------------------------------------------------------------------------------------- agreement
def _agree(error: str | None) -> None:
    """Every rank raises the same CheckpointError when any rank found one (the lowest such rank's message).

    Two tiny collectives (an int all-reduce, then a 4 KiB broadcast only on error), reached by every rank.
    """
    import deepspeed.comm as dist

    from .statistics import comm_device

    rank, world = dist.get_rank(), dist.get_world_size()
    dev = comm_device()
    t = torch.tensor([rank if error is not None else world], dtype=torch.int64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    src = int(t.item())
    if src == world:
        return
    buf = torch.zeros(4096, dtype=torch.uint8, device=dev)
    if rank == src:
        data = error.encode()[:4096]
        buf[:len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    dist.broadcast(buf, src=src)
    msg = bytes(buf.cpu().tolist()).rstrip(b"\0").decode(errors="replace")
    raise CheckpointError(msg if rank == src else f"{msg} (found by rank {src})")


# ---------------------------------------------------------------------------------------------- save
# tests monkeypatch this to simulate a crash after every file of the temporary tag is written
def _before_commit(tmp_dir: str) -> None:
    return None


def save_checkpoint(engine, plugin, save_dir: str, tag: str | None = None, client_state: dict | None = None,
                    keep_last: int | None = None, task_fingerprint: str | None = None, tokenizer=None,
                    extra: dict | None = None) -> str:
    """Atomically save engine + plugin under save_dir/TAG; every rank calls it. Returns the tag directory.

    DeepSpeed writes to save_dir/.tmp-TAG; each rank adds its plugin state (aim_plugin_rank*_of_*.pt) and
    fsyncs its files; after a barrier rank 0 writes the model config (and tokenizer, if given), the
    manifest, renames .tmp-TAG to TAG and atomically rewrites `latest`. A crash at any point leaves the
    previous checkpoint (and `latest`) intact. keep_last=K keeps the K newest complete tags.
    client_state: per rank, stored by DeepSpeed in the rank's model_states file, returned by load_checkpoint.
    task_fingerprint: any string (see `fingerprint`); load_checkpoint refuses a different one.
    tokenizer: saved (rank 0) under TAG/hf/ so `aim-ds convert` includes it.
    extra: a small JSON-able dict (rank 0's) kept in the manifest; `read_manifest` returns it BEFORE any
    engine is built (e.g. the task index whose memory must be attached before load_checkpoint).
    """
    import deepspeed.comm as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    tag = _check_tag(tag if tag is not None else f"global_step{engine.global_steps}")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise CheckpointError(f"keep_last={keep_last!r}: expected an integer >= 1 (or None to keep all).")
    tmp_tag = TMP_PREFIX + tag
    tmp_dir = os.path.join(save_dir, tmp_tag)
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        if os.path.exists(tmp_dir):  # left by a crashed save of the same tag
            shutil.rmtree(tmp_dir)
    dist.barrier()
    engine.save_checkpoint(save_dir, tag=tmp_tag, client_state=dict(client_state or {}), save_latest=False)
    if plugin is not None:
        _torch_save_synced(plugin.state_dict(), os.path.join(tmp_dir, plugin_file(rank, world)))
    mine = f"zero_pp_rank_{rank}_"
    for name in os.listdir(tmp_dir):
        if mine in name:
            _fsync_file(os.path.join(tmp_dir, name))
    layout = engine_layout(engine)
    dist.barrier()  # every rank's files are durable
    final = os.path.join(save_dir, tag)
    if rank == 0:
        hf = os.path.join(tmp_dir, HF_SUBDIR)
        cfg = getattr(engine.module, "config", None)
        if cfg is not None and hasattr(cfg, "save_pretrained"):
            os.makedirs(hf, exist_ok=True)
            cfg.save_pretrained(hf)
        if tokenizer is not None:
            os.makedirs(hf, exist_ok=True)
            tokenizer.save_pretrained(hf)
        if os.path.isdir(hf):
            for name in os.listdir(hf):
                _fsync_file(os.path.join(hf, name))
        import deepspeed

        manifest = {
            "format": FORMAT, "version": VERSION, "tag": tag, "world_size": world, "universal": False,
            "global_steps": int(engine.global_steps), "saved_at_ns": time.time_ns(),
            "deepspeed_version": deepspeed.__version__,
            "aim_merging": plugin.config.to_dict() if plugin is not None else None,
            "plugin": None if plugin is None else {"enabled": bool(plugin.enabled), "task_index": plugin.task_index,
                                                   "merge_count": plugin.merge_count},
            "model": model_fingerprint(engine),
            "task_fingerprint": task_fingerprint,
            "extra": extra,
            "layout": layout,
            "files": _list_files(tmp_dir),
        }
        _torch_free_write_json(os.path.join(tmp_dir, MANIFEST), manifest)
        _fsync_dir(tmp_dir)
        _before_commit(tmp_dir)
        old = None
        if os.path.exists(final):  # re-saving an existing tag: move the old one aside first
            old = os.path.join(save_dir, f"{DEL_PREFIX}{tag}-{time.time_ns()}")
            os.rename(final, old)
        os.rename(tmp_dir, final)
        _fsync_dir(save_dir)
        _atomic_write_text(os.path.join(save_dir, "latest"), tag)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _prune(save_dir, keep_last, tag)
    else:
        _before_commit(tmp_dir)
    dist.barrier()
    return final


def _torch_free_write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _prune(save_dir: str, keep_last: int | None, current: str) -> None:
    # stale temporaries of crashed saves, half-deleted tags
    for name in os.listdir(save_dir):
        p = os.path.join(save_dir, name)
        if os.path.isdir(p) and (name.startswith(DEL_PREFIX) or (name.startswith(TMP_PREFIX) and name != TMP_PREFIX + current)):
            shutil.rmtree(p, ignore_errors=True)
    if keep_last is None:
        return
    tags = [t for t in complete_tags(save_dir) if t != current]
    for t in tags[:max(0, len(tags) - (keep_last - 1))]:
        p = os.path.join(save_dir, t)
        gone = os.path.join(save_dir, f"{DEL_PREFIX}{t}-{time.time_ns()}")
        os.rename(p, gone)  # atomic: never a half-deleted dir that looks complete
        shutil.rmtree(gone, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- load
def _diff_keys(a: dict | None, b: dict | None) -> list[str]:
    a, b = a or {}, b or {}
    return [f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _validate(engine, plugin, load_dir, tag, task_fingerprint, rank, world) -> tuple[str, dict]:
    tag = resolve_tag(load_dir, tag)
    tag_dir = os.path.join(load_dir, tag)
    m = _read_manifest(tag_dir)
    mpath = os.path.join(tag_dir, MANIFEST)
    if m["world_size"] != world:
        raise CheckpointError(
            f"{mpath}: checkpoint was saved by {m['world_size']} ranks, this run has {world}. Reshard it first: "
            f"aim-ds reshard {load_dir} --tag {tag} --world-size {world} NEW_DIR, then load from NEW_DIR.")
    live = engine_layout(engine)
    if live.get("tp_size", 1) != m["layout"].get("tp_size", 1):
        raise CheckpointError(f"{mpath}: checkpoint was saved at tensor-parallel size {m['layout'].get('tp_size', 1)}, "
                              f"this run has {live.get('tp_size', 1)}; resume with the tensor_parallel settings it was "
                              "saved with (aim_ds cannot reshard across tensor-parallel sizes).")
    now = model_fingerprint(engine)
    saved = m["model"]
    if saved["params_sha256"] != now["params_sha256"]:
        sp, np_ = {n: s for n, s in saved["params"]}, {n: s for n, s in now["params"]}
        diffs = [f"{n}: checkpoint {sp.get(n)}, model {np_.get(n)}" for n in list(sp) + [x for x in np_ if x not in sp]
                 if sp.get(n) != np_.get(n)]
        raise CheckpointError(
            f"{mpath}: the checkpoint is of another model ({saved['class']}, {saved['param_count']} parameters; this "
            f"engine: {now['class']}, {now['param_count']}); first differences: {diffs[:3]}. Build the model the run "
            "was started with (same model config).")
    cfg_now = plugin.config.to_dict() if plugin is not None else None
    if (m["aim_merging"] is None) != (cfg_now is None):
        raise CheckpointError(f"{mpath}: the checkpoint was saved {'without' if m['aim_merging'] is None else 'with'} "
                              "an AimMerging plugin, this load is " + ("with" if cfg_now is not None else "without") +
                              " one; pass plugin=" + ("None." if cfg_now is not None else "the attached plugin."))
    if cfg_now is not None and m["aim_merging"] != cfg_now:
        raise CheckpointError(f"{mpath}: the checkpoint was made with a different aim_merging config ("
                              + "; ".join(_diff_keys(m["aim_merging"], cfg_now)) + "). Resume with the aim_merging "
                              "section the run started with.")
    if task_fingerprint is not None and m.get("task_fingerprint") is not None \
            and task_fingerprint != m["task_fingerprint"]:
        raise CheckpointError(f"{mpath}: the checkpoint was made for another task sequence (fingerprint "
                              f"{m['task_fingerprint']}, this run {task_fingerprint}); resume with the same benchmark, "
                              "order, data and seed, or start a new output directory.")
    _check_files(tag_dir, m)
    if live["sub_groups"] != m["layout"]["sub_groups"]:
        raise CheckpointError(f"{mpath}: the saved ZeRO-3 partition layout differs from this engine's (sub_group_size "
                              f"{m['layout']['sub_group_size']} vs {live['sub_group_size']}, "
                              f"{len(m['layout']['sub_groups'])} vs {len(live['sub_groups'])} sub-groups); use the "
                              "zero_optimization settings the run was saved with.")
    if plugin is not None and plugin.enabled:
        pf = os.path.join(tag_dir, plugin_file(rank, world))
        if not os.path.isfile(pf):
            raise CheckpointError(f"{pf} is missing: the checkpoint has no plugin state for rank {rank}.")
    return tag, m


def load_checkpoint(engine, plugin, load_dir: str, tag: str | None = None, task_fingerprint: str | None = None,
                    load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True) -> dict:
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
    try:
        tag, manifest = _validate(engine, plugin, load_dir, tag, task_fingerprint, rank, world)
    except CheckpointError as e:
        err = str(e)
    except Exception as e:  # noqa: BLE001 - an unexpected failure on one rank must not hang the others
        err = f"checkpoint validation failed on rank {rank}: {type(e).__name__}: {e}"
    _agree(err)
    cfg = engine._config
    universal_before = cfg.load_universal_checkpoint
    if manifest["universal"]:
        cfg.load_universal_checkpoint = True
    try:
        path, client_state = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=load_optimizer_states,
                                                    load_lr_scheduler_states=load_lr_scheduler_states)
    finally:
        cfg.load_universal_checkpoint = universal_before
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {os.path.join(load_dir, tag)}.")
    if plugin is not None:
        sd = torch.load(os.path.join(load_dir, tag, plugin_file(rank, world)), map_location="cpu", weights_only=False)
        plugin.load_state_dict(sd)
    return dict(client_state or {})


# ---------------------------------------------------------------------------------------------- driver helpers
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


def resolve_resume(resume: str | None, default_dir: str) -> tuple[str, str] | None:
    """What `--resume` names, as (load_dir, tag), or None to start fresh.

    resume None -> None. "auto" -> the newest complete checkpoint in default_dir (None when there is none;
    CheckpointError when `latest` there is dangling). A directory holding `latest` (or tags) -> its latest;
    a tag directory (holding aim_manifest.json) -> that tag. Anything else -> CheckpointError.
    Pure file-system reads: call it on every rank, then load_checkpoint(engine, plugin, *result).
    """
    if resume is None:
        return None
    if resume == "auto":
        tag = find_latest(default_dir)
        return None if tag is None else (default_dir, tag)
    path = os.path.abspath(resume)
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return os.path.dirname(path), os.path.basename(path)
    if os.path.isdir(path):
        tag = find_latest(path)
        if tag is None:
            raise CheckpointError(f"--resume {resume}: no complete checkpoint there (no 'latest', no tag with "
                                  f"{MANIFEST}); check the path, or use --resume auto.")
        return path, tag
    raise CheckpointError(f"--resume {resume}: no such directory; give a checkpoint directory, a tag directory or "
                          "'auto'.")


# ---------------------------------------------------------------------------------------------- offline tools
def _prepare_out(out_dir: str) -> str:
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise CheckpointError(f"output directory {out_dir} exists and is not empty; choose a new one (nothing was "
                              "written).")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(dir=parent, prefix=TMP_PREFIX + os.path.basename(out_dir) + "-")


def _commit_out(tmp: str, out_dir: str) -> None:
    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty (checked before)
    os.rename(tmp, out_dir)
    _fsync_dir(os.path.dirname(out_dir))


def _open_offline(ckpt_dir: str, tag: str | None) -> tuple[str, dict]:
    tag = resolve_tag(ckpt_dir, tag)
    tag_dir = os.path.join(ckpt_dir, tag)
    m = _read_manifest(tag_dir)
    _check_files(tag_dir, m)
    return tag, m


def _load_plugin_states(tag_dir: str, m: dict) -> list[dict]:
    # mmap: a 13B run's shards are read page by page instead of all landing in host memory at once
    return [torch.load(os.path.join(tag_dir, plugin_file(r, m["world_size"])), map_location="cpu",
                       weights_only=False, mmap=True) for r in range(m["world_size"])]


def model_state_dict(ckpt_dir: str, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a checkpoint (DeepSpeed's zero_to_fp32 consolidation; universal: zero/*/fp32.pt)."""
    tag, m = _open_offline(ckpt_dir, tag)
    if m["universal"]:
        out = {}
        for g in m["layout"]["sub_groups"]:
            for n, shape, _, _ in g["params"]:
                t = torch.load(os.path.join(ckpt_dir, tag, "zero", n, "fp32.pt"), map_location="cpu",
                               weights_only=False)
                t = t["param"] if isinstance(t, dict) else t
                out[n] = t.reshape(shape).float()
        return out
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    # ZeRO-1/2 consolidation returns views of one flat tensor; safetensors needs each on its own storage
    return {k: v.clone() if v.untyped_storage().nbytes() > v.numel() * v.element_size() else v for k, v in sd.items()}


def anchor_state_dict(ckpt_dir: str, tag: str | None = None, key: str = "anchor") -> dict[str, torch.Tensor]:
    """The plugin's full anchor (per-parameter, fp32), reassembled from every rank's anchor shards."""
    tag, m = _open_offline(ckpt_dir, tag)
    tag_dir = os.path.join(ckpt_dir, tag)
    if not m.get("plugin") or not m["plugin"]["enabled"]:
        raise CheckpointError(f"{os.path.join(tag_dir, MANIFEST)}: the checkpoint has no plugin anchor (merging was "
                              "disabled or no plugin was saved); use --what model.")
    if m["plugin"]["task_index"] < 0:
        raise CheckpointError(f"{os.path.join(tag_dir, MANIFEST)}: saved before the first start_task(): there is "
                              "no anchor yet; use --what model.")
    states = _load_plugin_states(tag_dir, m)
    full = _gather([_get(s, (key,)) for s in states], m["layout"])
    shapes = {n: s for g in m["layout"]["sub_groups"] for n, s, _, _ in g["params"]}
    return {n: t.reshape(shapes[n]) for n, t in full.items()}


def convert(ckpt_dir: str, out_dir: str, tag: str | None = None, what: str = "model", config: str | None = None,
            tokenizer: str | None = None, dtype: str = "float32") -> str:
    """ZeRO-3 checkpoint -> Hugging Face folder (config.json, safetensors, tokenizer files). Returns out_dir."""
    if what not in ("model", "anchor"):
        raise CheckpointError(f"--what {what!r}: expected 'model' or 'anchor'.")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise CheckpointError(f"--dtype {dtype!r}: expected one of {sorted(dtypes)}.")
    out_abs = os.path.abspath(out_dir)
    if os.path.exists(out_abs) and (not os.path.isdir(out_abs) or os.listdir(out_abs)):
        raise CheckpointError(f"output directory {out_abs} exists and is not empty; choose a new one (nothing was "
                              "written).")
    tag, m = _open_offline(ckpt_dir, tag)
    tag_dir = os.path.join(ckpt_dir, tag)
    from transformers import AutoConfig

    hf = os.path.join(tag_dir, HF_SUBDIR)
    cfg_src = config or (hf if os.path.isfile(os.path.join(hf, "config.json")) else None)
    if cfg_src is None:
        raise CheckpointError(f"{os.path.join(hf, 'config.json')} is missing (the engine's module had no HF config "
                              "when saving); pass --config MODEL_CONFIG_OR_DIR.")
    if os.path.isfile(cfg_src):
        import transformers

        with open(cfg_src) as f:
            d = json.load(f)
        model_config = transformers.AutoConfig.for_model(**d)
    else:
        model_config = AutoConfig.from_pretrained(cfg_src)
    tok_src = tokenizer
    if tok_src is None:
        for cand in (hf, os.path.join(ckpt_dir, "tokenizer")):
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
            _fsync_file(os.path.join(tmp, name))
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
    out_abs = os.path.abspath(out_dir)
    if os.path.exists(out_abs) and (not os.path.isdir(out_abs) or os.listdir(out_abs)):
        raise CheckpointError(f"output directory {out_abs} exists and is not empty; choose a new one (nothing was "
                              "written).")
    tag, m = _open_offline(ckpt_dir, tag)
    if m["layout"].get("kind") in ("flat", "replicated"):
        raise CheckpointError(f"{os.path.join(ckpt_dir, tag)}: aim-ds reshard handles ZeRO-3 checkpoints; this one is of "
                              f"ZeRO stage 0-2 ({m['layout'].get('family')}). Resume it at its world size, or "
                              "convert it (aim-ds convert) and start a new run (nothing was written).")
    src = os.path.join(ckpt_dir, tag)
    tmp = _prepare_out(out_abs)
    try:
        dst = os.path.join(tmp, tag)
        if m["universal"]:
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("aim_plugin_rank*", MANIFEST))
        else:
            from deepspeed.checkpoint import ds_to_universal

            ns = argparse.Namespace(input_folder=src, output_folder=dst, num_extract_workers=1, num_merge_workers=1,
                                    keep_temp_folder=False, strict=True, inject_missing_state=False)
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):
                ds_to_universal.main(ns)
            if os.path.isdir(os.path.join(src, HF_SUBDIR)):
                shutil.copytree(os.path.join(src, HF_SUBDIR), os.path.join(dst, HF_SUBDIR))
            latest_u = os.path.join(tmp, "latest_universal")
            if os.path.exists(latest_u):
                os.unlink(latest_u)
        new_layout = _split_layout(m["layout"], world_size)
        if m.get("plugin") is not None:
            states = _load_plugin_states(src, m)
            new_states = _reshard_plugin(states, m["layout"], new_layout)
            for r, sd in enumerate(new_states):
                _torch_save_synced(sd, os.path.join(dst, plugin_file(r, world_size)))
        manifest = dict(m)
        manifest.update({"world_size": world_size, "universal": True, "layout": new_layout,
                         "saved_at_ns": time.time_ns(), "resharded_from": {"dir": os.path.abspath(ckpt_dir),
                                                                            "tag": tag,
                                                                            "world_size": m["world_size"]}})
        manifest["files"] = _list_files(dst)
        _torch_free_write_json(os.path.join(dst, MANIFEST), manifest)
        with open(os.path.join(tmp, "latest"), "w") as f:
            f.write(tag)
        _commit_out(tmp, out_abs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.join(out_abs, tag)


def _reshard_plugin(states: list[dict], old: dict, new: dict) -> list[dict]:
    n_old = len(old["sub_groups"])
    paths = list(_shard_lists(states[0], n_old)) if states[0].get("enabled") else []
    split = {}
    for p in paths:  # one full buffer at a time on the host
        split[p] = _scatter(_gather([_get(s, p) for s in states], old), new)
    out = []
    for r in range(new["world_size"]):
        base = states[min(r, len(states) - 1)]
        sd = {k: v for k, v in base.items()}
        for k in ("ema",):  # nested dicts of shard lists: shallow-copy before replacing entries
            if isinstance(sd.get(k), dict):
                sd[k] = dict(sd[k])
        if sd.get("enabled"):
            sd["rank"], sd["world_size"] = r, new["world_size"]
            sd["controller"] = states[0].get("controller") if r == 0 else None
        sd["trajectory"] = list(states[0]["trajectory"]) if r == 0 else []
        for p in paths:
            _set(sd, p, split[p][r])
        out.append(sd)
    return out


# ---------------------------------------------------------------------------------------------- CLI
class ConvertCommand:
    HELP = "convert an aim_ds/DeepSpeed ZeRO-3 checkpoint to a Hugging Face model folder (weights or anchor)"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="checkpoint directory (the one holding 'latest')")
        p.add_argument("out_dir", metavar="OUT_DIR", help="new (or empty) output folder")
        p.add_argument("--tag", default=None, help="checkpoint tag (default: the one 'latest' names)")
        p.add_argument("--what", choices=["model", "anchor"], default="model",
                       help="model: the trained weights; anchor: the plugin's merging anchor")
        p.add_argument("--config", default=None, help="model config.json or folder (default: saved with the checkpoint)")
        p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: saved with the checkpoint, if any)")
        p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")

    @staticmethod
    def run(args) -> int:
        out = convert(args.ckpt_dir, args.out_dir, tag=args.tag, what=args.what, config=args.config,
                      tokenizer=args.tokenizer, dtype=args.dtype)
        print(out)
        return 0


class ReshardCommand:
    HELP = "reshard a checkpoint to another number of ranks (DeepSpeed universal checkpoint + plugin shards)"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="checkpoint directory (the one holding 'latest')")
        p.add_argument("out_dir", metavar="OUT_DIR", help="new (or empty) checkpoint directory for the new world size")
        p.add_argument("--tag", default=None, help="checkpoint tag (default: the one 'latest' names)")
        p.add_argument("--world-size", type=int, required=True, help="number of data-parallel ranks to load it on")

    @staticmethod
    def run(args) -> int:
        print(reshard(args.ckpt_dir, args.out_dir, args.world_size, tag=args.tag))
        return 0


def main(argv=None) -> int:  # `python -m aim_ds.checkpoint convert|reshard ...` without the console script
    parser = argparse.ArgumentParser(prog="python -m aim_ds.checkpoint")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cmd in (("convert", ConvertCommand), ("reshard", ReshardCommand)):
        sp = sub.add_parser(name, help=cmd.HELP)
        cmd.add_arguments(sp)
        sp.set_defaults(_cmd=cmd)
    args = parser.parse_args(argv)
    try:
        return args._cmd.run(args)
    except ValueError as e:
        print(f"aim-ds {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
