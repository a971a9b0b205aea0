# A DeepSpeed pipeline (2 stages, ZeRO-1) with AimMerging, two tasks. Run: deepspeed --num_gpus 2 examples/snippets/pipeline_loop.py
import deepspeed
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import aim_ds
from aim_ds.distributed import release_cpu_shm_names
from aim_ds.experiment.pipeline import build_pipeline_model

deepspeed.init_distributed()  # the accelerator's backend (gloo on CPU ranks)
release_cpu_shm_names()  # CPU ranks: DeepSpeed 0.19.8 never removes its /dev/shm file (no-op on GPUs)
stages = 2
data_parallel = deepspeed.comm.get_world_size() // stages
ds_config = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 2,  # micro-batches per train_batch: what keeps the stages busy
    "train_batch_size": 4 * 2 * data_parallel,
    "zero_optimization": {"stage": 1},  # a pipeline engine runs ZeRO stage 0 or 1
    "zero_allow_untested_optimizer": True,
    "aim_merging": {"enabled": True, "initial_interval": 4},  # probe_source stays "memory_forward"
}


def loader(task, n=16):  # micro-batches of a task, as the pipeline's data iterator yields them: (input_ids, labels)
    g = torch.Generator().manual_seed(100 * task)
    return [(x, x) for x in torch.randint(32 * task, 32 * task + 32, (2 * n, 4, 12), generator=g)]


tasks = [0, 1]


def memory_for(task):  # rehearsal memory as dicts; pipe_batch below turns each into a micro-batch
    return [{"input_ids": x, "labels": y} for t in tasks[:task] for x, y in loader(t)[:2]] or None


cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
pipe = build_pipeline_model(LlamaForCausalLM(cfg), stages)  # any deepspeed.pipe.PipelineModule works
optimizer = torch.optim.AdamW([p for p in pipe.parameters() if p.requires_grad], lr=3e-3)
engine, optimizer, _, _ = deepspeed.initialize(model=pipe, optimizer=optimizer, config=ds_config)
plugin = aim_ds.attach(engine, memory=None, pipe_batch=lambda b: (b["input_ids"], b["labels"]))
for task in tasks:
    plugin.start_task(memory=memory_for(task))  # at the start of each task (task 0 never merges)
    data = iter(loader(task))
    for _ in range(16):
        engine.train_batch(data)  # 2 micro-batches through both stages; the plugin runs after the step
plugin.write_trajectory_csv("trajectory.csv")  # rank 0: one row per step, "merge" = 1 where it merged
deepspeed.comm.barrier()  # last collectives done before exit: gloo aborts if it frees one during shutdown
deepspeed.comm.destroy_process_group()
