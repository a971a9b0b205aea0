"""Issue 33, items 5-7: the learning rate the plugin reads, and rank-0-only controller failures agreed on
every rank (2 CPU ranks, real ZeRO-3 engines, each launch under a timeout)."""

import pytest

from tests.mp import RankFailure, run_ranks

TIMEOUT = 180


def test_a_tensor_learning_rate_trains_and_merges(tmp_path):
    res = run_ranks("tests.scenarios_review:tensor_lr", 2, tmp_path, TIMEOUT)
    assert res[0]["merges"] >= 1, res[0]
    assert all(isinstance(lr, float) and lr == pytest.approx(1e-3) for lr in res[0]["lrs"]), res[0]


def test_the_recorded_lr_is_the_one_the_step_used(tmp_path):
    r = run_ranks("tests.scenarios_review:recorded_lr", 2, tmp_path, TIMEOUT)[0]
    assert len(set(r["used"])) >= 3, r  # warm-up: the lr moves from step to step
    assert r["recorded"] == pytest.approx(r["used"], rel=1e-12), r


def _errors(info) -> list[str]:
    msg = str(info.value)
    assert "timed out" not in msg, msg[:3000]
    return [part for part in msg.split("\nrank ") if part.strip()]


@pytest.mark.parametrize(
    "scenario,expected",
    [("steps_missing", "initial_interval_fraction"), ("explicit_lr_sqrt_merge", "lr_sqrt")],
)
def test_a_failure_only_rank_0_finds_stops_every_rank(tmp_path, scenario, expected):
    with pytest.raises(RankFailure) as info:
        run_ranks(f"tests.scenarios_review:{scenario}", 2, tmp_path, TIMEOUT)
    per_rank = _errors(info)
    assert len(per_rank) == 2, str(info.value)[:3000]
    assert all(expected in part and "rank 0: " in part for part in per_rank), str(info.value)[:3000]
