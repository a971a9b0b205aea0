"""The plugin on real DeepSpeed engines below ZeRO-3 (stages 0, 1, 2; fp32, bf16; optimizer offload),
CPU ranks over gloo, each launch under a timeout. Several cases share a launch (imports cost seconds)."""

import pytest

from tests.machine import requires_fp16, split_by_fp16
from tests.mp import run_ranks
from tests.scenarios_zero import FUSION_CASES

TIMEOUT = 600

FAMILIES = {
    "stage0_fp32": "stage0_fp32",
    "stage0_bf16": "stage0_unfused",
    "stage1_fp32": "zero1/2",
    "stage1_bf16": "bf16_optimizer",
    "stage2_fp32": "zero1/2",
    "stage2_bf16": "zero1/2",
    "stage2_bf16_offload": "zero1/2",
    "stage1_fp32_offload": "zero1/2",
    "stage0_fp16": "stage0_unfused",
    "stage1_fp16": "zero1/2",
    "stage2_fp16": "zero1/2",
}


FUSION_PLAIN, FUSION_FP16 = split_by_fp16(list(FUSION_CASES), lambda name: FUSION_CASES[name].get("dtype"))


@pytest.mark.parametrize(
    "cases", [FUSION_PLAIN, pytest.param(FUSION_FP16, marks=requires_fp16)], ids=["fp32_bf16", "fp16"]
)
def test_fusion_exact_at_stages_0_1_2(tmp_path, cases):
    # 3 ranks: ZeRO-1/2 partition boundaries cut parameters and the last partition is padded
    world = 3
    res = run_ranks("tests.scenarios_zero:fusion_cases", world, tmp_path, TIMEOUT, cases=cases)
    assert sorted(res[0]) == sorted(cases)
    for name in cases:
        kw = FUSION_CASES[name]
        r = res[0][name]
        per = [x[name] for x in res]
        tol = 1e-5 if kw.get("dtype", "fp32") == "fp32" else 2e-2
        assert r["family"] == FAMILIES[name], (name, r["family"], r["optimizer"])
        assert r["train_moved"] > 0 and r["rehearsal_moved"] > 0, (name, r)
        assert r["master_rel_err"] <= 1e-5, (name, r)  # the fp32 master holds the exact fused value
        assert r["working_rel_err"] <= tol, (name, r)  # ... and the forward's copy was refreshed on every rank
        assert r["forward_loss"] == pytest.approx(r["reference_loss"], rel=tol, abs=tol), (name, r)
        assert r["after_lr0_rel_err"] <= 1e-6, (name, r)  # the next optimizer step starts from the fused master
        assert r["after_lr0_working_rel_err"] <= tol, (name, r)
        assert r["undo_max_abs"] == 0.0, (name, r)  # weights (1, 0) give back theta_k exactly
        assert r["undo_working_rel_err"] <= tol, (name, r)
        total = r["total_params"]
        assert sum(x["valid_numel"] for x in per) == total, (name, [x["valid_numel"] for x in per])  # counted once
        held = [x["held_bytes"]["device"] + x["held_bytes"]["host"] for x in per]
        assert all(b == 4 * x["local_numel"] for b, x in zip(held, per)), (name, held)  # ONE fp32 buffer
        if kw["stage"] == 0:
            assert all(x["local_numel"] == total for x in per), name  # stage 0: every rank holds every master
        else:
            assert max(held) <= 4 * total / world + 4 * 64 * world, (name, held)  # 4 bytes / param / N
            assert per[-1]["valid_numel"] < per[-1]["local_numel"], name  # the last partition is padded
        if r["family"] == "zero1/2":
            assert any(x["cut"] for x in per), name  # some partition starts inside a parameter
        assert all(x["cpu_offload"] == bool(kw.get("offload")) for x in per), name


def test_disabled_identical_importance_and_refusals(tmp_path):
    res = run_ranks("tests.scenarios_zero:stage_checks", 2, tmp_path, TIMEOUT, stages=[0, 1, 2])
    for r in res:
        for stage, d in r["disabled"].items():
            assert d["hooked"] is False and d["max_abs"] == 0.0, (stage, d)  # enabled false = plain DeepSpeed
        for stage, d in r["importance"].items():
            assert d["ema_in"] > 0, (stage, d)  # the gradient hook saw the optimizer's fp32 gradients
            assert d["finite"] and d["merges"] == 1, (stage, d)
        e = r["unsupported"]["no_optimizer"]
        assert e["type"] == "ShardError" and "no optimizer" in e["message"], e


def test_stage2_checkpoint_resume_bit_exact_and_convert(tmp_path):
    res = run_ranks("tests.scenarios_zero:checkpoint_resume", 2, tmp_path, TIMEOUT, work=str(tmp_path))
    for r in res:
        assert r["family"] == "zero1/2" and r["merges_before_save"] == 1, r
        assert r["loaded_diff"] == 0.0 and r["resumed_diff"] == 0.0, r  # bit-identical weights after resume
        assert r["state_equal"], r  # anchor, theta_k, EMA shards, controller, cursors, trajectory
        assert r["merges"] == 2, r  # the resumed run crossed its next merge
    r0 = res[0]
    assert r0["convert_model_diff"] == 0.0, r0
    assert r0["convert_anchor_diff"] == 0.0, r0  # the anchor reassembled from flat partitions cut mid-parameter
    assert "ZeRO-3" in r0["reshard_error"], r0


@pytest.mark.parametrize(
    "cases", [[[0, "fp32"], [0, "bf16"]], pytest.param([[1, "fp16"]], marks=requires_fp16)], ids=["stage0", "fp16"]
)
def test_checkpoint_resume_bit_exact_stage0_and_fp16(tmp_path, cases):
    """Stage 0 (fp32: the parameters are the masters; bf16: the unfused optimizer's fp32 copies) and fp16 with
    dynamic loss scaling: save after a merge, resume bit-exact across the next merge, convert exactly."""
    res = run_ranks("tests.scenarios_zero:checkpoint_cases", 2, tmp_path, TIMEOUT, work=str(tmp_path), cases=cases)
    for stage, dtype in cases:
        name = f"stage{stage}_{dtype}"
        for r in (x[name] for x in res):
            assert r["merges_before_save"] == 1 and r["merges"] == 2, (name, r)
            assert r["loaded_diff"] == 0.0 and r["resumed_diff"] == 0.0 and r["state_equal"], (name, r)
        r0 = res[0][name]
        assert r0["convert_model_diff"] == 0.0 and r0["convert_anchor_diff"] == 0.0, (name, r0)


def test_driver_runs_the_shipped_zero2_config(tmp_path):
    """launch/train.py with ds_configs/cpu_zero2.json (2 ranks, deepspeed launcher): trains, merges, writes results."""
    import json
    import subprocess

    from tests.mp import REPO, deepspeed_cmd, driver_env

    cfg = json.loads((REPO / "ds_configs" / "cpu_zero2.json").read_text())
    cfg["aim_merging"].update(initial_interval=2, min_interval=1, max_interval=4)  # merges within 8 steps a task
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    cmd = [
        *deepspeed_cmd(REPO / "launch" / "train.py"),
        "--method",
        "aim",
        "--deepspeed_config",
        str(tmp_path / "ds.json"),
        "--output-dir",
        str(out),
        "--max-train",
        "32",
        "--max-eval",
        "16",
        "--batch-size",
        "2",
        "--eval-batch-size",
        "16",
        "--no-progress",
    ]
    p = subprocess.run(
        cmd, cwd=str(tmp_path), env=driver_env(tmp_path), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    r = json.loads((out / "results.json").read_text())
    assert r["world_size"] == 2 and r["merges"] >= 1, r
    assert r["config"]["deepspeed_config"]["zero_optimization"]["stage"] == 2
    assert r["steps"]["train"] == 32 and r["steps"]["engine"] > 32, r["steps"]  # rehearsal steps on top
