"""Driver (launch/train.py) tests: --help, bad input (must fail fast, before training, on every rank),
a 2-rank deepspeed-launcher aim run, and single-process runs of single / fixed_merge (FWT cache).

Each subprocess has a timeout: a rank-asymmetric hang fails the test instead of hanging CI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "launch" / "train.py")
BIN = Path(sys.executable).parent
SMALL = ["--max-train", "32", "--max-eval", "16", "--batch-size", "2", "--eval-batch-size", "16", "--no-progress"]


from tests.mp import deepspeed_cmd, free_port
from tests.mp import driver_env as env  # noqa: E402


def run(cmd, tmp_path, timeout=240):
    t0 = time.time()
    p = subprocess.run(cmd, cwd=str(tmp_path), env=env(tmp_path), capture_output=True, text=True, timeout=timeout)
    p.wall = time.time() - t0
    return p


def py(*args):
    return [sys.executable, TRAIN, *args]


def ds_config(tmp_path, **aim) -> str:
    cfg = json.loads((REPO / "ds_configs" / "cpu_zero3.json").read_text())
    monitor = aim.pop("_monitor", None)
    if aim.pop("_tp", None):
        cfg["zero_optimization"]["stage"] = 1
        cfg["tensor_parallel"] = {"autotp_size": 2}
    if monitor:
        cfg["csv_monitor"] = {"enabled": True, "output_path": monitor, "job_name": "job"}
    if aim.pop("_drop", False):
        cfg.pop("aim_merging", None)
    else:
        cfg["aim_merging"].update(aim)
    path = tmp_path / f"ds-{len(list(tmp_path.glob('ds-*.json')))}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def check_outputs(out: Path, method: str, n_tasks: int = 4) -> dict:
    for f in ("results.json", "trajectory.csv", "accuracy.png", "trajectory.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert not list(out.glob(".tmp-*")), "temporary files left behind"
    r = json.loads((out / "results.json").read_text())
    assert r["method"] == method
    for k in (
        "config",
        "tasks",
        "matrix",
        "OP",
        "BWT",
        "FWT",
        "single_task_scores",
        "fwt_reference",
        "wall_time_s",
        "steps",
        "merges",
    ):
        assert k in r, k
    assert len(r["tasks"]) == n_tasks
    for row in r["matrix"]:
        assert len(row) == n_tasks
        assert all(v is None or 0.0 <= v <= 100.0 for v in row)
    with open(out / "trajectory.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == [
        "task",
        "step",
        "probe_loss",
        "threshold",
        "activations",
        "interval",
        "learning_signal",
        "merge",
        "w_in",
        "w_out",
        "rehearsal_steps",
        "abs_change_sum",
        "numel",
        "explicit",
        "lr",
        "forgetting_signal",
        "undone",
    ]
    assert sum(int(x["merge"]) for x in rows) == r["merges"]
    return r


# ----------------------------------------------------------------------------- fast: help and bad input
def test_help_documents_every_option(tmp_path):
    p = run(py("--help"), tmp_path, timeout=60)
    assert p.returncode == 0, p.stderr
    for opt in (
        "--benchmark",
        "--data-dir",
        "--order",
        "--method",
        "--model",
        "--tokenizer",
        "--deepspeed_config",
        "--output-dir",
        "--overwrite",
        "--seed",
        "--epochs",
        "--batch-size",
        "--memory-batch-size",
        "--lr",
        "--memory-fraction",
        "--max-train",
        "--max-eval",
        "--eval-batch-size",
        "--fwt-reference",
        "--replay-rows",
        "--memory-weight",
        "--lora",
        "--lora-alpha",
        "--lora-targets",
        "--local_rank",
    ):
        assert opt in p.stdout, opt
    for m in ("aim", "seqft", "replay", "fixed_merge", "single", "multitask"):
        assert m in p.stdout


BAD = [
    ("aim_disabled", lambda t: ["--method", "aim", "--deepspeed_config", ds_config(t, enabled=False)], "enabled"),
    ("aim_no_section", lambda t: ["--method", "aim", "--deepspeed_config", ds_config(t, _drop=True)], "aim_merging"),
    (
        "bad_aim_key",
        lambda t: ["--method", "aim", "--deepspeed_config", ds_config(t, initial_interval=0)],
        "initial_interval",
    ),
    ("missing_ds_config", lambda t: ["--deepspeed_config", str(t / "nope.json")], "nope.json"),
    ("unknown_benchmark", lambda t: ["--benchmark", "nonsense"], "nonsense"),
    ("missing_task_file", lambda t: ["--benchmark", str(t / "tasks.json")], "tasks.json"),
    ("unknown_order", lambda t: ["--benchmark", "standard", "--order", "9", "--data-dir", str(t)], "9"),
    ("data_dir_without_split", lambda t: ["--benchmark", "standard", "--data-dir", str(t)], "train"),
    ("bad_model_path", lambda t: ["--model", str(t / "no_model")], "no_model"),
    ("bad_epochs", lambda t: ["--epochs", "0"], "--epochs"),
    ("replay_rows_for_seqft", lambda t: ["--method", "seqft", "--replay-rows", "2"], "--replay-rows applies to"),
    ("replay_without_rows", lambda t: ["--method", "replay", "--replay-rows", "0"], "--method seqft"),
    ("negative_replay_rows", lambda t: ["--replay-rows", "-1"], "--replay-rows -1"),
    (
        "batch_probe_without_rows",
        lambda t: [
            "--method",
            "aim",
            "--replay-rows",
            "0",
            "--deepspeed_config",
            ds_config(t, probe_source="training_batch"),
        ],
        "--replay-rows 0",
    ),
    ("memory_weight_out_of_range", lambda t: ["--memory-weight", "1"], "--memory-weight 1.0"),
    ("memory_weight_without_rows", lambda t: ["--method", "seqft", "--memory-weight", "0.5"], "--replay-rows >= 1"),
    ("memory_fraction_zero", lambda t: ["--memory-fraction", "0"], "--memory-fraction 0.0: must be in (0, 1]"),
    ("memory_fraction_above_one", lambda t: ["--memory-fraction", "1.5"], "--memory-fraction 1.5"),
    ("negative_lora", lambda t: ["--lora", "-1"], "--lora -1: must be >= 0"),
    ("tensor_parallel", lambda t: ["--deepspeed_config", ds_config(t, _tp=2)], "a multiple of 2 (this launch has 1)"),
]


@pytest.mark.parametrize("name,argf,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_fails_before_training(tmp_path, name, argf, needle):
    p = run(py(*argf(tmp_path), "--output-dir", str(tmp_path / "out"), *SMALL), tmp_path, timeout=90)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert err and needle in err[-1], p.stderr[-2000:]
    assert not (tmp_path / "out").exists(), "nothing may be written before the input is checked"


def test_existing_output_dir_is_not_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    p = run(py("--output-dir", str(out), *SMALL), tmp_path, timeout=90)
    assert p.returncode == 2 and "--overwrite" in p.stderr
    assert (out / "keep.txt").read_text() == "precious" and len(list(out.iterdir())) == 1


def test_bad_input_two_ranks_every_rank_reports(tmp_path):
    """Under the deepspeed launcher a bad config fails fast (no hang, no training). The launcher kills
    the sibling as soon as one rank exits, so how many ranks print is a race; every rank's own check
    is asserted below by starting each rank alone."""
    cmd = deepspeed_cmd(
        TRAIN,
        "--method",
        "aim",
        "--deepspeed_config",
        ds_config(tmp_path, enabled=False),
        "--output-dir",
        tmp_path / "out",
        *SMALL,
    )
    p = run(cmd, tmp_path, timeout=120)
    assert p.returncode != 0
    assert "error: --method aim but" in p.stdout + p.stderr, (p.stdout + p.stderr)[-3000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_bad_input_each_rank_fails_alone(tmp_path, rank):
    """Each rank of a 2-rank job, started with its peer absent, reports the error itself and exits:
    the check runs before any collective (one waiting for the missing peer would time out here)."""
    e = env(tmp_path)
    e.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )
    cmd = py(
        "--method",
        "aim",
        "--deepspeed_config",
        ds_config(tmp_path, enabled=False),
        "--output-dir",
        str(tmp_path / "out"),
        *SMALL,
    )
    t0 = time.time()
    p = subprocess.run(cmd, cwd=str(tmp_path), env=e, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert p.stderr.count("error: --method aim but") == 1, p.stderr[-2000:]
    assert not (tmp_path / "out").exists() and time.time() - t0 < 60


# ----------------------------------------------------------------------------- runs
def test_deepspeed_two_ranks_aim(tmp_path):
    """The real path: deepspeed launcher, 2 ranks, ZeRO-3, the plugin attached, merges happen."""
    out = tmp_path / "out"
    cfg = ds_config(tmp_path, initial_interval=2, min_interval=1, max_interval=4, _monitor=str(tmp_path / "mon"))
    port = free_port()
    cmd = [
        *deepspeed_cmd(TRAIN, port=port),
        "--method",
        "aim",
        "--deepspeed_config",
        cfg,
        "--output-dir",
        str(out),
        *SMALL,
    ]
    p = run(cmd, tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    # DeepSpeed's CPU shm all-reduce buffers (~69 MB per rank) must not outlive the run
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    r = check_outputs(out, "aim")
    assert r["world_size"] == 2 and r["launcher"] == "env"
    assert len(r["matrix"]) == 4
    assert r["merges"] >= 1
    assert r["steps"]["train"] == 32 and r["steps"]["engine"] > 32  # rehearsal steps on top
    assert r["config"]["aim_merging"]["initial_interval"] == 2
    assert r["fwt_reference"].startswith("cache-miss") and r["FWT"] is None
    # the default ds_config reads the forgetting signal from the memory rows mixed into every batch
    assert r["config"]["aim_merging"]["probe_source"] == "training_batch" and r["config"]["replay_rows"] == 2
    with open(out / "trajectory.csv") as f:
        merging = [row for row in csv.DictReader(f) if row["task"] != "0"]
    assert merging and all(row["probe_loss"] not in ("", None) for row in merging)
    assert p.stdout.count("[aim_ds] aim: OP") == 1  # rank 0 only
    loss_csv = list((tmp_path / "mon").rglob("train_loss*.csv"))  # DeepSpeed's csv monitor got the losses
    assert loss_csv and len(loss_csv[0].read_text().splitlines()) >= 32, list((tmp_path / "mon").rglob("*"))


def test_memory_weight_reweights_the_mixed_rows(tmp_path):
    """--memory-weight: the driver's own mixed loss (aim_ds.mixed_loss) trains the run and feeds the forgetting
    signal. The first mixed step's signal (the loss before any weighted update) equals the unweighted run's;
    later steps differ, because the weighted updates differ."""
    traj = {}
    for name, extra in (("plain", []), ("weighted", ["--memory-weight", "0.5"])):
        out = tmp_path / name
        p = run(py("--method", "aim", "--replay-rows", "1", "--output-dir", str(out), *SMALL, *extra), tmp_path)
        assert p.returncode == 0, p.stderr[-4000:]
        r = check_outputs(out, "aim")
        assert r["config"]["args"]["memory_weight"] == (0.5 if extra else None)
        with open(out / "trajectory.csv") as f:
            traj[name] = [float(row["probe_loss"]) for row in csv.DictReader(f) if row["task"] == "1"]
    assert len(traj["plain"]) == len(traj["weighted"]) == 16  # 32 examples, batch 2
    assert traj["weighted"][0] == pytest.approx(traj["plain"][0], rel=1e-5)
    assert any(abs(a - b) > 1e-4 for a, b in zip(traj["weighted"][1:], traj["plain"][1:])), traj


def test_single_then_fixed_merge_uses_fwt_cache(tmp_path):
    """--method single fills the FWT reference cache; a later run with the same options reuses it."""
    p = run(py("--method", "single", "--output-dir", str(tmp_path / "s"), *SMALL), tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    rs = check_outputs(tmp_path / "s", "single")
    assert rs["fwt_reference"] == "run" and len(rs["single_task_scores"]) == 4
    assert rs["FWT"] == 0.0 and rs["BWT"] is None
    assert [rs["matrix"][i][i] for i in range(4)] == rs["single_task_scores"]
    cfg = ds_config(tmp_path, initial_interval=3, w_in=0.7, w_out=0.3)
    p = run(
        py("--method", "fixed_merge", "--deepspeed_config", cfg, "--output-dir", str(tmp_path / "f"), *SMALL), tmp_path
    )
    assert p.returncode == 0, p.stderr[-4000:]
    rf = check_outputs(tmp_path / "f", "fixed_merge")
    assert rf["fwt_reference"].startswith("cache:") and rf["single_task_scores"] == rs["single_task_scores"]
    assert rf["FWT"] is not None
    assert rf["config"]["aim_merging"]["interval_rule"] == "fixed"
    assert rf["config"]["aim_merging"]["weight_policy"] == "fixed"
    assert rf["merges"] >= 3  # tasks 1..3, 8 steps each, every 3 steps
    with open(tmp_path / "f" / "trajectory.csv") as f:
        merges = [r for r in csv.DictReader(f) if r["merge"] == "1"]
    assert all(float(r["w_in"]) == 0.7 and float(r["w_out"]) == 0.3 for r in merges)


def test_eval_tasks_seen_skips_only_the_unseen_tasks(tmp_path):
    """--eval-tasks seen evaluates tasks 0..k after task k: the matrix above the diagonal is empty, every other
    entry and OP / BWT are those of the full evaluation (evaluating does not change training)."""
    r = {}
    for which in ("all", "seen"):
        out = tmp_path / which
        p = run(py("--method", "seqft", "--eval-tasks", which, "--output-dir", str(out), *SMALL), tmp_path)
        assert p.returncode == 0, p.stderr[-4000:]
        r[which] = check_outputs(out, "seqft")
    full, seen = r["all"]["matrix"], r["seen"]["matrix"]
    assert all(v is not None for row in full for v in row)
    for k in range(4):
        assert seen[k][k + 1 :] == [None] * (3 - k)
        assert seen[k][: k + 1] == full[k][: k + 1]
    assert (r["seen"]["OP"], r["seen"]["BWT"]) == (r["all"]["OP"], r["all"]["BWT"])
    assert r["seen"]["config"]["args"]["eval_tasks"] == "seen"
