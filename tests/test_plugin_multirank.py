"""The plugin on real multi-rank DeepSpeed ZeRO-3 engines (CPU, gloo), each launch under a timeout."""

import pytest

from tests.machine import requires_fp16
from tests.mp import run_ranks

TIMEOUT = 300


def _agree(results, key):
    values = [r[key] for r in results]
    assert all(v == values[0] for v in values), f"ranks disagree on {key}: {values}"
    return values[0]


@pytest.mark.parametrize(
    "world,dtype,persistence",
    [
        (3, "fp32", 0),  # 3 ranks pad the last partition of most tensors
        (3, "bf16", 0),
        (2, "fp32", 100000),  # DeepSpeed's default threshold: every tiny tensor persists whole
        pytest.param(2, "fp16", 0, marks=requires_fp16),  # fp16 with dynamic loss scaling
    ],
)
def test_fusion_exact_visible_survives_and_undo(tmp_path, world, dtype, persistence):
    res = run_ranks("fusion_exact", world, tmp_path, TIMEOUT, dtype=dtype, persistence=persistence)
    r = res[0]
    tol = 1e-5 if dtype == "fp32" else 2e-2
    assert r["train_moved"] > 0 and r["rehearsal_moved"] > 0, "training and rehearsal must move the weights"
    assert r["master_rel_err"] <= 1e-5, r  # the fp32 master holds the exact fused value in both dtypes
    assert r["working_rel_err"] <= tol, r  # ... and the copy the forward pass reads was refreshed
    assert r["forward_loss"] == pytest.approx(r["reference_loss"], rel=tol, abs=tol), r
    assert r["after_lr0_rel_err"] <= 1e-6, r  # the next optimizer step starts from the fused master
    assert r["after_lr0_working_rel_err"] <= tol, r
    assert r["undo_max_abs"] == 0.0, r  # weights (1, 0) give back theta_k exactly
    assert r["undo_working_rel_err"] <= tol, r
    assert r["rehearsal_steps"] == 2
    # one fp32 buffer shaped like this rank's partition: 4 bytes per parameter / N (+ padding)
    total = r["total_params"]
    per_rank = [x["held_bytes"]["device"] + x["held_bytes"]["host"] for x in res]
    assert all(b == 4 * x["local_numel"] for b, x in zip(per_rank, res))
    assert sum(x["valid_numel"] for x in res) == total  # padding excluded exactly once
    assert max(per_rank) <= 4 * total / world + 4 * 64 * world, per_rank


def test_fusion_exact_with_optimizer_offload(tmp_path):
    r = run_ranks("fusion_exact", 2, tmp_path, TIMEOUT, dtype="bf16", persistence=0, offload=True)[0]
    assert r["master_rel_err"] <= 1e-5, r
    assert r["working_rel_err"] <= 2e-2, r
    assert r["undo_max_abs"] == 0.0, r


def test_disabled_is_plain_deepspeed(tmp_path):
    res = run_ranks("disabled_identical", 2, tmp_path, TIMEOUT)
    for r in res:
        assert r["hooked"] is False
        assert r["max_abs"] == 0.0, r


def test_controller_fires_merges_end_to_end(tmp_path):
    res = run_ranks("controller_loop", 2, tmp_path, TIMEOUT, scheduler=True)
    r0 = res[0]
    assert _agree(res, "merges") >= 1, r0
    assert r0["merges_task0"] == 0, "nothing is merged during the first task"
    assert r0["rows"] == 6 + 40, r0  # one trajectory row per training step, rehearsal steps excluded
    assert res[1]["rows"] == 0  # rank 0 decides and keeps the record
    assert r0["task1_steps"] == [40]
    assert r0["merge_rows"] and all(s <= 40 for s in r0["merge_rows"])
    assert r0["probe_losses"] == 40  # probe every step of task 1 (probe_interval 1)
    assert r0["finite"]
    assert r0["sched_advance"] == 40, r0  # the LR schedule does not advance during rehearsal
    assert r0["global_advance"] > 40, r0  # ... although rehearsal steps are real optimizer steps


def test_controller_loop_with_gradient_accumulation(tmp_path):
    res = run_ranks("controller_loop", 2, tmp_path, TIMEOUT, gas=2, steps1=20)
    assert res[0]["rows"] == 6 + 20, res[0]  # the controller counts optimizer steps, not micro-steps
    assert _agree(res, "merges") >= 1


def test_non_finite_probe_is_skipped_not_merged(tmp_path):
    res = run_ranks("nan_probe", 2, tmp_path, TIMEOUT)
    r0 = res[0]
    assert r0["warned"] >= 1, r0
    assert r0["skipped_rows"] >= 1, r0
    assert all(r["finite"] for r in res), res


BAD_INPUTS = {
    "empty_memory_one_rank": "empty",
    "bad_key": "pixel_values",
    "out_of_vocab": "vocabulary",
    "no_labels": "labels",
    "bad_config": "min_interval",
    "no_memory_task1": "no memory",
    "record_without_training_batch": "probe_source",
}


def test_bad_input_raises_on_every_rank(tmp_path):
    # all cases in one process group: a case that hung or desynchronised the ranks fails the rest
    res = run_ranks("expect_errors", 2, tmp_path, 300, cases=list(BAD_INPUTS))
    for case, needle in BAD_INPUTS.items():
        per_rank = [r[case] for r in res]
        for r in per_rank:
            assert r["type"] is not None, f"{case}: no error raised: {r}"
            assert "timed out" not in r["message"], r
        # the rank that saw the problem names it
        assert any(needle in r["message"] for r in per_rank), (case, per_rank)


def test_global_quantile_and_importance_policy(tmp_path):
    res = run_ranks("quantile_and_importance", 3, tmp_path, TIMEOUT)
    r = res[0]
    assert all(x["approx"] == r["approx"] for x in res)  # every rank gets the same threshold
    assert abs(r["approx"] - r["exact"]) <= 1e-6, r  # within a bin of 1/1024**3 of the range
    assert abs(r["frac_above"] - 0.2) <= 0.01, r
    assert r["merges"] >= 1 and r["finite"], r


def test_host_anchor(tmp_path):
    res = run_ranks("host_anchor", 2, tmp_path, TIMEOUT)
    for r in res:
        assert r["anchor_device"] == "cpu"
        assert r["master_rel_err"] <= 1e-5, r
        assert r["undo_max_abs"] == 0.0, r


def test_probe_from_the_training_batch(tmp_path):
    res = run_ranks("batch_probe", 2, tmp_path, TIMEOUT)
    r0 = res[0]
    # the recorded memory-row losses, token-weighted over ranks (rank 1 skips some steps), are the signal
    assert len(r0["probe_losses"]) == r0["train_steps"]
    assert r0["probe_losses"] == pytest.approx(r0["expected"], rel=1e-9), r0
    assert _agree(res, "merges") >= 1, r0
    # no probe forward: every forward of task 1 is a training or a rehearsal step
    for r in res:
        assert r["forwards"] == r["train_steps"] + r0["rehearsal_steps"], r
    # nothing recorded: one warning per task, no signal, and the forced activation still merges
    assert r0["warned"] == 1, r0
    assert all(v is None for v in r0["unrecorded_probe_losses"])
    assert "count" in (r0["bad_count"] or ""), r0
