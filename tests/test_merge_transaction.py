"""A merge is a transaction, on real multi-rank DeepSpeed ZeRO-3 engines (CPU, gloo), each launch under a timeout."""

import pytest

from tests.mp import RankFailure, run_ranks

TIMEOUT = 300
PG_TIMEOUT = 120  # tests/mp.py initialises the process group with this timeout


@pytest.mark.parametrize(
    "case,policy,world",
    [
        ("nan", "signals", 2),
        ("raise_rehearsal", "signals", 3),
        ("raise_fusion", "signals", 2),
        ("raise_fusion", "importance", 2),
    ],
)
def test_failed_merge_is_undone_bit_exactly_on_every_rank(tmp_path, case, policy, world):
    res = run_ranks("tests.scenarios_fidelity:merge_undone", world, tmp_path, TIMEOUT, case=case, policy=policy)
    for r, x in enumerate(res):
        assert x["merged"] is False, (r, x)
        assert "rank 1: " in x["reason"] and "rank 0: " not in x["reason"], (r, x["reason"])
        assert x["diff"] == [], (r, x["diff"])  # masters, working flats, optimizer state, counters, plugin state
        assert x["full_diff"] == [], (r, x["full_diff"])  # the gathered model too
        assert x["next_merged"] is True and x["finite"], (r, x)
        assert x["merge_count"] == 1, (r, x)
    assert len(res[0]["warnings"]) == 1 and "undone on every rank" in res[0]["warnings"][0], res[0]["warnings"]
    assert all(not x["warnings"] for x in res[1:])  # one warning, from rank 0


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


@pytest.mark.parametrize("retries", [0, 2])
def test_a_persistently_failing_merge_is_retried_within_its_budget(tmp_path, retries):
    # fixed rule, S = 3, 12 steps: attempts at 3 (+ `retries` retries on the next steps), then every 3 steps
    # from where the segment was given up; before the budget there was one attempt (and its rehearsal) per step
    res = run_ranks("tests.scenarios_fidelity:undone_merges_retry_budget", 2, tmp_path, TIMEOUT, merge_retries=retries)
    expected = {0: [3, 6, 9, 12], 2: [3, 4, 5, 8, 9, 10]}[retries]
    assert res[0]["attempts"] == expected, res[0]
    assert res[0]["merges"] == 0 and res[0]["undone_warnings"] == len(expected)
    assert res[0]["replayed_attempts"] == expected and res[0]["replayed_merges"] == 0
