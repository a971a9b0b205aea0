# Mixed replay: memory rows in every training batch, their loss the forgetting signal (no probe forward).
# Run: deepspeed --num_gpus 2 examples/snippets/mixed_replay.py
import deepspeed
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import aim_ds
from aim_ds.distributed import release_cpu_shm_names

MEMORY_WEIGHT = None  # or e.g. 0.5: the memory rows weigh that much however few they are (the driver's --memory-weight)
deepspeed.init_distributed()  # the accelerator's backend (gloo on CPU ranks)
release_cpu_shm_names()  # CPU ranks: DeepSpeed 0.19.8 never removes its /dev/shm file (no-op on GPUs)
rank, world = deepspeed.comm.get_rank(), deepspeed.comm.get_world_size()
ds_config = {
    "train_micro_batch_size_per_gpu": 4,
    "train_batch_size": 4 * world,
    "zero_optimization": {"stage": 3},
    "zero_allow_untested_optimizer": True,
    "aim_merging": {"initial_interval": 4, "probe_source": "training_batch", "rehearsal_fraction": 0.25},
}


def loader(task, n=16):  # this rank's batches of a task: tokens from the task's own band of the vocabulary
    g = torch.Generator().manual_seed(100 * task + rank)
    return [{"input_ids": x, "labels": x} for x in torch.randint(32 * task, 32 * task + 32, (n, 4, 12), generator=g)]


def memory_for(task):  # rehearsal memory: a few batches of every earlier task; none before the first task
    return [b for t in range(task) for b in loader(t)[:2]] or None


cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
model = LlamaForCausalLM(cfg)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
plugin = aim_ds.attach(engine, memory=None)
for task in range(2):
    memory = memory_for(task)
    plugin.start_task(memory=memory)
    for i, new in enumerate(loader(task)):
        mem = memory[i % len(memory)] if memory else {k: v[:0] for k, v in new.items()}  # no memory rows on task 0
        batch = {k: torch.cat([new[k], mem[k][:2]]) for k in new}  # new-task rows followed by n_mem memory rows
        n_new = len(new["input_ids"])
        if MEMORY_WEIGHT is None:  # the model's own loss: the token mean over all rows
            out = engine(**batch)
            loss = out.loss
            plugin.record_probe_loss(*aim_ds.rows_loss(out.logits, batch["labels"], slice(n_new, None)))
        else:  # the model computes no loss of its own; one cross-entropy gives the loss and the memory rows' figures
            out = engine(**{k: v for k, v in batch.items() if k != "labels"})
            loss, mem_sum, mem_n = aim_ds.mixed_loss(out.logits, batch["labels"], n_new, memory_weight=MEMORY_WEIGHT)
            plugin.record_probe_loss(mem_sum, mem_n)  # every rank, before engine.step(); no memory rows: (0, 0)
        engine.backward(loss)
        engine.step()
plugin.write_trajectory_csv("trajectory.csv")  # rank 0: one row per step, "merge" = 1 where it merged
deepspeed.comm.barrier()  # last collectives done before exit: gloo aborts if it frees one during shutdown
deepspeed.comm.destroy_process_group()
