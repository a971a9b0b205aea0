"""Multi-rank scenarios run by tests/mp.py on real DeepSpeed ZeRO-3 engines (CPU, gloo).

Each returns a JSON-able dict of measured values; the pytest side asserts on them, so a failure
message shows the numbers. Models are tiny Llamas built from a config on the fly.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

import aim_ds
from aim_ds.experiment.modeling import tiny_llama_config

VOCAB = 97
_keep = []  # HfDeepSpeedConfig must stay alive while zero.Init builds the model


@contextlib.contextmanager
def after_rehearsal(fn):
    """Within the block every merge calls fn() between its rehearsal and its fusion (on every rank)."""
    from aim_ds.plugin.merge import Merge

    real = Merge.rehearse

    def rehearse(self, steps):
        out = real(self, steps)
        fn()
        return out

    Merge.rehearse = rehearse
    try:
        yield
    finally:
        Merge.rehearse = real


def tiny_config(**overrides) -> LlamaConfig:
    # sizes chosen so that most tensors are not divisible by 3: 3 ranks pad the last partitions
    sizes = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=70, max_position_embeddings=64, attention_dropout=0.0
    )
    return tiny_llama_config(**{**sizes, **overrides})


def ds_config(dtype="fp32", persistence=0, stage=3, aim=None, gas=1, scheduler=False, offload=False):
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage},
    }
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = persistence
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        cfg["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on the host: no cpu_adam JIT build
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    if dtype == "fp16":  # dynamic loss scaling from 2^8: no overflow-skipped step in these short runs
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
    if aim is not None:
        cfg["aim_merging"] = aim
    if scheduler:
        cfg["scheduler"] = {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 100},
        }
    return cfg


def make_engine(cfg: dict, seed: int = 0, lr: float = 1e-3, dropout: float = 0.0, sgd: bool = False, lora=None):
    """sgd: plain SGD (no momentum, no weight decay), where a step is theta - lr * grad; else AdamW.
    lora: peft LoRA adapters of rank 4 on these modules, the base frozen."""
    torch.manual_seed(seed)
    unset_hf_deepspeed_config()
    _keep.append(HfDeepSpeedConfig(cfg))
    model = LlamaForCausalLM._from_config(tiny_config(attention_dropout=dropout))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(lora)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    if sgd:
        opt = torch.optim.SGD(trainable, lr=lr)
    else:
        opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def batch(seed: int, rows: int = 4, length: int = 12, all_ignored=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=g)
    labels = torch.full_like(ids, -100) if all_ignored else ids.clone()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def rank() -> int:
    return deepspeed.comm.get_rank()


def memory(n=4, offset=1000):
    return [batch(offset + 100 * rank() + i) for i in range(n)]


def train_steps(engine, n, seed=0):
    losses = []
    for i in range(n):
        b = batch(seed + 17 * rank() + i)
        loss = engine(**{k: v.to(engine.device) for k, v in b.items()}).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses


def full_fp32(engine) -> dict:
    # stage 0 has no fp32 fragments: the master is the unfused optimizer's fp32 copy, or the fp32 param itself
    opt = engine.optimizer
    copies = {
        id(lp): hp
        for lg, hg in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", []))
        for lp, hp in zip(lg, hg)
    }
    out = {}
    for n, p in engine.module.named_parameters():
        v = safe_get_full_fp32_param(p)
        out[n] = (v if v is not None else copies.get(id(p), p)).detach().float().cpu().clone()
    return out


def full_working(engine) -> dict:
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return {n: p.detach().float().cpu().clone() for n, p in engine.module.named_parameters()}


def max_rel(a: dict, b: dict) -> float:
    worst = 0.0
    for k in a:
        scale = max(b[k].abs().max().item(), 1e-12)
        worst = max(worst, (a[k] - b[k]).abs().max().item() / scale)
    return worst


def max_abs(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@torch.no_grad()
def engine_loss(engine, b) -> float:
    engine.module.eval()
    out = float(engine(**{k: v.to(engine.device) for k, v in b.items()}).loss)
    engine.module.train()
    return out


@torch.no_grad()
def reference_loss(weights: dict, b, dtype) -> float:
    unset_hf_deepspeed_config()
    m = LlamaForCausalLM(tiny_config()).to(dtype)
    m.load_state_dict({k: v.to(dtype) for k, v in weights.items()})
    m.eval()
    return float(m(**b).loss)


# ---------------------------------------------------------------------------------------- scenarios
def fusion_exact(
    dtype="fp32", persistence=0, w_in=0.7, w_out=0.2, rehearsal=2, offload=False, anchor="device", stage=3, extra=None
):
    """Fusion against a reference computed from gathered full parameters; visibility; lr-0 survival;
    weights (1, 0) undo rehearsal."""
    engine = make_engine(
        {
            **ds_config(dtype, persistence, stage=stage, aim={"enabled": True, "anchor": anchor}, offload=offload),
            **(extra or {}),
        }
    )
    plugin = aim_ds.attach(engine, memory())
    plugin.start_task()
    anchor = full_fp32(engine)
    train_steps(engine, 3)
    theta_k = full_fp32(engine)
    seen = {}
    with after_rehearsal(lambda: seen.__setitem__("M", full_fp32(engine))):  # theta_M, on every rank
        rec = plugin.merge(weights=(w_in, w_out), rehearsal_steps=rehearsal)
    theta_m = seen["M"]
    ref = {k: anchor[k] + w_in * (theta_k[k] - anchor[k]) + w_out * (theta_m[k] - theta_k[k]) for k in anchor}
    fused = full_fp32(engine)
    working = full_working(engine)
    probe = batch(4242)
    result = {
        "rehearsal_moved": max_abs(theta_m, theta_k),
        "train_moved": max_abs(theta_k, anchor),
        "master_rel_err": max_rel(fused, ref),
        "working_rel_err": max_rel(working, ref),
        "forward_loss": engine_loss(engine, probe),
        "reference_loss": reference_loss(
            ref, probe, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
        ),
        "rehearsal_steps": rec["rehearsal_steps"],
        "fusion_bytes": rec["fusion_bytes"],
    }
    # an optimizer step with lr 0 must leave the fused weights where they are (the fp32 master is the truth)
    for g in engine.optimizer.param_groups:
        g["lr"] = 0.0
    train_steps(engine, 1, seed=99)
    result["after_lr0_rel_err"] = max_rel(full_fp32(engine), fused)
    result["after_lr0_working_rel_err"] = max_rel(full_working(engine), ref)
    for g in engine.optimizer.param_groups:
        g["lr"] = 1e-3
    # weights (1, 0): theta = anchor + (theta_k - anchor) = theta_k exactly, whatever rehearsal did
    train_steps(engine, 2, seed=7)
    before = full_fp32(engine)
    plugin.merge(weights=(1.0, 0.0), rehearsal_steps=3)
    after = full_fp32(engine)
    result["undo_max_abs"] = max_abs(after, before)
    result["undo_working_rel_err"] = max_rel(full_working(engine), before)
    result["held_bytes"] = plugin.held_bytes()
    result["anchor_device"] = str(plugin.anchor[0].device)
    result["local_numel"] = plugin.shards.local_numel
    result["valid_numel"] = plugin.shards.local_valid_numel
    result["total_params"] = sum(v.numel() for v in anchor.values())
    return result


def disabled_identical(dtype="fp32", stage=3):
    """enabled: false gives exactly the weights of plain DeepSpeed."""
    e1 = make_engine(ds_config(dtype, stage=stage, aim={"enabled": False}))
    plugin = aim_ds.attach(e1, memory())
    plugin.start_task()
    train_steps(e1, 4)
    plugin.start_task(memory())
    train_steps(e1, 4, seed=50)
    w1 = full_fp32(e1)
    e2 = make_engine(ds_config(dtype, stage=stage))
    train_steps(e2, 4)
    train_steps(e2, 4, seed=50)
    w2 = full_fp32(e2)
    return {"max_abs": max_abs(w1, w2), "hooked": "step" in e1.__dict__}


def controller_loop(dtype="fp32", steps0=6, steps1=40, lr=3e-3, aim=None, scheduler=False, gas=1):
    """The controller itself fires merges in an ordinary loop (no explicit merge())."""
    aim = aim or {
        "enabled": True,
        "initial_interval": 4,
        "min_interval": 2,
        "max_interval": 16,
        "threshold_factor": 1.05,
    }
    engine = make_engine(ds_config(dtype, aim=aim, scheduler=scheduler, gas=gas), lr=lr)
    plugin = aim_ds.attach(engine)
    plugin.start_task()
    train_steps(engine, steps0 * gas)
    merges_task0 = plugin.merge_count
    plugin.start_task(memory())
    lr_before = [g["lr"] for g in engine.optimizer.param_groups]
    sched_before = engine.lr_scheduler.last_batch_iteration if engine.lr_scheduler is not None else None
    global_before = engine.global_steps
    train_steps(engine, steps1 * gas, seed=500)
    sched_after = engine.lr_scheduler.last_batch_iteration if engine.lr_scheduler is not None else None
    w = full_fp32(engine)
    finite = all(torch.isfinite(v).all().item() for v in w.values())
    traj = plugin.trajectory
    return {
        "merges_task0": merges_task0,
        "merges": plugin.merge_count,
        "rows": len(traj),
        "merge_rows": [r["step"] for r in traj if r["merge"] == 1],
        "task1_steps": [r["step"] for r in traj if r["task"] == 1][-1:] or [0],
        "probe_losses": sum(1 for r in traj if r["probe_loss"] is not None),
        "finite": finite,
        "sched_advance": None if sched_before is None else sched_after - sched_before,
        "global_advance": engine.global_steps - global_before,
        "lr_before": lr_before,
        "state_keys": sorted(plugin.state_dict().keys()),
    }


def nan_probe():
    """A memory whose labels are all ignored gives a NaN probe loss: skipped with a warning, never merged in."""
    aim = {"enabled": True, "initial_interval": 2, "min_interval": 2, "max_interval": 8, "rehearsal_steps": 1}
    engine = make_engine(ds_config(aim=aim))
    plugin = aim_ds.attach(engine)
    plugin.start_task()
    train_steps(engine, 2)
    bad = [batch(7000 + rank(), all_ignored=True)]
    plugin.start_task(bad)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            train_steps(engine, 6, seed=300)
            err = None
        except FloatingPointError as e:  # rehearsal on an all-ignored batch has a NaN loss too
            err = str(e)
    w = full_fp32(engine)
    return {
        "warned": sum("non-finite probe loss" in str(c.message) for c in caught),
        "finite": all(torch.isfinite(v).all().item() for v in w.values()),
        "skipped_rows": sum(1 for r in plugin.trajectory if r["task"] == 1 and r["probe_loss"] is None),
        "merges": plugin.merge_count,
        "error": err,
    }


def expect_errors(cases: list):
    """Each bad input raises one clear error on every rank, before any collective can hang, so the
    next case in the same process group still runs."""
    return {case: _expect_error(case) for case in cases}


def _expect_error(case: str):
    try:
        if case == "empty_memory_one_rank":
            engine = make_engine(ds_config(aim={"enabled": True}))
            aim_ds.attach(engine, [] if rank() == 1 else memory())
        elif case == "bad_key":
            engine = make_engine(ds_config(aim={"enabled": True}))
            m = memory()
            if rank() == 0:
                m[0] = dict(m[0], pixel_values=torch.zeros(4, 3))
            aim_ds.attach(engine, m)
        elif case == "out_of_vocab":
            engine = make_engine(ds_config(aim={"enabled": True}))
            m = memory()
            m[1]["input_ids"][0, 0] = VOCAB + 5
            aim_ds.attach(engine, m)
        elif case == "no_labels":
            engine = make_engine(ds_config(aim={"enabled": True}))
            aim_ds.attach(engine, [{"input_ids": b["input_ids"]} for b in memory()])
        elif case == "bad_config":
            engine = make_engine(ds_config(aim={"enabled": True, "min_interval": 0}))
            aim_ds.attach(engine, memory())
        elif case == "record_without_training_batch":
            engine = make_engine(ds_config(aim={"enabled": True}))
            aim_ds.attach(engine, memory()).record_probe_loss(1.0, 4)
        elif case == "no_memory_task1":
            engine = make_engine(ds_config(aim={"enabled": True}))
            p = aim_ds.attach(engine)
            p.start_task()
            p.start_task()
        else:
            raise ValueError(case)
    except Exception as e:  # the expected path
        return {"type": type(e).__name__, "message": str(e)}
    return {"type": None, "message": "no error"}


def quantile_and_importance(q=0.8):
    """The global quantile of shard-local values equals torch.quantile of the gathered values (to a
    histogram bin), and the importance policy runs end to end on real shards."""
    from aim_ds.ops import collectives

    g = torch.Generator().manual_seed(rank())
    local = torch.rand(1000 + 37 * rank(), generator=g).pow(3)  # skewed, different sizes per rank
    padded = torch.cat([local, torch.full((5,), 1e9)])  # padding garbage that must be excluded
    approx = collectives.global_quantile([(padded, [(0, local.numel())])], q)
    sizes = [1000 + 37 * r for r in range(deepspeed.comm.get_world_size())]
    buf = torch.zeros(max(sizes))
    buf[: local.numel()] = local
    bufs = [torch.zeros(max(sizes)) for _ in sizes]
    torch.distributed.all_gather(bufs, buf)
    everything = torch.cat([b[:n] for b, n in zip(bufs, sizes)])
    exact = torch.quantile(everything, q, interpolation="lower").item()
    frac_above = (everything > approx).float().mean().item()
    aim = {
        "enabled": True,
        "weight_policy": "importance",
        "initial_interval": 3,
        "min_interval": 2,
        "max_interval": 8,
        "threshold_factor": 1.05,
    }
    loop = controller_loop(aim=aim, steps1=16)
    return {
        "approx": approx,
        "exact": exact,
        "frac_above": frac_above,
        "merges": loop["merges"],
        "finite": loop["finite"],
    }


def host_anchor():
    """anchor: host keeps the buffer in CPU memory; fusion stays exact."""
    return fusion_exact(anchor="host")


def shm_released():
    """tests/mp.py has called release_cpu_shm_names(): this rank's DeepSpeed CPU all-reduce buffer is no
    longer named in /dev/shm, yet the shm all-reduce (mapped before the unlink) still sums correctly."""
    import deepspeed.comm as ds_dist

    from aim_ds.distributed import cpu_shm_path

    names = [cpu_shm_path(r) for r in range(ds_dist.get_world_size())]
    t = torch.full((1000,), float(rank() + 1))
    ds_dist.inference_all_reduce(t)  # the op deepspeed_shm_comm serves on CPU
    g = torch.full((3,), float(rank() + 1))
    ds_dist.all_reduce(g)
    return {"left": [n for n in names if os.path.exists(n)], "shm_sum": float(t[0]), "gloo_sum": float(g[0])}


def batch_probe(steps1=12, skip_rank1_every=3):
    """probe_source "training_batch": the forgetting signal is the memory rows' loss of each training batch,
    recorded with record_probe_loss(); no probe forward runs. Rank 1 leaves some steps unrecorded (0, 0)."""
    from aim_ds.ops import collectives

    aim = {
        "enabled": True,
        "probe_source": "training_batch",
        "initial_interval": 4,
        "min_interval": 2,
        "max_interval": 8,
        "threshold_factor": 1.05,
        "rehearsal_steps": 2,
    }
    engine = make_engine(ds_config(aim=aim), lr=3e-3)
    forwards = [0]
    engine.module.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    plugin = aim_ds.attach(engine)
    plugin.start_task()
    train_steps(engine, 3)
    mem = memory()
    plugin.start_task(mem)
    forwards[0] = 0
    expected = []
    for i in range(steps1):
        new, old = batch(900 + 17 * rank() + i), mem[i % len(mem)]
        b = {k: torch.cat([new[k], old[k]]) for k in new}
        out = engine(**b)
        s, c = aim_ds.rows_loss(out.logits, b["labels"], slice(new["input_ids"].shape[0], None))
        if rank() == 1 and i % skip_rank1_every == 0:
            s, c = 0.0, 0  # this rank has no memory rows this step: the mean is over the others' tokens
        plugin.record_probe_loss(s, c)
        tot, cnt = collectives.sum_over_ranks(s, c)  # what the plugin must report for this step
        expected.append(tot / cnt)
        engine.backward(out.loss)
        engine.step()
    traj = [r for r in plugin.trajectory if r["task"] == 1]
    steps_run, merges, forwards_task1 = engine.global_steps, plugin.merge_count, forwards[0]
    # no recorded loss at all: a warning, no signal, merges only by forced activation
    plugin.start_task(mem)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_steps(engine, 6, seed=4000)
    traj2 = [r for r in plugin.trajectory if r["task"] == 2]
    try:
        plugin.record_probe_loss(1.0, 0)
        bad_count = None
    except aim_ds.plugin.AimInputError as e:
        bad_count = str(e)
    plugin.probe.discard()
    return {
        "probe_losses": [r["probe_loss"] for r in traj],
        "expected": expected,
        "merges": merges,
        "forwards": forwards_task1,
        "rehearsal_steps": sum(2 for r in traj if r["merge"]),
        "train_steps": steps1,
        "global_steps_task1": steps_run,
        "unrecorded_probe_losses": [r["probe_loss"] for r in traj2],
        "warned": sum("no rank recorded a memory loss" in str(c.message) for c in caught),
        "bad_count": bad_count,
    }
