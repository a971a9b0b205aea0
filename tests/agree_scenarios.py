"""Multi-rank scenario for aim_ds.ops.collectives.agree (run by tests/mp.py); imports only torch and DeepSpeed."""

from __future__ import annotations

import deepspeed
import torch


class _Refused(ValueError):
    pass


def agree_cases():
    """2 ranks: aim_ds.ops.collectives.agree in each case; returns per case (exception type, message) or None."""
    from aim_ds.ops.collectives import agree

    r = deepspeed.comm.get_rank()
    cases = {
        "none": lambda: None,
        "rank1": lambda: "bad memory row 3" if r == 1 else None,
        "both_differ": lambda: f"problem {r}",
        "both_same": lambda: "same problem",
        "empty_message": lambda: "" if r == 0 else None,
        "long_unicode": lambda: "é" * 5000 if r == 1 else None,
    }
    out = {}
    for name, error in cases.items():
        for exc_type in (RuntimeError, _Refused, SystemExit):
            try:
                agree(error(), exc_type=exc_type)
                out[f"{name}/{exc_type.__name__}"] = None
            except BaseException as e:  # noqa: BLE001 - SystemExit is one of the types under test
                out[f"{name}/{exc_type.__name__}"] = [type(e).__name__, str(e)]
    t = torch.ones(1)
    deepspeed.comm.all_reduce(t)  # the process group still works: every rank left agree at the same point
    out["_alive"] = float(t.item())
    return out
