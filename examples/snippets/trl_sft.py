# TRL's SFTTrainer with AimMerging on mixed replay: the callback, its replay collator, a compute_loss override.
# Run: deepspeed --num_gpus 2 examples/snippets/trl_sft.py
import deepspeed
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from aim_ds.distributed import release_cpu_shm_names
from aim_ds.hf import AimMergingCallback

deepspeed.init_distributed()  # before SFTConfig (CPU ranks need it: gloo); on GPUs the Trainer would do it
release_cpu_shm_names()  # CPU ranks: DeepSpeed 0.19.8 never removes its /dev/shm file (no-op on GPUs)
ds_config = {
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "zero_optimization": {"stage": 3},
    "zero_allow_untested_optimizer": True,
    "aim_merging": {"initial_interval": 4, "probe_source": "training_batch", "rehearsal_fraction": 0.25},
}
vocab = {f"t{i}": i for i in range(64)}  # a stand-in tokenizer: use your model's
tok = PreTrainedTokenizerFast(
    tokenizer_object=Tokenizer(models.WordLevel(vocab, "t0")), pad_token="t63", eos_token="t63"
)


def rows(task, n=128):  # a task's rows (SFTTrainer's collator adds the labels): tokens from the task's own band
    g = torch.Generator().manual_seed(task)
    return [{"input_ids": x.tolist()} for x in torch.randint(32 * task, 32 * task + 31, (n, 12), generator=g)]


def args(t):  # one SFTConfig per Trainer; the replay collator needs dataloader_num_workers=0 (the default)
    return SFTConfig(
        output_dir=f"out/task{t}",
        deepspeed=ds_config,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        num_train_epochs=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
    )


cb = AimMergingCallback(replay_rows=2)  # 2 memory rows appended to every batch of task 1 on


class ReplaySFTTrainer(SFTTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return cb.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)


first = args(0)  # before the model: ZeRO-3 partitions it at construction
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
model = AutoModelForCausalLM.from_config(cfg)  # or .from_pretrained(NAME)
collator = cb.replay_collator(DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id))
memory = []
for t in range(2):
    task = rows(t)
    if memory:  # none before the first task, which never merges
        cb.set_memory(memory)
    ReplaySFTTrainer(
        model=model,
        args=first if t == 0 else args(t),
        train_dataset=Dataset.from_list(task),
        processing_class=tok,
        data_collator=collator,
        callbacks=[cb],
    ).train()
    memory += task[:16]
cb.write_trajectory_csv("trajectory.csv")  # rank 0: "task" = the train() call, "merge" = 1 where it merged
deepspeed.comm.barrier()  # last collectives done before exit: gloo aborts if it frees one during shutdown
deepspeed.comm.destroy_process_group()
