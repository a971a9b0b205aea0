"""The README's code runs as printed.

Every ```python block of README.md is one of the scripts in examples/snippets/, byte for byte, so the README
cannot drift from code that is run here; each script runs on 2 CPU ranks (gloo, ZeRO-3) and must exit 0 having
merged on its second task and never on its first. The ```json block of the configuration section parses with
aim_ds's own parser and shows every key at its default."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aim_ds.config import AimConfig
from aim_ds.distributed import run_local_ranks
from tests.mp import driver_env, free_port

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SNIPPETS = REPO / "examples" / "snippets"
BIN = Path(sys.executable).parent
TIMEOUT = 180  # a run takes 25-50 s on a quiet 2-core machine; a hang fails instead of blocking CI


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def snippet_files() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(SNIPPETS.glob("*.py"))}


def test_every_python_block_is_a_snippet_file_and_every_file_is_shown():
    files = snippet_files()
    shown = blocks("python")
    assert shown, "README.md has no ```python block: the pattern above no longer finds them"
    for i, block in enumerate(shown):
        match = [name for name, text in files.items() if text == block]
        assert match, (
            f"README.md python block {i + 1} (starting {block.splitlines()[0]!r}) is not byte-identical to any "
            f"file in examples/snippets/: copy the file into the README (or the block into the file) exactly"
        )
    missing = sorted(set(files) - {name for name, text in files.items() if text in shown})
    assert not missing, f"examples/snippets/{missing} are not shown in README.md: show them or delete them"


def test_configuration_block_parses_and_shows_every_default():
    (block,) = [b for b in blocks("json") if b.lstrip().startswith('"aim_merging"')]
    section = json.loads("{" + block + "}")["aim_merging"]
    parsed = AimConfig.from_dict(section)  # raises ConfigError on an unknown key or a bad value
    defaults = AimConfig().to_dict()
    assert sorted(section) == sorted(defaults), "the README's block must list every aim_merging key"
    assert parsed.to_dict() == defaults, {k: (v, defaults[k]) for k, v in parsed.to_dict().items() if v != defaults[k]}


def merges(out: Path) -> dict[str, list[dict]]:
    with open(out / "trajectory.csv") as f:
        rows = list(csv.DictReader(f))
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    return by_task


def run_env_ranks(script: Path, tmp_path: Path) -> None:
    """2 ranks with RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set, the contract the deepspeed,
    torchrun and accelerate launchers give a script (tests/mp.py's way, without a launcher's start-up)."""
    codes, timed_out = run_local_ranks(
        lambda r, port: [sys.executable, str(script)],
        2,
        str(tmp_path),
        TIMEOUT,
        env=driver_env(tmp_path),
        cwd=str(tmp_path),
    )
    logs = "\n".join((tmp_path / f"rank{r}.log").read_text()[-3000:] for r in range(2))
    assert not timed_out, f"{script.name} timed out after {TIMEOUT} s (deadlock?)\n{logs}"
    assert codes == [0, 0], f"{script.name} exit codes {codes}\n{logs}"


def check_merged_on_task_1(tmp_path: Path, steps: int, signal_from_batch: bool = False) -> None:
    tasks = merges(tmp_path)
    assert sorted(tasks) == ["0", "1"] and [len(tasks[t]) for t in "01"] == [steps, steps], {
        t: len(r) for t, r in tasks.items()
    }
    assert not any(r["merge"] == "1" for r in tasks["0"]), "merged during the first task"
    assert sum(r["merge"] == "1" for r in tasks["1"]) >= 1, "no merge on the second task"
    if signal_from_batch:  # probe_source "training_batch": every step of task 1 got the memory rows' loss
        assert all(r["probe_loss"] not in ("", None) for r in tasks["1"]), "a task-1 step without forgetting signal"


def test_own_loop_under_the_deepspeed_launcher(tmp_path):
    """The command its first line gives: deepspeed --num_gpus 2 (on CPU the launcher starts 2 CPU ranks)."""
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), str(SNIPPETS / "own_loop.py")]
    p = subprocess.run(cmd, cwd=tmp_path, env=driver_env(tmp_path), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    check_merged_on_task_1(tmp_path, steps=16)


def test_mixed_replay_both_losses(tmp_path):
    """Both branches in one run: rank 0 keeps MEMORY_WEIGHT = None (the model's loss + rows_loss), rank 1 takes
    0.5 (mixed_loss on a forward without labels); the ranks' losses may differ, the plugin's collectives do not."""
    text = (SNIPPETS / "mixed_replay.py").read_text()
    line = "MEMORY_WEIGHT = None"
    assert text.count(line) == 1
    script = tmp_path / "mixed_replay.py"
    script.write_text(text.replace(line, 'MEMORY_WEIGHT = (None, 0.5)[int(__import__("os").environ["RANK"])]'))
    run_env_ranks(script, tmp_path)
    check_merged_on_task_1(tmp_path, steps=16, signal_from_batch=True)


@pytest.mark.parametrize(
    "name, steps, signal_from_batch",
    [("hf_trainer.py", 16, False), ("trl_sft.py", 16, True), ("accelerate_loop.py", 16, False)],
)
def test_hf_snippets(tmp_path, name, steps, signal_from_batch):
    pytest.importorskip("trl" if name == "trl_sft.py" else "accelerate")
    run_env_ranks(SNIPPETS / name, tmp_path)
    check_merged_on_task_1(tmp_path, steps, signal_from_batch)


def test_pipeline_snippet_on_two_stages(tmp_path):
    """2 ranks = 2 pipeline stages x 1 data-parallel rank: train_batch hooked, merges on task 1 only."""
    run_env_ranks(SNIPPETS / "pipeline_loop.py", tmp_path)
    check_merged_on_task_1(tmp_path, steps=16)
