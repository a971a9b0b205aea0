"""The Trainer path reproduces the driver: examples/hf_trainer.py with every `--as-driver` switch trains the same
steps as launch/train.py (2 ranks, deepspeed launcher, ZeRO-3, mixed replay, merges), so the switches are ALL the
differences between the two, and BENCHMARKS.md's separation of them is complete. Also the callback's
replay_draw="cycle" is the driver's memory_batches, batch for batch."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.mp import REPO, deepspeed_cmd, driver_env

BIN = Path(sys.executable).parent
SMALL = ["--max-train", "48", "--max-eval", "16", "--memory-fraction", "0.25", "--seed", "3"]


def launch(script: str, args: list, tmp_path: Path, timeout: int = 400) -> None:
    cmd = deepspeed_cmd(REPO / script, *args)
    p = subprocess.run(
        cmd, cwd=str(tmp_path), env=driver_env(tmp_path), capture_output=True, text=True, timeout=timeout
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]


def rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_trainer_with_every_switch_is_the_driver(tmp_path):
    cfg = json.loads((REPO / "ds_configs" / "cpu_zero3.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = 2
    cfg["aim_merging"].update(initial_interval=2, min_interval=1, max_interval=4)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(cfg))
    common = ["--deepspeed_config", str(ds), *SMALL]
    launch(
        "launch/train.py",
        [*common, "--fwt-reference", "none", "--no-progress", "--output-dir", str(tmp_path / "d")],
        tmp_path,
    )
    launch("examples/hf_trainer.py", [*common, "--as-driver", "all", "--output-dir", str(tmp_path / "t")], tmp_path)
    launch("examples/hf_trainer.py", [*common, "--output-dir", str(tmp_path / "n")], tmp_path)

    drv, hf, new = (rows(tmp_path / x / "losses.csv") for x in ("d", "t", "n"))
    assert len(drv) == len(hf) == len(new) == 4 * 12  # 48 rows / (2 per rank x 2 ranks) per task
    # the same steps: each loss equal up to float rounding (the Trainer's loss is rescaled to the rank's mean)
    for a, b in zip(drv, hf):
        assert (a["task"], a["step"]) == (b["task"], b["step"])
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-4, abs=1e-5), (a, b)
    # the Trainer as shipped (its own order, warm-up, decay groups, replay stream) trains other steps
    assert any(abs(float(a["loss"]) - float(b["loss"])) > 1e-3 for a, b in zip(drv, new))

    def merges(x):
        return [(r["task"], r["step"]) for r in rows(tmp_path / x / "trajectory.csv") if r["merge"] == "1"]

    assert merges("d") and merges("d") == merges("t")
    d, t = (json.loads((tmp_path / x / "results.json").read_text()) for x in ("d", "t"))
    assert [row[: i + 1] for i, row in enumerate(d["matrix"])] == t["matrix"]  # the example scores seen tasks


def test_replay_draw_cycle_is_the_drivers_memory_batches():
    from aim_ds.data.batching import memory_batches
    from aim_ds.errors import AimInputError
    from aim_ds.hf import AimMergingCallback

    rows_ = [f"m{i}" for i in range(13)]
    for draw in ("cycle", "stream"):
        got = []
        for rank in range(2):
            cb = AimMergingCallback(replay_rows=3, replay_draw=draw)
            cb.set_memory(rows_)
            cb.trainer_args = SimpleNamespace(world_size=2, process_index=rank)
            cb._replay_seed = 8
            got.append([cb._next_replay_rows() for _ in range(7)])
        want = memory_batches(rows_, 3, 0, 2, 8), memory_batches(rows_, 3, 1, 2, 8)
        assert len(want[0]) == 3  # ceil(13 / 6) global batches, then cycled
        cycled = [[want[r][c % 3] for c in range(7)] for r in range(2)]
        assert (got == cycled) == (draw == "cycle"), draw
    with pytest.raises(AimInputError, match="replay_draw='shuffle'.*stream, cycle"):
        AimMergingCallback(replay_rows=3, replay_draw="shuffle")
