"""A merge is a transaction, on real multi-rank DeepSpeed ZeRO-3 engines (CPU, gloo), each launch under a timeout."""

import pytest

from tests.machine import requires_fp16, split_by_fp16
from tests.mp import RankFailure, run_ranks
from tests.scenarios_fidelity import UNDO_CASES

TIMEOUT = 300
PG_TIMEOUT = 120  # tests/mp.py initialises the process group with this timeout


@pytest.mark.parametrize(
    "case,policy,world,undo",
    [
        ("nan", "signals", 2, "host"),
        ("raise_rehearsal", "signals", 3, "host"),
        ("raise_fusion", "signals", 2, "host"),
        ("raise_fusion", "importance", 2, "host"),
        ("raise_rehearsal", "signals", 3, "nvme"),
        ("raise_fusion", "importance", 2, "nvme"),
    ],
)
def test_failed_merge_is_undone_bit_exactly_on_every_rank(tmp_path, case, policy, world, undo):
    folder = None
    if undo == "nvme":  # the undo record in a memory-mapped file per rank in this folder
        folder = tmp_path / "undo"
        folder.mkdir()
    kw = dict(case=case, policy=policy, undo=undo, undo_path=str(folder) if folder else None)
    res = run_ranks("tests.scenarios_fidelity:merge_undone", world, tmp_path, TIMEOUT, **kw)
    for r, x in enumerate(res):
        assert x["merged"] is False, (r, x)
        assert "rank 1: " in x["reason"] and "rank 0: " not in x["reason"], (r, x["reason"])
        assert x["diff"] == [], (r, x["diff"])  # masters, working flats, optimizer state, counters, plugin state
        assert x["full_diff"] == [], (r, x["full_diff"])  # the gathered model too
        assert x["next_merged"] is True and x["finite"], (r, x)
        assert x["merge_count"] == 1, (r, x)
    assert len(res[0]["warnings"]) == 1 and "undone on every rank" in res[0]["warnings"][0], res[0]["warnings"]
    assert all(not x["warnings"] for x in res[1:])  # one warning, from rank 0
    for x in res:
        host, disk = x["undo_bytes"]["host"], x["undo_bytes"]["disk"]
        if undo == "nvme":  # the record was in the file (only step counts on the host), and no file is left
            assert disk > 0 and host < 1024 and x["undo_files_left"] == [], x
        else:
            assert host > 0 and disk == 0, x


def test_merge_without_undo_record_stops_every_rank(tmp_path):
    with pytest.raises(RankFailure) as info:
        run_ranks("tests.scenarios_fidelity:merge_without_undo_stops", 2, tmp_path, TIMEOUT)
    msg = str(info.value)
    per_rank = [part for part in msg.split("\nrank ") if part.strip()]
    assert len(per_rank) == 2 and "timed out" not in msg, msg
    for part in per_rank:
        assert "cannot be undone" in part and '"undo": "off"' in part and "rank 1: " in part, part[:2000]
        assert "restart from the last checkpoint" in part, part[:2000]


def test_merge_without_undo_record_fuses_like_the_transaction(tmp_path):
    res = run_ranks("tests.scenarios_fidelity:merge_without_undo_commits", 2, tmp_path, TIMEOUT)
    for x in res:
        assert x["max_abs_diff"] < 1e-6, x  # the same fusion, in two parts, up to fp32 rounding
        assert x["off_bytes"] == [0, 0] and x["host_bytes"][0] > 0 and x["host_bytes"][1] == 0, x
        assert x["off_anchor_is_master"] and x["host_anchor_is_master"], x  # committed: anchor = fused


def test_rank_failing_inside_a_merge_collective_stops_every_rank_naming_it(tmp_path):
    ckpt = tmp_path / "ckpt"
    with pytest.raises(RankFailure) as info:
        run_ranks("tests.scenarios_fidelity:merge_fails_inside_collective", 2, tmp_path, TIMEOUT, ckpt_dir=str(ckpt))
    failed_at = float((tmp_path / "failed_at").read_text())
    # each rank's result file is written when its error reached the top: seconds after the injected failure
    stopped = [f.stat().st_mtime - failed_at for f in tmp_path.glob("*/rank*.json")]
    msg = str(info.value)
    per_rank = [part for part in msg.split("\nrank ") if part.strip()]
    assert len(per_rank) == 2, msg  # both ranks reported an error (none hung, none succeeded)
    for part in per_rank:
        assert "failed on rank 1: ValueError: injected" in part, part[:2000]
    assert "timed out" not in msg
    assert len(stopped) == 2 and max(stopped) < PG_TIMEOUT / 4, stopped  # well within the process-group timeout
    res = run_ranks("tests.scenarios_fidelity:resume_after_failure", 2, tmp_path, TIMEOUT, ckpt_dir=str(ckpt))
    assert all(r["finite"] and r["task"] == 1 and r["step_at_load"] == 1 for r in res), res


UNDO_PLAIN, UNDO_FP16 = split_by_fp16(list(UNDO_CASES), lambda name: UNDO_CASES[name].get("dtype"))


@pytest.mark.parametrize("cases", [UNDO_PLAIN, pytest.param(UNDO_FP16, marks=requires_fp16)], ids=["fp32_bf16", "fp16"])
def test_undone_merge_at_every_stage_with_and_without_offload(tmp_path, cases):
    """Issue 29, items 1 and 6: after an undone merge the run continues (offload's gradient buffers are
    the ones DeepSpeed allocated), and loss scale, RNG, gradient norm and overflow are as before it; a
    committed merge leaves the training step's gradient norm and overflow in place."""
    res = run_ranks("tests.scenarios_fidelity:undo_cases", 2, tmp_path, 2 * TIMEOUT, cases=cases)
    problems = []  # every case's findings at once: the cases differ in what they break
    for name in cases:
        for r, per_case in enumerate(res):
            x = per_case[name]
            if "error" in x:
                problems.append((name, r, x["error"][:300]))
                continue
            if x["merged"] is not False or "rank 1: " not in x["reason"]:
                problems.append((name, r, x["merged"], x["reason"][:300]))
            problems += [(name, r, d) for d in x["diff"] + x["full_diff"] + x["report_diff_after_commit"]]
            if not (x["next_merged"] is True and x["finite"]):
                problems.append((name, r, "the run did not continue", x["next_merged"], x["finite"]))
    assert problems == [], "\n".join(map(str, problems))


def test_missing_undo_folder_on_one_rank_refused_at_attach_on_every_rank(tmp_path):
    with pytest.raises(RankFailure) as info:
        run_ranks("tests.scenarios_fidelity:undo_folder_missing", 2, tmp_path, TIMEOUT, folder=str(tmp_path))
    msg = str(info.value)
    per_rank = [part for part in msg.split("\nrank ") if part.strip()]
    assert len(per_rank) == 2 and "timed out" not in msg, msg
    for part in per_rank:
        assert "rank 1: the undo folder check failed" in part and "is not a folder" in part, part[:2000]


@pytest.mark.parametrize("retries", [0, 2])
def test_a_persistently_failing_merge_is_retried_within_its_budget(tmp_path, retries):
    # fixed rule, S = 3, 12 steps: attempts at 3 (+ `retries` retries on the next steps), then every 3 steps
    # from where the segment was given up; before the budget there was one attempt (and its rehearsal) per step
    res = run_ranks("tests.scenarios_fidelity:undone_merges_retry_budget", 2, tmp_path, TIMEOUT, merge_retries=retries)
    expected = {0: [3, 6, 9, 12], 2: [3, 4, 5, 8, 9, 10]}[retries]
    assert res[0]["attempts"] == expected, res[0]
    assert res[0]["merges"] == 0 and res[0]["undone_warnings"] == len(expected)
    assert res[0]["replayed_attempts"] == expected and res[0]["replayed_merges"] == 0
