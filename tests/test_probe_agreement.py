"""The probe agreed across ranks (issue 29, item 4), on real DeepSpeed ZeRO-3 engines (2 CPU ranks, gloo): a rank
whose probe fails stops every rank with an error naming it, well within the process group's timeout; one-shot
iterables are refused as memory."""

from __future__ import annotations

import time

import pytest

from tests.mp import RankFailure, run_ranks

TIMEOUT = 300
PG_TIMEOUT = 120  # tests/mp.py initialises the process group with this timeout


@pytest.mark.parametrize("where", ["batch", "forward"])
def test_probe_failure_on_one_rank_stops_every_rank_naming_it(tmp_path, where):
    t0 = time.time()
    with pytest.raises(RankFailure) as info:
        run_ranks("tests.scenarios_faults:probe_fails", 2, tmp_path, TIMEOUT, where=where, out_dir=str(tmp_path))
    msg = str(info.value)
    assert "timed out" not in msg, msg[-3000:]
    per_rank = [part for part in msg.split("\nrank ") if part.strip()]
    assert len(per_rank) == 2, msg[-3000:]  # both ranks reported an error: none hung, none went on
    for part in per_rank:
        assert "rank 1: " in part and "injected" in part and "probe" in part, part[:2000]
    failed_at = float((tmp_path / "failed_at").read_text())
    stopped = [float((tmp_path / f"stopped{r}").read_text()) - failed_at for r in range(2)]
    assert max(stopped) < PG_TIMEOUT / 4, (stopped, time.time() - t0)


def test_one_shot_iterable_memory_is_refused(tmp_path):
    # a generator once passed the checks, then both cursors and the look-ahead drained it: "memory iterable is
    # empty" inside a probe, mid-run
    for r, errors in enumerate(run_ranks("tests.scenarios_faults:one_shot_memory", 2, tmp_path, TIMEOUT)):
        assert set(errors) == {"attach", "set_memory"}, (r, errors)
        for e in errors.values():
            assert e.startswith("AimInputError") and "one-shot" in e and "list" in e, (r, e)
