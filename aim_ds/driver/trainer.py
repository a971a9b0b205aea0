"""The training loop of the driver: one CLTrainer whose train_task() runs a task's steps; the methods
(sequential, each task alone, all tasks jointly) are thin variations over it.

A fresh torch AdamW state at every task start; the learning rate follows a per-task linear warm-up and
cosine decay set here (no DeepSpeed scheduler). The plugin, when attached, hooks engine.step itself.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from aim_ds.plugin.memory import to_device
from aim_ds.shards import kept_alive

from ..data.batching import memory_batches, rank_batches
from .args import RunConfig
from .batching import BatchSizes, EncodingCache, lr_at
from .resume import CKPT_SUBDIR, ResumePoint, global_batches, position_seed, resume_options, seed_rank_rng

MULTITASK_SEED_OFFSET = 99991  # the joint pool's data order differs from every task's


@dataclasses.dataclass(frozen=True)
class RunState:
    """What the run was set up with: fixed once the process group, tokenizer and data exist."""

    cfg: RunConfig
    rank: int
    world: int
    tasks: list
    memories: list
    tokenizer: object
    sizes: BatchSizes  # per-rank batch sizes and the ds_config the engines get
    steps_per_task: list
    aim_cfg: object
    out_dir: str
    resume: ResumePoint | None
    task_fp: str
    mem_sha: str
    setup_s: float = 0.0
    tp: int = 1  # tensor-parallel size (AutoTP): ranks rank // tp * tp ... + tp - 1 share one data-parallel rank
    pp: int = 1  # pipeline stages: stage s holds ranks s * D ... s * D + D - 1 (DeepSpeed's pipe-outermost grid)
    single_scores: list | None = None
    fwt_source: str | None = None

    @property
    def micro(self) -> int:
        return self.sizes.micro

    @property
    def mem_bs(self) -> int:
        return self.sizes.mem_bs

    @property
    def replay_rows(self) -> int:
        return self.sizes.replay_rows

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.out_dir, CKPT_SUBDIR)

    @property
    def dp_rank(self) -> int:
        return (self.rank % (self.world // self.pp)) // self.tp

    @property
    def dp_world(self) -> int:
        return self.world // (self.tp * self.pp)

    def steps_before(self, task: int) -> int:
        return sum(self.steps_per_task[:task])


class Progress:
    """tqdm on rank 0 unless --no-progress."""

    def __init__(self, state: RunState, total: int, desc: str):
        self.bar = None
        if state.rank == 0 and not state.cfg.no_progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, mininterval=2.0, file=sys.stderr)

    def update(self, loss, **kw):
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", **kw, refresh=False)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def reset_optimizer(engine) -> None:
    """A fresh AdamW state at a task start (moments and step count cleared; lazily re-created)."""
    from aim_ds.shards import inner_optimizer

    inner_optimizer(engine).state.clear()


def set_lr(engine, lr: float) -> None:
    for g in engine.optimizer.param_groups:
        g["lr"] = lr


def add_lora(model, cfg: RunConfig):
    """The model wrapped with peft LoRA adapters (--lora R): the base frozen, the adapters trainable. The same
    torch seed on every rank gives every rank the same adapter initialisation. Raises InputError."""
    from peft import LoraConfig, get_peft_model

    from .args import InputError

    targets = [t.strip() for t in cfg.lora_targets.split(",")]
    lora = LoraConfig(r=cfg.lora, lora_alpha=cfg.lora_alpha, target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as e:  # no module of the model matches --lora-targets
        raise InputError(f"--lora-targets {cfg.lora_targets}: {e}") from None


def build_engine(state: RunState, encoder: EncodingCache):
    """A DeepSpeed engine over a fresh model (the same initial weights for every engine of the run)."""
    import deepspeed
    import torch

    from aim_ds.experiment.evaluation import keeps_logits
    from aim_ds.experiment.modeling import build_model
    from aim_ds.shards import keep_alive

    s, cfg = state, state.cfg
    torch.manual_seed(cfg.seed)  # the same initial model for every engine of the run
    model, keepalive = build_model(cfg.model, s.tokenizer, s.sizes.ds_run)
    if cfg.lora:
        model = add_lora(model, cfg)
    # batches carry logits_to_keep only if the forward names it (PeftModel's does not: **kwargs)
    encoder.keeps_logits = keeps_logits(model)
    # frozen weights (LoRA's base) stay out of the optimizer, so the plugin tracks the adapters only
    net = model
    if s.pp > 1:  # the stages' layers share the HF model's tensors; the HF model is kept to evaluate with
        import copy

        from aim_ds.experiment.pipeline import build_pipeline_model

        encoder.keeps_logits = False  # the pipeline's loss reads whole label rows
        keepalive = copy.deepcopy(model) if s.tp > 1 else model  # tensor parallelism cuts the model's layers
        net = build_pipeline_model(model, s.pp, tensor_parallel=s.tp)
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = None
    if s.sizes.client_opt:
        opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)
    engine, _, _, _ = deepspeed.initialize(
        model=net,
        optimizer=opt,
        config=s.sizes.ds_run,
        model_parameters=None if opt is not None else trainable,
    )
    keep_alive(engine, keepalive)
    check_tp_groups(engine, s)
    return engine


def check_tp_groups(engine, s: RunState) -> None:
    """The driver feeds rank r the data of data-parallel rank r // tp: check that DeepSpeed's groups agree
    (a DeepSpeed that laid the groups out otherwise would silently train each slice on other data)."""
    if s.tp == 1:
        return
    from aim_ds.shards.tp import parallel_ranks

    tp_rank, dp_rank = parallel_ranks(engine)
    if (tp_rank, dp_rank) != (s.rank % s.tp, s.dp_rank):
        raise RuntimeError(
            f"rank {s.rank}: DeepSpeed placed it at tensor-parallel rank {tp_rank}, data-parallel rank {dp_rank}; "
            f"the driver expects {s.rank % s.tp}, {s.dp_rank} (consecutive ranks per tensor-parallel group)"
        )


def checkpoint_extra(s: RunState, *, task: int, step: int, done: bool, matrix: list, data_seed: int) -> dict:
    """The driver's position, matrix and seed: a checkpoint manifest's extra, the same for every rank."""
    return {
        "driver": "launch/train.py",
        "method": s.cfg.method,
        "task": task,
        "step": step,
        "done": done,
        "driver_step": s.steps_before(task) + step,
        "data_seed": data_seed,
        "memory_sha": s.mem_sha,
        "global": global_batches(s.micro, s.mem_bs, s.replay_rows, s.dp_world),
        "matrix": matrix,
        "single_scores": s.single_scores,
        "fwt_source": s.fwt_source,
        "options": resume_options(s.cfg),
    }


def attach_plugin(engine, plugin_cfg, memory):
    """The method's plugin on the engine (AimMerging, or FOREVER for a ForeverConfig), or None without one."""
    if plugin_cfg is None:
        return None
    import aim_ds

    return aim_ds.attach(engine, memory, config=plugin_cfg)


def train_step(engine, batch: dict, n_new: int, mixed: bool, probe, memory_weight, pp: int) -> float:
    """One optimizer step on a collated batch (its first n_new rows new, the rest memory rows when mixed); the
    step's loss. probe: a plugin given the memory rows' loss (probe_source "training_batch")."""
    from aim_ds import mixed_loss, rows_loss
    from aim_ds.shards.tp import whole_vocab_logits

    if pp > 1:  # one train_batch: forward, backward and step through the stages
        return float(engine.train_batch(iter([(batch["input_ids"], batch["labels"])])))
    # the forgetting signal (probe) is read off this forward's memory rows: no extra forward
    # (logits gathered over the vocabulary when AutoTP sliced the head; the model's own loss handles that)
    if mixed and memory_weight is not None:  # the driver weights new and memory rows itself
        labels = batch.pop("labels")  # no second loss inside the model
        out = engine(**batch)
        loss, *mem_rows = mixed_loss(whole_vocab_logits(engine, out.logits), labels, n_new, memory_weight)
    else:
        out = engine(**batch)
        loss = out.loss
        mem_rows = None
        if probe is not None:
            mem_rows = rows_loss(whole_vocab_logits(engine, out.logits), batch["labels"], slice(n_new, None))
    if probe is not None:
        probe.record_probe_loss(*mem_rows)
    engine.backward(loss)
    engine.step()
    return float(loss.detach())


def evaluation_model(engine, s: RunState):
    """What evaluation runs: the engine, or under pipelines the stages joined into the HF model on every rank
    (the model build_engine kept; its own stage's layers already hold their weights)."""
    if s.pp == 1:
        return engine
    from aim_ds.experiment.pipeline import gather_hf_state_dict

    model = kept_alive(engine)
    model.load_state_dict(gather_hf_state_dict(engine))
    return model


class CLTrainer:
    def __init__(self, state: RunState):
        self.state = state
        self.cfg = state.cfg
        self.encoder = EncodingCache(state.tokenizer, state.cfg.max_len)
        # tokens through forward + backward on this rank (training batches; the plugin counts its own)
        self.work = {"train_tokens": 0, "train_memory_tokens": 0}
        self.losses: list[dict] = []

    # ------------------------------------------------------------------ engine
    def make_engine(self):
        return build_engine(self.state, self.encoder)

    # ------------------------------------------------------------------ the loop
    def train_task(
        self,
        engine,
        task_index: int,
        batches: list,
        progress: Progress,
        mem_batches=None,
        start: int = 0,
        on_step=None,
        probe=None,
    ) -> None:
        """One task's training loop: the plain DeepSpeed loop.

        mem_batches: memory rows appended to every batch (mixed replay). probe: a plugin with probe_source
        "training_batch", given the loss of those rows before each step. start: steps already done (a resumed
        run skips their batches); on_step(s) after step s (1-based)."""
        cfg = self.cfg
        total = len(batches)
        mon = getattr(engine, "monitor", None)
        mon_on = mon is not None and getattr(mon, "enabled", False)
        engine.train()
        for s, exs in enumerate(batches):
            if s < start:
                continue
            n_new = len(exs)
            if mem_batches:
                exs = exs + mem_batches[s % len(mem_batches)]
            batch = self.encoder.collate(exs)
            mask = batch["attention_mask"]  # counted on the host copy: no device sync per step
            self.work["train_tokens"] += int(mask.sum())
            self.work["train_memory_tokens"] += int(mask[n_new:].sum())
            batch = to_device(batch, engine.device)
            set_lr(engine, lr_at(s, total, cfg.lr, cfg.warmup))
            lv = train_step(engine, batch, n_new, bool(mem_batches), probe, cfg.memory_weight, self.state.pp)
            if self.state.rank == 0:
                self.losses.append({"task": task_index, "step": s + 1, "loss": lv})
            if mon_on:
                mon.write_events([("train/loss", lv, engine.global_samples)])
            progress.update(lv, task=task_index)
            if on_step is not None:
                on_step(s + 1)

    def evaluate(self, engine, task_ids) -> dict:
        from aim_ds.experiment.evaluation import evaluate_task

        s = self.state
        model = evaluation_model(engine, s)
        out = {}
        for i in task_ids:
            engine.eval()
            out[i] = float(
                evaluate_task(
                    model,
                    s.tokenizer,
                    s.tasks[i],
                    batch_size=self.cfg.eval_batch_size,
                    rank=s.dp_rank,  # the ranks of a tensor-parallel group score the same examples together
                    world_size=s.dp_world,
                    synced_gpus=s.world > 1 and s.pp == 1,  # the joined model is whole on every rank
                    max_prompt_len=self.cfg.max_len,
                )
            )
        engine.train()
        return out

    def _timed_eval(self, engine, task_ids, clock: dict) -> dict:
        t = time.time()
        scores = self.evaluate(engine, task_ids)
        clock["eval"] += time.time() - t
        return scores

    def task_batches(self, k: int) -> list:
        s = self.state
        return rank_batches(s.tasks[k].train, s.steps_per_task[k], s.micro, s.dp_rank, s.dp_world, self.cfg.seed + k)

    # ------------------------------------------------------------------ checkpoints
    def save(self, engine, plugin, *, task: int, step: int, done: bool, matrix: list, data_seed: int) -> None:
        """Everything needed to continue identically: DeepSpeed ZeRO-3 state (weights, fp32 master, AdamW moments
        and step counts, global step), the plugin (controller, anchor shards, cursors, trajectory), and the
        driver's position, matrix and seed (the manifest's extra, the same for every rank)."""
        from aim_ds.checkpoint import rng_state, save_checkpoint

        s = self.state
        tag = f"task{task:03d}-end" if done else f"task{task:03d}-step{step:06d}"
        extra = checkpoint_extra(s, task=task, step=step, done=done, matrix=matrix, data_seed=data_seed)
        client = {"rng": rng_state(), "losses": list(self.losses) if s.rank == 0 else [], "work": dict(self.work)}
        save_checkpoint(
            engine,
            plugin,
            s.ckpt_dir,
            tag=tag,
            client_state=client,
            keep_last=self.cfg.keep_checkpoints,
            task_fingerprint=s.task_fp,
            tokenizer=s.tokenizer if s.rank == 0 else None,
            extra=extra,
        )

    def load(self, engine, plugin) -> dict:
        """Load --resume's checkpoint into a fresh engine (+ plugin attached with the in-progress task's memory);
        returns the driver's saved position. Raises CheckpointError on every rank (before any other collective).

        A resharded checkpoint's ranks are not the saving run's, so their RNG streams cannot be restored: each
        rank's streams are seeded from --seed, the global position and the rank instead."""
        from aim_ds.checkpoint import load_checkpoint, set_rng_state

        s, r = self.state, self.state.resume
        client = load_checkpoint(engine, plugin, r.load_dir, r.tag, task_fingerprint=s.task_fp)
        if r.resharded:
            seed_rank_rng(position_seed(self.cfg.seed, r.extra["driver_step"], s.rank))
        else:
            set_rng_state(client["rng"])
        self.work.update(client.get("work") or {})
        self.losses = list(client.get("losses") or []) if s.rank == 0 else []
        if s.rank == 0:
            os.makedirs(s.out_dir, exist_ok=True)
        return r.extra

    def checkpoint_hook(self, engine, plugin, k: int, matrix: list, data_seed: int):
        """on_step callback: save every --checkpoint-every driver steps (not at a task's last step: the task-end
        checkpoint, after its evaluation, follows)."""
        n = self.cfg.checkpoint_every
        if not n:
            return None
        before, total = self.state.steps_before(k), self.state.steps_per_task[k]

        def on_step(step):
            if (before + step) % n == 0 and step < total:
                self.save(engine, plugin, task=k, step=step, done=False, matrix=matrix, data_seed=data_seed)

        return on_step

    # ------------------------------------------------------------------ methods
    def _memory_for(self, k: int):
        s = self.state
        mem_examples = [e for m in s.memories[:k] for e in m]
        mem_b = [
            self.encoder.collate(b)
            for b in memory_batches(mem_examples, s.mem_bs, s.dp_rank, s.dp_world, self.cfg.seed + 7 * k)
        ]
        return mem_examples, mem_b

    def sequential(self) -> dict:
        """The task sequence on one engine (seqft, replay, fixed_merge, aim, forever)."""
        s, cfg = self.state, self.cfg
        engine = self.make_engine()
        resume = s.resume
        self.losses = []
        # resumed: attach with the checkpoint's task memory BEFORE loading (its cursors are restored)
        resumed_memory = resume and s.aim_cfg is not None and self._memory_for(resume.extra["task"])[1]
        plugin = attach_plugin(engine, s.aim_cfg, resumed_memory or None)
        matrix, clock = [], {"eval": 0.0}
        first_k, first_s = 0, 0
        if resume is not None:
            extra = self.load(engine, plugin)
            matrix = [list(r) for r in extra["matrix"]]
            first_k, first_s = (extra["task"] + 1, 0) if extra["done"] else (extra["task"], extra["step"])
        progress = Progress(s, sum(s.steps_per_task), cfg.method)
        if progress.bar is not None and resume is not None:
            progress.bar.update(s.steps_before(first_k) + first_s)
        t_train = time.time()
        for k, task in enumerate(s.tasks):
            if k < first_k:
                continue
            start = first_s if k == first_k else 0
            mem_examples, mem_b = self._memory_for(k)
            if start == 0:  # a task in progress keeps its plugin state and AdamW moments (loaded)
                if plugin is not None:
                    plugin.start_task(memory=mem_b or None, steps=s.steps_per_task[k])
                reset_optimizer(engine)
            replay = None
            if s.replay_rows and mem_examples:
                replay = memory_batches(mem_examples, s.replay_rows, s.dp_rank, s.dp_world, cfg.seed + 7 * k + 1)
            probe = plugin if (replay and plugin is not None and plugin.records_probe_loss) else None
            self.train_task(
                engine,
                k,
                self.task_batches(k),
                progress,
                mem_batches=replay,
                start=start,
                on_step=self.checkpoint_hook(engine, plugin, k, matrix, cfg.seed + k),
                probe=probe,
            )
            if plugin is not None:
                plugin.end_task()  # FOREVER's end-of-task consolidation replay; nothing for AimMerging
            scores = self._timed_eval(engine, range(k + 1 if cfg.eval_tasks == "seen" else len(s.tasks)), clock)
            matrix.append([scores.get(i) for i in range(len(s.tasks))])
            if cfg.checkpoint_every:
                self.save(
                    engine, plugin, task=k, step=s.steps_per_task[k], done=True, matrix=matrix, data_seed=cfg.seed + k
                )
            if s.rank == 0 and progress.bar is not None:
                progress.bar.write(
                    f"after {task.name}: " + " ".join("-" if v is None else f"{v:.1f}" for v in matrix[-1])
                )
        progress.close()
        res = self._result(matrix, engine, time.time() - t_train, clock, merges=plugin.merge_count if plugin else 0)
        res["plugin"] = plugin
        if plugin is not None and s.rank == 0:
            res["trajectory_rows"] = list(plugin.trajectory)
        return res

    def single(self) -> dict:
        """Each task alone from the initial model (a fresh engine per task, same seed => same init)."""
        s = self.state
        scores, steps, clock = [], 0, {"eval": 0.0}
        self.losses = []
        progress = Progress(s, sum(s.steps_per_task), "single")
        t0 = time.time()
        for k in range(len(s.tasks)):
            engine = self.make_engine()
            self.train_task(engine, k, self.task_batches(k), progress)
            steps += int(engine.global_steps)
            scores.append(self._timed_eval(engine, [k], clock)[k])
            engine.destroy() if hasattr(engine, "destroy") else None
            del engine
        progress.close()
        K = len(s.tasks)
        matrix = [[scores[i] if i == k else None for i in range(K)] for k in range(K)]
        res = self._result(matrix, None, time.time() - t0, clock, merges=0)
        res.update(scores=scores, engine_steps=steps)
        return res

    def multitask(self) -> dict:
        """All tasks' training sets as one pool, the same total number of steps."""
        s, cfg = self.state, self.cfg
        engine = self.make_engine()
        pool = [e for t in s.tasks for e in t.train]
        n = sum(s.steps_per_task)
        data_seed = cfg.seed + MULTITASK_SEED_OFFSET
        batches = rank_batches(pool, n, s.micro, s.dp_rank, s.dp_world, data_seed)
        start, self.losses = 0, []
        if s.resume is not None:
            start = self.load(engine, None)["step"]
        progress = Progress(s, n, "multitask")
        t0 = time.time()
        if start == 0:
            reset_optimizer(engine)
        every = cfg.checkpoint_every

        def on_step(step):  # one long "task": periodic checkpoints only (the results follow the last step)
            if every and step % every == 0 and step < n:
                self.save(engine, None, task=0, step=step, done=False, matrix=[], data_seed=data_seed)

        self.train_task(engine, 0, batches, progress, start=start, on_step=on_step)
        progress.close()
        train_s, clock = time.time() - t0, {"eval": 0.0}
        scores = self._timed_eval(engine, range(len(s.tasks)), clock)
        return self._result(
            [[scores[i] for i in range(len(s.tasks))]], engine, train_s + clock["eval"], clock, merges=0
        )

    def _result(self, matrix, engine, elapsed: float, clock: dict, merges: int) -> dict:
        return dict(
            matrix=matrix,
            losses=self.losses,
            train_steps=sum(self.state.steps_per_task),
            engine_steps=int(engine.global_steps) if engine is not None else 0,
            merges=merges,
            train_wall_s=elapsed - clock["eval"],
            eval_wall_s=clock["eval"],
            work=dict(self.work),
        )
