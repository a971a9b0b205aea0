"""Multi-rank scenarios for the fault paths of issue 29 (run by tests/mp.py on real DeepSpeed engines, CPU, gloo):
a LoRA checkpoint at every ZeRO stage for aim-ds convert, and probe failures agreed across ranks."""

from __future__ import annotations

import torch

import aim_ds
from aim_ds.checkpoint import save_checkpoint
from tests import scenarios as sc

LORA_TARGETS = ["embed_tokens", "q_proj", "v_proj"]


def lora_checkpoint(ckpt_dir: str, stage: int, ref_path: str):
    """A peft LoRA model (embedding and linear adapters, frozen base) trained 2 steps with the plugin at `stage`,
    saved with aim_ds.checkpoint.save_checkpoint; rank 0 writes peft's merge_and_unload of the trained model."""
    import deepspeed
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    cfg = sc.ds_config(stage=stage, aim={"enabled": True})
    torch.manual_seed(0)
    unset_hf_deepspeed_config()
    sc._keep.append(HfDeepSpeedConfig(cfg))
    model = get_peft_model(
        LlamaForCausalLM._from_config(sc.tiny_config()), LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS)
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    plugin = aim_ds.attach(engine, sc.memory())
    plugin.start_task()
    sc.train_steps(engine, 2)
    save_checkpoint(engine, plugin, ckpt_dir, tag="t")
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):  # a no-op below stage 3
        if sc.rank() == 0:
            import copy

            plain = copy.deepcopy(engine.module).merge_and_unload()
            torch.save({k: v.detach().float().clone() for k, v in plain.state_dict().items()}, ref_path)
    return {"trainable": sum(p.requires_grad for p in params)}


class _FlakyMemory(list):
    """A list of memory batches whose reads fail from the `fail_at`-th on (a memory reader that lost its file)."""

    def __init__(self, batches, fail_at: int):
        super().__init__(batches)
        self.reads, self.fail_at = 0, fail_at

    def __getitem__(self, i):
        self.reads += 1
        if self.reads >= self.fail_at:
            raise OSError("injected: the memory file is gone")
        return super().__getitem__(i)


def probe_fails(where: str, out_dir: str, failing: int = 1):
    """Rank `failing`'s probe fails on its 3rd probe, `where` = "batch" (reading the memory batch) or "forward"
    (inside the probe's forward, between ZeRO-3's parameter gathers). Every rank must stop with an error that
    names the failing rank, long before the process group's timeout; each rank records when it stopped."""
    import time
    from pathlib import Path

    engine = sc.make_engine(sc.ds_config(aim={"enabled": True, "merge_first_task": True}))  # probes from step 1
    mem = sc.memory()
    if sc.rank() == failing and where == "batch":
        mem = _FlakyMemory(mem, fail_at=3)
    plugin = aim_ds.attach(engine, mem)
    plugin.start_task()
    if sc.rank() == failing and where == "forward":
        mlp = engine.module.model.layers[1].mlp
        real, calls = mlp.forward, {"n": 0}

        def forward(*args, **kwargs):
            if not engine.module.training:  # the probe runs in eval mode
                calls["n"] += 1
                if calls["n"] == 3:
                    Path(out_dir, "failed_at").write_text(repr(time.time()))
                    raise ValueError("injected: a kernel failed in the probe")
            return real(*args, **kwargs)

        mlp.forward = forward
    if sc.rank() == failing and where == "batch":
        Path(out_dir, "failed_at").write_text(repr(time.time()))  # an upper bound: the failure comes later
    try:
        sc.train_steps(engine, 6)
    finally:
        Path(out_dir, f"stopped{sc.rank()}").write_text(repr(time.time()))
    return {"unreachable": True}


def one_shot_memory():
    """A generator as memory: check_memory's look-ahead and both cursors would share (and exhaust) it."""
    engine = sc.make_engine(sc.ds_config(aim={"enabled": True}))
    err = {}
    for name, mem in (("attach", lambda: (b for b in sc.memory())), ("set_memory", lambda: iter(sc.memory()))):
        try:
            if name == "attach":
                aim_ds.attach(engine, mem())
            else:
                aim_ds.attach(engine).set_memory(mem())
        except Exception as e:
            err[name] = f"{type(e).__name__}: {e}"
    return err


def save_records_fsync(ckpt_dir: str, stage: int, tp: int = 1):
    """Save a checkpoint at `stage` (tp > 1: DeepSpeed AutoTP, every rank in one tensor-parallel group) with
    os.fsync recording what it made durable (files and folders, by path relative to ckpt_dir); each rank
    returns its own list."""
    import os

    cfg = sc.ds_config(stage=stage, aim={"enabled": True})
    if tp > 1:
        cfg["tensor_parallel"] = {"autotp_size": tp}
    engine = sc.make_engine(cfg)
    plugin = aim_ds.attach(engine, sc.memory() if tp == 1 else [sc.batch(1000 + i) for i in range(4)])
    plugin.start_task()
    b = sc.batch(7)  # the same batch on every rank: tensor-parallel ranks share their data-parallel rank's
    engine.backward(engine(**b).loss)
    engine.step()
    real, synced = os.fsync, []

    def fsync(fd):
        synced.append(os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), ckpt_dir))
        return real(fd)

    os.fsync = fsync
    try:
        save_checkpoint(engine, plugin, ckpt_dir, tag="t")
    finally:
        os.fsync = real
    return {"synced": sorted(set(synced))}
