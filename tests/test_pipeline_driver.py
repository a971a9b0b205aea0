"""launch/train.py --pipeline-parallel-size 2 on 2 CPU ranks (ZeRO-1, gloo): the default benchmark end to end with
merges on later tasks; a resume from a mid-task checkpoint ends exactly like the run it came from; a resume at
another pipeline size is refused before any engine is built; aim-ds convert joins the stages' files into a
Hugging Face folder, for the model (the fp32 masters) and for the anchor."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.mp import REPO, TRAIN, aim_ds_cmd, deepspeed_cmd, run_logged

PIPE_CONFIG = str(REPO / "ds_configs" / "cpu_pipe_zero1.json")
# 24 steps per task (96 examples, batch 4, one data-parallel rank): the default config forces a merge by step 16
SMALL = ["--max-train", "96", "--max-eval", "16", "--batch-size", "4", "--eval-batch-size", "16", "--no-progress"]
TIMEOUT = 400


def _train(cwd: Path, out: Path, *extra, ranks: int = 2, ds: str = PIPE_CONFIG) -> tuple[int, str]:
    cmd = deepspeed_cmd(
        TRAIN,
        "--pipeline-parallel-size",
        "2",
        "--deepspeed_config",
        ds,
        "--seed",
        "1",
        "--output-dir",
        str(out),
        *SMALL,
        *extra,
        ranks=ranks,
    )
    return run_logged(cmd, cwd, out.name, TIMEOUT)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe_driver")
    rc, log = _train(tmp, tmp / "ref", "--checkpoint-every", "6", "--keep-checkpoints", "20")
    assert rc == 0, log[-4000:]
    return tmp


def test_two_stages_run_the_default_benchmark_with_merges(run):
    res = json.loads((run / "ref" / "results.json").read_text())
    assert res["pipeline_parallel"] == 2 and res["world_size"] == 2
    assert len(res["matrix"]) == 4 and all(len(row) == 4 for row in res["matrix"])
    assert res["OP"] is not None and res["BWT"] is not None
    rows = (run / "ref" / "trajectory.csv").read_text().splitlines()
    header = rows[0].split(",")
    merges = [r.split(",") for r in rows[1:] if r.split(",")[header.index("merge")] == "1"]
    assert res["merges"] == len(merges) >= 1
    assert all(int(r[header.index("task")]) >= 1 for r in merges)  # task 0 never merges


def test_resume_from_a_mid_task_checkpoint_ends_like_the_run(run):
    tag = "task002-step000006"
    ckpt = run / "ref" / "checkpoints" / tag
    assert ckpt.is_dir(), sorted(p.name for p in (run / "ref" / "checkpoints").iterdir())
    rc, log = _train(run, run / "resumed", "--checkpoint-every", "6", "--resume", str(ckpt))
    assert rc == 0, log[-4000:]
    a = json.loads((run / "ref" / "results.json").read_text())
    b = json.loads((run / "resumed" / "results.json").read_text())
    assert a["matrix"] == b["matrix"] and a["merges"] == b["merges"] and a["steps"] == b["steps"]
    for f in ("trajectory.csv", "losses.csv"):  # bit for bit, the steps before the resume point included
        assert (run / "ref" / f).read_text() == (run / "resumed" / f).read_text(), f


def test_resume_at_another_pipeline_size_is_refused_before_any_engine(run):
    ckpt = run / "ref" / "checkpoints" / "task001-step000006"
    cmd = deepspeed_cmd(
        TRAIN,
        "--deepspeed_config",
        PIPE_CONFIG,
        "--seed",
        "1",
        "--output-dir",
        str(run / "other"),
        *SMALL,
        "--resume",
        str(ckpt),
    )
    rc, log = run_logged(cmd, run, "other", TIMEOUT)
    assert rc != 0
    assert "saved with 2 pipeline stage(s), this run has 1" in log and "--pipeline-parallel-size 2" in log, log[-3000:]
    assert "deepspeed.initialize" not in log and "Using topology" not in log  # refused before the engine


def _convert(run: Path, tag: str, what: str) -> Path:
    out = run / f"hf-{what}-{tag}"
    rc, log = run_logged(
        aim_ds_cmd("convert", str(run / "ref" / "checkpoints"), str(out), "--tag", tag, "--what", what),
        run,
        f"convert-{what}-{tag}",
        TIMEOUT,
    )
    assert rc == 0, log[-3000:]
    return out


def _load(folder: Path) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)  # strict: no missing key
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_convert_joins_the_stages_for_the_model_and_the_anchor(run):
    from aim_ds.checkpoint.pipe import pipeline_hf_state_dict

    end = _load(_convert(run, "task001-end", "model"))
    # fp32 training: the joined fp32 masters equal what each stage's layer files hold, for every parameter
    layers = pipeline_hf_state_dict(str(run / "ref" / "checkpoints" / "task001-end"), 2, True)
    assert sorted(layers) == sorted(end)
    assert all(torch.equal(layers[k].float(), end[k]) for k in end)
    # the anchor of task 2 is the weights task 2 started from: the end of task 1, on both stages
    anchor = _load(_convert(run, "task002-step000006", "anchor"))
    assert sorted(anchor) == sorted(end) and all(torch.equal(anchor[k], end[k]) for k in end)
    model = _load(_convert(run, "task002-step000006", "model"))
    assert any(not torch.equal(model[k], anchor[k]) for k in anchor)  # 6 steps of task 2 moved the model


def test_pipeline_options_a_run_cannot_take_are_refused(tmp_path):
    zero3 = str(REPO / "ds_configs" / "cpu_zero3.json")
    rc, log = run_logged(
        [sys.executable, TRAIN, "--pipeline-parallel-size", "2", "--deepspeed_config", zero3, *SMALL],
        tmp_path,
        "zero3",
        120,
    )
    assert rc == 2 and "zero_optimization.stage 3" in log and "stage 0 or 1" in log, log[-2000:]
    rc, log = run_logged(
        [sys.executable, TRAIN, "--pipeline-parallel-size", "2", "--lora", "4", *SMALL], tmp_path, "lora", 120
    )
    assert rc == 2 and "--lora with --pipeline-parallel-size" in log, log[-2000:]


@pytest.fixture(scope="module")
def run_tp(tmp_path_factory):
    """2 stages x 2 tensor-parallel ranks on 4 ranks: the ds_config's tensor_parallel size, the stages' layers cut
    Megatron-style by the driver; a reference run with checkpoints and a resume from one of them."""
    tmp = tmp_path_factory.mktemp("pipe_tp")
    cfg = json.loads(Path(PIPE_CONFIG).read_text())
    cfg["tensor_parallel"] = {"autotp_size": 2}
    ds = tmp / "pipe_tp2.json"
    ds.write_text(json.dumps(cfg))
    rc, log = _train(tmp, tmp / "ref", "--checkpoint-every", "6", "--keep-checkpoints", "20", ranks=4, ds=str(ds))
    assert rc == 0, log[-4000:]
    ckpt = tmp / "ref" / "checkpoints" / "task002-step000018"
    assert ckpt.is_dir(), sorted(p.name for p in (tmp / "ref" / "checkpoints").iterdir())
    rc, log = _train(tmp, tmp / "resumed", "--resume", str(ckpt), ranks=4, ds=str(ds))
    assert rc == 0, log[-4000:]
    return tmp


def test_two_stages_by_two_tensor_parallel_ranks_merge_resume_and_convert(run_tp):
    a = json.loads((run_tp / "ref" / "results.json").read_text())
    b = json.loads((run_tp / "resumed" / "results.json").read_text())
    assert (a["pipeline_parallel"], a["tensor_parallel"], a["world_size"]) == (2, 2, 4)
    assert a["merges"] >= 1 and a["matrix"] == b["matrix"] and a["merges"] == b["merges"]
    for f in ("trajectory.csv", "losses.csv"):  # the resumed run, bit for bit
        assert (run_tp / "ref" / f).read_text() == (run_tp / "resumed" / f).read_text(), f
    # convert joins every stage's tensor-parallel slices: from_pretrained loads them, equal to the layer files
    from aim_ds.checkpoint.pipe import pipeline_hf_state_dict

    out = run_tp / "hf"
    ckpts = run_tp / "ref" / "checkpoints"
    rc, log = run_logged(aim_ds_cmd("convert", str(ckpts), str(out)), run_tp, "convert", TIMEOUT)
    assert rc == 0, log[-3000:]
    model = _load(out)
    tag = (ckpts / "latest").read_text().strip()
    assert "layer_01-model_01-model_states.pt" in {p.name for p in (ckpts / tag).iterdir()}
    layers = pipeline_hf_state_dict(str(ckpts / tag), 2, True)
    assert sorted(layers) == sorted(model) and all(torch.equal(layers[k].float(), model[k]) for k in model)
    assert model["model.layers.0.mlp.down_proj.weight"].shape == (128, 512)  # whole again: 512 = both halves
    rc, log = run_logged(
        aim_ds_cmd("convert", str(ckpts), str(run_tp / "anchor"), "--what", "anchor"), run_tp, "anchor", TIMEOUT
    )
    assert rc != 0 and "anchor of a pipeline with tensor parallelism" in log, log[-2000:]
