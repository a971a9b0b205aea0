"""A 2-rank run SIGKILLed at many moments of a checkpoint save resumes (--resume auto: the newest complete
checkpoint) and ends exactly like the uninterrupted run: same loss at every step, bit-identical weights,
anchor and plugin state.

The launches are chained: each one resumes where the previous was killed, times its first save, and is
killed during (or after) its second save after a different fraction of that duration. The ranks run in a
process group of their own and the whole group gets a real SIGKILL, so the kill can land inside DeepSpeed's
or torch's writes. What the kill left on disk (the moment of the save it interrupted) is classified and
printed. The final launch also runs the uninterrupted reference, so N kills cost N + 1 launches.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aim_ds import checkpoint as ckpt
from tests import mp

pytestmark = pytest.mark.timeout(1500)

STEPS, SWITCH = 14, 5
# of the launch's first save duration: 0 = the killer starts with the save, 3 = well after `latest` is rewritten
FRACTIONS = [0.0, 0.1, 0.2, 0.3, 0.45, 3.0]  # the second save is often faster than the first


def _launch(tmp: Path, kwargs: dict, timeout: float) -> tuple[list, list]:
    """Start 2 ranks (tests/mp.py children) in a new process group; return (exit codes, results)."""
    out = tmp / f"launch-{time.monotonic_ns()}"
    out.mkdir()
    port, procs = mp.free_port(), []
    for r in range(2):
        with open(out / f"rank{r}.log", "w") as log:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(Path(mp.__file__).resolve()),
                        "tests.ckpt_scenarios:crash_save_run",
                        str(r),
                        "2",
                        str(port),
                        str(out),
                        json.dumps(kwargs),
                    ],
                    cwd=mp.REPO,
                    env=mp.base_env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    process_group=0 if r == 0 else procs[0].pid,
                )
            )
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(procs[0].pid, signal.SIGKILL)
        for p in procs:
            p.wait()
        pytest.fail(f"launch {kwargs} timed out: " + (out / "rank0.log").read_text()[-3000:])
    results = []
    for r in range(2):
        f = out / f"rank{r}.json"
        res = json.loads(f.read_text()) if f.exists() else {}
        assert not res.get("error"), res["error"]
        results.append(res.get("result"))
    return [p.returncode for p in procs], results


def _phase(d: Path, kill: dict) -> str:
    """Which moment of the save of kill['tag'] the kill interrupted, from what it left on disk."""
    tag, tmp = kill["tag"], d / (".tmp-" + kill["tag"])
    latest = (d / "latest").read_text() if (d / "latest").exists() else None
    if latest == tag:
        return "after latest"
    if (d / tag).is_dir():
        return "renamed, latest old"
    if (tmp / "aim_manifest.json").exists():
        return "manifest written"
    if tmp.is_dir() and any("aim_plugin" in n for n in os.listdir(tmp)):
        return "plugin files"
    if tmp.is_dir() and os.listdir(tmp):
        return "deepspeed writing"
    return "before writes"


def _losses(tmp: Path) -> dict[int, float]:
    """Every step's loss on rank 0, the launch that made it last winning (files are named by start time)."""
    out = {}
    for f in sorted(tmp.glob("losses-*-rank0.json"), key=lambda f: int(f.name.split("-")[1])):
        out.update({int(k): v for k, v in json.loads(f.read_text()).items()})
    return out


def test_sigkill_during_save_resumes_exactly(tmp_path):
    t0 = time.time()
    run_dir, ref_dir = tmp_path / "run", tmp_path / "ref"
    run_dir.mkdir()
    ref_dir.mkdir()
    args = {"d": str(run_dir / "ckpt"), "steps": STEPS, "switch": SWITCH}
    phases, resumed = [], []
    for frac in FRACTIONS:
        before = set(run_dir.glob("kill-*.json"))
        codes, _ = _launch(run_dir, dict(args, kill_fraction=frac), 400)
        assert codes == [-signal.SIGKILL] * 2, (frac, codes)
        (kill_file,) = set(run_dir.glob("kill-*.json")) - before
        kill = json.loads(kill_file.read_text())
        phase = _phase(run_dir / "ckpt", kill)
        found = ckpt.find_latest(str(run_dir / "ckpt"))
        # the next load finds a complete checkpoint: the killed save's when `latest` names it, else the one before
        assert found == (kill["tag"] if phase == "after latest" else kill["previous"]), (phase, found, kill)
        phases.append((frac, round(kill["delay_s"], 4), phase))
        resumed.append(found)
    # the last launch resumes and finishes, then runs the whole schedule uninterrupted from scratch
    codes, res = _launch(run_dir, dict(args, reference=str(ref_dir / "ckpt")), 400)
    assert codes == [0, 0], codes
    print(
        f"\nkills (fraction of the launch's first save, delay s, phase): {phases}; first saves "
        f"{res[0]['run']['save_s'][0]:.3f} s; {time.time() - t0:.0f} s in all"
    )
    for r in range(2):
        end, ref = res[r]["run"], res[r]["reference"]
        for key in ("weights", "anchor", "state", "merges", "task_index"):
            assert end[key] == ref[key], (r, key)
        assert end["resumed_from"] == resumed[-1] and ref["resumed_from"] is None
    ref_losses = {int(k): v for k, v in res[0]["reference"]["losses"].items()}
    assert sorted(ref_losses) == list(range(STEPS)) and _losses(run_dir) == ref_losses
    assert ref["merges"] >= 2 and ref["task_index"] == 1
    assert [n for n in os.listdir(run_dir / "ckpt") if n.startswith(".")] == []  # crashed saves' leftovers pruned
    # the kills landed at several moments of the save (which ones varies with the machine's load)
    assert len({p for _, _, p in phases}) >= 2, phases
