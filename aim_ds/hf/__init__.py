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
calls it on the call stack (`bind(trainer)` names it for one train() whose callbacks run outside a Trainer method).
A resumed train() is told by the Trainer's state (global_step > 0 at on_train_begin); its checkpoint folder is the
`resume_from_checkpoint` the Trainer's own frames hold (or `bind(trainer, resume_from_checkpoint=...)`).

Mixed replay draws its memory rows like the driver: batch c of a task takes positions c x K x world + rank x K
.. + K of a seeded stream over all memory rows (a fresh shuffle per pass, seed = TrainingArguments.seed + 7 x task
+ 1), so the draws are reproducible, differ across batches, and a resumed run draws from the position its
checkpoint recorded (the micro-batches already trained). The collator must run in the main process
(dataloader_num_workers 0): a worker's copy of the position would advance alone.

The Trainer's eval dataloader collates with the same data_collator, and no event precedes an evaluation
(on_evaluate follows it; eval_strategy="steps" runs one between two training batches). The collator therefore
tells an evaluation batch by a Trainer's evaluate/predict frame on the call stack (the eval dataloader is iterated
there, in the main process): such batches get no memory rows, leave the replay position where training left it,
and `compute_loss_func` gives them the plain token-mean loss and the plugin no forgetting-signal record.

Under Accelerate the engine steps inside `accelerator.backward`, before the Trainer reads the step's gradient
norm; the plugin's work (probe, merge, rehearsal) therefore waits until `on_optimizer_step`, so the Trainer logs
the training step's gradient norm, not the rehearsal's.

    callback   AimMergingCallback (the Trainer events, the plugin's hand-over between train() calls, resume,
               the replay draws and the mixed-replay loss) and the check of the Trainer's engine
    collator   the replay collator (memory rows after each training batch's rows) and how an evaluation batch
               is told (EVAL_METHODS on the call stack)
"""

from .callback import REPLAY_DRAWS, STATE_DIR, AimMergingCallback
from .collator import EVAL_METHODS

__all__ = ["EVAL_METHODS", "REPLAY_DRAWS", "STATE_DIR", "AimMergingCallback"]
