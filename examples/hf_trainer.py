"""Continual learning with the Hugging Face Trainer and AimMerging, one Trainer per task.

    deepspeed --num_gpus 2 examples/hf_trainer.py                       # the generated default benchmark, tiny Llama
    deepspeed --num_gpus 2 examples/hf_trainer.py --benchmark standard --data-dir DATA --model HF_DIR [--lora 16]
    deepspeed --num_gpus 2 examples/hf_trainer.py --as-driver all      # launch/train.py's run, step for step

Tasks, tokenizer, memory and evaluation are the driver's (aim_ds.data, aim_ds.experiment.modeling, aim_ds.experiment.evaluation);
training is the Trainer's. With the ds_config's "probe_source": "training_batch" (ds_configs/cpu_zero3.json)
every batch of a later task carries memory rows (mixed replay, as the driver's --method aim) and their loss is
the forgetting signal; with "memory_forward" the plugin probes on its own. Writes results.json (the accuracy
matrix, OP, BWT), trajectory.csv and losses.csv (rank 0's loss per step, as the driver's) to --output-dir.

The Trainer path differs from the driver in five places (--as-driver names them); none is needed for quality
(BENCHMARKS.md, "Hugging Face Trainer against the driver"), all five together reproduce the driver's run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AS_DRIVER = ("decay", "loss", "order", "schedule", "replay")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmark", default="default", help="as launch/train.py --benchmark")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--order", type=int, default=None, help="as launch/train.py --order")
    p.add_argument("--max-train", type=int, default=None, help="training examples per task (all when omitted)")
    p.add_argument("--max-eval", type=int, default=None, help="evaluation examples per task (all when omitted)")
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
    p.add_argument(
        "--data-seed",
        type=int,
        default=None,
        help="seed of the data order (task t: this + t; default --seed): another draw of the order, all else equal",
    )
    p.add_argument(
        "--lora", type=int, default=0, metavar="R", help="peft LoRA adapters of rank R (0: full fine-tuning)"
    )
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x R)")
    p.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated module names (peft target_modules)")
    p.add_argument("--output-dir", default=None, help="default runs/hf-trainer-<time>")
    p.add_argument(
        "--as-driver",
        nargs="*",
        default=[],
        choices=(*AS_DRIVER, "all"),
        help="take the driver's choice where the Trainer's differs (BENCHMARKS.md measures each): decay = "
        "weight decay on every parameter (the Trainer skips biases and norms), loss = each rank's own token "
        "mean (average_tokens_across_devices=False; the Trainer's default normalises by the global batch's "
        "tokens), order = the driver's data order (a seeded shuffle per task, cut into global batches), "
        "schedule = the driver's learning rate per step (the Trainer's warm-up gives its first step lr 0), "
        "replay = the driver's replay draw (the memory cut once into seeded batches, cycled: replay_draw='cycle'), "
        "all = every one of them (reproduces launch/train.py's run)",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if "all" in args.as_driver:
        args.as_driver = list(AS_DRIVER)
    return args


def main(argv=None):
    args = parse_args(argv)
    from aim_ds.distributed import init_distributed

    info = init_distributed()  # before TrainingArguments: the Trainer then uses this process group
    import torch
    from transformers import Trainer, TrainingArguments

    from aim_ds import data as aim_data
    from aim_ds.experiment.evaluation import cl_metrics, evaluate_task
    from aim_ds.experiment.modeling import build_model, cache_folder, load_tokenizer
    from aim_ds.fileio import atomic_write_text, write_csv
    from aim_ds.hf import AimMergingCallback

    rank, world = info.rank, info.world_size
    out = args.output_dir or os.path.join("runs", time.strftime("hf-trainer-%Y%m%d-%H%M%S", time.gmtime()))
    cache = cache_folder()
    tasks = aim_data.load_tasks(
        args.benchmark,
        data_dir=args.data_dir,
        order=args.order,
        max_train=args.max_train,
        max_eval=args.max_eval,
        seed=args.seed,
    )
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
            data_seed=(args.seed if args.data_seed is None else args.data_seed) + t,  # the driver's for task t
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

        def create_scheduler(self, num_training_steps, optimizer=None):
            if "schedule" in args.as_driver and self.lr_scheduler is None:
                from torch.optim.lr_scheduler import LambdaLR

                from aim_ds.driver.batching import lr_at

                opt = optimizer if optimizer is not None else self.optimizer
                warm = self.args.warmup_steps
                self.lr_scheduler = LambdaLR(opt, lambda s: lr_at(s, num_training_steps, 1.0, warm))
            return super().create_scheduler(num_training_steps, optimizer)

        def _get_train_sampler(self, train_dataset=None):
            if "order" in args.as_driver:
                return DriverOrder(len(train_dataset or self.train_dataset), self.args.data_seed)
            return super()._get_train_sampler(train_dataset)

    first = training_args(0)  # before the model: ZeRO-3 partitions it at construction
    torch.manual_seed(args.seed)
    model, _keep = build_model(args.model, tokenizer, ds)
    if args.lora:  # the base frozen: the Trainer optimises, and the plugin tracks and merges, the adapters only
        from peft import LoraConfig, get_peft_model

        targets = [t.strip() for t in args.lora_targets.split(",")]
        alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora
        model = get_peft_model(
            model, LoraConfig(r=args.lora, lora_alpha=alpha, target_modules=targets, task_type="CAUSAL_LM")
        )
    collate = functools.partial(aim_data.collate, pad_id=tokenizer.pad_token_id)
    cb = AimMergingCallback(replay_rows=replay, replay_draw="cycle" if "replay" in args.as_driver else "stream")
    losses: list[dict] = []  # rank 0's training loss per step, as the driver's losses.csv (its own token mean)

    def compute_loss(outputs, labels, num_items_in_batch=None):
        loss = cb.compute_loss_func(outputs, labels, num_items_in_batch)
        if rank == 0 and torch.is_grad_enabled():
            own = loss.detach()
            if num_items_in_batch is not None:  # back from the global token count to this rank's mean
                own = own * num_items_in_batch / (labels[:, 1:] != -100).sum().clamp(min=1)
            task = len(matrix)
            last = losses[-1]["step"] if losses and losses[-1]["task"] == task else 0
            losses.append({"task": task, "step": last + 1, "loss": float(own)})
        return loss

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
            compute_loss_func=compute_loss,
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
        write_csv(os.path.join(out, "losses.csv"), losses, ["task", "step", "loss"])
        print(f"OP {metrics['OP']:.1f}  BWT {metrics['BWT']:.1f}  merges {merges}  -> {out}", flush=True)
    cb.write_trajectory_csv(os.path.join(out, "trajectory.csv"))
    import deepspeed

    deepspeed.comm.barrier()  # last collectives done before exit: gloo aborts if it frees one during shutdown


class DriverOrder:
    """The driver's order of a task's examples (aim_ds.data.batching.rank_batches): a seeded shuffle per
    epoch; Accelerate deals consecutive per-rank batches to the ranks, so each rank gets the driver's slice."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        from aim_ds.data.batching import seeded_stream

        return iter(seeded_stream(self.n, self.epoch * self.n, self.n, self.seed))


if __name__ == "__main__":
    main()
