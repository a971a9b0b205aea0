"""AimMergingCallback: AimMerging across a sequence of Trainer.train() calls, one per task, and its checks of
the Trainer's engine. How it finds the engine, hands the plugin on, resumes and replays: aim_ds.hf's docstring."""

from __future__ import annotations

import inspect
import io
import math
import os
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, default_data_collator

from ..checkpoint import plugin_file
from ..data.batching import memory_batches, seeded_stream
from ..errors import AimInputError
from ..fileio import atomic_write_bytes
from ..ops.collectives import agree
from ..ops.losses import split_token_loss
from ..plugin import AimPlugin, ForeverPlugin, attach
from .collator import ReplayCollator, in_evaluation

STATE_DIR = "aim_merging"  # inside the Trainer's checkpoint-N/: one file per rank
REPLAY_DRAWS = ("stream", "cycle")


class AimMergingCallback(TrainerCallback):
    """AimMerging across a sequence of `Trainer.train()` calls, one per task (see aim_ds.hf's docstring).

    memory: rows like train_dataset items (the rehearsal memory of the tasks so far); cut, like the driver's,
        into seeded global batches of memory_batch_size rows per rank (default: per_device_train_batch_size),
        each rank collating its slice with the Trainer's collator (the one inside replay_collator()). May be
        given later with set_memory().
    config: an AimConfig or dict overriding the ds_config's "aim_merging" section; or a ForeverConfig, which runs
        FOREVER instead (docs/forever.md): model-time replay events during each train(), and the end-of-task
        replay in on_train_end.
    replay_rows, memory_weight: mixed replay, used by `replay_collator()` and `compute_loss_func`.
    replay_draw: "stream" (default: batch c takes the next K x world positions of the seeded stream, so every
        memory row recurs with fresh partners) or "cycle" (the driver's: the memory cut once into
        ceil(M / (K x world)) seeded global batches, batch c takes number c mod that count).
    """

    def __init__(
        self,
        memory=None,
        config=None,
        memory_batch_size: int | None = None,
        replay_rows: int = 0,
        memory_weight: float | None = None,
        replay_draw: str = "stream",
    ):
        if memory_batch_size is not None and (not isinstance(memory_batch_size, int) or memory_batch_size < 1):
            raise AimInputError(
                f"AimMergingCallback(memory_batch_size={memory_batch_size!r}): expected an integer >= 1."
            )
        if not isinstance(replay_rows, int) or replay_rows < 0:
            raise AimInputError(f"AimMergingCallback(replay_rows={replay_rows!r}): expected an integer >= 0.")
        if memory_weight is not None and not 0.0 < memory_weight < 1.0:
            raise AimInputError(f"AimMergingCallback(memory_weight={memory_weight!r}): must be in (0, 1) or None.")
        if replay_draw not in REPLAY_DRAWS:
            raise AimInputError(
                f"AimMergingCallback(replay_draw={replay_draw!r}): expected one of {', '.join(REPLAY_DRAWS)}."
            )
        self.config = config
        self.replay_draw = replay_draw
        self.memory_batch_size = memory_batch_size
        self.replay_rows = replay_rows
        self.memory_weight = memory_weight
        self.plugin: AimPlugin | ForeverPlugin | None = None
        self._rows = None
        self._replay_position = 0  # the next replay batch's index in this task's stream (collate calls)
        self._consumed = 0  # micro-batches trained in this task: the position a checkpoint records
        self._replay_seed = 0
        self._task = -1  # train() calls begun, 0-based; restored from a checkpoint on resume
        self._bound = None  # (trainer, resume_from_checkpoint) named by bind(), for one train()
        self._running = None  # the Trainer of the train() in progress
        self._engine = None
        self.trainer_args = None
        if memory is not None:
            self.set_memory(memory)

    # ------------------------------------------------------------------ public API
    def set_memory(self, rows) -> None:
        """The rehearsal memory for the next train() call: a list of rows like train_dataset items."""
        if isinstance(rows, dict) or not hasattr(rows, "__len__") or not hasattr(rows, "__getitem__"):
            raise AimInputError(
                f"set_memory: expected a list (or dataset) of rows like train_dataset items, got a "
                f"{type(rows).__name__}."
            )
        self._rows = rows

    def bind(self, trainer, resume_from_checkpoint: str | None = None) -> AimMergingCallback:
        """Name the Trainer of the next train() (only needed when no Trainer method is on the call stack of
        on_train_begin), and the checkpoint it resumes from when its frames do not hold it. Holds for that
        one train(): a Trainer found on the call stack always wins, and the binding ends at on_train_end."""
        self._bound = (trainer, resume_from_checkpoint)
        return self

    @property
    def trajectory(self) -> list[dict[str, Any]]:
        """On rank 0: the plugin's rows over all tasks ("task" = index of the train() call, "merge" = 1 on a merge)."""
        return self.plugin.trajectory if self.plugin is not None else []

    def write_trajectory_csv(self, path: str) -> None:
        """Rank 0 writes the trajectory atomically; other ranks return at once."""
        if self.plugin is not None:
            self.plugin.write_trajectory_csv(path)

    def replay_collator(self, collator=default_data_collator):
        """A data collator that appends `replay_rows` memory rows (a seeded draw per batch, see aim_ds.hf's doc)
        after each training batch's new-task rows, collated together by `collator` (evaluation batches get
        none). Pair it with `compute_loss_func` (mixed replay; with "probe_source": "training_batch" those rows'
        loss is the forgetting signal). Needs dataloader_num_workers 0 (checked at train())."""
        if self.replay_rows < 1:
            raise AimInputError("replay_collator() needs AimMergingCallback(replay_rows=K) with K >= 1.")
        return ReplayCollator(self, collator, self._next_replay_rows)

    def compute_loss_func(self, outputs, labels, num_items_in_batch=None):
        """Trainer(compute_loss_func=cb.compute_loss_func) for batches made by `replay_collator`: the token-mean
        loss (or, with memory_weight w, (1 - w) x new rows + w x memory rows), normalised as the Trainer expects
        (by num_items_in_batch); hands the memory rows' loss to the plugin as the forgetting signal. All three
        count label tokens as the Trainer's num_items_in_batch does (labels[:, 1:] != -100)."""
        if labels is None:
            raise AimInputError(
                "compute_loss_func: the batch has no labels; the Trainer pops them from the inputs "
                "only when they are there."
            )
        evaluating = in_evaluation()  # then the batch holds no memory rows (see ReplayCollator)
        k = 0 if evaluating else self._rows_in_batch()
        n_new = labels.shape[0] - k
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        new_sum, new_n, mem_sum, mem_n = split_token_loss(logits, labels, n_new, "compute_loss_func")
        tokens = new_n + mem_n
        if self.memory_weight is not None and 0 < k < labels.shape[0]:
            w = self.memory_weight  # a token-weighted share of the window, like the plain loss
            loss = tokens * ((1.0 - w) * new_sum / new_n.clamp(min=1) + w * mem_sum / mem_n.clamp(min=1))
        else:
            loss = new_sum + mem_sum
        loss = loss / (num_items_in_batch if num_items_in_batch is not None else tokens.clamp(min=1))
        p = self.plugin
        if torch.is_grad_enabled() and not evaluating and p is not None and p.records_probe_loss:
            # training forwards only: SFTTrainer's metrics forward runs without grad
            p.record_probe_loss(float(mem_sum.detach()) if k else 0.0, int(mem_n) if k else 0)
        return loss

    def compute_loss(self, trainer, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The body of a Trainer subclass's `compute_loss` for mixed replay (TRL's SFTTrainer deprecates
        `compute_loss_func` and runs a second, no-grad forward for its metrics after it): one forward,
        `compute_loss_func`'s loss, scaled across ranks as Trainer.compute_loss scales it::

            class ReplaySFTTrainer(SFTTrainer):
                def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                    return cb.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        """
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        outputs = model(**inputs)
        loss = self.compute_loss_func(outputs, labels, num_items_in_batch)
        if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (trainer.accelerator.num_processes // trainer.get_tp_size())
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ Trainer events
    def on_init_end(self, args, state, control, model=None, **kwargs):
        # checked here, in Trainer.__init__ on every rank: DeepSpeed fails later with an IndexError
        if model is not None and not any(p.requires_grad for p in model.parameters()):
            raise AimInputError(
                "AimMergingCallback: the model has no trainable parameters (requires_grad is False "
                "everywhere); AimMerging merges the trainable ones: unfreeze some (e.g. add LoRA "
                "adapters with peft) or drop the callback."
            )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trainer, resume = self._find_trainer()
        engine = trainer.model_wrapped
        _check_engine(engine)
        if isinstance(trainer.data_collator, ReplayCollator) and args.dataloader_num_workers > 0:
            raise AimInputError(
                f"AimMergingCallback.replay_collator() with dataloader_num_workers={args.dataloader_num_workers}: "
                "the collator would draw memory rows in worker processes, whose copies of the replay position "
                "advance alone (rows repeat, checkpoints record a stale position); set dataloader_num_workers=0."
            )
        resumed = state.global_step > 0  # the Trainer loaded its state from a checkpoint before this event
        if resumed and resume is None:
            raise AimInputError(
                f"AimMergingCallback: this train() resumes at step {state.global_step} but no checkpoint folder was "
                "found on the Trainer's frames (a patched training loop?); call "
                "cb.bind(trainer, resume_from_checkpoint=PATH) before train()."
            )
        self.trainer_args, self._running = args, trainer
        previous, self.plugin = self.plugin, None
        if self._engine is not None and self._engine is not engine:
            # the previous task's engine still has ZeRO-3 hooks on this model (the Trainer never destroys it);
            # left in place beside the new engine's, the third task's first forward failed in DeepSpeed's
            # parameter coordinator. Destroyed only now, so the user can evaluate the finished task with it.
            self._engine.destroy()
        self._engine = engine
        plugin = attach(engine, None, self.config)  # AimPlugin, or ForeverPlugin for a ForeverConfig
        saved = self._read_saved(plugin, resume) if resumed else None
        self._task = saved["task"] if saved is not None else self._task + 1
        self._replay_seed = args.seed + 7 * self._task + 1  # the driver's seeds: memory + 7k, replay + 7k + 1
        self._consumed = self._replay_position = saved["replay_position"] if saved is not None else 0
        memory = self._memory_batches(trainer) if self._rows is not None and plugin.enabled else None
        if saved is not None:
            if memory is not None:
                plugin.set_memory(memory)  # before the state: the memory positions are restored onto it
            plugin.load_state_dict(saved["plugin"])  # mid-task: anchor, controller and positions
        else:
            if previous is not None:
                plugin.load_state_dict(previous.state_dict())
            plugin.start_task(memory=memory, steps=state.max_steps)
        if plugin.enabled:
            plugin.defer_steps()  # engine.step() only marks the step; on_optimizer_step runs it (see aim_ds.hf's doc)
        self.plugin = plugin

    def on_substep_end(self, args, state, control, **kwargs):
        self._consumed += 1  # a micro-batch inside an accumulation window

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._consumed += 1  # the window's last micro-batch
        if self.plugin is not None and self.plugin.enabled:
            self.plugin.run_deferred_step()

    def on_save(self, args, state, control, **kwargs):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        p, trainer = self.plugin, self._running
        # where the Trainer writes this checkpoint: a hyperparameter-search trial's own run folder
        run_dir = trainer._get_output_dir(trial=getattr(trainer, "_trial", None)) if trainer else args.output_dir
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", STATE_DIR)
        os.makedirs(folder, exist_ok=True)
        rank, world = (p.rank, p.world_size) if p.enabled else (args.process_index, args.world_size)
        buf = io.BytesIO()
        torch.save({"plugin": p.state_dict(), "replay_position": self._consumed, "task": self._task}, buf)
        atomic_write_bytes(os.path.join(folder, plugin_file(rank, world)), buf.getvalue())

    def on_train_end(self, args, state, control, **kwargs):
        if self.plugin is not None:
            self.plugin.end_task()  # FOREVER's end-of-task replay (every rank is here); nothing for AimMerging
            self.plugin.detach()
        self._bound = None  # bind() holds for one train()

    # ------------------------------------------------------------------ internals
    def _find_trainer(self):
        """The Trainer running this callback (the call stack's, else the bound one), and the checkpoint folder
        its frames hold as resume_from_checkpoint (None when none does)."""
        frame = inspect.currentframe()
        trainer = resume = None
        while frame is not None:
            obj = frame.f_locals.get("self")
            if isinstance(obj, Trainer) and self in obj.callback_handler.callbacks and obj is (trainer or obj):
                trainer = obj
                # any of its frames: train() and _inner_training_loop hold it, under whatever name the loop has
                r = frame.f_locals.get("resume_from_checkpoint")
                resume = resume or (r if isinstance(r, (str, os.PathLike)) else None)
            frame = frame.f_back
        del frame
        bound, bound_resume = self._bound or (None, None)
        if trainer is None:
            trainer = bound
        if trainer is bound and bound_resume is not None:
            resume = bound_resume
        if trainer is None:
            raise AimInputError(
                "AimMergingCallback: no Trainer found calling on_train_begin; call "
                "callback.bind(trainer) before train()."
            )
        return trainer, resume

    def _memory_batches(self, trainer) -> list[dict]:
        """This rank's memory batches, cut like the driver's (seeded global batches, each rank its slice) and
        collated by the Trainer's collator; the replay collator's inner one, so no replay rows join them."""
        rank, world = trainer.args.process_index, trainer.args.world_size
        size = self.memory_batch_size or trainer.args.per_device_train_batch_size
        collate = trainer.data_collator
        if isinstance(collate, ReplayCollator):
            collate = collate.collator
        batches = []
        for rows in memory_batches(list(self._rows), size, rank, world, trainer.args.seed + 7 * self._task):
            b = collate(rows)
            batches.append({k: v for k, v in b.items() if torch.is_tensor(v)})
        return batches

    def _rows_in_batch(self) -> int:
        """Memory rows that replay_collator appends to every training batch of this train() call."""
        return self.replay_rows if self._rows is not None else 0

    def _next_replay_rows(self) -> list:
        k = self._rows_in_batch()
        if not k:
            return []
        from torch.utils.data import get_worker_info

        if get_worker_info() is not None:
            raise AimInputError(
                "AimMergingCallback.replay_collator() runs in a DataLoader worker: set dataloader_num_workers=0 "
                "(the replay position lives in the main process)."
            )
        a = self.trainer_args
        c = self._replay_position
        if self.replay_draw == "cycle":  # data.batching.memory_batches, batch c mod their count
            c %= max(1, math.ceil(len(self._rows) / (k * a.world_size)))
        start = (c * a.world_size + a.process_index) * k
        self._replay_position += 1
        return [self._rows[i] for i in seeded_stream(len(self._rows), start, k, self._replay_seed)]

    def _read_saved(self, plugin, checkpoint: str) -> dict:
        rank, world = (
            (plugin.rank, plugin.world_size)
            if plugin.enabled
            else (self.trainer_args.process_index, self.trainer_args.world_size)
        )
        path = os.path.join(checkpoint, STATE_DIR, plugin_file(rank, world))
        agree(
            None
            if os.path.isfile(path)
            else f"AimMergingCallback: {path} is missing: this checkpoint was saved without the callback (or with "
            "another number of ranks); resume from a checkpoint the callback saved.",
            exc_type=AimInputError,
        )
        saved = torch.load(path, map_location="cpu", weights_only=False)
        saved.setdefault("task", saved["plugin"]["task_index"])  # saved before the callback recorded it
        return saved


def _check_engine(engine) -> None:
    """The Trainer's engine must be a DeepSpeed engine that trains (has an optimizer)."""
    from deepspeed import DeepSpeedEngine

    if not isinstance(engine, DeepSpeedEngine):
        raise AimInputError(
            "AimMergingCallback: this Trainer does not run DeepSpeed; pass TrainingArguments(deepspeed=ds_config)."
        )
    if type(engine.optimizer).__name__ == "DeepSpeedZeRoOffload":
        # evaluate()/predict() before train() builds a ZeRO-3 inference engine, and train() on the same Trainer
        # goes on with it (an open transformers issue, huggingface/transformers#44889)
        raise AimInputError(
            "AimMergingCallback: this Trainer's DeepSpeed engine has no optimizer: evaluate() or predict() ran on "
            "this Trainer before train(), and transformers then trains the inference engine it built for them. "
            "Evaluate before training with TrainingArguments(eval_on_start=True) instead."
        )
