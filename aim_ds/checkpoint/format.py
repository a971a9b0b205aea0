"""The on-disk format of a checkpoint: names, tags, the manifest, `latest`, file checks, fingerprints.

Pure file-system reads and small durable writes; no process group needed (every rank may call these,
and so may the offline tools).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

from ..fileio import atomic_write_text, fsync_dir

MANIFEST = "aim_manifest.json"
FORMAT = "aim_ds-checkpoint"
VERSION = 1
HF_SUBDIR = "hf"
TMP_PREFIX = ".tmp-"
DEL_PREFIX = ".del-"
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that cannot be saved/loaded/converted as asked; the message names the file and the fix."""


# ---------------------------------------------------------------------------------------------- names
def plugin_file(rank: int, world: int) -> str:
    return f"aim_plugin_rank{rank:05d}_of_{world:05d}.pt"


def fingerprint(obj: Any) -> str:
    """A short stable hash of any JSON-able object (e.g. the task sequence: names, sizes, order, seed)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(engine) -> dict:
    """Class, parameter count and a hash of every parameter's name and full shape (also under ZeRO-3; under
    pipelines every stage's, so every rank calls it)."""
    from ..shards.checkpointing import engine_param_shapes

    params = engine_param_shapes(engine)
    count = sum(math.prod(s) for _, s in params)
    return {
        "class": type(engine.module).__name__,
        "param_count": int(count),
        "params_sha256": fingerprint(params),
        "params": params,
    }


def check_tag(tag: str) -> str:
    tag = str(tag)
    if not tag or "/" in tag or os.sep in tag or tag.startswith(".") or tag in (LATEST, "latest_universal"):
        raise CheckpointError(
            f"checkpoint tag {tag!r} is not usable: it must be a plain directory name that does "
            "not start with '.' (e.g. global_step100)."
        )
    return tag


def diff_config(saved: dict | None, now: dict | None, name=str) -> list[str]:
    """The keys whose values differ, as "key: checkpoint A, now B" (to check resume options against a
    manifest's); name(key) is how a key is written (e.g. as the command-line option that sets it)."""
    saved, now = saved or {}, now or {}
    return [
        f"{name(k)}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    ]


# ---------------------------------------------------------------------------------------------- small io


_UNCHECKED = object()


def check_compatible(
    tag_dir: str,
    manifest: dict,
    world_size: int | None = None,
    aim_merging=_UNCHECKED,
    task_fingerprint: str | None = None,
) -> None:
    """The identity checks of a checkpoint that need no engine: its world size, its aim_merging config (None:
    saved without a plugin) and its task fingerprint, each skipped when not given. Raises CheckpointError.
    load_checkpoint makes them too; a driver calls this first to refuse another run's checkpoint before it
    builds an engine."""
    mpath = os.path.join(tag_dir, MANIFEST)
    m = manifest
    if world_size is not None and m["world_size"] != world_size:
        load_dir, tag = os.path.split(os.path.normpath(tag_dir))
        raise CheckpointError(
            f"{mpath}: checkpoint was saved by {m['world_size']} ranks, this run has {world_size}. Reshard it first: "
            f"aim-ds reshard {load_dir} --tag {tag} --world-size {world_size} NEW_DIR, then load from NEW_DIR."
        )
    if aim_merging is not _UNCHECKED:
        if (m["aim_merging"] is None) != (aim_merging is None):
            raise CheckpointError(
                f"{mpath}: the checkpoint was saved {'without' if m['aim_merging'] is None else 'with'} an AimMerging "
                "plugin, this load is "
                + ("with" if aim_merging is not None else "without")
                + " one; pass plugin="
                + ("None." if aim_merging is not None else "the attached plugin.")
            )
        if aim_merging is not None and m["aim_merging"] != aim_merging:
            raise CheckpointError(
                f"{mpath}: the checkpoint was made with a different aim_merging config ("
                + "; ".join(diff_config(m["aim_merging"], aim_merging))
                + "). Resume with the "
                "aim_merging section the run started with."
            )
    if (
        task_fingerprint is not None
        and m.get("task_fingerprint") is not None
        and task_fingerprint != m["task_fingerprint"]
    ):
        raise CheckpointError(
            f"{mpath}: the checkpoint was made for another task sequence or training setup "
            f"(fingerprint {m['task_fingerprint']}, this run {task_fingerprint}); resume with the "
            "same benchmark, order, data, seed, model and training settings, or start a new output "
            "directory."
        )


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_synced(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def write_latest(ckpt_dir: str, tag: str) -> None:
    atomic_write_text(os.path.join(ckpt_dir, LATEST), tag, durable_dir=True)


def list_files(root: str) -> dict[str, int]:
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            p = os.path.join(d, name)
            out[os.path.relpath(p, root)] = os.path.getsize(p)
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------- manifest
def read_tag_manifest(tag_dir: str) -> dict:
    """The manifest inside one tag directory (CheckpointError when missing, unreadable or foreign)."""
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{path} is missing: {tag_dir} is not a complete aim_ds checkpoint (a save was "
            "interrupted, or it was written without aim_ds.checkpoint.save_checkpoint). Load "
            "another tag (see the 'latest' file) or save again."
        )
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
            m = read_tag_manifest(p)
        except CheckpointError:
            continue
        found.append((m.get("saved_at_ns", 0), name))
    return [n for _, n in sorted(found)]


def find_latest(ckpt_dir: str) -> str | None:
    """The tag `--resume auto` should load: the one `latest` names, or None when ckpt_dir holds no checkpoint.

    Raises CheckpointError when `latest` names a tag that is not a complete checkpoint.
    """
    latest = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(latest):
        tags = complete_tags(ckpt_dir)
        return tags[-1] if tags else None
    with open(latest) as f:
        tag = f.read().strip()
    tag_dir = os.path.join(ckpt_dir, tag)
    if tag and not os.path.isfile(os.path.join(tag_dir, MANIFEST)) and _finish_commit(ckpt_dir, tag):
        return tag
    if not tag or not os.path.isdir(tag_dir) or not os.path.isfile(os.path.join(tag_dir, MANIFEST)):
        have = complete_tags(ckpt_dir)
        raise CheckpointError(
            f"{latest} names tag {tag!r}, but {tag_dir} is not a complete checkpoint. "
            + (
                f"Complete tags there: {have}; pass one explicitly (--resume {os.path.join(ckpt_dir, have[-1])} or "
                f"tag={have[-1]!r}) or rewrite {latest}."
                if have
                else "There is no complete checkpoint there: "
                "start fresh (remove the directory) or point --resume elsewhere."
            )
        )
    return tag


def _finish_commit(ckpt_dir: str, tag: str) -> bool:
    """`latest` names TAG but TAG is gone: a save crashed between the two renames of its commit where the file
    system has no atomic exchange (NFS): TAG was moved aside to .del-TAG-N, the new version is still at .tmp-TAG.
    Finish the commit with .tmp-TAG when it is complete (its manifest is written last), else put the newest
    complete .del-TAG-N back. Several ranks may race here: a rename that loses finds TAG in place. True when
    TAG is complete afterwards."""
    final = os.path.join(ckpt_dir, tag)
    aside = f"{DEL_PREFIX}{tag}-"
    olds = [n for n in os.listdir(ckpt_dir) if n.startswith(aside) and n[len(aside) :].isdigit()]
    olds.sort(key=lambda n: int(n[len(aside) :]), reverse=True)
    for name in [TMP_PREFIX + tag, *olds]:
        src = os.path.join(ckpt_dir, name)
        if os.path.isfile(os.path.join(final, MANIFEST)):
            break
        if not os.path.isfile(os.path.join(src, MANIFEST)):
            continue
        try:
            os.rename(src, final)
            fsync_dir(ckpt_dir)
        except OSError:
            pass  # another rank moved it first, or TAG is in the way
    return os.path.isfile(os.path.join(final, MANIFEST))


def resolve_tag(ckpt_dir: str, tag: str | None) -> str:
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist; check the path.")
    if tag in (None, "auto", LATEST):
        t = find_latest(ckpt_dir)
        if t is None:
            raise CheckpointError(
                f"{ckpt_dir} holds no complete checkpoint (no 'latest' file and no tag with "
                f"{MANIFEST}); check the path or start fresh."
            )
        return t
    tag = str(tag)
    if not os.path.isdir(os.path.join(ckpt_dir, tag)):
        raise CheckpointError(
            f"checkpoint tag {tag!r} does not exist in {ckpt_dir} (complete tags: "
            f"{complete_tags(ckpt_dir)}); pass one of them."
        )
    return tag


def read_manifest(ckpt_dir: str, tag: str | None = None) -> dict:
    """The manifest of a checkpoint (tag None/"auto": the one `latest` names): world_size, aim_merging,
    plugin (enabled, task_index, merge_count), task_fingerprint, extra, global_steps, layout, files."""
    return read_tag_manifest(os.path.join(ckpt_dir, resolve_tag(ckpt_dir, tag)))


def check_files(tag_dir: str, manifest: dict, only=None) -> None:
    """Every file the manifest lists exists with its recorded size (a truncated write is caught here)."""
    for rel, size in manifest["files"].items():
        if only is not None and not only(rel):
            continue
        p = os.path.join(tag_dir, rel)
        if not os.path.isfile(p):
            raise CheckpointError(
                f"{p} is missing: the checkpoint {tag_dir} is incomplete. Restore the file or load an older tag."
            )
        actual = os.path.getsize(p)
        if actual != size:
            raise CheckpointError(
                f"{p} has {actual} bytes but the checkpoint recorded {size}: it is truncated or "
                "was overwritten. Restore the file or load an older tag."
            )


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
            raise CheckpointError(
                f"--resume {resume}: no complete checkpoint there (no 'latest', no tag with "
                f"{MANIFEST}); check the path, or use --resume auto."
            )
        return path, tag
    raise CheckpointError(
        f"--resume {resume}: no such directory; give a checkpoint directory, a tag directory or 'auto'."
    )
