"""The driver's --lora R (peft LoRA on a --model HF_DIR, AimMerging on the adapters) through the deepspeed launcher
on 2 CPU ranks, its checkpoint identity, and `aim-ds convert` of its checkpoint to a plain HF folder."""

from __future__ import annotations

import json
import subprocess

import torch

from tests.mp import aim_ds_cmd, deepspeed_cmd
from tests.test_driver import REPO, SMALL, TRAIN, ds_config, py, run

TARGETS = ("q_proj", "v_proj")


def make_hf_dir(path):
    """A tiny random Llama with the default benchmark's tokenizer, saved as a Hugging Face folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from aim_ds.data import get_tokenizer, load_tasks

    tok = get_tokenizer(load_tasks("default"), str(path.parent / "tok"))
    cfg = json.loads((REPO / "configs" / "tiny_llama.json").read_text())
    cfg.pop("architectures")
    cfg.update(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2, vocab_size=len(tok))
    cfg.update(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_lora_aim_run_merges_adapters_and_converts(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from aim_ds.checkpoint import anchor_state_dict, model_state_dict

    hf_dir = tmp_path / "base"
    initial = make_hf_dir(hf_dir)
    out = tmp_path / "out"
    cfg = ds_config(tmp_path, initial_interval=2, min_interval=1, max_interval=4)
    lora = ["--model", str(hf_dir), "--lora", "4", "--checkpoint-every", "1000", "--keep-checkpoints", "1"]
    cmd = deepspeed_cmd(TRAIN) + ["--method", "aim", "--deepspeed_config", cfg, "--output-dir", str(out), *SMALL, *lora]
    p = run(cmd, tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    r = json.loads((out / "results.json").read_text())
    assert r["merges"] >= 1 and r["config"]["args"]["lora"] == 4 and r["config"]["args"]["lora_alpha"] == 8.0

    ckpt = out / "checkpoints"
    sd = model_state_dict(str(ckpt))
    adapters = {k for k in sd if ".lora_" in k}
    assert len(adapters) == 2 * len(TARGETS) * 2  # A and B per target per layer (2 layers)
    assert any(sd[k].abs().max() > 0 for k in adapters if ".lora_B." in k), "the adapters did not train"
    # the plugin tracks the trainable parameters only: its anchor holds the adapters and nothing else
    assert set(anchor_state_dict(str(ckpt))) == adapters
    # the frozen base is bit-unchanged after training and merging
    for k, v in initial.items():
        key = "base_model.model." + k
        for t in TARGETS:
            key = key.replace(f".{t}.weight", f".{t}.base_layer.weight")
        if key in sd:  # the tied lm_head is saved once
            assert torch.equal(sd[key], v), k

    # a LoRA run's checkpoint converts to a plain HF folder: adapters merged, peft names stripped
    conv = tmp_path / "conv"
    c = subprocess.run(aim_ds_cmd("convert", ckpt, conv), capture_output=True, text=True)
    assert c.returncode == 0, c.stderr[-3000:]
    converted = AutoModelForCausalLM.from_pretrained(conv)
    names = set(converted.state_dict())
    assert not any("lora" in n or "base_layer" in n for n in names)
    ref = get_peft_model(
        AutoModelForCausalLM.from_pretrained(hf_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), task_type="CAUSAL_LM"),
    )
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and not [m for m in missing if "lm_head" not in m], (missing, unexpected)
    ref = ref.merge_and_unload()
    batch = torch.randint(
        0, len(initial["model.embed_tokens.weight"]), (2, 12), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        want, got = ref(batch).logits, converted(batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(hf_dir)
    with torch.no_grad():
        assert (base(batch).logits - got).abs().max() > 1e-4, "the merged adapters change the model"
    conv_sd = converted.state_dict()
    for k, v in initial.items():  # everything but the adapted projections is the initial model's
        if not any(f".{t}." in k for t in TARGETS):
            assert torch.equal(conv_sd[k], v), k
    # the anchor converts the same way: its adapters merged into the (unchanged) base
    conv_a = tmp_path / "conv_anchor"
    c = subprocess.run(aim_ds_cmd("convert", ckpt, conv_a, "--what", "anchor"), capture_output=True, text=True)
    assert c.returncode == 0, c.stderr[-3000:]
    anchor_sd = AutoModelForCausalLM.from_pretrained(conv_a).state_dict()
    assert set(anchor_sd) == set(conv_sd)
    assert all(torch.equal(anchor_sd[k], v) for k, v in initial.items() if not any(f".{t}." in k for t in TARGETS))

    # --lora is part of the checkpoint's identity: a resume with another rank, or without LoRA, is refused up front
    common = ["--resume", "auto", "--output-dir", str(out), *SMALL, "--method", "aim", "--deepspeed_config", cfg]
    for other, needle in ((["--lora", "8"], "--lora: checkpoint 4, now 8"), ([], "--lora: checkpoint 4, now None")):
        p = run(py(*common, *lora[:2], *other, *lora[4:]), tmp_path, timeout=90)
        assert p.returncode == 2 and needle in p.stderr, p.stderr[-2000:]


def test_lora_options_refused_up_front():
    import pytest
    from transformers import LlamaConfig, LlamaForCausalLM

    from aim_ds.driver.args import InputError, parse_args
    from aim_ds.driver.trainer import add_lora

    assert parse_args([]).lora == 0 and parse_args([]).lora_alpha is None
    assert parse_args(["--lora", "4"]).lora_alpha == 8.0  # default alpha 2R
    for argv, needle in (
        (["--lora", "-1"], "--lora -1: must be >= 0"),
        (["--lora-alpha", "3"], "give --lora R >= 1"),
        (["--lora", "2", "--lora-alpha", "0"], "--lora-alpha 0.0"),
        (["--lora", "2", "--lora-targets", "q_proj,"], "comma-separated"),
    ):
        with pytest.raises(InputError, match=needle.replace("(", r"\(")):
            parse_args(argv)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    with pytest.raises(InputError, match="--lora-targets nope"):
        add_lora(LlamaForCausalLM(cfg), parse_args(["--lora", "2", "--lora-targets", "nope"]))


def test_merge_adapters_matches_peft_merge_and_unload():
    """aim-ds convert's merge equals peft's own merge_and_unload (plain and rslora scaling), names stripped."""
    import pytest
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from aim_ds.checkpoint import CheckpointError
    from aim_ds.checkpoint.lora import merge_adapters

    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    for rslora in (False, True):
        torch.manual_seed(0)
        lora = LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"], use_rslora=rslora)
        model = get_peft_model(LlamaForCausalLM(cfg), lora)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_()  # peft starts B at zero: no change to merge otherwise
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        merged = merge_adapters(sd, json.loads(json.dumps(lora.to_dict(), default=list)), "ckpt")
        want = model.merge_and_unload().state_dict()
        assert set(merged) == set(want)
        for k in want:
            torch.testing.assert_close(merged[k], want[k], rtol=1e-6, atol=1e-6)
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        merge_adapters(sd, None, "ckpt")
