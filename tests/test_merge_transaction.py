"""A merge is a transaction, on real multi-rank DeepSpeed ZeRO-3 engines (CPU, gloo), each launch under a timeout."""

import pytest

from tests.mp import RankFailure, run_ranks
from tests.scenarios_fidelity import UNDO_CASES

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


def test_undone_merge_at_every_stage_with_and_without_offload(tmp_path):
    """Issue 29, items 1 and 6: after an undone merge the run continues (offload's gradient buffers are
    the ones DeepSpeed allocated), and loss scale, RNG, gradient norm and overflow are as before it; a
    committed merge leaves the training step's gradient norm and overflow in place."""
    res = run_ranks("tests.scenarios_fidelity:undo_cases", 2, tmp_path, 2 * TIMEOUT, cases=list(UNDO_CASES))
    problems = []  # every case's findings at once: the cases differ in what they break
    for name in UNDO_CASES:
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
