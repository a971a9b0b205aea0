"""Multi-rank scenarios for aim_ds.hf: a real HF Trainer (and Accelerate, peft) over real DeepSpeed ZeRO-3 on CPU
ranks (gloo), run by tests/mp.py. Each returns measured values; tests/test_hf.py asserts on them."""
from __future__ import annotations

import hashlib
import os
import warnings

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param
from transformers import LlamaForCausalLM, Trainer, TrainingArguments
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

import aim_ds
from aim_ds.hf import AimMergingCallback
from tests.scenarios import VOCAB, tiny_config

warnings.filterwarnings("ignore")
AIM = {"enabled": True, "initial_interval": 3, "min_interval": 2, "max_interval": 16, "threshold_factor": 1.05}


def world() -> int:
    return deepspeed.comm.get_world_size()


def ds_cfg(aim=None, gas=1, stage=3, micro=4):
    cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
           "train_batch_size": micro * gas * world(), "gradient_clipping": 1.0, "steps_per_print": 10**9,
           "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": stage}}
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if aim is not None:
        cfg["aim_merging"] = aim
    return cfg


def task_rows(task: int, n: int = 64, length: int = 12) -> list[dict]:
    """A generated task: each task uses its own band of the vocabulary, so learning one forgets another."""
    g = torch.Generator().manual_seed(100 + task)
    lo = (task * 29) % (VOCAB - 30)
    rows = []
    for _ in range(n):
        ids = torch.randint(lo, lo + 30, (length,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


def args_for(out, cfg, gas=1, steps=None, lr=3e-3, **kw):
    return TrainingArguments(output_dir=str(out), deepspeed=cfg, per_device_train_batch_size=4,
                             gradient_accumulation_steps=gas, learning_rate=lr, num_train_epochs=1,
                             max_steps=steps or -1, lr_scheduler_type="constant", max_grad_norm=1.0,
                             logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True,
                             dataloader_drop_last=True, disable_tqdm=True, **kw)


def new_model(args, seed=0, peft=None):
    """Built AFTER TrainingArguments(deepspeed=...) so ZeRO-3 partitions it at construction."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(tiny_config())
    if peft is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **peft))
    return model


def gathered(model) -> dict:
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}


def digest(w: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(w):
        h.update(k.encode())
        h.update(w[k].numpy().tobytes())
    return h.hexdigest()


def max_abs(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def run_tasks(out, cfg, tasks, cb=None, gas=1, memory_rows=8, seed=0, trainer_kw=None, peft=None, **args_kw):
    """The issue's contract: one Trainer per task on one model; memory = the first rows of every earlier task."""
    args = args_for(os.path.join(out, "t0"), cfg, gas=gas, **args_kw)
    model = new_model(args, seed, peft)
    memory = []
    for t, rows in enumerate(tasks):
        args = args_for(os.path.join(out, f"t{t}"), cfg, gas=gas, **args_kw)
        if cb is not None and memory:
            cb.set_memory(memory)
        Trainer(model=model, args=args, train_dataset=rows, callbacks=[cb] if cb else [],
                **(trainer_kw or {})).train()
        memory = memory + rows[:memory_rows]
    return model


class Instrumented(AimMergingCallback):
    """Records, for every merge, the anchor, theta_k (before rehearsal), theta_M (after it) and the fused weights,
    gathered in full on every rank, and the optimizer steps rehearsal took."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.merges, self.rehearsal_steps_taken = [], []

    def on_train_begin(self, args, state, control, **kw):
        super().on_train_begin(args, state, control, **kw)
        p = self.plugin
        if not p.enabled:
            return
        engine = p.engine
        full = lambda: {n: safe_get_full_fp32_param(q).detach().float().cpu().clone()  # noqa: E731
                        for n, q in engine.module.named_parameters() if q.requires_grad}
        self.anchor = full()
        merge, rehearse = p._merge, p._rehearse

        def _rehearse(steps):
            self._k, before = full(), engine.global_steps
            out = rehearse(steps)
            self.rehearsal_steps_taken.append((steps, engine.global_steps - before))
            self._m = full()
            return out

        def _merge(**kw):
            rec = merge(**kw)
            if rec.get("merged"):
                fused = full()
                a, k, m, wi, wo = self.anchor, self._k, self._m, rec["w_in"], rec["w_out"]
                ref = {n: a[n] + wi * (k[n] - a[n]) + wo * (m[n] - k[n]) for n in a}
                self.merges.append({"task": p.task_index, "err": max_abs(fused, ref), "moved": max_abs(fused, a)})
                self.anchor = fused
            return rec

        p._merge, p._rehearse = _merge, _rehearse


# ---------------------------------------------------------------------------------------- scenarios
def contract(tmp):
    """3 tasks, memory_forward probe: merges on tasks 1 and 2 only; fusion as the reference; ranks agree."""
    cb = Instrumented()
    tasks = [task_rows(t) for t in range(3)]
    model = run_tasks(tmp, ds_cfg(AIM), tasks, cb)
    w = gathered(model)
    path = os.path.join(tmp, "trajectory.csv")
    cb.write_trajectory_csv(path)
    traj = cb.trajectory
    return {"digest": digest(w), "merges_by_task": [sum(r["merge"] for r in traj if r["task"] == t) for t in range(3)],
            "rows": len(traj), "tasks": sorted({r["task"] for r in traj}), "fusion_err": [m["err"] for m in cb.merges],
            "moved": [m["moved"] for m in cb.merges], "csv": os.path.exists(path),
            "rehearsal": cb.rehearsal_steps_taken, "work": cb.plugin.work}
