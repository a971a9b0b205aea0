"""What every rank does in one merge: the plan rank 0's controller decides and broadcasts, then completed on
every rank with how the fuser applies it (element-wise or not, and the terms its collectives prepared)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..ops import collectives


@dataclass(frozen=True)
class MergePlan:
    """One merge's plan: decided on rank 0, broadcast as four float64s (interval, R, w_in, w_out); the fusion
    fields are filled in on every rank (``with_fusion``, then the fuser's ``prepare``)."""

    interval: int  # the new S (-1: skip the merge)
    rehearsal_steps: int  # R
    w_in: float
    w_out: float
    element_wise: bool = False  # the fuser applies per-element weights (importance) instead of (w_in, w_out)
    prepared: tuple[float, ...] | None = None  # what the fuser's collectives computed after rehearsal

    SKIP = -1
    FAILED = -2  # rank 0's controller raised: every rank raises its message

    @property
    def skip(self) -> bool:
        return self.interval < 0

    @property
    def failed(self) -> bool:
        return self.interval == self.FAILED

    def with_fusion(self, element_wise: bool) -> MergePlan:
        return replace(self, element_wise=element_wise)

    def with_prepared(self, prepared: tuple[float, ...] | None) -> MergePlan:
        return replace(self, prepared=prepared)

    def to_tensor(self) -> torch.Tensor:
        values = [self.interval, self.rehearsal_steps, self.w_in, self.w_out]
        return torch.tensor(values, dtype=torch.float64, device=collectives.comm_device())

    @classmethod
    def broadcast(cls, plan: MergePlan | None) -> MergePlan:
        """Rank 0's plan on every rank (other ranks pass None)."""
        t = (
            plan.to_tensor()
            if plan is not None
            else torch.zeros(4, dtype=torch.float64, device=collectives.comm_device())
        )
        collectives.broadcast(t, src=0)
        interval, r, w_in, w_out = t.tolist()
        return cls(int(interval), int(r), w_in, w_out)


__all__ = ["MergePlan"]
