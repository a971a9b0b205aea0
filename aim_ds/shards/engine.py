"""The DeepSpeed engine internals the plugin and the driver touch outside the shard adapters: the gradient
accumulation boundary a framework set by hand, the loss scaler's state, the torch optimizer inside DeepSpeed's
wrapper, and a place on the engine for objects that must live as long as it."""

from __future__ import annotations

import copy


def accumulation_boundary(engine):
    """The accumulation boundary set by hand with engine.set_gradient_accumulation_boundary (Accelerate, the
    HF Trainer), which DeepSpeed keeps until set again; None when nobody set it."""
    return getattr(engine, "_is_gradient_accumulation_boundary", None)


def loss_scaler_snapshot(optimizer):
    """A copy of the optimizer's loss scaler state (fp16 dynamic scaling), for restore_loss_scaler; None if none."""
    scaler = getattr(optimizer, "loss_scaler", None)
    return (scaler, copy.deepcopy(vars(scaler))) if scaler is not None else None


def restore_loss_scaler(snapshot) -> None:
    if snapshot is not None:
        vars(snapshot[0]).update(copy.deepcopy(snapshot[1]))


def inner_optimizer(engine):
    """The torch optimizer that holds the state (DeepSpeed's wrappers keep it as .optimizer)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def keep_alive(engine, obj) -> None:
    """Keep obj alive as long as the engine (e.g. the HfDeepSpeedConfig that ZeRO-3 model loading needs)."""
    engine._aim_ds_keepalive = obj


__all__ = ["accumulation_boundary", "inner_optimizer", "keep_alive", "loss_scaler_snapshot", "restore_loss_scaler"]
