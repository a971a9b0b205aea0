"""FOREVER on real DeepSpeed engines (CPU, gloo): model time on the shards, replay events, the L2 pull."""

from __future__ import annotations

import math

import deepspeed

import aim_ds
from aim_ds.config import ForeverConfig
from tests.scenarios import batch, ds_config, full_fp32, full_working, make_engine, memory, rank

GLOBAL_ROWS = 6  # one global batch per step, cut evenly at world 1, 2 and 3: the same update at every world size


def _global_step(engine, step: int) -> float:
    """One optimizer step on this rank's slice of the step's global batch (equal slices: the averaged gradient
    is the global batch's at any world size)."""
    world = deepspeed.comm.get_world_size()
    rows = GLOBAL_ROWS // world
    full = batch(500 + step, rows=GLOBAL_ROWS)
    b = {k: v[rank() * rows : (rank() + 1) * rows].to(engine.device) for k, v in full.items()}
    loss = engine(**b).loss
    engine.backward(loss)
    engine.step()
    return float(loss)


def _norm(before: dict, after: dict) -> float:
    return math.sqrt(sum(float(((after[k].double() - before[k].double()) ** 2).sum()) for k in before))


def model_time(stage: int = 3, steps0: int = 4, steps1: int = 5, lora=None) -> dict:
    """Task 0 (no replay) and task 1 (one day = 2 steps, replay at days 1 and 2): every step's Delta against the
    norm of the gathered fp32 masters' change, and the replay rows. lora: adapters on these modules."""
    engine = make_engine(ds_config(stage=stage), lr=1e-2, lora=lora)
    frozen_before = {k: v for k, v in full_working(engine).items() if "lora_" not in k} if lora else {}
    cfg = ForeverConfig(day_steps=2, days=(1.0, 2.0, 4.0), replay_steps=2, consolidation_steps=1)
    plugin = aim_ds.attach(engine, config=cfg)
    expected, measured = [], []
    plugin.start_task()
    for task, steps in ((0, steps0), (1, steps1)):
        if task == 1:
            plugin.start_task(memory=memory())
        for i in range(steps):
            before = full_fp32(engine)
            rows_before = len(plugin.trajectory)
            _global_step(engine, 10 * task + i)
            after = full_fp32(engine)
            expected.append(_norm(before, after))
            if rank() == 0:  # a step that fired a replay moved the weights twice: only its first move is Delta
                row = [r for r in plugin.trajectory[rows_before:] if r.get("delta") is not None][-1]
                measured.append(None if row["replay"] is not None else row["delta"])
        plugin.end_task()
    rows = plugin.trajectory if rank() == 0 else []
    after = full_working(engine)
    return {
        "expected": expected,
        "measured": measured,
        "tau": [r["tau"] for r in rows if r.get("delta") is not None],
        "replays": [
            (r["task"], r["step"], r["replay"], r["replay_steps"]) for r in rows if r.get("replay") is not None
        ],
        "work": plugin.work,
        "frozen_moved": max((float((after[k] - v).abs().max()) for k, v in frozen_before.items()), default=0),
    }


def _sgd_engine(beta_base: float, stage: int, offload: bool = False):
    """Plain SGD without clipping: the L2 pull's share of a replay step can be read off the weights."""
    engine = make_engine({**ds_config(stage=stage, offload=offload), "gradient_clipping": 0.0}, lr=0.1, sgd=True)
    forever = ForeverConfig(day_steps=100, replay_steps=1, consolidation_steps=1, beta_base=beta_base)
    return engine, aim_ds.attach(engine, config=forever)


def pull_gradient(stage: int = 3, beta: float = 0.5, offload: bool = False) -> dict:
    """Two identical runs, one with the pull (beta) and one without (0), each: task 0 for 3 steps, task 1 for 3
    steps, then the end-of-task replay. The replay step's weights differ by exactly -lr * 2 beta (theta - theta*)."""
    out = {}
    for name, b in (("pull", beta), ("plain", 0.0)):
        engine, plugin = _sgd_engine(b, stage, offload)
        plugin.start_task()
        for i in range(3):
            _global_step(engine, i)
        plugin.start_task(memory=memory())
        anchor = full_fp32(engine)
        for i in range(3):
            _global_step(engine, 10 + i)
        before = full_fp32(engine)
        plugin.end_task()
        out[name] = (anchor, before, full_fp32(engine))
    anchor, before, pulled = out["pull"]
    _, before_plain, plain = out["plain"]
    worst = max(float((pulled[k] - plain[k] - (-0.1 * 2 * beta) * (before[k] - anchor[k])).abs().max()) for k in pulled)
    scale = max(float((0.1 * 2 * beta * (before[k] - anchor[k])).abs().max()) for k in pulled)
    same_start = max(float((before[k] - before_plain[k]).abs().max()) for k in before)
    return {"worst": worst, "scale": scale, "same_start": same_start}
