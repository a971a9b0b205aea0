"""Multi-rank scenarios for aim_ds.hf's mixed replay and its fault paths (issue 29 item 5, issue 25): a real HF
Trainer (and TRL's SFTTrainer) over real DeepSpeed ZeRO-3 on CPU ranks (gloo), run by tests/mp.py."""

from __future__ import annotations

import os
import types

import torch
from transformers import Trainer

from aim_ds.hf import AimMergingCallback
from tests.scenarios_hf import AIM, args_for, digest, ds_cfg, gathered, new_model, sft_setup, task_rows, world

TRAINING_BATCH = dict(AIM, probe_source="training_batch")


def _key(row) -> tuple:
    return tuple(torch.as_tensor(row["input_ids"]).tolist())


class Recording(AimMergingCallback):
    """Records the memory rows each replay batch drew (by their index in the memory list), the size of every
    memory batch the plugin was given, and every record_probe_loss call."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.draws, self.memory_rows, self.records = [], [], 0

    def set_memory(self, rows):
        super().set_memory(rows)
        self._index = {_key(r): i for i, r in enumerate(rows)}

    def _next_replay_rows(self):
        rows = super()._next_replay_rows()
        if rows:
            self.draws.append([self._index[_key(r)] for r in rows])
        return rows

    def on_train_begin(self, args, state, control, **kw):
        super().on_train_begin(args, state, control, **kw)
        p = self.plugin
        if p.enabled and p.state.memory is not None:
            self.memory_rows.append([int(b["input_ids"].shape[0]) for b in p.state.memory])
        record = p.record_probe_loss

        def counted(*a):
            self.records += 1
            return record(*a)

        p.record_probe_loss = counted


def _trainer(cb, args, model, rows, cls=Trainer):
    return cls(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=cb.replay_collator(),
        compute_loss_func=cb.compute_loss_func,
        callbacks=[cb],
    )


def _patched_loop_trainer():
    """A Trainer whose training loop runs under another frame name (as Unsloth's `_fast_inner_training_loop`)."""
    f = Trainer._inner_training_loop
    code = f.__code__.replace(co_name="_fast_inner_training_loop", co_qualname="_fast_inner_training_loop")
    loop = types.FunctionType(code, f.__globals__, f.__name__, None, f.__closure__)
    loop.__defaults__, loop.__kwdefaults__ = f.__defaults__, f.__kwdefaults__
    return type("PatchedLoopTrainer", (Trainer,), {"_inner_training_loop": loop})


def replay_draws_and_resume(tmp):
    """Two tasks with the replay collator (K = 2, gradient accumulation 2, training_batch probe), checkpoints every 3
    steps; then task 1 resumed from checkpoint-3 in a fresh model, Trainer and callback, once by a plain Trainer
    and once by one whose loop has another frame name."""
    tasks = [task_rows(t, n=96) for t in range(2)]
    cfg, gas = ds_cfg(TRAINING_BATCH, gas=2), 2
    out = {}
    a = os.path.join(tmp, "a")
    cb = Recording(replay_rows=2)
    model = new_model(args_for(os.path.join(a, "t0"), cfg, gas=gas))
    for t in range(2):
        args = args_for(os.path.join(a, f"t{t}"), cfg, gas=gas, save_strategy="steps", save_steps=3)
        if t:
            cb.set_memory(tasks[0][:16])
        _trainer(cb, args, model, tasks[t]).train()
    out["full"], out["traj"], out["draws"] = digest(gathered(model)), cb.trajectory, cb.draws
    out["memory_rows"], out["records"] = cb.memory_rows, cb.records
    out["replay_seed"] = getattr(cb, "_replay_seed", None)  # absent before the seeded draws
    ckpt = os.path.join(a, "t1", "checkpoint-3")
    for name, cls in (("resumed", Trainer), ("patched", _patched_loop_trainer())):
        args = args_for(os.path.join(tmp, name), cfg, gas=gas)
        model_b = new_model(args, seed=5)  # another init: the weights must come from the checkpoint
        cb_b = Recording(replay_rows=2)
        cb_b.set_memory(tasks[0][:16])
        try:
            _trainer(cb_b, args, model_b, tasks[1], cls).train(resume_from_checkpoint=ckpt)
            out[name] = {"digest": digest(gathered(model_b)), "traj": cb_b.trajectory, "draws": cb_b.draws}
        except Exception as e:  # noqa: BLE001 - today's code may refuse; the test reads the outcome
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


def bind_and_workers(tmp):
    """(c) bind(trainer) for task 0, then task 1 by another Trainer without bind: the plugin must attach to task
    1's engine and merge there. (b) dataloader_num_workers=2 with the replay collator: one clear error."""
    out = {}
    tasks = [task_rows(t) for t in range(2)]
    cfg = ds_cfg(AIM)
    cb = AimMergingCallback()
    model = new_model(args_for(os.path.join(tmp, "b0"), cfg))
    t0 = Trainer(model=model, args=args_for(os.path.join(tmp, "b0"), cfg), train_dataset=tasks[0], callbacks=[cb])
    cb.bind(t0)
    t0.train()
    cb.set_memory(tasks[0][:8])
    t1 = Trainer(model=model, args=args_for(os.path.join(tmp, "b1"), cfg), train_dataset=tasks[1], callbacks=[cb])
    t1.train()
    out["bind"] = {
        "engine_is_task1": cb.plugin.engine is t1.model_wrapped,
        "merges_task1": sum(r["merge"] for r in cb.trajectory if r["task"] == 1),
    }
    cb = AimMergingCallback(replay_rows=2)
    cb.set_memory(tasks[0][:8])
    args = args_for(os.path.join(tmp, "w"), ds_cfg(TRAINING_BATCH), dataloader_num_workers=2, steps=2)
    try:
        _trainer(cb, args, new_model(args), task_rows(1, n=16)).train()
        out["workers"] = {"type": None, "message": "no error"}
    except Exception as e:  # noqa: BLE001 - the expected path
        out["workers"] = {"type": type(e).__name__, "message": str(e)[:600]}
    return out


def trl_mixed_replay(tmp):
    """TRL's SFTTrainer with mixed replay through the documented compute_loss override (cb.compute_loss):
    K memory rows in every batch of task 1, their loss the forgetting signal, one record per training
    micro-batch (SFTTrainer's metrics forward is not one), no probe forward of the plugin's own."""
    from datasets import Dataset
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from tests.scenarios import tiny_config

    tok, args = sft_setup(tmp, TRAINING_BATCH)
    cb = Recording(replay_rows=2)

    class ReplaySFTTrainer(SFTTrainer):  # the README's override, verbatim
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return cb.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    first = args(0)
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM._from_config(tiny_config())
    memory, steps = [], []
    collator = cb.replay_collator(DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id))
    for t in range(2):
        rows = [{"input_ids": r["input_ids"].tolist()} for r in task_rows(t)]
        if memory:
            cb.set_memory(memory)
        before = cb.records
        tr = ReplaySFTTrainer(
            model=model,
            args=first if t == 0 else args(t),
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            data_collator=collator,
            callbacks=[cb],
        )
        tr.train()
        steps.append({"records": cb.records - before, "micro_batches": tr.state.global_step})
        memory += rows[:8]
    traj = cb.trajectory
    return {
        "steps": steps,
        "merges": [sum(r["merge"] for r in traj if r["task"] == t) for t in range(2)],
        "probe_rows_task1": sum(1 for r in traj if r["task"] == 1 and r["probe_loss"] is not None),
        "rows_task1": sum(1 for r in traj if r["task"] == 1),
        "probe_forwards": cb.plugin.work["probe_forwards"],
        "draws": len(cb.draws),
        "world": world(),
    }


def hp_search_trial_folder(tmp):
    """Trainer.hyperparameter_search (optuna, one trial) with the callback and save_steps: the callback's state
    must land in the trial's own checkpoint folder, beside the Trainer's files for it."""
    cfg = ds_cfg(AIM)
    args = args_for(tmp, cfg, save_strategy="steps", save_steps=2, steps=4)
    cb = AimMergingCallback()
    rows = task_rows(0, n=32)
    trainer = Trainer(
        model_init=lambda: new_model(args), args=args, train_dataset=rows, eval_dataset=rows[:8], callbacks=[cb]
    )
    trainer.hyperparameter_search(
        backend="optuna", n_trials=1, direction="minimize", hp_space=lambda trial: {}, compute_objective=lambda m: 0.0
    )
    found = {}
    for root, _, files in os.walk(tmp):
        for f in files:
            if f.startswith("aim_plugin_") or f in ("trainer_state.json", "latest"):
                found.setdefault(os.path.relpath(root, tmp).split(os.sep)[0], []).append(f)
    return {k: sorted(v) for k, v in found.items()}
