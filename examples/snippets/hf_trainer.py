# The Hugging Face Trainer with AimMerging: one callback, one Trainer per task on the same model.
# Run: deepspeed --num_gpus 2 examples/snippets/hf_trainer.py
import deepspeed
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

from aim_ds.distributed import release_cpu_shm_names
from aim_ds.hf import AimMergingCallback

deepspeed.init_distributed()  # before TrainingArguments (CPU ranks need it: gloo); on GPUs the Trainer would do it
release_cpu_shm_names()  # CPU ranks: DeepSpeed 0.19.8 never removes its /dev/shm file (no-op on GPUs)
ds_config = {
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "zero_optimization": {"stage": 3},
    "zero_allow_untested_optimizer": True,
    "aim_merging": {"initial_interval": 4},  # the callback's config (AimMergingCallback(config=...) overrides it)
}


def rows(task, n=128):  # a task's training rows: tokens from the task's own band of the vocabulary
    g = torch.Generator().manual_seed(task)
    return [{"input_ids": x, "labels": x} for x in torch.randint(32 * task, 32 * task + 32, (n, 12), generator=g)]


def args(t):  # one TrainingArguments per Trainer (Accelerate refuses a second Trainer on the same one)
    return TrainingArguments(
        output_dir=f"out/task{t}",
        deepspeed=ds_config,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        num_train_epochs=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
    )


tasks = [rows(0), rows(1)]
first = args(0)  # before the model: ZeRO-3 partitions it at construction
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
model = AutoModelForCausalLM.from_config(cfg)  # or .from_pretrained(NAME)
cb = AimMergingCallback()  # config: the ds_config's "aim_merging" section
memory = []  # rows like train_dataset items, of the earlier tasks
for t, task in enumerate(tasks):
    if memory:  # none before the first task, which never merges
        cb.set_memory(memory)
    Trainer(model=model, args=first if t == 0 else args(t), train_dataset=task, callbacks=[cb]).train()
    memory += task[:16]
cb.write_trajectory_csv("trajectory.csv")  # rank 0: "task" = the train() call, "merge" = 1 where it merged
deepspeed.comm.barrier()  # last collectives done before exit: gloo aborts if it frees one during shutdown
deepspeed.comm.destroy_process_group()
