"""The pipeline-parallel Llama (aim_ds.experiment.pipeline) and its offline checkpoint join (aim_ds.checkpoint.pipe):
at 1 stage (1 rank) and 2 stages (2 ranks) the same losses as the HF model, one training step the same weights
as a torch SGD step of the HF model (the tied embedding gets both its gradients), and a saved checkpoint that
joins into a strict-loading HF state dict equal to the live gathered one."""

import os
import shutil

import pytest
import torch
from transformers import LlamaForCausalLM

from aim_ds.checkpoint.format import CheckpointError
from aim_ds.checkpoint.pipe import layer_file, pipeline_hf_state_dict
from aim_ds.experiment.pipeline import hf_param_name
from tests.mp import run_ranks
from tests.scenarios_pipeline_model import config

TIMEOUT = 300
LAYERS = 2  # the scenarios' tiny Llama


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launch per shape; {1 | 2 | "2x2": (output folder, every rank's result)}: 1 stage, 2 stages, and 2 stages
    x 2 Megatron-style tensor-parallel ranks (4 ranks). One stage runs eager attention (a materialised causal
    mask), the others sdpa (its is_causal path)."""
    out = {}
    for key, ranks, tp, attn in ((1, 1, 1, "eager"), (2, 2, 1, "sdpa"), ("2x2", 4, 2, "sdpa")):
        tmp = tmp_path_factory.mktemp(f"pipe{key}")
        res = run_ranks(
            "tests.scenarios_pipeline_model:pipeline_checks",
            ranks,
            tmp,
            timeout=TIMEOUT,
            out=str(tmp),
            attn=attn,
            tp=tp,
        )
        assert _same_numbers(res), res
        out[key] = (tmp, res)
    return out


def _same_numbers(res) -> bool:
    """Every rank measured the same losses and differences (the local layer names differ by stage)."""
    keys = ("eval", "initial_diff", "train_loss", "step_diff", "eval_after")
    return all(r[t][k] == res[0][t][k] for r in res for t in ("tied", "untied") for k in keys)


def test_offline_names_follow_the_layer_layout():
    assert hf_param_name(0, "weight", 2, True) == "model.embed_tokens.weight"
    assert hf_param_name(3, "weight", 2, True) == "model.norm.weight"
    assert hf_param_name(2, "mlp.down_proj.weight", 2, False) == "model.layers.1.mlp.down_proj.weight"
    assert hf_param_name(4, "weight", 2, False) == "lm_head.weight"
    with pytest.raises(ValueError, match="tied head"):
        hf_param_name(4, "weight", 2, True)
    with pytest.raises(ValueError, match="no layer"):
        hf_param_name(5, "weight", 2, False)


@pytest.mark.parametrize("stages", [1, 2, "2x2"])
def test_pipeline_matches_the_hf_model(runs, stages):
    _, res = runs[stages]
    for tied in ("untied", "tied"):
        r = res[0][tied]
        assert r["keys"] and r["initial_diff"] == 0.0, r  # the pipeline shares the HF weights
        for got, want in r["eval"]:  # right padding and two sequence lengths
            assert got == pytest.approx(want, abs=1e-5), r["eval"]
        assert r["train_loss"] == pytest.approx(r["ref_train_loss"], abs=1e-5)
        assert r["step_size"] > 1e-3  # the step moved the weights by far more than the tolerance below
        assert r["step_diff"] < 1e-5, r
        for got, want in r["eval_after"]:
            assert got == pytest.approx(want, abs=1e-5), r["eval_after"]
        if tied == "tied":
            assert r["head_is_embedding"]


def test_two_stages_split_embedding_and_layer0_from_layer1_and_head(runs):
    _, res = runs[2]
    assert res[0]["untied"]["parts"] == [0, 2, 5]
    assert res[0]["untied"]["local"][0] == "0.weight" and "2.mlp.up_proj.weight" in res[1]["untied"]["local"]
    assert {"3.weight", "4.weight"} <= set(res[1]["untied"]["local"])
    # the tied embedding lives on both stages under DeepSpeed's tied-module name
    assert all("tied_modules.embed.weight" in r["tied"]["local"] for r in res)


@pytest.mark.parametrize("shape", [2, "2x2"])
def test_one_and_two_stages_train_to_the_same_weights(runs, shape):
    for tied in ("untied", "tied"):
        a = torch.load(runs[1][0] / f"1-{tied}.pt")
        b = torch.load(runs[shape][0] / f"{shape}-{tied}.pt")
        assert sorted(a) == sorted(b)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


@pytest.mark.parametrize("stages", [1, 2, "2x2"])
def test_saved_checkpoint_joins_into_the_gathered_hf_state_dict(runs, stages):
    tmp, _ = runs[stages]
    for tied in (False, True):
        name = f"{stages}-{'tied' if tied else 'untied'}"
        tag_dir = os.path.join(tmp, name, "step1")
        files = os.listdir(tag_dir)  # under tensor parallelism one file per layer and tensor-parallel rank
        has = {int(f[6:8]) for f in files if f.startswith("layer_")}
        assert LAYERS + 1 in has
        assert (LAYERS + 2 in has) is not tied  # a tied head is the embedding: DeepSpeed writes no file for it
        if stages == "2x2":
            assert "layer_01-model_01-model_states.pt" in files
        sd = pipeline_hf_state_dict(tag_dir, LAYERS, tied)
        gathered = torch.load(tmp / f"{name}.pt")
        assert sorted(sd) == sorted(gathered)
        assert all(torch.equal(sd[k], gathered[k]) for k in sd)
        model = LlamaForCausalLM(config(tied))
        model.load_state_dict(sd, strict=True)
        if tied:
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_a_missing_or_extra_layer_file_is_refused_by_name(runs, tmp_path):
    src = os.path.join(runs[2][0], "2-untied", "step1")
    tag_dir = str(tmp_path / "step1")
    shutil.copytree(src, tag_dir)
    os.remove(os.path.join(tag_dir, layer_file(1)))
    with pytest.raises(CheckpointError, match="layer_01-model_states.pt"):
        pipeline_hf_state_dict(tag_dir, LAYERS, False)
    shutil.copy(os.path.join(src, layer_file(1)), tag_dir)
    with pytest.raises(CheckpointError, match="layer_04-model_states.pt.*beyond"):
        pipeline_hf_state_dict(tag_dir, LAYERS, True)  # an untied save read as tied
    shutil.copy(os.path.join(src, layer_file(1)), os.path.join(tag_dir, "layer_01-model_01-model_states.pt"))
    with pytest.raises(CheckpointError, match="not form one tensor-parallel layout.*layer_01-model_01-model_states.pt"):
        pipeline_hf_state_dict(tag_dir, LAYERS, False)  # one layer with a stray slice beside its whole file
