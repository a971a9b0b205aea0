"""The driver under the other launchers, 2 local ranks each: `mpirun -np 2 python launch/train.py`
(MPI discovery through mpi4py, the venv's MPICH mpirun) and `torchrun --nproc_per_node 2`.
They double as the replay / multitask method tests. Both use a random free port; both time out."""

from __future__ import annotations

import shutil
import sys

import pytest
from test_driver import BIN, SMALL, TRAIN, check_outputs, free_port, run


def _mpirun():
    cand = BIN / "mpirun"
    return str(cand) if cand.exists() else shutil.which("mpirun")


@pytest.mark.skipif(_mpirun() is None, reason="no mpirun (pip install mpich into the venv)")
def test_mpirun_two_ranks_replay(tmp_path):
    out = tmp_path / "out"
    cmd = [_mpirun(), "-np", "2", sys.executable, TRAIN, "--method", "replay", "--output-dir", str(out), *SMALL]
    p = run(cmd, tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    r = check_outputs(out, "replay")
    assert r["launcher"] == "mpi" and r["world_size"] == 2
    assert r["merges"] == 0 and len(r["matrix"]) == 4
    # the default ds_config enables merging; a non-plugin method does not attach it and says so
    assert r["config"]["aim_merging"] is None and any("not attached" in n for n in r["notes"])


def test_torchrun_two_ranks_multitask_generation(tmp_path):
    """torchrun + the generated free-text benchmark (ROUGE-L, greedy generation with synced_gpus under ZeRO-3)."""
    out = tmp_path / "out"
    cmd = [
        str(BIN / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        TRAIN,
        "--method",
        "multitask",
        "--benchmark",
        "default-gen",
        "--output-dir",
        str(out),
        *SMALL,
        "--max-eval",
        "8",
    ]
    p = run(cmd, tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    r = check_outputs(out, "multitask")
    assert r["launcher"] == "env" and r["world_size"] == 2
    assert len(r["matrix"]) == 1 and r["steps"]["train"] == 32
    assert {t["metric"] for t in r["tasks"]} == {"rougeL"}


@pytest.mark.parametrize("value, expect", [(None, "per-rank"), ("", "per-rank"), ("  ", "per-rank"), ("3", "3")])
def test_omp_threads_set_when_unset_or_empty(monkeypatch, value, expect):
    """Several local ranks: an unset OR empty OMP_NUM_THREADS (OpenMP ignores an empty one and starts a thread
    per core) becomes cores // local ranks; a value the user gave is kept."""
    import os

    import torch

    from aim_ds.distributed import set_omp_threads

    if value is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", value)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    threads = torch.get_num_threads()
    try:
        set_omp_threads(2)
        assert os.environ["OMP_NUM_THREADS"] == ("4" if expect == "per-rank" else expect)
    finally:
        torch.set_num_threads(threads)
