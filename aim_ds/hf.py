"""AimMerging for the Hugging Face Trainer (and Trainers built on it, such as TRL's SFTTrainer).

    cb = AimMergingCallback()                  # config: the "aim_merging" section of the Trainer's ds_config
    for task in tasks:                         # one Trainer per task, on the same model object
        if memory: cb.set_memory(memory)       # rows like train_dataset items
        Trainer(model=model, args=TrainingArguments(..., deepspeed=ds_config), train_dataset=task,
                callbacks=[cb]).train()        # each train() is one task
    cb.write_trajectory_csv("trajectory.csv")  # rank 0

Each train() builds a new DeepSpeed engine; the callback attaches a plugin to it in on_train_begin and hands
the previous plugin's state (task index, controller, memory positions, trajectory) to the new one. The engine is
`trainer.model_wrapped`; callbacks are handed only the unwrapped model, so the callback finds the Trainer that
calls it on the call stack (`bind(trainer)` names it explicitly for a loop that calls callbacks itself).

Under Accelerate the engine steps inside `accelerator.backward`, before the Trainer reads the step's gradient
norm; the plugin's work (probe, merge, rehearsal) therefore waits until `on_optimizer_step`, so the Trainer logs
the training step's gradient norm, not the rehearsal's.
"""

from __future__ import annotations

import inspect
import io
import os
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, default_data_collator

from . import mixed_loss, rows_loss
from .checkpoint import plugin_file
from .collectives import agree
from .errors import AimInputError
from .fileio import atomic_write_bytes
from .losses import token_loss_sum
from .plugin import AimPlugin

STATE_DIR = "aim_merging"  # inside the Trainer's checkpoint-N/: one file per rank


class AimMergingCallback(TrainerCallback):
    """AimMerging across a sequence of `Trainer.train()` calls, one per task (see the module docstring).

    memory: rows like train_dataset items (the rehearsal memory of the tasks so far); every rank takes
        rows[rank::world] and collates them with the Trainer's data collator into batches of
        memory_batch_size (default: per_device_train_batch_size). May be given later with set_memory().
    config: an AimConfig or dict overriding the ds_config's "aim_merging" section.
    replay_rows, memory_weight: mixed replay, used by `replay_collator()` and `compute_loss_func`.
    """

    def __init__(
        self,
        memory=None,
        config=None,
        memory_batch_size: int | None = None,
        replay_rows: int = 0,
        memory_weight: float | None = None,
    ):
        if memory_batch_size is not None and (not isinstance(memory_batch_size, int) or memory_batch_size < 1):
            raise AimInputError(
                f"AimMergingCallback(memory_batch_size={memory_batch_size!r}): expected an integer >= 1."
            )
        if not isinstance(replay_rows, int) or replay_rows < 0:
            raise AimInputError(f"AimMergingCallback(replay_rows={replay_rows!r}): expected an integer >= 0.")
        if memory_weight is not None and not 0.0 < memory_weight < 1.0:
            raise AimInputError(f"AimMergingCallback(memory_weight={memory_weight!r}): must be in (0, 1) or None.")
        self.config = config
        self.memory_batch_size = memory_batch_size
        self.replay_rows = replay_rows
        self.memory_weight = memory_weight
        self.plugin: AimPlugin | None = None
        self._rows = None
        self._replay_position = 0
        self._trainer = None
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

    def bind(self, trainer) -> AimMergingCallback:
        """Name the Trainer explicitly (only needed when no Trainer method is on the call stack of on_train_begin)."""
        self._trainer = trainer
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
        """A data collator that appends `replay_rows` memory rows (this rank's, cycled) after each batch's new-task
        rows, collated together by `collator`. Pair it with `compute_loss_func` (mixed replay; with
        "probe_source": "training_batch" those rows' loss is the forgetting signal)."""
        if self.replay_rows < 1:
            raise AimInputError("replay_collator() needs AimMergingCallback(replay_rows=K) with K >= 1.")
        return _ReplayCollator(self, collator)

    def compute_loss_func(self, outputs, labels, num_items_in_batch=None):
        """Trainer(compute_loss_func=cb.compute_loss_func) for batches made by `replay_collator`: the token-mean
        loss (or, with memory_weight w, (1 - w) x new rows + w x memory rows), normalised as the Trainer expects
        (by num_items_in_batch); hands the memory rows' loss to the plugin as the forgetting signal."""
        if labels is None:
            raise AimInputError(
                "compute_loss_func: the batch has no labels; the Trainer pops them from the inputs "
                "only when they are there."
            )
        k = self._rows_in_batch()
        n_new = labels.shape[0] - k
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        tokens = int((labels[:, 1:] != -100).sum())
        if self.memory_weight is not None and 0 < k < labels.shape[0]:
            loss, mem_sum, mem_n = mixed_loss(logits, labels, n_new, self.memory_weight)
            loss = loss * tokens  # a token-weighted share of the window, like the plain loss below
        else:
            loss = token_loss_sum(logits, labels)
            mem_sum, mem_n = rows_loss(logits, labels, slice(n_new, None)) if k else (0.0, 0)
        loss = loss / (num_items_in_batch if num_items_in_batch is not None else max(tokens, 1))
        p = self.plugin
        if torch.is_grad_enabled() and p is not None and p.records_probe_loss:
            p.record_probe_loss(mem_sum, mem_n)  # training forwards only (evaluation runs without grad)
        return loss

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
        from deepspeed import DeepSpeedEngine

        if not isinstance(engine, DeepSpeedEngine):
            raise AimInputError(
                "AimMergingCallback: this Trainer does not run DeepSpeed; pass TrainingArguments(deepspeed=ds_config)."
            )
        self.trainer_args = args
        previous, self.plugin = self.plugin, None
        if self._engine is not None and self._engine is not engine:
            # the previous task's engine still has ZeRO-3 hooks on this model (the Trainer never destroys it);
            # left in place beside the new engine's, the third task's first forward failed in DeepSpeed's
            # parameter coordinator. Destroyed only now, so the user can evaluate the finished task with it.
            self._engine.destroy()
        self._engine = engine
        plugin = AimPlugin(engine, memory=None, config=self.config)
        memory = self._memory_batches(trainer) if self._rows is not None and plugin.enabled else None
        if resume is not None and state.global_step > 0:
            if memory is not None:
                plugin.set_memory(memory)  # before the state: the memory positions are restored onto it
            self._load(plugin, resume)  # mid-task: anchor, controller and positions come from the checkpoint
        else:
            if previous is not None:
                plugin.load_state_dict(previous.state_dict())
            plugin.start_task(memory=memory)
        if plugin.enabled:
            plugin.defer_steps()  # engine.step() only marks the step; on_optimizer_step runs it (see module doc)
        self.plugin = plugin

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.plugin is not None and self.plugin.enabled:
            self.plugin.run_deferred_step()

    def on_save(self, args, state, control, **kwargs):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        p = self.plugin
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", STATE_DIR)
        os.makedirs(folder, exist_ok=True)
        rank, world = (p.rank, p.world_size) if p.enabled else (args.process_index, args.world_size)
        buf = io.BytesIO()
        torch.save({"plugin": p.state_dict(), "replay_position": self._replay_position}, buf)
        atomic_write_bytes(os.path.join(folder, plugin_file(rank, world)), buf.getvalue())

    def on_train_end(self, args, state, control, **kwargs):
        if self.plugin is not None:
            self.plugin.detach()

    # ------------------------------------------------------------------ internals
    def _find_trainer(self):
        """The Trainer running this callback, and the checkpoint it resumes from (None for a fresh start)."""
        frame = inspect.currentframe()
        trainer, resume = self._trainer, None
        while frame is not None:
            obj = frame.f_locals.get("self")
            if isinstance(obj, Trainer) and self in obj.callback_handler.callbacks:
                trainer = trainer or obj
                if frame.f_code.co_name == "_inner_training_loop":
                    resume = frame.f_locals.get("resume_from_checkpoint")
                break
            frame = frame.f_back
        del frame
        if trainer is None:
            raise AimInputError(
                "AimMergingCallback: no Trainer found calling on_train_begin; call "
                "callback.bind(trainer) before train()."
            )
        return trainer, resume

    def _memory_batches(self, trainer) -> list[dict]:
        """This rank's memory rows, collated by the Trainer's collator into memory_batch_size batches."""
        rank, world = trainer.args.process_index, trainer.args.world_size
        rows = [self._rows[i] for i in range(rank, len(self._rows), world)]
        size = self.memory_batch_size or trainer.args.per_device_train_batch_size
        batches = []
        for i in range(0, len(rows), size):
            b = trainer.data_collator(rows[i : i + size])
            batches.append({k: v for k, v in b.items() if torch.is_tensor(v)})
        return batches

    def _rows_in_batch(self) -> int:
        """Memory rows that replay_collator appends to every batch of this train() call."""
        return self.replay_rows if self._rows is not None else 0

    def _next_replay_rows(self) -> list:
        k = self._rows_in_batch()
        if not k:
            return []
        a = self.trainer_args
        mine = range(a.process_index, len(self._rows), a.world_size)
        rows = [self._rows[mine[(self._replay_position + i) % len(mine)]] for i in range(k)]
        self._replay_position += k
        return rows

    def _load(self, plugin, checkpoint: str) -> None:
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
        plugin.load_state_dict(saved["plugin"])
        self._replay_position = saved["replay_position"]


class _ReplayCollator:
    """New-task rows followed by the callback's replay rows, collated together (padding applies to both)."""

    def __init__(self, callback: AimMergingCallback, collator):
        self.callback, self.collator = callback, collator

    def __call__(self, features):
        return self.collator(list(features) + self.callback._next_replay_rows())
