"""Where a checkpointed run stands and how it continues: the driver's position, its RNG, its checks.

The checkpoint's identity (world size, aim_merging config, task fingerprint) is checked by
aim_ds.checkpoint.check_compatible; this module adds only what the driver alone knows (method, options,
global batches, memory selection). The data order is a pure function of (seed, task, global step) and the
memory selection of --seed, so a checkpoint records the seed and position and a hash of the selection.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import NamedTuple

from .args import InputError, RunConfig

CKPT_SUBDIR = "checkpoints"
DRIVER = "launch/train.py"  # the manifest's "driver" entry: checkpoints of other loops are refused


class ResumePoint(NamedTuple):
    load_dir: str
    tag: str
    manifest: dict

    @property
    def extra(self) -> dict:
        return self.manifest["extra"]

    @property
    def tag_dir(self) -> str:
        return os.path.join(self.load_dir, self.tag)

    @property
    def resharded(self) -> bool:
        return self.manifest.get("resharded_from") is not None


def resume_options(cfg: RunConfig) -> dict:
    """The options that decide the run's trajectory and do not depend on the number of ranks (a checkpoint
    resumes only with the same ones). Per-rank sizes (--batch-size, --memory-batch-size, --replay-rows) may
    change with the world size after `aim-ds reshard`; their global products are checked apart."""
    keys = (
        "benchmark",
        "data_dir",
        "order",
        "max_train",
        "max_eval",
        "memory_fraction",
        "method",
        "model",
        "tokenizer",
        "max_len",
        "seed",
        "epochs",
        "lr",
        "warmup",
        "fwt_reference",
        "memory_weight",
    )
    if cfg.lora:  # only LoRA runs add these, so the checkpoints of full fine-tuning keep their identity
        keys += ("lora", "lora_alpha", "lora_targets")
    return {k: getattr(cfg, k) for k in keys}


def global_batches(micro: int, mem_bs: int, replay_rows: int, world: int) -> dict:
    """What decides the trajectory at the global level: examples per training step, memory examples per
    probe/rehearsal step, memory rows mixed into each training step."""
    return {"batch": micro * world, "memory_batch": mem_bs * world, "replay_rows": replay_rows * world}


def resolve_resume_arg(cfg: RunConfig) -> tuple[RunConfig, ResumePoint | None]:
    """The ResumePoint --resume names (None: fresh start), and cfg with --output-dir filled in when --resume
    DIR implies it. Pure file reads: the same on every rank."""
    from aim_ds.checkpoint import MANIFEST, CheckpointError, read_manifest, resolve_resume

    if cfg.resume is None:
        return cfg, None
    if cfg.output_dir is None:  # --resume DIR: the run directory is the one holding DIR's checkpoints/
        path = os.path.abspath(cfg.resume)
        if os.path.isfile(os.path.join(path, MANIFEST)):
            path = os.path.dirname(path)
        if os.path.basename(path) != CKPT_SUBDIR:
            raise InputError(
                f"--resume {cfg.resume}: give --output-dir too (the checkpoint is not in a run's "
                f"{CKPT_SUBDIR}/ folder, so the driver cannot tell where the results go)"
            )
        cfg = dataclasses.replace(cfg, output_dir=os.path.dirname(path))
    try:
        found = resolve_resume(cfg.resume, os.path.join(cfg.output_dir, CKPT_SUBDIR))
        if found is None:
            return cfg, None
        manifest = read_manifest(*found)
    except CheckpointError as e:
        raise InputError(str(e)) from None
    if (manifest.get("extra") or {}).get("driver") != DRIVER:
        raise InputError(
            f"--resume {cfg.resume}: {os.path.join(*found)} was not saved by {DRIVER} "
            "(no driver state in its manifest); resume it with the loop that saved it"
        )
    return cfg, ResumePoint(found[0], found[1], manifest)


def check_resume_options(resume: ResumePoint, cfg: RunConfig, aim_cfg) -> None:
    """Refuse a checkpoint of another run (method, aim_merging config, options) before the process group
    starts: pure file reads, identical on every rank."""
    from aim_ds.checkpoint import MANIFEST, CheckpointError, check_compatible, diff_config

    where = os.path.join(resume.tag_dir, MANIFEST)
    if resume.extra["method"] != cfg.method:
        raise InputError(
            f"{where}: the checkpoint is of --method {resume.extra['method']}, this run is --method "
            f"{cfg.method}; resume with the options the run was started with"
        )
    try:
        check_compatible(resume.tag_dir, resume.manifest, aim_merging=aim_cfg.to_dict() if aim_cfg else None)
    except CheckpointError as e:
        raise InputError(str(e)) from None
    saved, now = resume.extra.get("options", {}), resume_options(cfg)
    diff = diff_config(saved, now, name=lambda k: "--" + k.replace("_", "-"))
    if diff:
        raise InputError(
            f"{where}: the checkpoint was made with other options ({'; '.join(diff)}); resume with the "
            "options the run was started with, or start a new --output-dir"
        )


def check_resume_manifest(
    resume: ResumePoint, world: int, task_fp: str, mem_sha: str, glob: dict, tp: int = 1, pp: int = 1
) -> None:
    """Refuse a checkpoint of another pipeline / tensor-parallel size / world size / global batch / data / setup
    before any engine is built."""
    from aim_ds.checkpoint import MANIFEST, CheckpointError, check_compatible

    where = os.path.join(resume.tag_dir, MANIFEST)
    saved_pp = (resume.manifest.get("layout") or {}).get("pp_size", 1)
    if saved_pp != pp:  # each rank's files hold its stage's layers: another cut of the layers cannot load them
        raise InputError(
            f"{where}: the checkpoint was saved with {saved_pp} pipeline stage(s), this run has {pp}; resume with "
            f"--pipeline-parallel-size {saved_pp}, or convert it (aim-ds convert) and start a new run from the "
            "Hugging Face folder"
        )
    saved_tp = (resume.manifest.get("layout") or {}).get("tp_size", 1)
    if saved_tp != tp:  # first: the weights are sliced per tensor-parallel rank, no reshard joins or cuts them
        raise InputError(
            f"{where}: the checkpoint was saved at tensor-parallel size {saved_tp}, this run has {tp}; resume "
            f"with tensor_parallel.autotp_size {saved_tp} in the ds_config (and a multiple of {saved_tp} ranks), "
            "or convert it (aim-ds convert) and start a new run from the Hugging Face folder"
        )
    try:  # the world size first: its error says to reshard, after which the per-rank sizes change
        check_compatible(resume.tag_dir, resume.manifest, world_size=world)
    except CheckpointError as e:
        raise InputError(
            f"{e} For the driver: --resume NEW_DIR/{resume.tag} --output-dir DIR on {world} ranks, with "
            "--batch-size / --memory-batch-size / --replay-rows that keep the global sizes "
            f"{resume.extra.get('global')} (launch/README.md, resuming on another number of ranks)"
        ) from None
    if "global" not in resume.extra:
        raise InputError(
            f"{where}: the checkpoint was saved by an earlier version of the driver (no global sizes in "
            "its manifest, another task fingerprint); resume it with that version, or start a new "
            "--output-dir"
        )
    try:
        saved = resume.extra["global"]
        if saved != glob:
            diff = "; ".join(f"{k} {saved.get(k)} vs {glob[k]}" for k in glob if saved.get(k) != glob[k])
            raise InputError(
                f"{where}: the checkpoint's global sizes differ from this run's (checkpoint vs now: "
                f"{diff}; per-rank size x ranks); choose --batch-size / --memory-batch-size / "
                "--replay-rows so that they match"
            )
        check_compatible(resume.tag_dir, resume.manifest, task_fingerprint=task_fp)
    except CheckpointError as e:
        raise InputError(str(e)) from None
    if resume.extra.get("memory_sha") != mem_sha:
        raise InputError(
            f"{where}: the memory buffer selected now differs from the checkpoint's (same seed and "
            "data, so aim_ds.data.select_memory changed); resume with the code version that saved it"
        )


def position_seed(seed: int, driver_step: int, rank: int) -> int:
    """The RNG seed of `rank` at a global position, for ranks whose saved streams do not exist (a resharded
    checkpoint has other ranks than the run that saved it)."""
    from aim_ds.checkpoint import fingerprint

    return int(fingerprint(["rng", seed, driver_step, rank])[:15], 16)


def seed_rank_rng(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def announce(resume: ResumePoint) -> None:
    e = resume.extra
    how = f", resharded from {resume.manifest['resharded_from']['world_size']} ranks" if resume.resharded else ""
    print(
        f"[aim_ds] resuming from {resume.tag_dir} (task {e['task']}, step {e['step']}"
        f"{', evaluated' if e['done'] else ''}{how})",
        flush=True,
    )


def announce_fresh(cfg: RunConfig) -> None:
    print(
        f"[aim_ds] --resume auto: no checkpoint under {os.path.join(cfg.output_dir, CKPT_SUBDIR)}; starting fresh",
        file=sys.stderr,
        flush=True,
    )
