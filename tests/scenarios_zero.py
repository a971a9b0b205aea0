"""Multi-rank scenarios for ZeRO stages 0, 1 and 2 (and tensor-parallel statistics) on real DeepSpeed
engines (CPU, gloo), run by tests/mp.py. The fusion checks themselves are tests/scenarios.py's, run
here at other stages; several cases share one launch because each launch costs seconds of imports."""

from __future__ import annotations

import os

import deepspeed
import torch

import aim_ds
from tests import ckpt_scenarios
from tests import scenarios as sc

# (name, fusion_exact kwargs): every optimizer family the plugin has an adapter for, below ZeRO-3
BF16_OPTIMIZER = {"data_types": {"grad_accum_dtype": "fp32"}}  # stage 1 + bf16 + fp32 accumulation
FUSION_CASES = {
    "stage0_fp32": {"stage": 0},  # torch optimizer: the params are the masters
    "stage0_bf16": {"stage": 0, "dtype": "bf16"},  # FP16_UnfusedOptimizer (bf16 params, fp32 copies)
    "stage1_fp32": {"stage": 1},  # DeepSpeedZeroOptimizer
    "stage1_bf16": {"stage": 1, "dtype": "bf16", "extra": BF16_OPTIMIZER},  # BF16_Optimizer
    "stage2_fp32": {"stage": 2},
    "stage2_bf16": {"stage": 2, "dtype": "bf16"},
    "stage2_bf16_offload": {"stage": 2, "dtype": "bf16", "offload": True},
    "stage1_fp32_offload": {"stage": 1, "offload": True},
    "stage0_fp16": {"stage": 0, "dtype": "fp16"},  # fp16 with dynamic loss scaling
    "stage1_fp16": {"stage": 1, "dtype": "fp16"},
    "stage2_fp16": {"stage": 2, "dtype": "fp16"},
}


def fusion_cases(cases: list):
    """tests/scenarios.fusion_exact for each case, plus the engine's optimizer family and layout facts."""
    out = {}
    for name in cases:
        kw = dict(FUSION_CASES[name])
        out[name] = sc.fusion_exact(**kw)
        out[name].update(layout(kw.get("stage"), kw.get("dtype", "fp32"), kw.get("offload", False), kw.get("extra")))
    return out


def layout(stage, dtype, offload, extra):
    """The adapter family; whether a partition boundary cuts a parameter on this rank; master devices."""
    engine = sc.make_engine(
        {**sc.ds_config(dtype, stage=stage, offload=offload, aim={"enabled": True}), **(extra or {})}
    )
    plugin = aim_ds.attach(engine, sc.memory())
    opt = engine.optimizer
    cut = any(int(x) > 0 for x in getattr(opt, "first_offset", []))  # ZeRO-1/2: a param began on the previous rank
    return {
        "family": plugin.shards.family,
        "optimizer": type(opt).__name__,
        "cut": cut,
        "cpu_offload": bool(getattr(opt, "cpu_offload", False)),
        "master_device": str(plugin.shards.device),
        "groups": len(plugin.shards.groups),
    }


def stage_checks(stages: list):
    """Per stage: enabled false is bit-identical to plain DeepSpeed (tests/scenarios.disabled_identical);
    the importance policy's gradient hook fires and its fusion stays finite. Then the refused setups."""
    return {
        "disabled": {str(s): sc.disabled_identical(stage=s) for s in stages},
        "importance": _importance(stages),
        "unsupported": _unsupported(),
    }


def _importance(stages: list):
    out = {}
    for s in stages:
        engine = sc.make_engine(sc.ds_config(stage=s, aim={"enabled": True, "weight_policy": "importance"}))
        plugin = aim_ds.attach(engine, sc.memory())
        plugin.start_task()
        sc.train_steps(engine, 3)
        ema = sum(float(b.abs().sum()) for b in plugin.fuser.ema["i_in"])
        plugin.merge(rehearsal_steps=2)
        w = sc.full_fp32(engine)
        out[str(s)] = {
            "ema_in": ema,
            "finite": all(torch.isfinite(v).all().item() for v in w.values()),
            "merges": plugin.merge_count,
        }
    return out


def _unsupported():
    """An engine the plugin cannot merge on: one clear error, raised on every rank."""
    from transformers import LlamaForCausalLM

    out = {}
    try:  # stage 0 without an optimizer: no fp32 masters anywhere
        model = LlamaForCausalLM(sc.tiny_config())
        engine, *_ = deepspeed.initialize(model=model, config=sc.ds_config(stage=0, aim={"enabled": True}))
        aim_ds.attach(engine, sc.memory())
        out["no_optimizer"] = {"type": None, "message": "no error"}
    except Exception as e:
        out["no_optimizer"] = {"type": type(e).__name__, "message": str(e)}
    return out


def rank():
    return deepspeed.comm.get_rank()


# ---------------------------------------------------------------------------------------- tensor parallel
class HandMpu:
    """A Megatron-style mpu over real gloo groups: rank = dp * tp_size + tp (DeepSpeed's own mesh order).
    The model is not sliced, so every parameter is one that each TP rank holds whole."""

    def __init__(self, tp_size: int):
        import torch.distributed as tdist

        world, me = tdist.get_world_size(), tdist.get_rank()
        self.tp_size, self.dp_size = tp_size, world // tp_size
        self.tp_rank, self.dp_rank = me % tp_size, me // tp_size
        self.tp_group = self.dp_group = None
        for d in range(self.dp_size):  # every rank creates every group, in the same order
            g = tdist.new_group([d * tp_size + t for t in range(tp_size)])
            if d == self.dp_rank:
                self.tp_group = g
        for t in range(tp_size):
            g = tdist.new_group([d * tp_size + t for d in range(self.dp_size)])
            if t == self.tp_rank:
                self.dp_group = g

    def get_model_parallel_group(self):
        return self.tp_group

    def get_model_parallel_world_size(self):
        return self.tp_size

    def get_model_parallel_rank(self):
        return self.tp_rank

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_world_size(self):
        return self.dp_size

    def get_data_parallel_rank(self):
        return self.dp_rank

    def get_data_parallel_group_ranks(self):
        return [d * self.tp_size + self.tp_rank for d in range(self.dp_size)]


TP_AIM = {"enabled": True, "merge_first_task": True, "initial_interval": 1000, "max_interval": 1000}


def tp_signal(tp: int = 1, mode: str = "none", steps: int = 3, stage: int = 1, work: str | None = None):
    """Train `steps` steps, merge once, and report what the TP=1 run of the same data must reproduce:
    the probe losses, the learning signal, the element count and the merged model's loss.
    mode: "none" (no tensor parallelism: the reference), "autotp" (DeepSpeed AutoTP, tp ranks) or "mpu"
    (a hand-made Megatron-style mpu). Data-parallel rank d sees the same batches in every mode.
    With `work`: the run is also saved there and resumed by a fresh engine, and a checkpoint claiming
    another tensor-parallel size is refused."""
    cfg = sc.ds_config(stage=stage, aim=TP_AIM)
    mpu = None
    if mode == "autotp":
        cfg["tensor_parallel"] = {"autotp_size": tp}
    elif mode == "mpu":
        mpu = HandMpu(tp)

    def build():
        torch.manual_seed(0)
        sc.unset_hf_deepspeed_config()
        model = sc.LlamaForCausalLM(sc.tiny_config())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        return deepspeed.initialize(model=model, optimizer=opt, config=cfg, mpu=mpu)[0]

    engine = build()
    dp = rank() // tp if mode != "none" else rank()
    mem = [sc.batch(1000 + 100 * dp + i) for i in range(4)]
    plugin = aim_ds.attach(engine, mem)
    plugin.start_task()
    for i in range(steps):
        loss = engine(**sc.batch(17 * dp + i)).loss
        engine.backward(loss)
        engine.step()
    rec = plugin.merge(weights=(0.7, 0.2), rehearsal_steps=1)
    try:  # tensor-parallel ranks given different memories: refused on every rank
        plugin.set_memory([sc.batch(5000 + rank())])
        mismatch = None
    except aim_ds.plugin.AimInputError as e:
        mismatch = str(e)
    out = _tp_checkpoint(engine, plugin, build, mem, work) if work else {}
    return {
        **out,
        "mismatch_error": mismatch,
        "probe_losses": [r["probe_loss"] for r in plugin.trajectory],
        "learning_signal": rec["learning_signal"],
        "count": plugin._global_valid_numel,
        "merged_loss": sc.engine_loss(engine, sc.batch(4242)),
        "tp_size": plugin.shards.tp_size,
        "tp_rank": plugin.shards.tp_rank,
        "family": plugin.shards.family,
        "sliced": sum(1 for p in engine.module.parameters() if getattr(p, "tensor_model_parallel", False)),
        "total_params": sum(p.numel() for p in sc.LlamaForCausalLM(sc.tiny_config()).parameters()),
    }


def tp_vocab_head(tp: int = 2):
    """AutoTP over a model with a tied LM head (cut over the vocabulary): the driver's gathered logits and
    greedy generation against the same model unsliced on this rank."""
    from aim_ds.experiment.evaluation import generate_texts
    from aim_ds.shards.tp import vocab_head, whole_vocab_logits

    class Tok:  # what generate_texts reads of a tokenizer: the special ids and a decode
        pad_token_id, eos_token_id, bos_token_id = 0, 1, 2

        @staticmethod
        def decode(ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    conf = sc.tiny_config()
    conf.tie_word_embeddings = True
    torch.manual_seed(0)
    ref = sc.LlamaForCausalLM(conf).eval()
    torch.manual_seed(0)
    sc.unset_hf_deepspeed_config()
    model = sc.LlamaForCausalLM(conf)
    cfg = sc.ds_config(stage=1)
    cfg["tensor_parallel"] = {"autotp_size": tp}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = deepspeed.initialize(model=model, optimizer=opt, config=cfg)[0]
    engine.eval()
    b = sc.batch(7)
    with torch.no_grad():
        sliced = engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        full = whole_vocab_logits(engine, sliced)
        want = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    prompts = [[5, 9, 13, 4], [7, 3], [11, 12, 6, 8, 10]]
    return {
        "head": type(vocab_head(engine)).__name__,
        "vocab": conf.vocab_size,
        "sliced_width": sliced.shape[-1],
        "gathered_width": full.shape[-1],
        "logits_max_diff": float((full - want).abs().max()),
        "generated": generate_texts(engine, Tok, prompts, batch_size=2, max_new_tokens=6),
        "reference": generate_texts(ref, Tok, prompts, batch_size=2, max_new_tokens=6),
    }


def _tp_checkpoint(engine, plugin, build, mem, work):
    from aim_ds import checkpoint as ckpt

    plugin.set_memory(mem)
    d = os.path.join(work, "tp")
    ckpt.save_checkpoint(engine, plugin, d, tag="a")
    e2 = build()
    p2 = aim_ds.attach(e2, mem)
    ckpt.load_checkpoint(e2, p2, d)
    same_w = all(torch.equal(a, b) for a, b in zip(engine.module.parameters(), e2.module.parameters()))
    same_state = _equal(p2.state_dict(), plugin.state_dict())
    sd = plugin.state_dict()
    sd["position"] = dict(sd["position"], tp_size=1)
    try:
        p2.load_state_dict(sd)
        plugin_error = None
    except aim_ds.plugin.AimInputError as e:
        plugin_error = str(e)
    # the same checkpoint with a manifest that says TP=1: refused on every rank before DeepSpeed loads
    if rank() == 0:
        import json
        import shutil

        shutil.copytree(d, d + "1")
        m = os.path.join(d + "1", "a", ckpt.MANIFEST)
        with open(m) as f:
            man = json.load(f)
        man["layout"]["tp_size"] = 1
        with open(m, "w") as f:
            json.dump(man, f)
    deepspeed.comm.barrier()
    try:
        ckpt.load_checkpoint(e2, p2, d + "1")
        ckpt_error = None
    except ckpt.CheckpointError as e:
        ckpt_error = str(e)
    return {
        "resumed_weights_equal": same_w,
        "resumed_state_equal": same_state,
        "plugin_tp_error": plugin_error,
        "ckpt_tp_error": ckpt_error,
    }


# ---------------------------------------------------------------------------------------- checkpoints
CKPT_AIM = ckpt_scenarios.AIM  # importance: theta_k and EMA shards travel too


def _equal(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def checkpoint_cases(work: str, cases: list):
    """checkpoint_resume for each [stage, dtype], each in its own folder (one launch)."""
    return {f"stage{st}_{dt}": checkpoint_resume(os.path.join(work, f"{st}-{dt}"), st, dt) for st, dt in cases}


def checkpoint_resume(work: str, stage: int = 2, dtype: str = "bf16"):
    """Save in the middle of task 1 (after a merge), run on; a fresh engine + plugin loads the checkpoint and
    runs the same steps (crossing the next merge): weights and plugin state must be bit-identical. Rank 0
    then converts the checkpoint (model and anchor) to Hugging Face folders and checks them."""
    from aim_ds import checkpoint as ckpt

    d = os.path.join(work, "run")

    def engine():
        return sc.make_engine(sc.ds_config(dtype, stage=stage, aim=CKPT_AIM, scheduler=True))

    e1 = engine()
    p1 = aim_ds.attach(e1, sc.memory())
    p1.start_task()
    sc.train_steps(e1, 3)
    mem1 = sc.memory(offset=3000)
    p1.start_task(mem1)
    sc.train_steps(e1, 3, seed=100)  # the fixed interval merges at step 3
    merges_before_save = p1.merge_count
    anchor_full = sc.full_fp32(e1)  # right after a merge the anchor is the weights
    sc.train_steps(e1, 1, seed=200)
    saved_w = sc.full_fp32(e1)
    ckpt.save_checkpoint(e1, p1, d, tag="a", task_fingerprint="t")
    sc.train_steps(e1, 4, seed=300)  # crosses the merge at step 6
    final_w, final_sd = sc.full_fp32(e1), p1.state_dict()
    e2 = engine()
    p2 = aim_ds.attach(e2, mem1)
    ckpt.load_checkpoint(e2, p2, d, task_fingerprint="t")
    out = {
        "merges_before_save": merges_before_save,
        "loaded_diff": sc.max_abs(sc.full_fp32(e2), saved_w),
        "family": p2.shards.family,
    }
    sc.train_steps(e2, 4, seed=300)
    out.update(
        resumed_diff=sc.max_abs(sc.full_fp32(e2), final_w),
        state_equal=_equal(p2.state_dict(), final_sd),
        merges=p2.merge_count,
    )
    deepspeed.comm.barrier()
    if rank() == 0:
        from transformers import AutoModelForCausalLM

        for what, ref in (("model", saved_w), ("anchor", anchor_full)):
            path = ckpt.convert(d, os.path.join(work, f"hf_{what}"), what=what)
            got = {n: p.detach().float() for n, p in AutoModelForCausalLM.from_pretrained(path).named_parameters()}
            out[f"convert_{what}_diff"] = sc.max_abs(got, ref)
        try:
            ckpt.reshard(d, os.path.join(work, "resharded"), 1)
            out["reshard_error"] = None
        except ckpt.CheckpointError as e:
            out["reshard_error"] = str(e)
    return out
