"""The undo record of one merge on one rank: what rehearsal and fusion change, copied before they run.

Rehearsal takes real optimizer steps, so undoing a merge means more than restoring the weights: the
fp32 masters (theta_k), the optimizer's state for them (Adam's moments and step counts), the loss
scaler and the engine's step/sample counters all move. The record copies them at the start of the
merge and puts them back bit-exactly on failure; the anchor needs no copy because it is written only
when the merge commits. The low-precision working copies are derived from the masters (the caller
refreshes them after a restore).

The masters' copy is theta_k, which the fusion reads anyway. The record lives in host memory for the
duration of the merge only (theta_k and Adam's two moments: 12 bytes per parameter / N ranks at the
peak), so the plugin's resident memory between merges is unchanged.
"""

from __future__ import annotations

import copy

import torch

from . import fusion
from .shards import loss_scaler_snapshot, restore_loss_scaler


class MergeAborted(RuntimeError):
    """A merge failed on some rank and is undone on every rank."""


def local_error(fn, what: str) -> str | None:
    """Run this rank's own part of a merge (no collective inside); its error message, or None."""
    try:
        return fn()
    except Exception as e:
        return f"{what} failed: {type(e).__name__}: {e}"


FAILURE_KEY = "aim_ds/merge_failure"


def fatal_error(e: BaseException, rank: int, what: str) -> RuntimeError:
    """A rank failed inside a collective of a merge: its peers are blocked in that collective, so no
    agreement is possible any more. The failing rank publishes its error in the process group's store
    and stops; a peer whose collective then fails (the failing rank's connections close) reads it, so
    every rank's error names the rank that failed first."""
    mine = f"rank {rank}: {type(e).__name__}: {e}"
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
        if store.check([FAILURE_KEY]):
            first = store.get(FAILURE_KEY).decode()
            if not first.startswith(f"rank {rank}:"):
                return RuntimeError(
                    f"aim_merging: {what} failed on {first}; this rank stopped too ({mine}). "
                    "Restart from the last checkpoint."
                )
        else:
            store.set(FAILURE_KEY, mine)
    except Exception:  # the store lives in rank 0's process: gone when rank 0 is the one that failed
        mine += " (the process group's store is unreachable: rank 0, which hosts it, has probably failed)"
    return RuntimeError(f"aim_merging: {what} failed on {mine}; every rank stops. Restart from the last checkpoint.")


ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu")
    fusion.copy_into(out.view(-1), t.detach().reshape(-1)) if t.dim() else out.copy_(t.detach())
    return out


class MergeJournal:
    def __init__(self, shards, engine):
        self.groups = shards.groups
        self.engine = engine
        self.inner, self.keys = shards.optimizer_state()  # the optimizer and what it keys its state by
        self.theta_k = [torch.empty(g.master.numel(), dtype=g.master.dtype, device="cpu") for g in self.groups]
        for g, k in zip(self.groups, self.theta_k):
            fusion.copy_into(k, g.master)
        self.opt_state = []
        for key in self.keys:
            st = self.inner.state.get(key)
            self.opt_state.append(
                None
                if st is None
                else {k: (_host_copy(v) if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in st.items()}
            )
        self.counters = {n: getattr(engine, n) for n in ENGINE_COUNTERS if hasattr(engine, n)}
        self.scaler = loss_scaler_snapshot(shards.optimizer)

    @property
    def host_bytes(self) -> int:
        n = sum(v.numel() * v.element_size() for st in self.opt_state if st for v in st.values() if torch.is_tensor(v))
        return n + sum(k.numel() * k.element_size() for k in self.theta_k)

    @torch.no_grad()
    def restore(self) -> None:
        """Put every recorded value back (this rank only; the caller refreshes the working copies)."""
        for g, k, key in zip(self.groups, self.theta_k, self.keys):
            fusion.copy_into(g.master, k)
            g.master.grad = key.grad = None
        for g, saved, key in zip(self.groups, self.opt_state, self.keys):
            if saved is None:
                self.inner.state.pop(key, None)
                continue
            cur = self.inner.state.setdefault(key, {})
            for key in [k for k in cur if k not in saved]:
                del cur[key]
            for key, v in saved.items():
                if torch.is_tensor(v) and torch.is_tensor(cur.get(key)) and cur[key].shape == v.shape:
                    fusion.copy_into(cur[key].view(-1), v.view(-1)) if v.dim() else cur[key].copy_(v)
                else:
                    cur[key] = v.to(g.master.device) if torch.is_tensor(v) and v.dim() else v
        for n, v in self.counters.items():
            setattr(self.engine, n, v)
        restore_loss_scaler(self.scaler)


__all__ = ["ENGINE_COUNTERS", "MergeAborted", "MergeJournal", "fatal_error", "local_error"]
