"""The plugin's fusion steps on this rank's shards: the importance statistics gathered during training and
rehearsal, their global quantiles, and the fused update written into the fp32 masters."""

from __future__ import annotations

import torch

from . import fusion, statistics
from .policies import make_weight_policy


class FusionSteps:
    """Mixed into AimPlugin: uses its config, shards, anchor, _ema buffers, task_index and _in_rehearsal."""

    def _track_importance(self, index: int, master: torch.Tensor, grad: torch.Tensor) -> None:
        if self.task_index < 0:
            return
        side = "out" if self._in_rehearsal else "in"
        fusion.update_importance(
            self._ema["i_" + side][index],
            self._ema["u_" + side][index],
            master,
            grad,
            self.config.importance_beta1,
            self.config.importance_beta2,
        )

    @torch.no_grad()
    def _importance_scores(self) -> None:
        """score = EMA(I) * U, built in the rehearsal side's buffers (score_out in i_out, then score_in in
        u_out): the training side's statistics stay untouched, so an undone merge keeps them."""
        e = self._ema
        for i_out, u_out, i_in, u_in in zip(e["i_out"], e["u_out"], e["i_in"], e["u_in"]):
            fusion.importance_score(i_out, i_out, u_out)
            fusion.importance_score(u_out, i_in, u_in)

    def _importance_quantiles(self) -> tuple[float, float]:
        q, groups = self.config.importance_quantile, self.shards.groups
        return tuple(
            statistics.global_quantile([(s, g.ranges) for s, g in zip(self._ema[k], groups)], q)
            for k in ("u_out", "i_out")
        )  # (q_in, q_out)

    @torch.no_grad()
    def _fuse(self, scalar: bool, w_in: float, w_out: float, theta_k: list, quantiles) -> str | None:
        """This rank's fusion into the masters (the anchor is written only at commit). theta_k entries are
        None with undo "off" (scalar policies): the anchor already holds the terms without theta_M."""
        groups = self.shards.groups
        if scalar:
            for g, a, k in zip(groups, self.anchor, theta_k):
                if k is None:
                    fusion.fuse_scalar_finish(g.master, a, w_out)
                else:
                    fusion.fuse_scalar(g.master, a, k, w_in, w_out)
        else:
            policy = make_weight_policy(self.config)
            for g, a, k, s_in, s_out in zip(groups, self.anchor, theta_k, self._ema["u_out"], self._ema["i_out"]):
                fusion.fuse_importance(
                    g.master, a, k, s_in, quantiles[0], s_out, quantiles[1], both=policy.both, neither=policy.default
                )
        if not all(fusion.all_finite(g.master, g.ranges) for g in groups):
            return "the fused weights hold NaN/inf"
        return None
