"""launch/train.py with a tensor-parallel ds_config (DeepSpeed AutoTP over CPU ranks, ds_configs/cpu_autotp2_zero1.json):
a TP=2 run equals the TP=1 run of the same seed and global batch (matrix, merge schedule, losses within
float noise), its checkpoints convert (model and anchor, tensor-parallel slices joined) to Hugging Face
folders that load with from_pretrained, it resumes at the same TP size and refuses another one.

The driver's default model ties its embeddings, so AutoTP cuts the LM head over the vocabulary: the
driver's label scores and losses run on gathered logits. Every launch has a timeout."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch
from test_driver import BIN, TRAIN, free_port, run

from tests.mp import REPO

TIMEOUT = 420
# 16 driver steps per task (32 examples, global batch 2), 4 tasks; merges from step 2 on; a checkpoint every 8
ARGS = ["--method", "aim", "--max-train", "32", "--max-eval", "16", "--batch-size", "2", "--eval-batch-size", "16"]
ARGS += ["--no-progress", "--checkpoint-every", "8", "--keep-checkpoints", "20"]


def ds_config(tmp_path, tp: int) -> str:
    cfg = json.loads((REPO / "ds_configs" / "cpu_autotp2_zero1.json").read_text())
    cfg["aim_merging"].update(initial_interval=2, min_interval=1, max_interval=4)
    if tp == 1:
        cfg.pop("tensor_parallel")
    path = tmp_path / f"ds-tp{tp}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def launch(ranks: int, *args) -> list:
    if ranks == 1:
        return [sys.executable, TRAIN, *args]
    return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), TRAIN, *args]


def driver(tmp_path, name: str, ranks: int, tp: int, *extra):
    out = tmp_path / name
    p = run(
        launch(ranks, *ARGS, "--deepspeed_config", ds_config(tmp_path, tp), "--output-dir", str(out), *extra),
        tmp_path,
        TIMEOUT,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return out


def table(path, cols) -> list:
    with open(path) as f:
        return [tuple(r[c] for c in cols) for r in csv.DictReader(f)]


def assert_same_run(tp_out, ref_out, tp: int, dp: int):
    a = json.loads((tp_out / "results.json").read_text())
    b = json.loads((ref_out / "results.json").read_text())
    assert a["tensor_parallel"] == tp and a["world_size"] == tp * dp and b["tensor_parallel"] == 1
    assert a["steps"] == b["steps"] and a["merges"] == b["merges"] >= 1, (a["steps"], a["merges"], b["merges"])
    assert a["matrix"] == b["matrix"], (a["matrix"], b["matrix"])
    # the merge schedule (the adaptive controller's decisions) step for step
    cols = ("task", "step", "interval", "merge")
    assert table(tp_out / "trajectory.csv", cols) == table(ref_out / "trajectory.csv", cols)
    la = [float(x[0]) for x in table(tp_out / "losses.csv", ("loss",))]
    lb = [float(x[0]) for x in table(ref_out / "losses.csv", ("loss",))]
    assert len(la) == len(lb) == a["steps"]["train"]
    assert la == pytest.approx(lb, rel=1e-2)  # float noise of sums taken in another order, grown by AdamW


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    return tmp, driver(tmp, "tp2", 2, 2), driver(tmp, "tp1", 1, 1)


def test_tp2_dp1_matches_tp1(runs):
    _, tp2, tp1 = runs
    assert_same_run(tp2, tp1, tp=2, dp=1)


def test_tp_checkpoints_convert_to_one_hf_folder(runs):
    """model and anchor: the TP slices joined equal the TP=1 run's tensors at its first checkpoint (the anchor,
    task 0's start weights, exactly; the weights after 8 AdamW steps to float noise); the converted folders
    load with from_pretrained and hold exactly the joined tensors."""
    from transformers import AutoModelForCausalLM

    from aim_ds.checkpoint import anchor_state_dict, convert, model_state_dict

    tmp, tp2, tp1 = runs
    for fn, atol in ((model_state_dict, 2e-4), (anchor_state_dict, 0.0)):
        a = fn(str(tp2 / "checkpoints"), "task000-step000008")
        b = fn(str(tp1 / "checkpoints"), "task000-step000008")
        assert a.keys() == b.keys(), fn.__name__
        for k in a:
            assert a[k].shape == b[k].shape and torch.allclose(a[k], b[k], rtol=0, atol=atol), (fn.__name__, k)
    ckpt = str(tp2 / "checkpoints")
    joined = {"model": model_state_dict(ckpt), "anchor": anchor_state_dict(ckpt)}
    for what, want in joined.items():
        out = tmp / f"hf-{what}"
        convert(ckpt, str(out), what=what)
        model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (what, info)  # none random-initialised
        live = model.state_dict()
        # every tensor of the model from the checkpoint; an anchor for every parameter (all trained in this run),
        # the tied LM head still tied to the embedding (no parameter of its own), so the anchor's too
        assert joined["model"].keys() == live.keys(), sorted(joined["model"].keys() ^ live.keys())
        assert joined["anchor"].keys() == {n for n, _ in model.named_parameters()}, what
        for k, v in want.items():
            assert torch.equal(live[k].float(), v), (what, k)
        assert not torch.equal(want["model.norm.weight"], torch.ones_like(want["model.norm.weight"]))  # trained


def test_tp_resume_same_size_and_refuse_another(runs):
    tmp, tp2, _ = runs
    tag = tp2 / "checkpoints" / "task002-step000008"
    res = driver(tmp, "resumed", 2, 2, "--resume", str(tag))
    a = json.loads((tp2 / "results.json").read_text())
    b = json.loads((res / "results.json").read_text())
    assert b["checkpoints"]["resumed_from"] == str(tag)
    assert a["matrix"] == b["matrix"] and a["merges"] == b["merges"]
    for f in ("trajectory.csv", "losses.csv"):
        assert (tp2 / f).read_text() == (res / f).read_text(), f  # bit-exact at the same TP size
    # another TP size: one clear error before any engine is built, nothing written
    p = run(
        launch(
            1,
            *ARGS,
            "--deepspeed_config",
            ds_config(tmp, 1),
            "--output-dir",
            str(tmp / "tp1-from-tp2"),
            "--resume",
            str(tag),
        ),
        tmp,
        120,
    )
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and err, p.stderr[-3000:]
    assert "saved at tensor-parallel size 2, this run has 1" in err[-1], err[-1]
    assert not (tmp / "tp1-from-tp2").exists()


def test_tp2_dp2_matches_tp1_dp2(tmp_path):
    """4 ranks: two tensor-parallel pairs, data split over the pairs; equals TP=1 on 2 ranks (same global batch)."""
    assert_same_run(driver(tmp_path, "tp2dp2", 4, 2), driver(tmp_path, "dp2", 2, 1), tp=2, dp=2)


def test_vocab_sliced_head_gathered_for_scores_and_generation(tmp_path):
    """A tied LM head under AutoTP TP=2 is cut over the vocabulary: the gathered logits equal the unsliced
    model's, and greedy generation through aim_ds.experiment.evaluation produces the same tokens."""
    from tests.mp import run_ranks

    for r in run_ranks("tests.scenarios_zero:tp_vocab_head", 2, tmp_path, TIMEOUT):
        assert r["sliced_width"] < r["vocab"] and r["gathered_width"] == r["vocab"], r
        assert r["logits_max_diff"] < 1e-4, r
        assert r["generated"] == r["reference"] and len(r["generated"]) == 3, r
