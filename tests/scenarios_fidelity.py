"""Multi-rank scenarios for merge transactions: a merge that fails on one rank is undone on every rank,
bit-exactly; a rank that fails inside a merge's collectives stops every rank with an error naming it.
Run by tests/mp.py on real DeepSpeed ZeRO-3 engines (CPU, gloo)."""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import torch

import aim_ds
from aim_ds.checkpoint import load_checkpoint, save_checkpoint
from aim_ds.ops import fusion
from tests.scenarios import (
    batch,
    ds_config,
    full_fp32,
    full_working,
    make_engine,
    memory,
    rank,
    train_steps,
)

AIM = {"enabled": True, "initial_interval": 3, "min_interval": 2, "max_interval": 8, "interval_rule": "reference"}


def _second_task(aim: dict, steps: int, second_memory=None, dropout=0.0, **cfg):
    """An engine with the plugin: 2 steps of task 0, then `steps` steps of task 1 (merging active).
    cfg: ds_config's dtype, stage, offload."""
    engine = make_engine(ds_config(aim=aim, **cfg), dropout=dropout)
    plugin = aim_ds.attach(engine)
    plugin.start_task(memory())
    train_steps(engine, 2)
    plugin.start_task(second_memory or memory(offset=3000))
    train_steps(engine, steps, seed=50)
    return engine, plugin


def _rank_state(engine, plugin) -> dict:
    """Everything a merge may touch on this rank, cloned: masters, working flats, optimizer state, engine
    counters, the plugin's state (anchor, controller, trajectory, cursors, importance buffers), the loss
    scale, the RNG, what the last step reported (gradient norm, overflow) and which gradient buffers the
    optimizer writes into (with optimizer offload DeepSpeed allocates them once)."""
    opt = engine.optimizer
    inner, keys = plugin.shards.optimizer_state()
    masters = [g.master.detach().clone() for g in plugin.shards.groups]
    working = [g.working.detach().clone() for g in plugin.shards.groups if g.working is not None]
    state = [
        {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in inner.state.get(key, {}).items()}
        for key in keys
    ]
    counters = {k: getattr(engine, k) for k in ("global_steps", "global_samples", "micro_steps", "skipped_steps")}
    scale = {a: dict(vars(getattr(opt, a))) for a in ("loss_scaler", "loss_scale_config") if hasattr(opt, a)}
    norm = engine.get_global_grad_norm()
    report = {
        "grad_norm": float(norm) if norm is not None else None,
        "step_applied": engine.was_step_applied(),
        "overflow": bool(getattr(opt, "overflow", False)),
    }
    grads = [None if k.grad is None else k.grad.data_ptr() for k in keys]
    return {
        "masters": masters,
        "working": working,
        "opt": state,
        "counters": counters,
        "plugin": plugin.state_dict(),
        "scale": {
            a: {k: v for k, v in d.items() if isinstance(v, (int, float, bool, type(None)))} for a, d in scale.items()
        },
        "rng": torch.get_rng_state(),
        "report": report,
        "grad_buffers": grads,
    }


def _same(a, b, path="") -> list[str]:
    """Paths where a and b differ (tensors bit for bit)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        ok = (
            torch.is_tensor(a)
            and torch.is_tensor(b)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(
                a.view(torch.int32) if a.dtype == torch.float32 else a,
                b.view(torch.int32) if b.dtype == torch.float32 else b,
            )
        )
        return [] if ok else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path} keys {sorted(a)} != {sorted(b)}"]
        return [d for k in a for d in _same(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path} length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _same(x, y, f"{path}[{i}]")]
    both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return [] if a == b or both_nan else [f"{path}: {a!r} != {b!r}"]


def merge_undone(
    case: str,
    policy: str = "signals",
    failing: int = 1,
    dropout: float = 0.0,
    undo: str = "host",
    undo_path=None,
    **cfg,
):
    """case "nan": one rank's rehearsal batch has every label ignored (a NaN loss, whose NaN gradients
    the optimizer applies everywhere); "raise_rehearsal": one rank's second rehearsal batch raises;
    "raise_fusion": one rank's fusion corrupts half its masters, then raises. The merge must be undone
    on every rank, bit-exactly, with one warning; then the run continues and the next merge commits."""
    mem = memory(offset=3000)
    if case == "nan" and rank() == failing:
        mem[0] = batch(3999, all_ignored=True)
    aim = dict(AIM, weight_policy=policy, undo=undo, undo_path=undo_path)
    engine, plugin = _second_task(aim, 2, mem, dropout, **cfg)  # 2 < S: no merge yet
    full_before, working_before = full_fp32(engine), full_working(engine)
    before = _rank_state(engine, plugin)
    undo = []
    if rank() == failing and case == "raise_rehearsal":
        calls = {"n": 0}
        real = plugin._rehearsal_batch

        def flaky():
            calls["n"] += 1
            if calls["n"] == 2:  # after one whole rehearsal step: the optimizer state has moved
                raise RuntimeError("injected: the memory reader lost its file")
            return real()

        plugin._rehearsal_batch = flaky
        undo.append(lambda: setattr(plugin, "_rehearsal_batch", real))
    if rank() == failing and case == "raise_fusion":
        name = "fuse_importance" if policy == "importance" else "fuse_scalar"
        real = getattr(fusion, name)

        def broken(theta, *args, **kwargs):
            theta.narrow(0, 0, theta.numel() // 2).mul_(3.0)
            raise MemoryError("injected: out of memory in fusion")

        setattr(fusion, name, broken)
        undo.append(lambda: setattr(fusion, name, real))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = plugin.merge()
    for u in undo:
        u()
    after = _rank_state(engine, plugin)
    full_after, working_after = full_fp32(engine), full_working(engine)
    result = {
        "merged": rec["merged"],
        "reason": rec.get("reason", ""),
        "diff": _same(before, after, "state"),
        "full_diff": _same(full_before, full_after, "full_fp32") + _same(working_before, working_after, "working"),
        "warnings": [str(c.message) for c in caught if "undone" in str(c.message)],
    }
    # the run continues: training, then a merge that commits, all finite (a memory without the bad batch)
    plugin.set_memory(memory(offset=5000))
    train_steps(engine, 2, seed=80)
    report = _rank_state(engine, plugin)["report"]
    rec2 = plugin.merge()
    result["report_diff_after_commit"] = _same(report, _rank_state(engine, plugin)["report"], "report")
    result["next_merged"] = rec2["merged"]
    result["finite"] = all(torch.isfinite(v).all().item() for v in full_fp32(engine).values())
    result["merge_count"] = plugin.merge_count
    result["undo_bytes"] = {"host": rec2.get("undo_host_bytes"), "disk": rec2.get("undo_disk_bytes")}
    result["undo_files_left"] = sorted(p.name for p in Path(undo_path).iterdir()) if undo_path else []
    return result


UNDO_CASES = {  # items 1 and 6 of issue 29: every ZeRO stage, with and without optimizer offload
    "stage1": {"stage": 1},
    "stage1_offload": {"stage": 1, "offload": True},
    "stage2": {"stage": 2},
    "stage2_offload": {"stage": 2, "offload": True},
    "stage3": {"stage": 3},
    "stage3_offload": {"stage": 3, "offload": True},
    "stage3_bf16_offload": {"stage": 3, "offload": True, "dtype": "bf16"},
    "stage0_bf16": {"stage": 0, "dtype": "bf16"},
    "stage0_fp16": {"stage": 0, "dtype": "fp16"},
}


def undo_cases(cases: list[str], failing: int = 1):
    """merge_undone("raise_rehearsal") on each case's engine (attention dropout on: rehearsal draws from
    the RNG); a case's error is its result, so one broken case does not hide the others."""
    out = {}
    for name in cases:
        try:
            out[name] = merge_undone("raise_rehearsal", failing=failing, dropout=0.1, **UNDO_CASES[name])
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    return out


def merge_without_undo_stops(case: str = "raise_rehearsal", failing: int = 1):
    """undo "off": a merge that fails on one rank cannot be undone, so every rank raises (no hang, no
    silent half-merge). The first merge of the run commits normally (and equals the transactional one)."""
    engine, plugin = _second_task(dict(AIM, undo="off"), 2)
    if rank() == failing:
        calls = {"n": 0}
        real = plugin._rehearsal_batch

        def flaky():
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("injected: the memory reader lost its file")
            return real()

        plugin._rehearsal_batch = flaky
    plugin.merge()
    return {"merged": True}


def merge_without_undo_commits():
    """undo "off" and "host" give the same fused weights (same run, same data) up to fp32 rounding."""
    out = {}
    for undo in ("host", "off"):
        torch.manual_seed(0)
        engine, plugin = _second_task(dict(AIM, undo=undo), 2)
        rec = plugin.merge(weights=(0.7, 0.2), rehearsal_steps=2)
        out[undo] = {k: v.clone() for k, v in full_fp32(engine).items()}
        out[f"{undo}_bytes"] = (rec["undo_host_bytes"], rec["undo_disk_bytes"])
        out[f"{undo}_anchor_is_master"] = all(
            torch.equal(a, g.master) for a, g in zip(plugin.anchor, plugin.shards.groups)
        )
        plugin.detach()
    diff = max(float((out["host"][k] - out["off"][k]).abs().max()) for k in out["host"])
    return {"max_abs_diff": diff, **{k: v for k, v in out.items() if not isinstance(v, dict)}}


def merge_fails_inside_collective(ckpt_dir: str, failing: int = 1):
    """A checkpoint is saved; then one rank raises inside a rehearsal forward (its peers are blocked in
    ZeRO-3's parameter gathers), with no catching: every rank must stop with an error naming it."""
    engine, plugin = _second_task(AIM, 1)
    save_checkpoint(engine, plugin, ckpt_dir, tag="before-merge")
    if rank() == failing:
        mlp = engine.module.model.layers[1].mlp
        real = mlp.forward

        def forward(*args, **kwargs):
            if plugin.state.in_rehearsal:
                Path(ckpt_dir).parent.joinpath("failed_at").write_text(repr(time.time()))
                raise ValueError("injected: a kernel failed in rehearsal")
            return real(*args, **kwargs)

        mlp.forward = forward
    train_steps(engine, 20, seed=60)  # the controller's merge comes within these steps
    return {"unreachable": True}


def resume_after_failure(ckpt_dir: str):
    """The checkpoint saved before the failed merge loads into fresh engines and training continues."""
    engine = make_engine(ds_config(aim=AIM), seed=1)
    plugin = aim_ds.attach(engine)
    load_checkpoint(engine, plugin, ckpt_dir)
    plugin.set_memory(memory(offset=3000))
    steps = plugin.state.step_in_task
    train_steps(engine, 6, seed=61)
    return {
        "task": plugin.task_index,
        "step_at_load": steps,
        "merges": plugin.merge_count,
        "finite": all(torch.isfinite(v).all().item() for v in full_fp32(engine).values()),
    }


# the de-noised signals of issue 24: EMA of the probe loss, mean + k std threshold, lr-normalised learning signal
SIGNALS = {"forgetting_ema": 0.6, "threshold_rule": "mean_std", "threshold_std": 1.0, "learning_signal": "lr_sqrt"}


def trajectory_for_replay(out_dir: str, signals: bool = False):
    """A short run with merges that change the interval (reference rule, no cold start) and one explicit
    merge; rank 0 writes trajectory.csv and the config record `aim-ds replay` reads (as the driver does).
    signals: with the SIGNALS options, and a learning rate that decays step by step (lr_sqrt reads it)."""
    cfg = dict(AIM, cold_start=0, initial_interval=2, probe_interval=1, **(SIGNALS if signals else {}))
    engine, plugin = _second_task(cfg, 0)
    base = engine.optimizer.param_groups[0]["lr"]
    for i in range(24):
        for g in engine.optimizer.param_groups:
            g["lr"] = base * (1.0 - i / 48) if signals else base
        train_steps(engine, 1, seed=50 + i)
    plugin.merge()
    plugin.start_task(memory(offset=4000))
    train_steps(engine, 16, seed=70)
    if rank() == 0:
        plugin.write_trajectory_csv(str(Path(out_dir) / "trajectory.csv"))
        from aim_ds.experiment.report import write_json

        write_json(str(Path(out_dir) / "results.json"), {"config": {"aim_merging": plugin.config.to_dict()}})
    return {"merges": plugin.merge_count}


def undo_folder_missing(folder: str):
    """undo "nvme" with a folder that exists on rank 0 only: every rank refuses at attach, naming rank 1."""
    path = folder if rank() == 0 else str(Path(folder) / "missing")
    engine = make_engine(ds_config(aim=dict(AIM, undo="nvme", undo_path=path)))
    aim_ds.attach(engine)
    return {"attached": True}


def undone_merges_retry_budget(merge_retries: int, steps: int = 12):
    """Every automatic merge fails on rank 1 (its rehearsal batch raises): each attempt is undone on every
    rank, retried at most merge_retries times in its segment, then the segment is given up. Returns the
    steps of the attempts (rows marked undone) and whether the replay of the trajectory reproduces them."""
    cfg = dict(AIM, interval_rule="fixed", initial_interval=3, merge_retries=merge_retries)
    engine, plugin = _second_task(cfg, 0)
    if rank() == 1:

        def broken():
            raise RuntimeError("injected: the memory reader lost its file")

        plugin._rehearsal_batch = broken
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_steps(engine, steps, seed=90)
    out = {"merges": plugin.merge_count, "undone_warnings": sum("undone" in str(c.message) for c in caught)}
    if rank() == 0:
        from aim_ds.tools import replay

        rows = [r for r in plugin.trajectory if r["task"] == 1]
        out["attempts"] = [r["step"] for r in rows if r["undone"] == 1]
        replayed = replay.replay(plugin.trajectory, plugin.config)
        out["replayed_attempts"] = [r["step"] for r in replayed if r["task"] == 1 and r["undone"] == 1]
        out["replayed_merges"] = len(replay.merges(replayed))
    return out
