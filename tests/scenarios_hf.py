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
from aim_ds.plugin.merge import Merge
from tests.scenarios import VOCAB, after_rehearsal, tiny_config

warnings.filterwarnings("ignore")
AIM = {"enabled": True, "initial_interval": 3, "min_interval": 2, "max_interval": 16, "threshold_factor": 1.05}


def world() -> int:
    return deepspeed.comm.get_world_size()


def ds_cfg(aim=None, gas=1, stage=3, micro=4):
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * world(),
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage},
    }
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
    kw = {"save_strategy": "no", **kw}
    return TrainingArguments(
        output_dir=str(out),
        deepspeed=cfg,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=gas,
        learning_rate=lr,
        num_train_epochs=1,
        max_steps=steps or -1,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        logging_steps=1,
        report_to=[],
        seed=0,
        use_cpu=True,
        dataloader_drop_last=True,
        disable_tqdm=True,
        **kw,
    )


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
        Trainer(model=model, args=args, train_dataset=rows, callbacks=[cb] if cb else [], **(trainer_kw or {})).train()
        memory = memory + rows[:memory_rows]
    return model


class Instrumented(AimMergingCallback):
    """Records, for every merge, the anchor, theta_k (before rehearsal), theta_M (after it) and the fused weights,
    gathered in full on every rank, and the optimizer steps rehearsal took."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.merges, self.rehearsal_steps_taken = [], []
        # Trainer step -> engine grad norm (before the merge, after it, right after its rehearsal); logged
        self.norms, self.logged = {}, {}

    def on_optimizer_step(self, args, state, control, **kw):
        self._step = state.global_step + 1  # the step the Trainer logs next
        super().on_optimizer_step(args, state, control, **kw)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "grad_norm" in logs:
            self.logged[state.global_step] = logs["grad_norm"]

    def on_train_begin(self, args, state, control, **kw):
        super().on_train_begin(args, state, control, **kw)
        p = self.plugin
        if not p.enabled:
            return
        engine = p.engine
        full = lambda: {
            n: safe_get_full_fp32_param(q).detach().float().cpu().clone()
            for n, q in engine.module.named_parameters()
            if q.requires_grad
        }
        self.anchor = full()
        merge = p._merge
        rehearse = self.__dict__.setdefault("_real_rehearse", Merge.rehearse)  # replaced, never chained, per task

        def _rehearse(m, steps):
            if m.ctx.state is not p.state:
                return rehearse(m, steps)
            self._k, before = full(), engine.global_steps
            out = rehearse(m, steps)
            self.rehearsal_steps_taken.append((steps, engine.global_steps - before))
            self._m = full()
            self._rehearsal_norm = float(engine.get_global_grad_norm())
            return out

        def _merge(**kw):
            before = float(engine.get_global_grad_norm())
            rec = merge(**kw)
            if rec.get("merged"):
                self.norms[self._step] = (before, float(engine.get_global_grad_norm()), self._rehearsal_norm)
                fused = full()
                a, k, m, wi, wo = self.anchor, self._k, self._m, rec["w_in"], rec["w_out"]
                ref = {n: a[n] + wi * (k[n] - a[n]) + wo * (m[n] - k[n]) for n in a}
                self.merges.append({"task": p.task_index, "err": max_abs(fused, ref), "moved": max_abs(fused, a)})
                self.anchor = fused
            return rec

        p._merge, Merge.rehearse = _merge, _rehearse


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
    return {
        "digest": digest(w),
        "merges_by_task": [sum(r["merge"] for r in traj if r["task"] == t) for t in range(3)],
        "rows": len(traj),
        "tasks": sorted({r["task"] for r in traj}),
        "fusion_err": [m["err"] for m in cb.merges],
        "moved": [m["moved"] for m in cb.merges],
        "csv": os.path.exists(path),
        "rehearsal": cb.rehearsal_steps_taken,
        "work": cb.plugin.work,
    }


def frozen(model) -> dict:
    return {n: p for n, p in gathered(model).items() if not dict(model.named_parameters())[n].requires_grad}


def lora_trainer(tmp):
    """peft LoRA (task_type CAUSAL_LM) under ZeRO-3 + Trainer with the callback: only adapters move and merge."""
    cb = Instrumented()
    tasks = [task_rows(t) for t in range(2)]
    model = run_tasks(os.path.join(tmp, "lora"), ds_cfg(AIM), tasks, cb, peft={"task_type": "CAUSAL_LM"}, lr=2e-2)
    base0 = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in frozen(model).items()}
    torch.manual_seed(0)
    ref = gathered(LlamaForCausalLM._from_config(tiny_config()))  # same seed, same init: the untouched base
    p = cb.plugin
    n_trainable = sum(
        q.ds_numel if hasattr(q, "ds_numel") else q.numel() for q in model.parameters() if q.requires_grad
    )
    return {
        "base_max_abs": max(((ref[k] - v).abs().max().item() for k, v in base0.items() if k in ref), default=-1),
        "base_compared": sum(1 for k in base0 if k in ref),
        "base_total": len(ref),
        "merges": len(cb.merges),
        "fusion_err": [m["err"] for m in cb.merges],
        "moved": [m["moved"] for m in cb.merges],
        "held": p.held_bytes(),
        "local_numel": p.shards.local_numel,
        "valid_numel": p.shards.local_valid_numel,
        "trainable": n_trainable,
    }


def contract_and_lora(tmp):
    out = {"contract": contract(os.path.join(tmp, "c"))}
    out["lora"] = lora_trainer(os.path.join(tmp, "l"))
    return out


def replay_gas2(tmp):
    """gradient_accumulation_steps 2, probe_source training_batch through the replay collator and
    compute_loss_func: every rehearsal takes exactly R optimizer steps; the probe comes from the mixed rows."""
    aim = dict(AIM, probe_source="training_batch")
    cb = Instrumented(replay_rows=2)
    tasks = [task_rows(t, n=96) for t in range(2)]
    run_tasks(
        tmp,
        ds_cfg(aim, gas=2),
        tasks,
        cb,
        gas=2,
        trainer_kw={"data_collator": cb.replay_collator(), "compute_loss_func": cb.compute_loss_func},
    )
    traj = cb.trajectory
    return {
        "rehearsal": cb.rehearsal_steps_taken,
        "merges": [r["step"] for r in traj if r["merge"]],
        "probe_rows_task1": sum(1 for r in traj if r["task"] == 1 and r["probe_loss"] is not None),
        "rows_task1": sum(1 for r in traj if r["task"] == 1),
        "fusion_err": [m["err"] for m in cb.merges],
        "norms": [[cb.logged.get(k), *v] for k, v in cb.norms.items()],
    }


def disabled(tmp):
    """ "enabled": false with the callback: the weights of a run without the callback, bit for bit."""
    tasks = [task_rows(t) for t in range(2)]
    with_cb = digest(
        gathered(run_tasks(os.path.join(tmp, "a"), ds_cfg({"enabled": False}), tasks, AimMergingCallback()))
    )
    without = digest(gathered(run_tasks(os.path.join(tmp, "b"), ds_cfg(), tasks)))
    return {"with": with_cb, "without": without}


def replay_and_disabled(tmp):
    return {"replay": replay_gas2(os.path.join(tmp, "r")), "disabled": disabled(os.path.join(tmp, "d"))}


def resume(tmp):
    """A Trainer checkpoint mid-task 1 + resume_from_checkpoint in a fresh Trainer, model and callback: the
    same final weights and trajectory as the uninterrupted run."""
    tasks = [task_rows(t) for t in range(2)]
    cb = AimMergingCallback()
    a = os.path.join(tmp, "a")
    model = run_tasks(a, ds_cfg(AIM), tasks, cb, save_strategy="steps", save_steps=3)
    full = digest(gathered(model))
    traj_a = cb.trajectory
    saved = sorted(os.listdir(os.path.join(a, "t1")))
    ckpt = os.path.join(a, "t1", "checkpoint-3")
    args = args_for(os.path.join(tmp, "b"), ds_cfg(AIM))
    model_b = new_model(args, seed=5)  # another init: the weights must come from the checkpoint
    cb_b = AimMergingCallback()
    cb_b.set_memory(tasks[0][:8])
    Trainer(model=model_b, args=args, train_dataset=tasks[1], callbacks=[cb_b]).train(resume_from_checkpoint=ckpt)
    return {
        "full": full,
        "resumed": digest(gathered(model_b)),
        "traj_a": traj_a,
        "traj_b": cb_b.trajectory,
        "saved": saved,
        "files": sorted(os.listdir(os.path.join(ckpt, "aim_merging"))),
        "merges": sum(r["merge"] for r in traj_a),
    }


def bad_inputs(tmp):
    out = {}
    for case in ("no_memory_task1", "stage2", "no_trainable"):
        try:
            d = os.path.join(tmp, case)
            tasks = [task_rows(t, n=16) for t in range(2)]
            if case == "no_memory_task1":
                run_tasks(d, ds_cfg(AIM), tasks, AimMergingCallback(), memory_rows=0)  # set_memory never called
            elif case == "stage2":  # ZeRO-2 (a common Trainer + LoRA setting) is served: no error, task 1 merges
                cb = AimMergingCallback()
                run_tasks(d, ds_cfg(AIM, stage=2), [task_rows(t) for t in range(2)], cb)
                out[case] = {"type": None, "message": "no error", "merges": sum(r["merge"] for r in cb.trajectory)}
                continue
            elif case == "no_trainable":
                args = args_for(d, ds_cfg(AIM))
                model = new_model(args)
                model.requires_grad_(False)
                Trainer(model=model, args=args, train_dataset=tasks[0], callbacks=[AimMergingCallback()]).train()
            out[case] = {"type": None, "message": "no error"}
        except Exception as e:  # noqa: BLE001 - the expected path: each case must raise
            out[case] = {"type": type(e).__name__, "message": str(e)[:600]}
    return out


def _steps(engine, rows, n, gas=1, accelerator=None, optimizer=None):
    for i in range(n * gas):
        b = {k: torch.stack([r[k] for r in rows[(4 * i) % len(rows) :][:4]]) for k in rows[0]}
        if accelerator is None:
            engine.backward(engine(**b).loss)
            engine.step()
        else:
            with accelerator.accumulate(engine):
                accelerator.backward(engine(**b).loss)
                optimizer.step()
                optimizer.zero_grad()


def _memory():
    rows = task_rows(0, n=16)
    mine = rows[deepspeed.comm.get_rank() :: world()]
    return [{k: torch.stack([r[k] for r in mine[i : i + 4]]) for k in mine[0]} for i in range(0, len(mine), 4)]


def raw_lora():
    """peft LoRA WITHOUT task_type (PeftModel.forward(*args, **kwargs)) in a raw ZeRO-3 loop: attach accepts the
    memory; a merge fuses the adapters exactly; frozen base weights are bit-unchanged."""
    from peft import LoraConfig, get_peft_model
    from transformers.integrations import HfDeepSpeedConfig

    cfg = ds_cfg({"enabled": True})
    unset_hf_deepspeed_config()
    keep = HfDeepSpeedConfig(cfg)
    torch.manual_seed(0)
    model = get_peft_model(
        LlamaForCausalLM._from_config(tiny_config()), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    plugin = aim_ds.attach(engine, _memory())
    plugin.start_task()
    full = lambda: {
        n: safe_get_full_fp32_param(q).float().cpu().clone()
        for n, q in engine.module.named_parameters()
        if q.requires_grad
    }
    base0, anchor = frozen(engine.module), full()
    _steps(engine, task_rows(1), 3)
    theta_k, seen = full(), {}
    w_in, w_out = 0.7, 0.2
    with after_rehearsal(lambda: seen.__setitem__("M", full())):  # theta_M, on every rank
        plugin.merge(weights=(w_in, w_out), rehearsal_steps=2)
    m = seen["M"]
    ref = {n: anchor[n] + w_in * (theta_k[n] - anchor[n]) + w_out * (m[n] - theta_k[n]) for n in anchor}
    n_trainable = sum(q.ds_numel for q in model.parameters() if q.requires_grad)
    del keep
    return {
        "fusion_err": max_abs(full(), ref),
        "moved": max_abs(theta_k, anchor),
        "base_max_abs": max_abs(frozen(engine.module), base0),
        "held": plugin.held_bytes(),
        "local_numel": plugin.shards.local_numel,
        "valid_numel": plugin.shards.local_valid_numel,
        "trainable": n_trainable,
    }


def accelerate_loop():
    """Accelerate's own loop (Accelerator(deepspeed_plugin=...), accelerator.backward, optimizer.step()) with
    gradient accumulation 2: attach(model) after prepare; a merge's rehearsal takes exactly R optimizer steps."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    unset_hf_deepspeed_config()
    cfg = ds_cfg(AIM, gas=2)
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg), gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(tiny_config())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    engine, opt = accelerator.prepare(model, opt)  # engine: the DeepSpeedEngine
    plugin = aim_ds.attach(engine)  # the added lines: attach, then start_task per task
    plugin.start_task()
    _steps(engine, task_rows(0), 4, gas=2, accelerator=accelerator, optimizer=opt)
    plugin.start_task(memory=_memory())
    g0 = engine.global_steps
    _steps(engine, task_rows(1), 6, gas=2, accelerator=accelerator, optimizer=opt)
    g1 = engine.global_steps
    auto = plugin.work["rehearsal_steps"]
    rec = plugin.merge(rehearsal_steps=3)
    return {
        "task1_steps": g1 - g0 - auto,
        "auto_rehearsal": auto,
        "explicit_r": rec["rehearsal_steps"],
        "explicit_steps": engine.global_steps - g1,
        "merges": plugin.merge_count,
    }


def raw_lora_and_accelerate(tmp):
    return {"raw_lora": raw_lora(), "accelerate": accelerate_loop()}


def sft_setup(tmp, aim):
    """TRL set-up shared by the SFTTrainer scenarios: a word-level tokenizer over the tiny model's vocabulary,
    and SFTConfig(task t) for a ds_config with the given aim_merging section."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig

    vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"<pad>": VOCAB - 1}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="<pad>", eos_token="<pad>"
    )

    def args(t):
        return SFTConfig(
            output_dir=os.path.join(tmp, f"t{t}"),
            deepspeed=ds_cfg(aim),
            per_device_train_batch_size=4,
            learning_rate=3e-3,
            num_train_epochs=1,
            lr_scheduler_type="constant",
            max_grad_norm=1.0,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            logging_steps=1,
            disable_tqdm=True,
            dataloader_drop_last=True,
            packing=False,
            max_length=64,
        )

    return tok, args


def trl_sft(tmp):
    """TRL's SFTTrainer with the callback (memory_forward probe): memory rows without labels are collated by
    SFTTrainer's own collator; task 0 never merges, task 1 does."""
    from datasets import Dataset
    from trl import SFTTrainer

    tok, args = sft_setup(tmp, AIM)

    first = args(0)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(tiny_config())
    cb, memory = AimMergingCallback(), []
    for t in range(2):
        rows = [{"input_ids": r["input_ids"].tolist()} for r in task_rows(t)]
        if memory:
            cb.set_memory(memory)
        SFTTrainer(
            model=model,
            args=first if t == 0 else args(t),
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            callbacks=[cb],
        ).train()
        memory += rows[:8]
    traj = cb.trajectory
    return {
        "merges": [sum(r["merge"] for r in traj if r["task"] == t) for t in range(2)],
        "probe_forwards": cb.plugin.work["probe_forwards"],
    }


def forever_trainer(tmp):
    """FOREVER through the callback: two train() calls, one per task; task 1 replays at its day-1 mark (step 2)
    and at its end (on_train_end)."""
    from aim_ds.config import ForeverConfig

    cb = AimMergingCallback(config=ForeverConfig(day_steps=2, replay_steps=1, consolidation_steps=1))
    run_tasks(os.path.join(tmp, "f"), ds_cfg(), [task_rows(0), task_rows(1)], cb)
    rows = cb.plugin.trajectory
    return {
        "steps": [(r["task"], r["step"]) for r in rows if r.get("delta") is not None],
        "replays": [(r["task"], r["step"], r["replay"]) for r in rows if r.get("replay") is not None],
        "work": cb.plugin.work,
        "method": type(cb.plugin).__name__,
    }
