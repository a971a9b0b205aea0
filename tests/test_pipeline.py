"""AimMerging under DeepSpeed's PipelineEngine on CPU ranks (gloo): stages x data-parallel ranks with ZeRO-1,
against the same run at one stage; a failed merge on one stage; resume; resume at another pipeline size."""

import pytest
import torch

from tests.mp import RankFailure, run_ranks

TIMEOUT = 300
SCENARIO = "tests.scenarios_pipeline"


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)  # the same parameters, whichever stage holds them
    return max(float((torch.tensor(a[k]) - torch.tensor(b[k])).abs().max()) for k in a)


def _same_run(one: dict, two: dict) -> None:
    """Two runs on the same micro-batches from the same weights: the same merges at the same steps, the same
    signals up to fp32 reduction order, the same weights."""
    assert one["merges"] == two["merges"] >= 1
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-5)
    assert one["work"] == two["work"]
    assert len(one["trajectory"]) == len(two["trajectory"])
    for x, y in zip(one["trajectory"], two["trajectory"], strict=True):
        assert (x["task"], x["step"], x["merge"], x["interval"], x["rehearsal_steps"], x["undone"]) == (
            y["task"],
            y["step"],
            y["merge"],
            y["interval"],
            y["rehearsal_steps"],
            y["undone"],
        )
        for k in ("probe_loss", "learning_signal"):  # probe: eval_batch; learning signal: sums over the stages
            assert (x[k] is None) == (y[k] is None)
            if x[k] is not None:
                assert x[k] == pytest.approx(y[k], rel=1e-5)
    assert _max_diff(one["weights"], two["weights"]) < 1e-5


@pytest.mark.parametrize("stage", [1, 0])
def test_two_stages_merge_as_one_stage(tmp_path, stage):
    one = run_ranks(f"{SCENARIO}:two_tasks", 1, tmp_path, TIMEOUT, pp=1, stage=stage)[0]
    two = run_ranks(f"{SCENARIO}:two_tasks", 2, tmp_path, TIMEOUT, pp=2, stage=stage)
    assert [r["position"]["pp_rank"] for r in two] == [0, 1]
    assert any(r["probe_loss"] is not None for r in two[0]["trajectory"])  # the probe ran through eval_batch
    _same_run(one, two[0])


def _four_ranks_against_one_stage(tmp_path, axis: str, one_ranks: int, **four_shape) -> None:
    """2 stages x 2 ranks along `axis` (dp_rank or tp_rank) on 4 ranks, against 1 stage on `one_ranks` ranks with
    the same data (without tensor parallelism where the 4-rank run has it)."""
    one_shape = {"tp": 1} if "tp" in four_shape else {}
    one = run_ranks(f"{SCENARIO}:two_tasks", one_ranks, tmp_path, TIMEOUT, pp=1, **one_shape)[0]
    four = run_ranks(f"{SCENARIO}:two_tasks", 4, tmp_path, TIMEOUT * 2, pp=2, **four_shape)
    assert sorted((r["position"]["pp_rank"], r["position"][axis]) for r in four) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    _same_run(one, four[0])


def test_two_stages_by_two_data_parallel_ranks(tmp_path):
    """4 ranks: 2 stages x 2 data-parallel ranks (ZeRO-1 cuts each stage over its 2 ranks), against 1 x 2."""
    _four_ranks_against_one_stage(tmp_path, "dp_rank", one_ranks=2)


def test_two_stages_by_two_megatron_tensor_parallel_ranks(tmp_path):
    """4 ranks: 2 stages x 2 tensor-parallel ranks (column- and row-parallel blocks, the pipeline's grid as the
    engine's mpu) against 1 stage without tensor parallelism: TP-cut parameters counted on every TP rank, whole
    ones on TP rank 0, so the same learning signal, merges and (joined) weights."""
    _four_ranks_against_one_stage(tmp_path, "tp_rank", one_ranks=1, tp=2)


def test_resume_is_bit_exact_at_two_stages_by_two_tensor_parallel_ranks(tmp_path):
    out = run_ranks(f"{SCENARIO}:resume", 4, tmp_path, TIMEOUT * 2, pp=2, tp=2, ckpt=str(tmp_path / "ckpt"))
    for r in out:
        assert r["max_diff"] == 0.0 and r["same_trajectory"] is True and r["merges"][0] == r["merges"][1] >= 1


def test_a_merge_that_fails_on_one_stage_is_undone_on_every_stage(tmp_path):
    out = run_ranks(f"{SCENARIO}:failed_merge_undone_everywhere", 2, tmp_path, TIMEOUT, pp=2)
    for r in out:  # the fusion failed on the last stage only: both stages are back at theta_k, bit for bit
        assert r["merged"] is False and r["diff"] == 0.0
        assert r["next_merged"] is True and r["merges"] == 1  # and the run merges again afterwards


def test_resume_is_bit_exact_at_two_stages(tmp_path):
    out = run_ranks(f"{SCENARIO}:resume", 2, tmp_path, TIMEOUT, pp=2, ckpt=str(tmp_path / "ckpt"))
    for r in out:
        assert r["max_diff"] == 0.0 and r["same_trajectory"] is True
        assert r["merges"][0] == r["merges"][1] >= 1  # a merge after the resume point, the same in both


def test_resume_at_another_pipeline_size_is_refused(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run_ranks(f"{SCENARIO}:save_for_other_size", 2, tmp_path, TIMEOUT, pp=2, ckpt=ckpt)
    out = run_ranks(f"{SCENARIO}:load_at", 2, tmp_path, TIMEOUT, pp=1, ckpt=ckpt)
    for r in out:  # the same world size, 1 stage x 2 data-parallel ranks instead of 2 x 1
        assert r["error"] is not None and "2 pipeline stage(s)" in r["error"] and "has 1" in r["error"]


def test_zero_stage_2_with_pipelines_is_refused(tmp_path):
    with pytest.raises(RankFailure, match="ZeRO|stage"):
        run_ranks(f"{SCENARIO}:make_engine_only", 2, tmp_path, TIMEOUT, pp=2, stage=2)


def test_forever_on_two_stages_as_on_one(tmp_path):
    one = run_ranks(f"{SCENARIO}:forever_two_tasks", 1, tmp_path, TIMEOUT, pp=1)[0]
    two = run_ranks(f"{SCENARIO}:forever_two_tasks", 2, tmp_path, TIMEOUT, pp=2)[0]
    assert one["replays"] == two["replays"] and len(one["replays"]) >= 2  # events and the end-of-task replay
    assert one["replays"][-1][2] == "end" and one["work"] == two["work"]
    assert two["deltas"] == pytest.approx(one["deltas"], rel=1e-5)  # model time summed over the stages
    assert _max_diff(one["weights"], two["weights"]) < 1e-5


def test_memory_that_pipe_batch_cannot_read_is_refused_on_every_rank(tmp_path):
    for r in run_ranks(f"{SCENARIO}:bad_memory", 2, tmp_path, TIMEOUT, pp=2):
        missing, floats = r["errors"]
        assert "AimInputError" in missing and "pipe_batch could not turn it" in missing and "KeyError" in missing
        assert "AimInputError" in floats and "labels must be an integer tensor" in floats
