"""The driver's set-up and entry point: checks, process group, tokenizer, data, sizes, fingerprints, the
FWT reference, then the method's training and the results.

Everything that can be checked without collectives is checked first and identically on every rank, so a
bad input gives the same one-line error everywhere before any collective can hang."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import socket
import sys
import time
from typing import NamedTuple

from .args import (
    MIXING_METHODS,
    InputError,
    RunConfig,
    apply_aim_overrides,
    check_output_dir,
    load_ds_config,
    parse_args,
    plugin_config,
)
from .batching import BatchSizes
from .lock import LOCK_NAME, LockError, OutputLock, check_free
from .resume import (
    CKPT_SUBDIR,
    announce,
    announce_fresh,
    check_resume_manifest,
    check_resume_options,
    global_batches,
    resolve_resume_arg,
    resume_options,
)


def main(argv=None, t0: float | None = None) -> int:
    """t0: the process start, so wall_time_s includes the imports before this call."""
    t0 = time.time() if t0 is None else t0
    from aim_ds.checkpoint import CheckpointError

    try:
        return run(parse_args(argv), t0)
    except (InputError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


def data_fingerprint(tasks) -> str:
    h = hashlib.sha256()
    for t in tasks:
        h.update(f"{t.name}|{t.metric}|{t.labels}\n".encode())
        for split in (t.train, t.eval):
            for e in split:
                h.update(f"{e.id}\x00{e.input}\x00{e.output}\n".encode())
    return h.hexdigest()


def tp_size(ds_config: dict) -> int:
    """AutoTP's tensor-parallel size (1 without a tensor_parallel section)."""
    return max(1, int((ds_config.get("tensor_parallel") or {}).get("autotp_size") or 1))


class CheckedInputs(NamedTuple):
    """What the collective-free checks established (check_inputs)."""

    cfg: RunConfig  # with --resume resolved
    ds_config: dict  # with the --aim overrides applied
    aim_cfg: object  # the plugin's AimConfig (ForeverConfig for forever), or None for a method without the plugin
    resume: object  # the ResumePoint, or None for a fresh run
    tasks: list


def check_inputs(cfg: RunConfig) -> CheckedInputs:
    """The collective-free checks (see CheckedInputs). Raises InputError."""
    ds_config = apply_aim_overrides(load_ds_config(cfg.deepspeed_config), cfg.aim)
    aim_cfg = plugin_config(cfg.method, ds_config, cfg.deepspeed_config)
    cfg, resume = resolve_resume_arg(cfg)
    if resume is not None:
        check_resume_options(resume, cfg, aim_cfg)
    if resume is None and cfg.resume == "auto" and os.environ.get("RANK", "0") == "0":
        announce_fresh(cfg)
    if cfg.output_dir is not None:
        try:
            check_free(cfg.output_dir)  # named first: a live run's folder is also "not empty"
        except LockError as e:
            raise InputError(str(e)) from None
        ckpt_root = os.path.abspath(os.path.join(cfg.output_dir, CKPT_SUBDIR))
        if resume is not None and os.path.abspath(resume.load_dir) == ckpt_root:
            pass  # resuming into the run's own directory
        elif (
            cfg.resume == "auto"
            and os.path.isdir(cfg.output_dir)
            and set(os.listdir(cfg.output_dir)) <= {CKPT_SUBDIR, LOCK_NAME}
        ):
            pass  # a run killed before its first complete checkpoint
        else:
            check_output_dir(cfg.output_dir, cfg.overwrite)
    from aim_ds.experiment.modeling import ModelError, describe_model_arg

    try:
        describe_model_arg(cfg.model)
    except ModelError as e:
        raise InputError(str(e)) from e
    if cfg.tokenizer is not None and not os.path.isdir(cfg.tokenizer):
        raise InputError(f"--tokenizer {cfg.tokenizer}: no such folder")
    from aim_ds import data as aim_data

    try:
        tasks = aim_data.load_tasks(
            cfg.benchmark,
            data_dir=cfg.data_dir,
            order=cfg.order,
            max_train=cfg.max_train,
            max_eval=cfg.max_eval,
            seed=cfg.seed,
        )
    except (aim_data.DataError, FileNotFoundError) as e:
        raise InputError(str(e)) from e
    if not tasks:
        raise InputError(f"--benchmark {cfg.benchmark}: no tasks")
    check_pipeline_config(cfg, ds_config, aim_cfg)
    for t in tasks:
        if not t.train or not t.eval:
            raise InputError(f"task {t.name}: empty {'train' if not t.train else 'eval'} set")
    return CheckedInputs(cfg=cfg, ds_config=ds_config, aim_cfg=aim_cfg, resume=resume, tasks=tasks)


def check_pipeline_config(cfg: RunConfig, ds_config: dict, aim_cfg) -> None:
    """What the ds_config cannot have under --pipeline-parallel-size > 1. Raises InputError."""
    if cfg.pipeline_parallel_size == 1:
        return
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    where = f"{cfg.deepspeed_config} with --pipeline-parallel-size {cfg.pipeline_parallel_size}"
    if stage > 1:
        raise InputError(
            f"{where}: zero_optimization.stage {stage}; DeepSpeed's pipeline engine runs ZeRO stage 0 or 1 only "
            "(ds_configs/cpu_pipe_zero1.json is one)"
        )
    if getattr(aim_cfg, "probe_source", None) == "training_batch":
        raise InputError(
            f'{where}: aim_merging.probe_source "training_batch" reads the memory rows\' logits, which a pipeline '
            'does not return; use probe_source "memory_forward"'
        )


def default_output_dir(cfg: RunConfig, rank: int) -> str:
    """rank 0 decides (the name has a timestamp) and tells everybody (collective)."""
    import torch.distributed as dist

    holder = [None]
    if rank == 0:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        bname = os.path.splitext(os.path.basename(cfg.benchmark))[0]
        base = os.path.join("runs", f"{bname}-{cfg.method}-s{cfg.seed}-{stamp}")
        out, i = base, 1
        while os.path.exists(out):
            out, i = f"{base}-{i}", i + 1
        holder[0] = out
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def data_parallel_world(cfg: RunConfig, tp: int, world: int) -> int:
    """The number of data-parallel ranks; every rank sees the same world size, so the same error
    everywhere and no collective."""
    pp = cfg.pipeline_parallel_size
    if pp > 1:
        if world % (pp * tp):
            raise InputError(
                f"--pipeline-parallel-size {pp} with tensor-parallel size {tp} needs a number of ranks that is a "
                f"multiple of {pp * tp} (this launch has {world}); launch {pp} x {tp} x the data-parallel size ranks"
            )
        return world // (pp * tp)
    if world % tp:
        raise InputError(
            f"{cfg.deepspeed_config}: tensor_parallel.autotp_size {tp} needs a number of ranks that is a multiple "
            f"of {tp} (this launch has {world}); launch {tp} x the data-parallel size ranks, or lower autotp_size"
        )
    return world // tp


def run_tokenizer(cfg: RunConfig, tasks: list, cache_dir: str, rank: int):
    """The run's tokenizer, on every rank (a collective); a rank that cannot load it stops every rank."""
    from aim_ds.experiment.modeling import ModelError, load_tokenizer
    from aim_ds.ops.collectives import agree

    tokenizer, error = None, None
    try:
        tokenizer = load_tokenizer(cfg.tokenizer, cfg.model, tasks, os.path.join(cache_dir, "tokenizers"), rank)
    except ModelError as e:
        error = str(e)
    agree(error, exc_type=InputError)
    return tokenizer


def run(cfg: RunConfig, t0: float) -> int:
    inputs = check_inputs(cfg)
    cfg, tasks, resume = inputs.cfg, inputs.tasks, inputs.resume

    # ---- distributed
    from aim_ds.distributed import init_distributed

    info = init_distributed(cfg.dist_timeout)
    import torch

    rank, world = info.rank, info.world_size
    # AutoTP groups consecutive ranks (DeepSpeed's groups._init_tp_mesh_device): the ranks of one
    # tensor-parallel group share data-parallel rank rank // tp and are fed the same batches
    tp = tp_size(inputs.ds_config)
    dp_world = data_parallel_world(cfg, tp, world)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    out_dir = cfg.output_dir if cfg.output_dir is not None else default_output_dir(cfg, rank)

    from aim_ds import data as aim_data
    from aim_ds.experiment.modeling import cache_folder

    cache_dir = cache_folder(cfg.cache_dir)
    tokenizer = run_tokenizer(cfg, tasks, cache_dir, rank)
    sizes = batch_sizes(cfg, inputs.ds_config, inputs.aim_cfg, world)
    # memory buffer: the same seeded selection for every method
    memories = [aim_data.select_memory(t, cfg.memory_fraction, cfg.seed) for t in tasks]
    steps_per_task = [max(1, int(math.ceil(cfg.epochs * len(t.train) / (sizes.micro * dp_world)))) for t in tasks]
    ref = fwt_reference(cfg, tasks, sizes, world, cache_dir, tp)
    task_fp, mem_sha, glob = checkpoint_identity(cfg, tasks, memories, sizes, steps_per_task, dp_world)
    if resume is not None:
        check_resume_manifest(resume, world, task_fp, mem_sha, glob, tp, cfg.pipeline_parallel_size)

    from .trainer import RunState

    lock = OutputLock(out_dir)
    try:
        take_lock(lock, rank)
        check_shared_output(lock, rank, world)
        if rank == 0:
            if resume is None:  # a resumed run creates nothing before its checkpoint has loaded
                os.makedirs(out_dir, exist_ok=True)
            else:
                announce(resume)
            print(
                f"[aim_ds] method={cfg.method} benchmark={cfg.benchmark} tasks={[t.name for t in tasks]} "
                f"world={world}{f' (tensor parallel {tp})' if tp > 1 else ''}"
                f"{f' (pipeline stages {cfg.pipeline_parallel_size})' if cfg.pipeline_parallel_size > 1 else ''} micro_batch={sizes.micro} steps/task={steps_per_task} out={out_dir}",
                flush=True,
            )
        state = RunState(
            cfg=cfg,
            rank=rank,
            world=world,
            tp=tp,
            pp=cfg.pipeline_parallel_size,
            tasks=tasks,
            memories=memories,
            tokenizer=tokenizer,
            sizes=sizes,
            steps_per_task=steps_per_task,
            aim_cfg=inputs.aim_cfg,
            out_dir=out_dir,
            resume=resume,
            task_fp=task_fp,
            mem_sha=mem_sha,
            setup_s=time.time() - t0,
        )  # imports, process group, tokenizer, data (not engine set-up)
        return train_and_report(state, inputs.ds_config, info, ref, t0)
    finally:
        lock.release()


def batch_sizes(cfg: RunConfig, ds_config: dict, aim_cfg, world: int) -> BatchSizes:
    """The run's batch sizes; raises InputError when the forgetting signal would have no memory rows to read."""
    from aim_ds.control.policies import uses_signal
    from aim_ds.plugin.probes import probe_source

    micro = cfg.batch_size or int(ds_config.get("train_micro_batch_size_per_gpu", 8))
    mem_bs = cfg.memory_batch_size or micro
    replay_rows = 0
    if cfg.method in MIXING_METHODS:
        replay_rows = mem_bs if cfg.replay_rows is None else cfg.replay_rows
    from aim_ds.config import AimConfig

    aim = aim_cfg if isinstance(aim_cfg, AimConfig) else None  # FOREVER reads no forgetting signal
    if (
        aim is not None
        and probe_source(aim).records_loss
        and uses_signal(aim)
        and uses_signal(aim_cfg)
        and replay_rows == 0
    ):
        raise InputError(
            f'{cfg.deepspeed_config}: aim_merging.probe_source is "training_batch" (the forgetting signal is read '
            "from the memory rows of the training batches) but --replay-rows 0 puts none there; give "
            '--replay-rows >= 1 or set probe_source "memory_forward" in the ds_config'
        )
    ds_run = json.loads(json.dumps(ds_config))
    ds_run["train_micro_batch_size_per_gpu"] = micro
    ds_run["gradient_accumulation_steps"] = 1
    # DeepSpeed's batch check counts every rank, tensor-parallel ones too (its config has no mpu under AutoTP)
    ds_run["train_batch_size"] = micro * world
    if cfg.pipeline_parallel_size > 1:  # the pipeline's grid is DeepSpeed's mpu: it counts data-parallel ranks only
        tp = tp_size(ds_config)
        ds_run["train_batch_size"] = micro * world // (cfg.pipeline_parallel_size * tp)
        # the driver cuts the stages' layers itself (Megatron-style): AutoTP does not cut a PipelineModule
        ds_run.pop("tensor_parallel", None)
        if tp > 1:
            from aim_ds.experiment.pipeline import PIPE_CONFIG

            ds_run["pipeline"] = {**ds_run.get("pipeline", {}), **PIPE_CONFIG}
    ds_run.pop("scheduler", None)  # the driver owns the LR schedule
    return BatchSizes(micro, mem_bs, replay_rows, ds_run)


def fwt_reference(cfg: RunConfig, tasks, sizes: BatchSizes, world: int, cache_dir: str, tp: int = 1) -> FwtReference:
    """The FWT reference's cache key: the hyper-parameters shared by every method (not the method itself)."""
    from aim_ds.experiment.modeling import model_source_key

    ref_key_src = json.dumps(
        {
            "benchmark": cfg.benchmark,
            "order": cfg.order,
            "data": data_fingerprint(tasks),
            "model": model_source_key(cfg.model),
            "tokenizer": cfg.tokenizer,
            "seed": cfg.seed,
            "epochs": cfg.epochs,
            "global_batch": sizes.micro * world // (tp * cfg.pipeline_parallel_size),
            "world": world,
            "lr": cfg.lr,
            "warmup": cfg.warmup,
            "max_len": cfg.max_len,
            "ds": {k: v for k, v in sizes.ds_run.items() if k != "aim_merging"},
            # only LoRA runs add the key, so the cached references of full fine-tuning keep theirs
            **({"lora": [cfg.lora, cfg.lora_alpha, cfg.lora_targets]} if cfg.lora else {}),
        },
        sort_keys=True,
    )
    ref_key = hashlib.sha256(ref_key_src.encode()).hexdigest()[:20]
    return FwtReference(ref_key, ref_key_src, os.path.join(cache_dir, "fwt", f"{ref_key}.json"))


def checkpoint_identity(cfg: RunConfig, tasks, memories, sizes: BatchSizes, steps_per_task, dp_world: int):
    """(task fingerprint, memory fingerprint, global batches): what decides the trajectory at the global level,
    so that a checkpoint resharded to another number of ranks keeps it (the aim_merging section is checked apart).
    dp_world: the data-parallel ranks (tensor-parallel ranks share their batches)."""
    from aim_ds.checkpoint import fingerprint
    from aim_ds.experiment.modeling import model_source_key

    glob = global_batches(sizes.micro, sizes.mem_bs, sizes.replay_rows, dp_world)
    per_rank = ("train_micro_batch_size_per_gpu", "train_batch_size", "aim_merging")
    task_fp = fingerprint(
        {
            "options": resume_options(cfg),
            "data": data_fingerprint(tasks),
            "model": model_source_key(cfg.model),
            "steps_per_task": steps_per_task,
            "global": glob,
            "ds": {k: v for k, v in sizes.ds_run.items() if k not in per_rank},
        }
    )
    return task_fp, fingerprint([[e.id for e in m] for m in memories]), glob


def check_shared_output(lock: OutputLock, rank: int, world: int) -> None:
    """Every rank must see the output folder rank 0 locked (one shared file system: checkpoints are written by
    every rank and committed by rank 0). A rank on another node that sees its own node-local folder instead
    reads no lock there, or another one: every rank raises the same InputError before anything is written
    (collective)."""
    if world == 1:
        return
    import torch.distributed as dist

    from aim_ds.ops.collectives import agree

    from .lock import read_holder

    holder = [read_holder(lock.path) if rank == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    err = None
    if read_holder(lock.path) != holder[0]:
        err = (
            f"--output-dir {lock.out_dir}: this rank ({socket.gethostname()}) does not see the lock file rank 0 "
            "wrote there; every rank must see the same output folder (a file system shared by all nodes). "
            "Node-local output folders are not supported: give an --output-dir on shared storage"
        )
    agree(err, exc_type=InputError)


def take_lock(lock: OutputLock, rank: int) -> None:
    """rank 0 takes the output folder's lock (atomic: of two runs starting together one gets it); every rank
    raises the same InputError when it could not (collective)."""
    from aim_ds.ops.collectives import agree

    err = None
    if rank == 0:
        try:
            lock.acquire()
        except (LockError, OSError) as e:
            err = str(e)
    agree(err, exc_type=InputError)


class FwtReference(NamedTuple):
    """Where the single-task scores of this setup are cached: the key, what it hashes, the file."""

    key: str
    source: str
    path: str


def train_and_report(state, ds_config: dict, info, ref: FwtReference, t0: float) -> int:
    """The FWT reference (cached, trained here, or from the checkpoint), the method, the results."""
    import torch.distributed as dist

    from .trainer import CLTrainer

    cfg, rank, tasks, resume = state.cfg, state.rank, state.tasks, state.resume
    ref_key, ref_key_src, ref_path = ref
    trainer = CLTrainer(state)
    single_scores, fwt_source, single_res = None, cfg.fwt_reference, None
    if resume is not None:  # resumed: the reference is in the checkpoint
        single_scores, fwt_source = resume.extra["single_scores"], resume.extra["fwt_source"]
    elif cfg.method == "single" or cfg.fwt_reference == "run":
        single_res = trainer.single()
        single_scores = single_res["scores"]
        if rank == 0:
            from aim_ds.experiment.report import write_json

            write_json(
                ref_path,
                {
                    "key": ref_key,
                    "scores": single_scores,
                    "tasks": [t.name for t in tasks],
                    "source": json.loads(ref_key_src),
                },
            )
        fwt_source = "run"
    elif cfg.fwt_reference == "cache":
        if os.path.exists(ref_path):
            with open(ref_path) as f:
                single_scores = json.load(f)["scores"]
            fwt_source = f"cache:{ref_path}"
        else:
            fwt_source = "cache-miss (run --method single with the same options to create it)"

    trainer.state = state = dataclasses.replace(state, single_scores=single_scores, fwt_source=fwt_source)
    if cfg.method == "single":
        res = single_res
    elif cfg.method == "multitask":
        res = trainer.multitask()
    else:
        res = trainer.sequential()

    if rank == 0:
        from .results import write_results

        write_results(state, res, ds_config, info, t0)
    dist.barrier()
    return 0
