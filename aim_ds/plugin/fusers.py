"""Fusers: how a merge's weights are applied to this rank's shards, one class per kind of weight policy,
chosen from ``FUSERS`` by the policy's ``fusion`` attribute (aim_ds.control.policies). A fuser owns what its fusion
needs beyond the anchor: buffers, gradient hooks, their share of the plugin state, and the fuse itself.

- :class:`ScalarFuser` ("signals", "fixed"): one (w_in, w_out) pair for every element; nothing held.
- :class:`ImportanceFuser` ("importance"): element-wise weights from masks of the importance statistics
  (EMAs of |theta * grad| over training and rehearsal steps, their global quantiles); holds theta_k and four
  EMA buffers, fed by a gradient hook.

A merge calls, in order: ``prepare`` (collectives on the fuser's statistics, after rehearsal),
``fuse`` (this rank only), then ``commit`` or ``undo``. The merge's plan (aim_ds.plugin.plan.MergePlan) carries the
weights, whether the fusion is element-wise and what ``prepare`` computed; every fuser follows ``Fuser``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from ..control.policies import WeightPolicy
from ..errors import local_error
from ..ops import collectives, fusion
from .plan import MergePlan


class Fuser(Protocol):
    """How a merge's weights are applied to this rank's shards (one class per weight policy ``fusion`` kind)."""

    name: str

    def tensors(self) -> list[torch.Tensor]: ...

    def start_task(self) -> None: ...

    def element_wise(self, explicit_weights: bool) -> bool: ...

    def passes(self, plan: MergePlan) -> int: ...

    def prepare(self, plan: MergePlan, agree: Callable[[str | None], None]) -> MergePlan: ...

    def fuse(self, anchor, theta_k, plan: MergePlan) -> str | None: ...

    def keep_theta_k(self, anchor, plan: MergePlan) -> list: ...

    def commit(self, theta_k) -> None: ...

    def undo(self) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, sd: dict) -> None: ...

    def detach(self) -> None: ...


class ScalarFuser:
    """theta = anchor + w_in (theta_k - anchor) + w_out (theta_M - theta_k), one pair for every element."""

    name = "scalar"

    def __init__(self, config, shards, policy: WeightPolicy, alloc: Callable, side: Callable[[], str | None]):
        self.config, self.shards, self.policy = config, shards, policy

    def tensors(self) -> list[torch.Tensor]:
        """The tensors the fuser holds (the plugin's held_bytes counts them)."""
        return []

    def start_task(self) -> None:
        """A new task: statistics of the previous one are dropped."""

    def element_wise(self, explicit_weights: bool) -> bool:
        return False

    def passes(self, plan: MergePlan) -> int:
        """Bytes moved per fp32 shard element by one merge, in units of 4 bytes."""
        return 12 if plan.element_wise else fusion.SCALAR_FUSION_PASSES

    def prepare(self, plan: MergePlan, agree: Callable[[str | None], None]) -> MergePlan:
        """The collective part of the fusion (every rank calls it after rehearsal): the plan with its result."""
        return plan

    @torch.no_grad()
    def fuse(self, anchor, theta_k, plan: MergePlan) -> str | None:
        """This rank's fusion into the masters (the anchor is written only at commit); an error message or None."""
        groups = self.shards.groups
        for g, a, k in zip(groups, anchor, theta_k):
            if k is None:  # undo "off": the anchor already holds the terms without theta_M
                fusion.fuse_scalar_finish(g.master, a, plan.w_out)
            else:
                fusion.fuse_scalar(g.master, a, k, plan.w_in, plan.w_out)
        return _finite(groups)

    @torch.no_grad()
    def keep_theta_k(self, anchor, plan: MergePlan) -> list:
        """undo "off" (no undo record), before rehearsal: what fuse needs of theta_k, kept without a copy. The
        scalar fusion folds it into the anchor (entries None); the anchor is then lost if the merge fails."""
        for g, a in zip(self.shards.groups, anchor):
            fusion.fuse_scalar_anchor_part(a, g.master, plan.w_in, plan.w_out)
        return [None] * len(anchor)

    def commit(self, theta_k) -> None:
        """The merge committed on every rank."""

    def undo(self) -> None:
        """The merge was undone on every rank."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict) -> None:
        pass

    def detach(self) -> None:
        pass


class ImportanceFuser(ScalarFuser):
    """Element-wise weights from importance masks; an explicit (w_in, w_out) falls back to the scalar fusion."""

    name = "importance"

    def __init__(self, config, shards, policy: WeightPolicy, alloc: Callable, side: Callable[[], str | None]):
        super().__init__(config, shards, policy, alloc, side)
        groups = shards.groups
        self.theta_k = [alloc(g.master) for g in groups]  # the last committed merge's theta_k (checkpointed)
        self.ema = {k: [alloc(g.master, zero=True) for g in groups] for k in ("i_in", "u_in", "i_out", "u_out")}
        self._side = side  # "in" (training), "out" (rehearsal) or None (no task started)
        self._remove_hook = shards.gradient_hook(self._track)

    def _track(self, index: int, master: torch.Tensor, grad: torch.Tensor) -> None:
        side = self._side()
        if side is None:
            return
        fusion.update_importance(
            self.ema["i_" + side][index],
            self.ema["u_" + side][index],
            master,
            grad,
            self.config.importance_beta1,
            self.config.importance_beta2,
        )

    def tensors(self) -> list[torch.Tensor]:
        return self.theta_k + [b for bufs in self.ema.values() for b in bufs]

    def start_task(self) -> None:
        self._zero(self.ema.values())

    def element_wise(self, explicit_weights: bool) -> bool:
        return not explicit_weights

    def prepare(self, plan: MergePlan, agree: Callable[[str | None], None]) -> MergePlan:
        if not plan.element_wise:
            return plan
        # the masks' global quantiles are collectives: agree on the local scores first
        agree(local_error(self._scores, "the importance scores"))
        q, groups = self.config.importance_quantile, self.shards.groups
        quantiles = tuple(
            collectives.global_quantile([(s, g.ranges) for s, g in zip(self.ema[k], groups)], q)
            for k in ("u_out", "i_out")
        )  # (q_in, q_out)
        return plan.with_prepared(quantiles)

    @torch.no_grad()
    def _scores(self) -> None:
        """score = EMA(I) * U, built in the rehearsal side's buffers (score_out in i_out, then score_in in
        u_out): the training side's statistics stay untouched, so an undone merge keeps them."""
        e = self.ema
        for i_out, u_out, i_in, u_in in zip(e["i_out"], e["u_out"], e["i_in"], e["u_in"]):
            fusion.importance_score(i_out, i_out, u_out)
            fusion.importance_score(u_out, i_in, u_in)

    @torch.no_grad()
    def fuse(self, anchor, theta_k, plan: MergePlan) -> str | None:
        if not plan.element_wise:
            return super().fuse(anchor, theta_k, plan)
        policy, (q_in, q_out) = self.policy, plan.prepared
        groups = self.shards.groups
        for g, a, k, s_in, s_out in zip(groups, anchor, theta_k, self.ema["u_out"], self.ema["i_out"]):
            fusion.fuse_importance(g.master, a, k, s_in, q_in, s_out, q_out, both=policy.both, neither=policy.default)
        return _finite(groups)

    @torch.no_grad()
    def keep_theta_k(self, anchor, plan: MergePlan) -> list:
        if not plan.element_wise:
            return super().keep_theta_k(anchor, plan)
        for g, t in zip(self.shards.groups, self.theta_k):  # the state's own theta_k buffer is the snapshot
            fusion.copy_into(t, g.master)
        return self.theta_k

    def commit(self, theta_k) -> None:
        # the state keeps the last committed merge's theta_k, as checkpoints always did (undo "off": it is
        # already there, or, with explicit scalar weights, folded into the anchor and not kept)
        if theta_k is not self.theta_k and all(k is not None for k in theta_k):
            for t, k in zip(self.theta_k, theta_k):
                fusion.copy_into(t, k)
        self._zero(self.ema.values())

    def undo(self) -> None:
        # rehearsal's side of the statistics; the training side is left untouched
        self._zero([self.ema["i_out"], self.ema["u_out"]])

    def state_dict(self) -> dict:
        return {
            "theta_k": [t.detach().cpu().clone() for t in self.theta_k],
            "ema": {k: [t.detach().cpu().clone() for t in v] for k, v in self.ema.items()},
        }

    def load_state_dict(self, sd: dict) -> None:
        for dst, src in zip(self.theta_k, sd["theta_k"]):
            dst.copy_(src)
        for k, v in sd["ema"].items():
            for dst, src in zip(self.ema[k], v):
                dst.copy_(src)

    def detach(self) -> None:
        if self._remove_hook is not None:
            self._remove_hook()
            self._remove_hook = None

    @staticmethod
    def _zero(buffer_lists) -> None:
        for bufs in buffer_lists:
            for b in bufs:
                b.zero_()


FUSERS = {cls.name: cls for cls in (ScalarFuser, ImportanceFuser)}


def make_fuser(config, shards, policy: WeightPolicy, alloc: Callable, side: Callable[[], str | None]) -> Fuser:
    """The fuser of a weight policy, chosen by its ``fusion`` kind (alloc(master, zero=False) makes a buffer
    shaped like a master)."""
    return FUSERS[policy.fusion](config, shards, policy, alloc, side)


def _finite(groups) -> str | None:
    if not all(fusion.all_finite(g.master, g.ranges) for g in groups):
        return "the fused weights hold NaN/inf"
    return None


__all__ = ["FUSERS", "Fuser", "ImportanceFuser", "ScalarFuser", "make_fuser"]
