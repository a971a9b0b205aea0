"""Fusion on flat shards: pure tensor math, no collectives, no DeepSpeed.

Scalar-weight fusion theta = a + w_in (k - a) + w_out (M - k) reads the anchor a, the snapshot
theta_k taken before rehearsal (the merge's undo record, which the fusion needs anyway) and the
masters M after rehearsal, and writes only the masters: the anchor takes the fused value when the
merge commits. Each function walks a flat tensor in chunks so that no temporary of shard size is ever
allocated, and so that a buffer kept in host memory is streamed through the device chunk by chunk.
The importance policy's EMA statistics are updated here too (``update_importance``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

CHUNK = 1 << 22  # elements per chunk: 16 MiB of fp32, large enough to run at copy bandwidth


def chunks(numel: int, chunk: int = CHUNK) -> Iterator[tuple[int, int]]:
    for start in range(0, numel, chunk):
        yield start, min(chunk, numel - start)


def may_overlap(dst: torch.device) -> bool:
    """Whether a copy into `dst` may be queued (non_blocking) instead of waited for.

    Towards an accelerator, yes: the kernels that read the copy are queued behind it on the same stream.
    Towards the host, no: a device-to-host copy into pinned memory returns before the data lands, and the
    CPU op that reads it next would see stale memory (finite, so no check would notice)."""
    return dst.type != "cpu"


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device else t.to(device, non_blocking=may_overlap(device))


F64_CHUNK = 1 << 20  # elements per float64 piece of the learning-signal sum: two 8 MiB temporaries at most


@torch.no_grad()
def abs_change_sum(theta: torch.Tensor, anchor: torch.Tensor, ranges: list[tuple[int, int]]) -> float:
    """sum |theta - anchor| over the valid ranges (padding excluded), in float64 throughout.

    An fp32 reduction over millions of elements drifts by 1e-4 relative, enough to move the interval
    across an integer boundary (e.g. 64 halved to 32 instead of 63). Each bounded piece is widened to
    float64 before the subtraction, so the difference and the sum are exact to float64 rounding; the
    running total stays on the device (one host sync at the end)."""
    return _change_sum(theta, anchor, ranges, squared=False)


@torch.no_grad()
def _change_sum(theta: torch.Tensor, other: torch.Tensor, ranges: list[tuple[int, int]], squared: bool) -> float:
    """sum |theta - other| (or of its squares) over the valid ranges, each bounded piece widened to float64."""
    total = torch.zeros((), dtype=torch.float64, device=theta.device)
    for start, length in ranges:
        for off, n in chunks(length, F64_CHUNK):
            o = _on(other.narrow(0, start + off, n), theta.device)
            d = theta.narrow(0, start + off, n).double().sub_(o.double())
            total += (d.square_() if squared else d.abs_()).sum()
    return float(total)


@torch.no_grad()
def all_finite(t: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    """No NaN/inf among the valid elements (padding is uninitialised and may hold anything)."""
    ok = torch.ones((), dtype=torch.bool, device=t.device)
    for start, length in ranges:
        for off, n in chunks(length):
            ok &= torch.isfinite(t.narrow(0, start + off, n)).all()
    return bool(ok)


@torch.no_grad()
def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst <- src, chunked so a host<->device copy does not need a staging buffer of shard size."""
    overlap = may_overlap(dst.device)
    for off, n in chunks(dst.numel()):
        dst.narrow(0, off, n).copy_(src.narrow(0, off, n), non_blocking=overlap)


# On the CPU a fused update runs block by block, each block small enough that its three streams stay in a
# core's L2 cache (3 x 1 MiB): the in-place ops after the first then touch cache, not memory, so every stream
# crosses the memory bus once, like one fused kernel, without a compiler (torch.compile costs 10-30 s per
# process on first use here and needs a C++ toolchain). On an accelerator the chunk is the block.
CPU_BLOCK = 1 << 18


def _block(device: torch.device) -> int:
    return CPU_BLOCK if device.type == "cpu" else CHUNK


@torch.no_grad()
def fuse_scalar(theta: torch.Tensor, anchor: torch.Tensor, theta_k: torch.Tensor, w_in: float, w_out: float) -> None:
    """theta (= theta_M) <- (1 - w_in) a + (w_in - w_out) theta_k + w_out theta_M; the anchor is NOT written.

    The same value as a + w_in (theta_k - a) + w_out (theta_M - theta_k), in one pass over memory: each
    block of theta is scaled, then theta_k and the anchor are added into it while it is in cache (three
    streams read, one written). The anchor and theta_k stay untouched until the merge commits (the caller
    then copies theta into the anchor), so a merge that fails on any rank can be undone bit-exactly.
    Weights (1, 0) give theta_k and (0, 0) give the anchor exactly: every product is by 0 or 1."""
    dev = theta.device
    c_a, c_k, c_m = 1.0 - w_in, w_in - w_out, w_out
    for off, n in chunks(theta.numel(), _block(dev)):
        t = theta.narrow(0, off, n)
        t.mul_(c_m).add_(_on(theta_k.narrow(0, off, n), dev), alpha=c_k).add_(
            _on(anchor.narrow(0, off, n), dev), alpha=c_a
        )


@torch.no_grad()
def fuse_scalar_anchor_part(anchor: torch.Tensor, theta_k: torch.Tensor, w_in: float, w_out: float) -> None:
    """anchor <- (1 - w_in) a + (w_in - w_out) theta_k, before rehearsal (aim_merging "undo": "off").

    The terms of fuse_scalar that do not need theta_M, written into the anchor so that no copy of theta_k
    is kept: after rehearsal fuse_scalar_finish adds w_out theta_M. The anchor is then lost if the merge
    fails, which is why "off" stops every rank instead of undoing."""
    dev = anchor.device
    for off, n in chunks(anchor.numel(), _block(dev)):
        a = anchor.narrow(0, off, n)
        a.mul_(1.0 - w_in).add_(_on(theta_k.narrow(0, off, n), dev), alpha=w_in - w_out)


@torch.no_grad()
def fuse_scalar_finish(theta: torch.Tensor, partial: torch.Tensor, w_out: float) -> None:
    """theta (= theta_M) <- w_out theta_M + partial (the anchor after fuse_scalar_anchor_part)."""
    dev = theta.device
    for off, n in chunks(theta.numel(), _block(dev)):
        theta.narrow(0, off, n).mul_(w_out).add_(_on(partial.narrow(0, off, n), dev))


# bytes each merge moves through memory per fp32 element of the shard, in the scalar policies:
# snapshot theta_k (read k; write the copy) + fuse (read a, k, M; write theta) + commit (read theta; write a)
SCALAR_FUSION_PASSES = 8


@torch.no_grad()
def fuse_importance(
    theta: torch.Tensor,
    anchor: torch.Tensor,
    theta_k: torch.Tensor,
    score_in: torch.Tensor,
    q_in: float,
    score_out: torch.Tensor,
    q_out: float,
    both: tuple[float, float],
    neither: tuple[float, float],
) -> None:
    """Element-wise fusion of the importance policy; theta (= theta_M) <- fused (the anchor is not written).

    Masks m = score > global quantile. Per element: both masks -> `both` weights, neither ->
    `neither`, otherwise (m_in, m_out) as 0/1 (the released code's rule). Two passes per block (the
    weights from the scores, then the update), each block in cache as in fuse_scalar, so no weight
    tensor of shard size exists and each stream crosses the memory bus once.
    """
    dev = theta.device
    for off, n in chunks(theta.numel(), _block(dev)):
        t = theta.narrow(0, off, n)
        a = _on(anchor.narrow(0, off, n), dev)
        k = _on(theta_k.narrow(0, off, n), dev)
        m_in = _on(score_in.narrow(0, off, n), dev) > q_in
        m_out = _on(score_out.narrow(0, off, n), dev) > q_out
        w_in = m_in.to(t.dtype)
        w_out = m_out.to(t.dtype)
        both_m = m_in & m_out
        neither_m = ~(m_in | m_out)
        w_in.masked_fill_(both_m, both[0]).masked_fill_(neither_m, neither[0])
        w_out.masked_fill_(both_m, both[1]).masked_fill_(neither_m, neither[1])
        # t <- a + w_in (k - a) + w_out (t - k)
        t.sub_(k).mul_(w_out).add_(a).addcmul_(w_in, k - a)


@torch.no_grad()
def update_importance(
    ema_i: torch.Tensor, ema_u: torch.Tensor, master: torch.Tensor, grad: torch.Tensor, beta1: float, beta2: float
) -> None:
    """One step of the importance statistics: I = |theta * grad|, EMA(I) with beta1 and the uncertainty
    U = EMA(|I - EMA(I)|) with beta2, chunked (the EMAs may live in host memory)."""
    for off, n in chunks(master.numel()):
        imp = (master.narrow(0, off, n) * grad.narrow(0, off, n).to(master.dtype)).abs_()
        ei = _on(ema_i.narrow(0, off, n), master.device)
        eu = _on(ema_u.narrow(0, off, n), master.device)
        ei.mul_(beta1).add_(imp, alpha=1 - beta1)
        eu.mul_(beta2).add_((imp - ei).abs_(), alpha=1 - beta2)
        if ei.data_ptr() != ema_i.narrow(0, off, n).data_ptr():
            ema_i.narrow(0, off, n).copy_(ei)
            ema_u.narrow(0, off, n).copy_(eu)


@torch.no_grad()
def importance_score(out: torch.Tensor, ema_i: torch.Tensor, ema_u: torch.Tensor) -> torch.Tensor:
    """out <- EMA(I) * U, the score whose global quantile sets the mask (out may be ema_i itself)."""
    return torch.mul(ema_i, ema_u, out=out)


@torch.no_grad()
def squared_change_and_keep(theta: torch.Tensor, previous: torch.Tensor, ranges: list[tuple[int, int]]) -> float:
    """sum (theta - previous)^2 over the valid ranges in float64 (like abs_change_sum), then previous <- theta.

    FOREVER's update size ||theta_t - theta_{t-1}||^2 on this rank's shard; `previous` lives beside theta."""
    value = _change_sum(theta, previous, ranges, squared=True)
    copy_into(previous, theta)
    return value


@torch.no_grad()
def add_pull(grad: torch.Tensor, theta: torch.Tensor, anchor: torch.Tensor, coeff: float, ranges) -> None:
    """grad += coeff (theta - anchor) over the valid ranges: the gradient of (coeff / 2) ||theta - anchor||^2,
    added to the fp32 gradient the optimizer is about to apply (padding is left alone)."""
    for start, length in ranges:
        for off, n in chunks(length):
            a = _on(anchor.narrow(0, start + off, n), theta.device)
            grad.narrow(0, start + off, n).add_(theta.narrow(0, start + off, n) - a, alpha=coeff)


def allocator(dev: torch.device):
    """alloc(master, zero=False): a flat fp32 buffer on `dev` shaped like a master (pinned on the host of a GPU)."""

    def alloc(master: torch.Tensor, zero: bool = False) -> torch.Tensor:
        pin = dev.type == "cpu" and master.device.type == "cuda"
        t = torch.empty(master.numel(), dtype=torch.float32, device=dev, pin_memory=pin)
        if zero:
            t.zero_()
        return t

    return alloc
