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
