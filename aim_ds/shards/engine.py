"""The DeepSpeed engine internals the plugin and the driver touch outside the shard adapters: the gradient
accumulation boundary a framework set by hand, the loss scaler's state, the torch optimizer inside DeepSpeed's
wrapper, and a place on the engine for objects that must live as long as it."""

from __future__ import annotations

import copy


def accumulation_boundary(engine):
    """The accumulation boundary set by hand with engine.set_gradient_accumulation_boundary (Accelerate, the
    HF Trainer), which DeepSpeed keeps until set again; None when nobody set it."""
    return getattr(engine, "_is_gradient_accumulation_boundary", None)


# the loss scale: ZeRO's loss_scaler, or FP16_UnfusedOptimizer's loss_scale_config (stage 0)
SCALER_ATTRS = ("loss_scaler", "loss_scale_config")
# what engine.step() reported for the last optimizer step
STEP_REPORT = (
    ("engine", "_global_grad_norm"),
    ("engine", "_step_applied"),
    ("optimizer", "overflow"),
    ("optimizer", "_global_grad_norm"),
)


def loss_scaler_snapshot(optimizer) -> list:
    """A copy of the optimizer's loss scale state (fp16 dynamic scaling; its iteration count), for
    restore_loss_scaler."""
    scalers = [getattr(optimizer, a, None) for a in SCALER_ATTRS]
    return [(s, copy.deepcopy(vars(s))) for s in scalers if s is not None]


def restore_loss_scaler(snapshot) -> None:
    for scaler, saved in snapshot or []:
        vars(scaler).update(copy.deepcopy(saved))


def step_report_snapshot(engine) -> list:
    """What engine.step() reported for the last step (gradient norm, applied, overflow), for restore_step_report."""
    owners = {"engine": engine, "optimizer": engine.optimizer}
    return [(owners[o], n, getattr(owners[o], n)) for o, n in STEP_REPORT if hasattr(owners[o], n)]


def restore_step_report(snapshot) -> None:
    for owner, n, v in snapshot:
        setattr(owner, n, v)


def inner_optimizer(engine):
    """The torch optimizer that holds the state (DeepSpeed's wrappers keep it as .optimizer)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def keep_alive(engine, obj) -> None:
    """Keep obj alive as long as the engine (e.g. the HfDeepSpeedConfig that ZeRO-3 model loading needs)."""
    engine._aim_ds_keepalive = obj


def kept_alive(engine):
    """What keep_alive(engine, obj) keeps (None if nothing)."""
    return getattr(engine, "_aim_ds_keepalive", None)


__all__ = [
    "accumulation_boundary",
    "inner_optimizer",
    "keep_alive",
    "kept_alive",
    "loss_scaler_snapshot",
    "restore_loss_scaler",
    "restore_step_report",
    "step_report_snapshot",
]
