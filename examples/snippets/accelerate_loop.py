# Accelerate's own loop with AimMerging: attach to the DeepSpeed engine that accelerator.prepare returns.
# Run: deepspeed --num_gpus 2 examples/snippets/accelerate_loop.py
import deepspeed
import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin
from transformers import LlamaConfig, LlamaForCausalLM

import aim_ds
from aim_ds.distributed import release_cpu_shm_names

deepspeed.init_distributed()  # before the Accelerator (CPU ranks need it: gloo); on GPUs Accelerate would do it
release_cpu_shm_names()  # CPU ranks: DeepSpeed 0.19.8 never removes its /dev/shm file (no-op on GPUs)
rank, world = deepspeed.comm.get_rank(), deepspeed.comm.get_world_size()
ds_config = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 2,
    "train_batch_size": 8 * world,
    "zero_optimization": {"stage": 3},
    "zero_allow_untested_optimizer": True,
    "aim_merging": {"initial_interval": 4},
}


def loader(task, n=32):  # this rank's batches of a task: tokens from the task's own band of the vocabulary
    g = torch.Generator().manual_seed(100 * task + rank)
    return [{"input_ids": x, "labels": x} for x in torch.randint(32 * task, 32 * task + 32, (n, 4, 12), generator=g)]


def memory_for(task):  # rehearsal memory: a few batches of every earlier task; none before the first task
    return [b for t in range(task) for b in loader(t)[:2]] or None


accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config), gradient_accumulation_steps=2)
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
model = LlamaForCausalLM(cfg)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
engine, optimizer = accelerator.prepare(model, optimizer)
plugin = aim_ds.attach(engine)  # the added line
for task in range(2):
    plugin.start_task(memory=memory_for(task))  # and this one, per task
    for batch in loader(task):
        with accelerator.accumulate(engine):
            accelerator.backward(engine(**batch).loss)
            optimizer.step()
            optimizer.zero_grad()
plugin.write_trajectory_csv("trajectory.csv")  # rank 0: one row per optimizer step, "merge" = 1 where it merged
deepspeed.comm.barrier()  # last collectives done before exit: gloo aborts if it frees one during shutdown
deepspeed.comm.destroy_process_group()
