# Your own DeepSpeed loop with AimMerging, two tasks. Run: deepspeed --num_gpus 2 examples/snippets/own_loop.py
import deepspeed
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import aim_ds
from aim_ds.distributed import release_cpu_shm_names

deepspeed.init_distributed()  # the accelerator's backend (gloo on CPU ranks)
release_cpu_shm_names()  # CPU ranks: DeepSpeed 0.19.8 never removes its /dev/shm file (no-op on GPUs)
rank, world = deepspeed.comm.get_rank(), deepspeed.comm.get_world_size()
ds_config = {
    "train_micro_batch_size_per_gpu": 4,
    "train_batch_size": 4 * world,
    "zero_optimization": {"stage": 3},
    "zero_allow_untested_optimizer": True,
    "aim_merging": {"enabled": True, "initial_interval": 4},  # every key: docs/configuration.md
}


def loader(task, n=16):  # this rank's batches of a task: tokens from the task's own band of the vocabulary
    g = torch.Generator().manual_seed(100 * task + rank)
    return [{"input_ids": x, "labels": x} for x in torch.randint(32 * task, 32 * task + 32, (n, 4, 12), generator=g)]


tasks = [0, 1]


def memory_for(task):  # rehearsal memory: a few batches of every earlier task; none before the first task
    return [b for t in tasks[:task] for b in loader(t)[:2]] or None


cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
model = LlamaForCausalLM(cfg)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
plugin = aim_ds.attach(engine, memory=None)  # the one added line (memory comes with each task)
for task in tasks:
    plugin.start_task(memory=memory_for(task))  # at the start of each task (task 0 never merges)
    for batch in loader(task):  # your ordinary loop, unchanged
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()  # the plugin runs after each optimizer step
plugin.write_trajectory_csv("trajectory.csv")  # rank 0: one row per step, "merge" = 1 where it merged
deepspeed.comm.barrier()  # last collectives done before exit: gloo aborts if it frees one during shutdown
deepspeed.comm.destroy_process_group()
