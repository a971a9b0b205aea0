"""The AimMergingCallback's overhead on a Trainer step with no probe and no merge, as a ratio measured side by side.

    deepspeed --num_gpus 2 benchmarks/hf_overhead.py [--rounds 6 --steps 40]

One model, one process group; Trainers with and without the callback alternate (round by round, the order
flipped each round), each training --steps steps. The callback runs a merging task (task >= 1: the per-step
merge decision and its 8-byte broadcast run) with the "fixed" interval rule and an interval longer than the
run, so no probe and no merge happen. A timing callback records each optimizer step's wall time (on_step_begin
to on_step_end); "ratio" is median(with) / median(without) over all rounds, and "callback_share" the median time
inside the callback's on_optimizer_step over the median step with it. Prints one JSON line on rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._t = [], None

    def on_step_begin(self, *a, **k):
        self._t = time.perf_counter()

    def on_step_end(self, *a, **k):
        self.times.append(time.perf_counter() - self._t)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--local_rank", type=int, default=None)
    a = p.parse_args(argv)
    from aim_ds.distributed import init_distributed

    info = init_distributed()
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        Trainer,
        TrainingArguments,
    )

    from aim_ds.hf import AimMergingCallback

    micro, world = 8, info.world_size
    ds = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro * world,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3},
    }
    aim = {
        "enabled": True,
        "interval_rule": "fixed",
        "initial_interval": 10**6,
        "min_interval": 1,
        "max_interval": 10**6,
    }
    out = tempfile.mkdtemp(prefix="hf_overhead_")

    def targs():
        return TrainingArguments(
            output_dir=out,
            deepspeed=ds,
            per_device_train_batch_size=micro,
            max_steps=a.steps,
            learning_rate=1e-3,
            lr_scheduler_type="constant",
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
            logging_steps=10**6,
        )

    first = targs()
    cfg = AutoConfig.from_pretrained(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_llama.json"))
    cfg.vocab_size = 2000
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(micro * world * a.steps):
        ids = torch.randint(0, cfg.vocab_size, (64,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    cb = AimMergingCallback(config=aim)
    # the callback's own work per step (the merge decision and its broadcast run in on_optimizer_step), timed
    # inside the same steps: a direct share of the step, free of the run-to-run noise of a shared machine
    inner, spent = cb.on_optimizer_step, []

    def timed(*args, **kw):
        t = time.perf_counter()
        out = inner(*args, **kw)
        spent.append(time.perf_counter() - t)
        return out

    cb.on_optimizer_step = timed
    times = {"with": [], "without": []}
    # task 0 with the callback (no merging there), then rounds; the memory makes later tasks merging tasks
    Trainer(model=model, args=first, train_dataset=rows, callbacks=[cb]).train()
    cb.set_memory(rows[: micro * world])
    spent.clear()
    for r in range(a.rounds):
        for kind in ("with", "without") if r % 2 == 0 else ("without", "with"):
            timer = StepTimer()
            callbacks = [cb, timer] if kind == "with" else [timer]
            Trainer(model=model, args=targs(), train_dataset=rows, callbacks=callbacks).train()
            times[kind] += timer.times[2:]  # the first steps of a new engine warm up
    if info.rank == 0:
        w, wo = statistics.median(times["with"]), statistics.median(times["without"])
        merges = sum(x["merge"] for x in cb.trajectory)
        own = statistics.median(spent)
        print(
            json.dumps(
                {
                    "ratio": w / wo,
                    "callback_share": own / w,
                    "median_callback_s": own,
                    "median_step_s_with": w,
                    "median_step_s_without": wo,
                    "steps_each": len(times["with"]),
                    "merges": merges,
                    "rounds": a.rounds,
                    "world": world,
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                }
            )
        )


if __name__ == "__main__":
    main()
