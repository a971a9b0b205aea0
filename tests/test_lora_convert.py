"""aim-ds convert of peft LoRA adapters (issue 29, item 2): every adapter kind peft's LoraConfig puts on a causal
LM (Linear with and without lora_bias, Embedding) merged as peft's merge_and_unload merges it; what convert
cannot merge is refused by name. The checkpoint side (frozen base weights at ZeRO stages 0-2 and in a
resharded checkpoint) runs on real engines in test_lora_checkpoint_convert."""

from __future__ import annotations

import pytest
import torch

from aim_ds.checkpoint.format import CheckpointError
from aim_ds.checkpoint.lora import merge_adapters


def _peft_model(targets, lora_bias=False, **lora_kw):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(
        vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, attention_bias=True, tie_word_embeddings=False,
    )  # fmt: skip
    model = get_peft_model(
        LlamaForCausalLM(cfg),
        LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_bias=lora_bias, **lora_kw),
    )
    with torch.no_grad():  # peft zero-initialises B: give every adapter tensor a value so a dropped delta shows
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def _converted_and_reference(model):
    import json

    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    adapter = json.loads(json.dumps(model.peft_config["default"].to_dict(), default=list))
    merged = merge_adapters(sd, adapter, "ckpt")
    return merged, {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize(
    "targets,lora_bias",
    [
        (("embed_tokens",), False),  # embeddings only: once loaded as a randomly initialised model
        (("embed_tokens", "q_proj", "v_proj", "lm_head"), False),  # mixed: the embedding delta was dropped
        (("q_proj", "o_proj"), True),  # lora_bias: lora_B's bias was left as an extra key
    ],
)
def test_convert_merges_like_peft_merge_and_unload(targets, lora_bias):
    merged, ref = _converted_and_reference(_peft_model(targets, lora_bias))
    assert set(merged) == set(ref), sorted(set(merged) ^ set(ref))
    for k in ref:
        assert torch.allclose(merged[k], ref[k], rtol=1e-5, atol=1e-6), (k, (merged[k] - ref[k]).abs().max())


def test_convert_refuses_adapters_it_cannot_merge():
    sd = {k: v.detach() for k, v in _peft_model(("q_proj",)).state_dict().items()}
    sd["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight"] = torch.ones(16)
    adapter = {"r": 4, "lora_alpha": 8}
    with pytest.raises(CheckpointError, match="lora_magnitude_vector.*merge_and_unload"):
        merge_adapters(sd, adapter, "ckpt")
