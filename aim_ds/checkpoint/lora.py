"""peft LoRA adapters in a checkpoint: their config saved under hf/ (peft's adapter_config.json) and merged into
the base weights on conversion, so a LoRA run converts to a plain Hugging Face model folder."""

from __future__ import annotations

import json
import os
import re

import torch

from .format import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"  # peft's own file name: the hf/ folder doubles as the adapter's config
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the wrapped model
_LORA_A = re.compile(r"^(?P<module>.+)\.lora_A\.(?P<adapter>[^.]+)\.weight$")


def save_adapter_config(peft_config: dict, hf_dir: str) -> None:
    """peft's adapter_config.json of the model's one adapter (several adapters are not merged: none is written,
    and convert refuses their checkpoint)."""
    if len(peft_config) != 1:
        return
    (cfg,) = peft_config.values()
    cfg.save_pretrained(hf_dir)


def read_adapter_config(hf_dir: str) -> dict | None:
    path = os.path.join(hf_dir, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def merge_adapters(sd: dict[str, torch.Tensor], adapter: dict | None, where: str) -> dict[str, torch.Tensor]:
    """The plain model's state dict: every LoRA pair folded into its base weight with peft's formula
    W += B @ A * scaling (scaling = alpha / r; alpha / sqrt(r) under rslora; transposed for fan_in_fan_out),
    the adapters dropped and peft's name prefixes stripped. sd without adapters is returned as it is."""
    pairs = {m.group("module"): m.group("adapter") for k in sd if (m := _LORA_A.match(k))}
    if not pairs:
        return sd
    if adapter is None:
        raise CheckpointError(
            f"{where}: the checkpoint holds LoRA adapters but no {ADAPTER_CONFIG} (the model had several "
            "adapters, or it was saved by an older aim_ds); convert it with peft (PeftModel.merge_and_unload)."
        )
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save") if adapter.get(k)]
    if unsupported:
        raise CheckpointError(
            f"{where}: LoRA options {unsupported} are not merged by aim-ds convert; merge with peft "
            "(PeftModel.merge_and_unload) instead."
        )
    if len(set(pairs.values())) != 1:
        raise CheckpointError(f"{where}: several LoRA adapters {sorted(set(pairs.values()))}; merge one with peft.")
    r, alpha = int(adapter["r"]), float(adapter["lora_alpha"])
    scaling = alpha / (r**0.5 if adapter.get("use_rslora") else r)
    out = dict(sd)
    for module, name in pairs.items():
        a = out.pop(f"{module}.lora_A.{name}.weight")
        b = out.pop(f"{module}.lora_B.{name}.weight")
        base_key = f"{module}.base_layer.weight"
        if base_key not in out:
            raise CheckpointError(f"{where}: LoRA adapter of {module} has no base weight {base_key}.")
        w = out[base_key]
        delta = (b.double() @ a.double()) * scaling
        if adapter.get("fan_in_fan_out"):
            delta = delta.T
        out[base_key] = (w.double() + delta).to(w.dtype)
    return {_plain_name(k): v for k, v in out.items()}


def _plain_name(key: str) -> str:
    if key.startswith(PEFT_PREFIX):
        key = key[len(PEFT_PREFIX) :]
    return key.replace(".base_layer.", ".")
