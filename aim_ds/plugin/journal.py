"""The undo record of one merge on one rank: what rehearsal and fusion change, copied before they run.

Rehearsal takes real optimizer steps, so undoing a merge means more than restoring the weights: the
fp32 masters (theta_k), the optimizer's state for them (Adam's moments and step counts), the loss
scaler and the engine's step/sample counters all move. The record copies them at the start of the
merge and puts them back bit-exactly on failure; the anchor needs no copy because it is written only
when the merge commits. The low-precision working copies are derived from the masters (the caller
refreshes them after a restore).

The masters' copy is theta_k, which the fusion reads anyway. The record exists for the duration of the
merge only (theta_k and Adam's two moments: 12 bytes per parameter / N ranks at the peak), so the
plugin's resident memory between merges is unchanged. Where it lives is aim_merging "undo": "host"
(host memory) or "nvme" (one memory-mapped file per rank in "undo_path", its blocks reserved up front so
a full disk fails the merge's first step, which is undone, instead of a later write; the file is unlinked
as soon as it is mapped, so nothing is left behind even if the process dies).
"""

from __future__ import annotations

import copy
import os

import torch

from ..errors import local_error
from ..ops import fusion
from ..shards import loss_scaler_snapshot, restore_loss_scaler, restore_step_report, step_report_snapshot

ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu")
    fusion.copy_into(out.view(-1), t.detach().reshape(-1)) if t.dim() else out.copy_(t.detach())
    return out


def check_undo_path(folder: str) -> None:
    """undo "nvme": the folder must exist and be writable (checked when the plugin attaches, before training)."""
    if not os.path.isdir(folder):
        raise ValueError(
            f'aim_merging.undo_path = "{folder}" is not a folder: create it (on a local NVMe drive) or use "undo": "host".'
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f'aim_merging.undo_path = "{folder}" is not writable by this process: fix its permissions.')


def undo_path_error(config) -> str | None:
    """This rank's problem with an "nvme" undo folder (checked at attach, before training), or None."""
    return (
        local_error(lambda: check_undo_path(config.undo_path), "the undo folder check")
        if config.undo == "nvme"
        else None
    )


ALIGN = 64  # bytes: each tensor in the mapped file starts on a cache line (and on its element size)


def _mapped(folder: str, specs: list[tuple[torch.Size, torch.dtype]]) -> list[torch.Tensor]:
    """Empty tensors of the given shapes backed by one new memory-mapped file in `folder`."""
    offsets, total = [], 0
    for shape, dtype in specs:
        offsets.append(total)
        total += -(-shape.numel() * dtype.itemsize // ALIGN) * ALIGN
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    path = os.path.join(folder, f"aim_ds_undo_rank{rank}_{os.getpid()}.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if total:
            os.posix_fallocate(fd, 0, total)  # ENOSPC here, not as SIGBUS on a write into the mapping
            buf = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
    finally:
        os.close(fd)
        os.unlink(path)  # the mapping keeps the blocks until it is dropped
    if not total:
        return [torch.empty(shape, dtype=dtype) for shape, dtype in specs]
    return [buf[o : o + s.numel() * d.itemsize].view(d).view(s) for o, (s, d) in zip(offsets, specs)]


class MergeJournal:
    def __init__(self, shards, engine, undo: str = "host", undo_path: str | None = None):
        self.groups = shards.groups
        self.engine = engine
        self.inner, self.keys = shards.optimizer_state()  # the optimizer and what it keys its state by
        # the large tensors (masters, moments) go to the chosen store; step counts and other scalars to the host
        big = [(g.master.detach().reshape(-1), None, None) for g in self.groups]
        states = [self.inner.state.get(key) for key in self.keys]
        for i, st in enumerate(states):
            for k, v in (st or {}).items():
                if torch.is_tensor(v) and v.dim():
                    big.append((v.detach(), i, k))
        specs = [(t.shape, t.dtype) for t, _, _ in big]
        stores = _mapped(undo_path, specs) if undo == "nvme" else [torch.empty(s, dtype=d) for s, d in specs]
        for (src, _, _), dst in zip(big, stores):
            fusion.copy_into(dst.view(-1), src.reshape(-1))
        self.theta_k = stores[: len(self.groups)]
        self.opt_state = [None if st is None else {} for st in states]
        for (_, i, k), dst in zip(big[len(self.groups) :], stores[len(self.groups) :]):
            self.opt_state[i][k] = dst
        for st, saved in zip(states, self.opt_state):
            for k, v in (st or {}).items():
                if k not in saved:
                    saved[k] = _host_copy(v) if torch.is_tensor(v) else copy.deepcopy(v)
        # bytes of the record by where they live (the mapped file's alignment padding not counted)
        record = sum(s.numel() * d.itemsize for s, d in specs)
        scalars = sum(
            v.numel() * v.element_size() for st in self.opt_state if st for v in st.values() if torch.is_tensor(v)
        )
        scalars -= record - sum(k.numel() * k.element_size() for k in self.theta_k)
        self.host_bytes, self.disk_bytes = (scalars, record) if undo == "nvme" else (scalars + record, 0)
        # with optimizer offload DeepSpeed allocates each partition's .grad once and writes into it
        # (and keeps views of it): the same tensors must be there after an undo
        self.grads = [(g.master.grad, key.grad) for g, key in zip(self.groups, self.keys)]
        self.counters = {n: getattr(engine, n) for n in ENGINE_COUNTERS if hasattr(engine, n)}
        self.scaler = loss_scaler_snapshot(shards.optimizer)
        self.report = step_report_snapshot(engine)  # rehearsal's steps overwrite it: put back on commit or undo
        # rehearsal's dropout draws from the RNG: an undone merge must not shift the rest of the run
        from deepspeed.accelerator import get_accelerator

        self._accelerator = get_accelerator()
        self.rng = (torch.get_rng_state(), self._accelerator.get_rng_state())

    @torch.no_grad()
    def restore(self) -> None:
        """Put every recorded value back (this rank only; the caller refreshes the working copies)."""
        for g, k, key, (master_grad, key_grad) in zip(self.groups, self.theta_k, self.keys, self.grads):
            fusion.copy_into(g.master, k)
            g.master.grad, key.grad = master_grad, key_grad
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
        torch.set_rng_state(self.rng[0])
        self._accelerator.set_rng_state(self.rng[1])
        self.restore_step_report()

    def restore_step_report(self) -> None:
        """The training step's gradient norm and overflow flag, as engine.step() reported them before the
        merge's rehearsal steps replaced them (called on commit too)."""
        restore_step_report(self.report)


__all__ = ["ENGINE_COUNTERS", "MergeJournal", "check_undo_path", "undo_path_error"]
