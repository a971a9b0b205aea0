"""The fp16 parts that need no fp16 engine, so machines whose DeepSpeed refuses fp16 (tests/machine.py) lose no
coverage of them: DeepSpeed's own loss scalers through the undo record's snapshot and restore, and the fusion's
write-back into fp16 working copies."""

from __future__ import annotations

import copy

import torch
from deepspeed.runtime.fp16 import loss_scaler
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

from aim_ds.ops import fusion
from aim_ds.shards import loss_scaler_snapshot, restore_loss_scaler


class _Optimizer:
    """Stands in for the optimizer object only as the holder of the scaler attribute the record reads."""

    def __init__(self, attr: str, scaler):
        setattr(self, attr, scaler)


def test_loss_scale_after_overflows_in_rehearsal_is_restored(monkeypatch):
    # the scaler asks the process group for its rank only to log an overflow: no group in this process
    monkeypatch.setattr(loss_scaler.dist, "get_rank", lambda: 0)
    # an undone merge puts back the scale and its counters: rehearsal steps that overflowed halve the scale and
    # reset the growth counter, which must not leak into training after the undo
    for attr in ("loss_scaler", "loss_scale_config"):
        scaler = DynamicLossScaler(
            init_scale=2.0**8, scale_window=4, min_scale=1.0, delayed_shift=2, consecutive_hysteresis=False
        )
        for _ in range(3):
            scaler.update_scale(overflow=False)
        before = copy.deepcopy(vars(scaler))
        opt = _Optimizer(attr, scaler)
        snap = loss_scaler_snapshot(opt)
        for overflow in (True, True, False, True):
            scaler.update_scale(overflow=overflow)
        assert vars(scaler) != before  # rehearsal moved the scaler
        restore_loss_scaler(snap)
        assert vars(scaler) == before, attr
        assert getattr(opt, attr) is scaler  # restored in place: the optimizer keeps its own object


def test_fused_fp32_master_refreshes_the_fp16_working_copy_within_its_rounding():
    # the fusion runs on the fp32 masters; the fp16 copy the forward reads is the master rounded once
    g = torch.Generator().manual_seed(5)
    n = 3 * fusion.CPU_BLOCK + 17
    a, k, m0 = (torch.randn(n, generator=g) for _ in range(3))
    m = m0.clone()
    fusion.fuse_scalar(m, a, k, 0.5, 0.5)
    working = torch.empty(n, dtype=torch.float16)
    fusion.copy_into(working, m)
    ref = a.double() + 0.5 * (k.double() - a.double()) + 0.5 * (m0.double() - k.double())
    assert torch.equal(working, m.half())
    assert torch.allclose(working.double(), ref, rtol=2**-10, atol=1e-6)
