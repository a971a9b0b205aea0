"""Every ready config in ds_configs/ is valid JSON, a valid "aim_merging" section and a config DeepSpeed accepts.

DeepSpeed is checked without GPUs or a process group: DeepSpeedConfig parses the whole dict with its
pydantic models (unknown keys inside its own sections are rejected) and checks the batch-size
arithmetic for a stand-in world size.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"gpu_zero3_bf16.json", "zero3_offload_13b.json"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_parses_as_json(path):
    d = json.loads(path.read_text())
    assert isinstance(d, dict) and "zero_optimization" in d


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_aim_merging_section(path):
    config = pytest.importorskip("aim_ds.config", reason="aim_ds.config (the controller's module) is not there yet")
    d = json.loads(path.read_text())
    cfg = config.AimConfig.from_ds_config(d)
    if "aim_merging" in d:
        assert cfg.to_dict() == config.AimConfig.from_dict(cfg.to_dict()).to_dict()


@pytest.mark.parametrize("world", [1, 8])
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_deepspeed_accepts(path, world, monkeypatch):
    rc = pytest.importorskip("deepspeed.runtime.config")
    monkeypatch.setattr(rc.dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(rc.dist, "get_world_size", lambda *a, **k: world)
    d = json.loads(path.read_text())
    c = rc.DeepSpeedConfig(d)
    assert c.world_size == world
    assert c.zero_optimization_stage == int(path.name.split("zero")[1][0])  # the stage its name says
    assert c.train_batch_size == c.train_micro_batch_size_per_gpu * c.gradient_accumulation_steps * world


def test_deepspeed_rejects_a_typo_so_the_check_means_something(monkeypatch):
    rc = pytest.importorskip("deepspeed.runtime.config")
    d = json.loads((REPO / "ds_configs" / "gpu_zero3_bf16.json").read_text())
    d["zero_optimization"]["stage3_prefetch_bucket_sise"] = 1
    with pytest.raises(Exception, match="stage3_prefetch_bucket_sise"):
        rc.DeepSpeedConfig(d)


def test_cluster_configs_say_what_the_issue_asks():
    gpu = json.loads((REPO / "ds_configs" / "gpu_zero3_bf16.json").read_text())
    assert gpu["bf16"]["enabled"] and gpu["optimizer"]["type"] == "AdamW"
    assert gpu["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert gpu["aim_merging"]["enabled"] is True and gpu["aim_merging"].get("anchor", "device") == "device"
    off = json.loads((REPO / "ds_configs" / "zero3_offload_13b.json").read_text())
    z = off["zero_optimization"]
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert off["bf16"]["enabled"] and off["aim_merging"]["enabled"] is True and off["aim_merging"]["anchor"] == "host"


def test_13b_offload_fits_8x80gb():
    """The estimator says the offload config's model states fit an 80 GB GPU with the plugin on."""
    pytest.importorskip("deepspeed.runtime.zero.stage3")
    from aim_ds.tools.estimate import estimate

    e = estimate(13e9, 8, offload="both", anchor="host", largest_layer_params=32000 * 5120)
    assert e.plugin_gpu_bytes == 0
    assert e.with_plugin_gpu_bytes < 80e9 / 8  # model states use a small part of the GPU: room for activations
