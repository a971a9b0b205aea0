"""Run a scenario on N local ranks (CPU, gloo) as separate processes, with a hard timeout.

Each rank is `python tests/mp.py SCENARIO RANK WORLD PORT OUTDIR ARGS_JSON`; it initialises
torch.distributed through deepspeed with a short timeout, runs `tests.scenarios.<SCENARIO>(**args)` (or `module:function`)
and writes its return value (JSON) or its exception to OUTDIR/rank<R>.json. The parent kills every
rank when the timeout passes, so a rank-asymmetric bug fails the test in minutes instead of hanging CI.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aim_ds.distributed import free_port, run_local_ranks  # noqa: E402

__all__ = [
    "BIN",
    "REPO",
    "TRAIN",
    "RankFailure",
    "aim_ds_cmd",
    "base_env",
    "deepspeed_cmd",
    "driver_env",
    "free_port",
    "run_ranks",
]

BIN = Path(sys.executable).parent  # the virtual environment's scripts (the deepspeed launcher)
TRAIN = str(REPO / "launch" / "train.py")


def deepspeed_cmd(script, *args, ranks: int = 2, port: int | None = None) -> list[str]:
    """`deepspeed --num_gpus RANKS --master_port PORT SCRIPT ARGS...`, the one launcher command the tests build (on
    CPU the launcher starts RANKS CPU ranks); PORT: a free one unless given."""
    port = free_port() if port is None else port
    return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port), str(script), *map(str, args)]


def aim_ds_cmd(*args) -> list[str]:
    """`aim-ds ARGS...` as a user runs it: the installed console script when its entry point is the one
    pyproject.toml declares; else (an install older than the checkout, e.g. an editable install made before the
    entry point last moved: its script imports what is no longer there) that entry point, run by this
    interpreter as the script would run it."""
    import re
    from importlib.metadata import entry_points

    declared = re.search(r'^aim-ds = "([\w.]+):(\w+)"$', (REPO / "pyproject.toml").read_text(), re.M)
    module, func = declared.groups()
    installed = [e.value for e in entry_points(group="console_scripts") if e.name == "aim-ds"]
    if (BIN / "aim-ds").exists() and installed == [f"{module}:{func}"]:
        return [str(BIN / "aim-ds"), *map(str, args)]
    run = f"import sys; from {module} import {func}; sys.exit({func}())"
    return [sys.executable, "-c", run, *map(str, args)]


def base_env() -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"),
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def driver_env(tmp_path) -> dict:
    """Environment for a launcher started by a test: no inherited rank variables, a private cache."""
    env = base_env()
    env.update(AIM_DS_CACHE=str(Path(tmp_path) / "cache"), PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


class RankFailure(AssertionError):
    pass


def run_logged(cmd, cwd, name: str, timeout: float) -> tuple[int, str]:
    """Run a command (a driver launch, a tool) in cwd with driver_env, its output in cwd/NAME.log: (exit code, the
    log). Past the timeout its whole process group is killed and the test fails with the log's end."""
    import signal
    import subprocess

    import pytest

    log = Path(cwd) / f"{name}.log"
    with open(log, "w") as f:
        p = subprocess.Popen(
            cmd, cwd=cwd, env=driver_env(cwd), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
            pytest.fail(f"{name} timed out after {timeout}s: {log.read_text()[-3000:]}")
    return rc, log.read_text()


def run_ranks(scenario: str, world: int, tmp_path, timeout: float = 240, **kwargs) -> list:
    """Run `scenario` on `world` ranks; return each rank's result (list by rank).

    scenario: a function name in tests/scenarios.py, or "package.module:function".

    Raises RankFailure with every failing rank's traceback; on timeout kills all ranks and fails.
    """
    out = Path(tmp_path) / f"{scenario.replace(':', '.')}-{world}-{time.monotonic_ns()}"
    out.mkdir(parents=True)
    codes, timed_out = run_local_ranks(
        lambda r, port: [
            sys.executable,
            str(Path(__file__).resolve()),
            scenario,
            str(r),
            str(world),
            str(port),
            str(out),
            json.dumps(kwargs),
        ],
        world,
        str(out),
        timeout,
        env=base_env(),
        cwd=str(REPO),
    )
    results, errors = [], []
    for r in range(world):
        f = out / f"rank{r}.json"
        if f.exists():
            res = json.loads(f.read_text())
            if res.get("error"):
                errors.append(f"rank {r}: {res['error']}")
            results.append(res.get("result"))
        else:
            tail = (out / f"rank{r}.log").read_text()[-3000:]
            errors.append(f"rank {r}: no result (exit {codes[r]}); log tail:\n{tail}")
            results.append(None)
    if timed_out:
        raise RankFailure(
            f"scenario {scenario} on {world} ranks timed out after {timeout}s (deadlock?)\n" + "\n".join(errors)
        )
    if errors:
        raise RankFailure("\n".join(errors))
    return results


def _child(scenario, rank, world, port, outdir, kwargs):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    payload = {}
    try:
        from datetime import timedelta

        import deepspeed
        import torch

        torch.set_num_threads(1)
        deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=120))
        from aim_ds.distributed import release_cpu_shm_names

        release_cpu_shm_names()  # DeepSpeed leaves ~69 MB per rank in /dev/shm otherwise
        import importlib

        module, _, name = scenario.rpartition(":")
        payload["result"] = getattr(importlib.import_module(module or "tests.scenarios"), name)(**kwargs)
    except BaseException as e:  # report every failure, including expected-error scenarios' surprises
        payload["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(payload, default=str))
    try:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()
    except Exception:
        pass
    os._exit(0)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], json.loads(sys.argv[6]))
