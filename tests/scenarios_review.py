"""Rank scenarios for issue 33's review findings on the step hook: the lr the controller sees, and failures
that only rank 0's controller can find (each must stop every rank with its message, never leave peers
waiting in a collective)."""

from __future__ import annotations

import torch

import aim_ds
from tests import scenarios as sc

AIM = {"enabled": True, "initial_interval": 2, "min_interval": 2, "max_interval": 8, "rehearsal_steps": 1}


def tensor_lr(steps1: int = 6):
    """torch.optim accepts a Tensor lr: the plugin trains, decides and merges with one."""
    cfg = sc.ds_config(aim=AIM)
    engine = sc.make_engine(cfg)
    for g in engine.optimizer.param_groups:
        g["lr"] = torch.tensor(g["lr"])
    plugin = aim_ds.attach(engine, sc.memory())
    plugin.start_task()
    sc.train_steps(engine, 2)
    plugin.start_task()
    sc.train_steps(engine, steps1, seed=300)
    return {"merges": plugin.merge_count, "lrs": [r["lr"] for r in plugin.trajectory]}


def recorded_lr(steps: int = 5):
    """Under a DeepSpeed-managed scheduler the trajectory's lr is the lr each step used (read by the caller
    just before engine.step()), not the one the scheduler set after it."""
    engine = sc.make_engine(sc.ds_config(aim=AIM, scheduler=True))
    plugin = aim_ds.attach(engine, sc.memory())
    plugin.start_task()
    used = []
    for i in range(steps):
        b = sc.batch(11 + 17 * sc.rank() + i)
        loss = engine(**{k: v.to(engine.device) for k, v in b.items()}).loss
        engine.backward(loss)
        used.append(float(engine.optimizer.param_groups[0]["lr"]))
        engine.step()
    return {"used": used, "recorded": [r["lr"] for r in plugin.trajectory]}


def steps_missing():
    """initial_interval_fraction needs start_task(steps=...): refused on every rank, not on rank 0 alone."""
    engine = sc.make_engine(sc.ds_config(aim={"enabled": True, "initial_interval_fraction": 0.25}))
    plugin = aim_ds.attach(engine, sc.memory())
    plugin.start_task()


def explicit_lr_sqrt_merge():
    """An explicit merge() before any step with learning_signal "lr_sqrt": rank 0's plan fails (no lr seen
    yet); every rank raises its message instead of waiting for the plan's broadcast."""
    engine = sc.make_engine(sc.ds_config(aim=dict(AIM, learning_signal="lr_sqrt")))
    plugin = aim_ds.attach(engine, sc.memory())
    plugin.start_task()
    plugin.start_task()
    plugin.merge()
