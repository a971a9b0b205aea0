"""Tensor parallelism: DeepSpeed AutoTP (it trains on the CPU accelerator over gloo) and a Megatron-style
mpu. The plugin's statistics must equal those of the same model and data at TP=1: the element count
exactly (a parameter every TP rank holds whole is counted once), the learning signal, probe losses and
merged model to float tolerance."""

import json
import os
import shutil

import pytest

from tests.mp import run_ranks

TIMEOUT = 600
# frozen under AutoTP TP=2: a norm every rank holds whole, and an MLP weight cut over the ranks (along its rows)
FROZEN = ("model.norm.weight", "model.layers.0.mlp.down_proj.weight")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """TP=1 runs of the same data, by data-parallel size (launched once per module)."""
    cache = {}

    def get(dp):
        if dp not in cache:
            cache[dp] = run_ranks(
                "tests.scenarios_zero:tp_signal", dp, tmp_path_factory.mktemp("ref"), TIMEOUT, tp=1, mode="none"
            )[0]
        return cache[dp]

    return get


def _check(res, ref, sliced):
    r0 = res[0]
    total = r0["total_params"]
    assert ref["count"] == total and ref["tp_size"] == 1
    for r in res:
        assert r["tp_size"] == 2, r
        assert r["count"] == total, r  # every element counted once over TP x DP ranks
        assert r["learning_signal"] == pytest.approx(ref["learning_signal"], rel=1e-5), (r, ref)
        assert r["merged_loss"] == pytest.approx(ref["merged_loss"], rel=1e-5), (r, ref)  # the TP=1 merge
        assert (r["sliced"] > 0) == sliced, r
        assert r["mismatch_error"] and "tensor-parallel" in r["mismatch_error"], r
    assert ref["mismatch_error"] is None
    # decisions come from global rank 0; its probe losses (reduced over data parallel) are the TP=1 ones
    probes = [x for x in r0["probe_losses"] if x is not None]  # the explicit merge's row has no probe
    assert len(probes) == 3 and probes == pytest.approx([x for x in ref["probe_losses"] if x is not None], rel=1e-5)
    assert all(r["probe_losses"] == [] for r in res[1:])


def test_autotp_tp2_dp1_matches_tp1_and_resumes(tmp_path, reference):
    res = run_ranks("tests.scenarios_zero:tp_signal", 2, tmp_path, TIMEOUT, tp=2, mode="autotp", work=str(tmp_path))
    _check(res, reference(1), sliced=True)
    for r in res:
        assert r["resumed_weights_equal"] and r["resumed_state_equal"], r  # save + load at TP=2, bit-exact
        assert "tensor-parallel size 1, this run has 2" in r["plugin_tp_error"], r
        assert "tensor-parallel size 1, this run has 2" in r["ckpt_tp_error"], r  # refused on every rank


def test_megatron_mpu_tp2_dp1_matches_tp1(tmp_path, reference):
    # a hand-made mpu over real gloo groups, the model not sliced: every parameter is held whole by both TP ranks
    res = run_ranks("tests.scenarios_zero:tp_signal", 2, tmp_path, TIMEOUT, tp=2, mode="mpu")
    _check(res, reference(1), sliced=False)


def test_autotp_tp2_dp2_matches_tp1(tmp_path, reference):
    res = run_ranks("tests.scenarios_zero:tp_signal", 4, tmp_path, TIMEOUT, tp=2, mode="autotp")
    _check(res, reference(2), sliced=True)


def frozen_checkpoints(work: str, stages: list):
    """Scenario (2 ranks, AutoTP TP=2): the tiny Llama with FROZEN frozen trains 2 steps at each ZeRO stage
    and is saved by aim_ds.checkpoint.save_checkpoint under work/stage<S>."""
    import deepspeed
    import torch

    from aim_ds import checkpoint as ckpt
    from tests import scenarios as sc

    cut = {}
    for stage in stages:
        torch.manual_seed(0)
        sc.unset_hf_deepspeed_config()
        model = sc.LlamaForCausalLM(sc.tiny_config())
        for n, p in model.named_parameters():
            p.requires_grad_(n not in FROZEN)
        cfg = sc.ds_config(stage=stage)
        cfg["tensor_parallel"] = {"autotp_size": 2}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        engine = deepspeed.initialize(model=model, optimizer=opt, config=cfg)[0]
        for i in range(2):
            engine.backward(engine(**sc.batch(i)).loss)
            engine.step()
        ckpt.save_checkpoint(engine, None, os.path.join(work, f"stage{stage}"), tag="a")
        cut[stage] = {n: list(p.shape) for n, p in engine.module.named_parameters() if n in FROZEN}
    return cut


def test_autotp_convert_keeps_frozen_parameters(tmp_path):
    """Issue 33, item 3: under AutoTP (ZeRO stages 0 and 1) the converted model has every tensor of the model's
    state_dict, the frozen ones whole and unchanged, and loads with from_pretrained with nothing missing."""
    import torch
    from transformers import LlamaForCausalLM

    from aim_ds.checkpoint import convert, model_state_dict
    from tests import scenarios as sc

    res = run_ranks(
        "tests.test_tensor_parallel:frozen_checkpoints", 2, tmp_path, TIMEOUT, work=str(tmp_path), stages=[0, 1]
    )
    torch.manual_seed(0)
    start = sc.LlamaForCausalLM(sc.tiny_config()).state_dict()  # the scenario's model before training
    for r in res:  # the premise: AutoTP cut the frozen MLP weight, not the norm
        for shapes in r.values():
            assert shapes["model.norm.weight"] == list(start["model.norm.weight"].shape), r
            assert shapes[FROZEN[1]][1] < start[FROZEN[1]].shape[1], r
    for stage in (0, 1):
        sd = model_state_dict(str(tmp_path / f"stage{stage}"))
        assert sd.keys() == start.keys(), (stage, sorted(start.keys() ^ sd.keys()))
        for k, v in sd.items():
            assert v.shape == start[k].shape, (stage, k)
            assert torch.equal(v, start[k]) == (k in FROZEN), (stage, k)  # frozen kept; the others trained
        out = convert(str(tmp_path / f"stage{stage}"), str(tmp_path / f"hf{stage}"))
        model, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (stage, info)
        live = model.state_dict()
        assert live.keys() == sd.keys(), stage
        for k, v in sd.items():
            assert torch.equal(live[k], v), (stage, k)
    _check_refusals(tmp_path, sd)


def _check_refusals(tmp_path, sd):
    """Checkpoints that record no cut for the frozen parameters (as one saved before they were recorded): the
    norm, whole on every rank, still joins; the cut MLP weight is refused by name. A parameter the model names
    that no file holds is refused by name."""
    import re

    from aim_ds.checkpoint import CheckpointError, model_state_dict

    def drop_cuts(*names):
        def edit(m):
            for n in names:
                del m["layout"]["tp_slices"][n]

        return edit

    old = model_state_dict(_edited(tmp_path, "old-norm", drop_cuts(FROZEN[0])))
    assert old.keys() == sd.keys() and all(old[k].equal(v) for k, v in sd.items())
    with pytest.raises(CheckpointError, match=re.escape(f"parameter {FROZEN[1]} is cut over the tensor-parallel")):
        model_state_dict(_edited(tmp_path, "old", drop_cuts(*FROZEN)))
    extra = _edited(tmp_path, "extra", lambda m: m["model"]["params"].append(["model.extra.weight", [4]]))
    with pytest.raises(CheckpointError, match=re.escape("parameter model.extra.weight (1 in all")):
        model_state_dict(extra)


def _edited(tmp_path, name: str, edit):
    """A copy of the stage-1 checkpoint of the test above whose manifest `edit` changed."""
    d = tmp_path / name
    shutil.copytree(tmp_path / "stage1", d)
    path = d / "a" / "aim_manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))
    return str(d)
