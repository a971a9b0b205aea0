"""DeepSpeed's CPU shm all-reduce leaves a ~69 MB file per rank in /dev/shm (deepspeed 0.19.8 never unlinks
it); aim_ds.distributed.release_cpu_shm_names unlinks each rank's name once all ranks have mapped it."""

from __future__ import annotations

import pytest

from tests.mp import run_ranks


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 3])
def test_shm_names_released_and_allreduce_still_works(tmp_path, world):
    res = run_ranks("shm_released", world, tmp_path, timeout=240)
    total = sum(range(1, world + 1))
    for r in res:
        assert r["left"] == [], r  # nothing of this job left in /dev/shm
        assert r["shm_sum"] == total and r["gloo_sum"] == total, r
