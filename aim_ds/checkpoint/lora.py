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
_LINEAR_A = re.compile(r"^(?P<module>.+)\.lora_A\.(?P<adapter>[^.]+)\.weight$")
_EMBEDDING_A = re.compile(r"^(?P<module>.+)\.lora_embedding_A\.(?P<adapter>[^.]+)$")  # nn.Parameter: no .weight
_LORA_KEY = re.compile(r"\.lora_[A-Za-z_]+\.")  # any peft LoRA tensor (lora_A/B, lora_embedding_A/B, DoRA's ...)


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
    """The plain model's state dict, as peft's merge_and_unload gives it: every LoRA adapter folded into its base
    layer with peft's formulas (Linear: W += B @ A * scaling, transposed for fan_in_fan_out, and with lora_bias
    b += B.bias * scaling; Embedding: W += (B @ A)^T * scaling; scaling = alpha / r, alpha / sqrt(r) under
    rslora), the adapters dropped and peft's name prefixes stripped. An adapter tensor this cannot merge is
    refused by name. sd without adapters is returned as it is."""
    lora_keys = [k for k in sd if _LORA_KEY.search(k)]
    if not lora_keys:
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
    found = {}  # (module, adapter name) -> kind
    for k in lora_keys:
        m = _LINEAR_A.match(k) or _EMBEDDING_A.match(k)
        if m:
            found[(m.group("module"), m.group("adapter"))] = "embedding" if "lora_embedding_A" in k else "linear"
    if len({a for _, a in found}) > 1:
        raise CheckpointError(f"{where}: several LoRA adapters {sorted({a for _, a in found})}; merge one with peft.")
    r, alpha = int(adapter["r"]), float(adapter["lora_alpha"])
    scaling = alpha / (r**0.5 if adapter.get("use_rslora") else r)
    out = dict(sd)
    for (module, name), kind in found.items():
        if kind == "embedding":
            a, b = out.pop(f"{module}.lora_embedding_A.{name}"), out.pop(f"{module}.lora_embedding_B.{name}", None)
            transpose = True  # peft: transpose(B @ A, True) for embeddings
        else:
            a, b = out.pop(f"{module}.lora_A.{name}.weight"), out.pop(f"{module}.lora_B.{name}.weight", None)
            transpose = bool(adapter.get("fan_in_fan_out"))
        base_key = f"{module}.base_layer.weight"
        if b is None or base_key not in out or a.dim() != 2 or b.dim() != 2:
            raise CheckpointError(
                f"{where}: the LoRA adapter of {module} is not a pair of matrices over a base weight {base_key}; "
                "merge it with peft (PeftModel.merge_and_unload)."
            )
        delta = (b.double() @ a.double()) * scaling
        w = out[base_key]
        out[base_key] = (w.double() + (delta.T if transpose else delta)).to(w.dtype)
        bias = out.pop(f"{module}.lora_B.{name}.bias", None)  # lora_bias=True
        if bias is not None:
            base_bias = out.get(f"{module}.base_layer.bias")
            if base_bias is None:
                raise CheckpointError(f"{where}: {module} has a LoRA bias (lora_bias) but its base layer has no bias.")
            out[f"{module}.base_layer.bias"] = (base_bias.double() + bias.double() * scaling).to(base_bias.dtype)
    left = [k for k in out if _LORA_KEY.search(k)]
    if left:
        raise CheckpointError(
            f"{where}: LoRA tensors {left[:3]} are of a kind aim-ds convert does not merge; merge with peft "
            "(PeftModel.merge_and_unload) instead."
        )
    return {_plain_name(k): v for k, v in out.items()}


def _plain_name(key: str) -> str:
    if key.startswith(PEFT_PREFIX):
        key = key[len(PEFT_PREFIX) :]
    return key.replace(".base_layer.", ".")
