"""Continual learning with the Hugging Face Trainer and AimMerging, one Trainer per task.

    deepspeed --num_gpus 2 examples/hf_trainer.py                       # the generated default benchmark, tiny Llama
    deepspeed --num_gpus 2 examples/hf_trainer.py --benchmark standard --data-dir DATA --model HF_DIR

Tasks, tokenizer, memory and evaluation are the driver's (aim_ds.data, aim_ds.modeling, aim_ds.evaluation);
training is the Trainer's. With the ds_config's "probe_source": "training_batch" (ds_configs/cpu_zero3.json)
every batch of a later task carries memory rows (mixed replay, as the driver's --method aim) and their loss is
the forgetting signal; with "memory_forward" the plugin probes on its own. Writes results.json (the accuracy
matrix, OP, BWT) and trajectory.csv to --output-dir.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmark", default="default", help="as launch/train.py --benchmark")
    p.add_argument("--data-dir", default=None)
    p.add_argument(
        "--deepspeed_config",
        "--deepspeed-config",
        dest="ds_config",
        default=os.path.join(REPO, "ds_configs", "cpu_zero3.json"),
    )
    p.add_argument(
        "--model",
        default=os.path.join(REPO, "configs", "tiny_llama.json"),
        help="a model config .json (random init) or a Hugging Face model folder",
    )
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--memory-fraction", type=float, default=0.02)
    p.add_argument("--max-len", type=int, default=160)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=None, help="default runs/hf-trainer-<time>")
    p.add_argument(
        "--as-driver",
        nargs="*",
        default=[],
        choices=("decay", "loss", "order"),
        help="take the driver's choice where the Trainer's differs (BENCHMARKS.md measures each): decay = "
        "weight decay on every parameter (the Trainer skips biases and norms), loss = each rank's own token "
        "mean (average_tokens_across_devices=False; the Trainer's default normalises by the global batch's "
        "tokens), order = the driver's data order (a seeded shuffle per task, cut into global batches)",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from aim_ds.distributed import init_distributed

    info = init_distributed()  # before TrainingArguments: the Trainer then uses this process group
    import torch
    from transformers import Trainer, TrainingArguments

    from aim_ds import data as aim_data
    from aim_ds.evaluation import cl_metrics, evaluate_task
    from aim_ds.fileio import atomic_write_text
    from aim_ds.hf import AimMergingCallback
    from aim_ds.modeling import build_model, load_tokenizer

    rank, world = info.rank, info.world_size
    out = args.output_dir or os.path.join("runs", time.strftime("hf-trainer-%Y%m%d-%H%M%S", time.gmtime()))
    cache = os.environ.get("AIM_DS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "aim_ds")
    tasks = aim_data.load_tasks(args.benchmark, data_dir=args.data_dir, seed=args.seed)
    tokenizer = load_tokenizer(None, args.model, tasks, os.path.join(cache, "tokenizers"), rank)
    with open(args.ds_config) as f:
        ds = json.load(f)
    micro = int(ds.get("train_micro_batch_size_per_gpu", 8))
    # explicit sizes: the Trainer's "auto" would compute the world size as 1 on CPU ranks
    ds.update(gradient_accumulation_steps=1, train_batch_size=micro * world)
    ds.pop("scheduler", None)  # the Trainer owns the learning-rate schedule (warm-up 6%, then cosine, per task)
    aim = ds.get("aim_merging", {})
    replay = micro if aim.get("enabled") and aim.get("probe_source") == "training_batch" else 0

    def training_args(t):
        return TrainingArguments(
            output_dir=os.path.join(out, f"task{t}"),
            deepspeed=ds,
            per_device_train_batch_size=micro,
            num_train_epochs=args.epochs,
            learning_rate=args.lr,
            lr_scheduler_type="cosine",
            warmup_steps=0.06,
            weight_decay=0.01,
            adam_beta2=0.98,
            max_grad_norm=float(ds.get("gradient_clipping", 1.0)),
            save_strategy="no",
            logging_steps=50,
            report_to=[],
            seed=args.seed,
            data_seed=args.seed + t,  # the driver's data seed for task t
            average_tokens_across_devices="loss" not in args.as_driver,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
        )

    class CLTrainer(Trainer):
        """The Trainer with the differences --as-driver names switched to the driver's."""

        def get_decay_parameter_names(self, model):
            if "decay" in args.as_driver:
                return [n for n, _ in model.named_parameters()]
            return super().get_decay_parameter_names(model)

        def _get_train_sampler(self, train_dataset=None):
            if "order" in args.as_driver:
                return DriverOrder(len(train_dataset or self.train_dataset), self.args.data_seed)
            return super()._get_train_sampler(train_dataset)

    first = training_args(0)  # before the model: ZeRO-3 partitions it at construction
    torch.manual_seed(args.seed)
    model, _keep = build_model(args.model, tokenizer, ds)
    collate = functools.partial(aim_data.collate, pad_id=tokenizer.pad_token_id)
    cb = AimMergingCallback(replay_rows=replay)
    memory, matrix = [], []
    t0 = time.time()
    for t, task in enumerate(tasks):
        if memory:
            cb.set_memory(memory)  # rows of every earlier task; each rank takes its share
        trainer = CLTrainer(
            model=model,
            args=first if t == 0 else training_args(t),
            train_dataset=aim_data.CausalLMExamples(task.train, tokenizer, args.max_len),
            data_collator=cb.replay_collator(collate) if replay else collate,
            compute_loss_func=cb.compute_loss_func,
            callbacks=[cb],
        )
        trainer.train()
        matrix.append(
            [
                evaluate_task(model, tokenizer, tasks[i], rank=rank, world_size=world, max_prompt_len=args.max_len)
                for i in range(t + 1)
            ]
        )
        memory += aim_data.CausalLMExamples(
            aim_data.select_memory(task, args.memory_fraction, args.seed), tokenizer, args.max_len
        ).items
        if rank == 0:
            print(f"task {t} ({task.name}): " + " ".join(f"{a:.1f}" for a in matrix[-1]), flush=True)
    metrics = cl_metrics(matrix)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        merges = sum(r["merge"] for r in cb.trajectory)
        result = {
            "tasks": [t.name for t in tasks],
            "matrix": matrix,
            "OP": metrics["OP"],
            "BWT": metrics["BWT"],
            "merges": merges,
            "seconds": time.time() - t0,
            "world": world,
            "ds_config": args.ds_config,
            "as_driver": args.as_driver,
        }
        atomic_write_text(os.path.join(out, "results.json"), json.dumps(result, indent=1))
        print(f"OP {metrics['OP']:.1f}  BWT {metrics['BWT']:.1f}  merges {merges}  -> {out}", flush=True)
    cb.write_trajectory_csv(os.path.join(out, "trajectory.csv"))


class DriverOrder:
    """The driver's order of a task's examples (aim_ds.driver.batching.rank_batches): a seeded shuffle per
    epoch; Accelerate deals consecutive per-rank batches to the ranks, so each rank gets the driver's slice."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        from aim_ds.driver.batching import seeded_stream

        return iter(seeded_stream(self.n, self.epoch * self.n, self.n, self.seed))


if __name__ == "__main__":
    main()
