"""Resume on another number of ranks through the driver: a run checkpointed mid-task on 2 ranks, resharded
with `aim-ds reshard --world-size 1` and resumed on 1 rank finishes (and 1 -> 2 likewise), with the matrix
rows, trajectory and losses before the checkpoint identical to the uninterrupted run's and the resharded
anchor and controller equal to the saving run's; the data order is per global batch.

Every subprocess runs in its own session with a timeout (tests/test_resume.py's helpers)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from aim_ds.driver import memory_batches, rank_batches

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from test_resume import TRAIN, finish, run, start  # noqa: E402

from tests.mp import aim_ds_cmd, deepspeed_cmd  # noqa: E402

# 18 driver steps per task at a global batch of 4 (72 examples), checkpoints every 15 driver steps:
# task002-step000009 lies mid-task 2, after task 1's merges
COMMON = [
    "--seed",
    "3",
    "--max-train",
    "72",
    "--max-eval",
    "16",
    "--eval-batch-size",
    "16",
    "--no-progress",
    "--checkpoint-every",
    "15",
    "--keep-checkpoints",
    "20",
]
TAG, DONE_TASKS, POSITION = "task002-step000009", 2, (2, 9)


def driver(world: int, out: Path, *extra) -> list[str]:
    per_rank = ["--batch-size", str(4 // world)]  # global batch 4 (memory batch and replay rows follow)
    if world == 1:
        return [sys.executable, TRAIN, *COMMON, *per_rank, "--output-dir", str(out), *extra]
    return deepspeed_cmd(TRAIN, *COMMON, *per_rank, "--output-dir", out, *extra, ranks=world)


def rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def upto(rs: list[dict], pos) -> list[dict]:
    return [r for r in rs if (int(r["task"]), int(r["step"])) <= pos]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reshard")
    refs = {w: tmp / f"ref{w}" for w in (1, 2)}
    procs = {w: start(driver(w, refs[w]), tmp, tmp / f"ref{w}.log") for w in (1, 2)}
    for w, p in procs.items():
        assert finish(p, 600) == 0, (tmp / f"ref{w}.log").read_text()[-4000:]
    resumed, procs = {}, {}
    for src, dst in ((2, 1), (1, 2)):
        resh = tmp / f"resh{src}to{dst}"
        rc, log = run(
            aim_ds_cmd("reshard", refs[src] / "checkpoints", resh, "--world-size", dst, "--tag", TAG),
            tmp,
            300,
        )
        assert rc == 0, log[-3000:]
        resumed[src, dst] = tmp / f"resumed{src}to{dst}"
        procs[src, dst] = start(
            driver(dst, resumed[src, dst], "--resume", str(resh / TAG)), tmp, tmp / f"resumed{src}to{dst}.log"
        )
    for (src, dst), p in procs.items():
        assert finish(p, 600) == 0, (tmp / f"resumed{src}to{dst}.log").read_text()[-4000:]
    return dict(tmp=tmp, refs=refs, resumed=resumed)


@pytest.mark.parametrize("src,dst", [(2, 1), (1, 2)])
def test_resharded_checkpoint_resumes_on_the_new_world_size(runs, src, dst):
    tmp, ref, out = runs["tmp"], runs["refs"][src], runs["resumed"][src, dst]
    log = (tmp / f"resumed{src}to{dst}.log").read_text()
    assert f"resharded from {src} ranks" in log, log[-3000:]
    a, b = json.loads((ref / "results.json").read_text()), json.loads((out / "results.json").read_text())
    assert b["world_size"] == dst and a["world_size"] == src
    assert b["checkpoints"]["resumed_from"].endswith(TAG)
    assert len(b["matrix"]) == 4 and b["matrix"][:DONE_TASKS] == a["matrix"][:DONE_TASKS]
    assert b["steps"]["train"] == a["steps"]["train"] and b["steps"]["per_task"] == a["steps"]["per_task"]
    assert all(v is not None for v in b["matrix"][-1])
    for f in ("trajectory.csv", "losses.csv"):
        before_a, before_b = upto(rows(ref / f), POSITION), upto(rows(out / f), POSITION)
        assert before_b == before_a and len(before_a) == 2 * 18 + 9, f
        assert len(rows(out / f)) == len(rows(ref / f)) == 4 * 18, f
    assert b["merges"] >= sum(int(r["merge"]) for r in upto(rows(ref / "trajectory.csv"), POSITION)) >= 1


@pytest.mark.parametrize("src,dst", [(2, 1), (1, 2)])
def test_resharded_anchor_and_controller_equal_the_saving_runs(runs, src, dst):
    from aim_ds.checkpoint import anchor_state_dict, model_state_dict, plugin_file

    ref_ckpt, resh = runs["refs"][src] / "checkpoints", runs["tmp"] / f"resh{src}to{dst}"
    for fn in (anchor_state_dict, model_state_dict):
        wa, wb = fn(str(ref_ckpt), TAG), fn(str(resh), TAG)
        # the universal checkpoint lists a tied weight once (lm_head.weight is embed_tokens.weight here)
        assert set(wa) - set(wb) <= {"lm_head.weight"} and set(wb) <= set(wa), fn.__name__
        assert wb and all(wa[k].equal(wb[k]) for k in wb), fn.__name__
    sa = torch.load(ref_ckpt / TAG / plugin_file(0, src), weights_only=False)
    sb = torch.load(resh / TAG / plugin_file(0, dst), weights_only=False)
    assert sa["controller"] is not None and sb["controller"] == sa["controller"]
    assert sb["trajectory"] == sa["trajectory"] and sb["merge_count"] == sa["merge_count"]


def test_data_order_is_a_function_of_the_global_position():
    examples = list(range(37))
    for per_rank, world in ((2, 2), (1, 4), (4, 1)):
        glob = [
            sum((rank_batches(examples, 25, per_rank, r, world, seed=11)[s] for r in range(world)), [])
            for s in range(25)
        ]
        assert glob == rank_batches(examples, 25, 4, 0, 1, seed=11)
        mem = [
            sum((memory_batches(examples, per_rank, r, world, seed=5)[s] for r in range(world)), []) for s in range(10)
        ]
        assert mem == memory_batches(examples, 4, 0, 1, seed=5)


def test_resharded_checkpoint_with_other_global_sizes_is_refused(runs):
    """The resharded checkpoint on 1 rank with the 2-rank per-rank batch (global 2, not 4): one error naming
    the sizes and the options to change, nothing written."""
    tmp = runs["tmp"]
    cmd = [
        sys.executable,
        TRAIN,
        *COMMON,
        "--batch-size",
        "2",
        "--output-dir",
        str(tmp / "wrong"),
        "--resume",
        str(tmp / "resh2to1" / TAG),
    ]
    rc, log = run(cmd, tmp, 300)
    assert rc == 2 and log.count("error:") == 1, log[-3000:]
    assert "global sizes differ" in log and "batch 4 vs 2" in log and "--batch-size" in log, log[-3000:]
    assert not (tmp / "wrong").exists()
