"""Fusion on flat shards: pure tensor math, no collectives, no DeepSpeed.

The scalar-weight fusion theta = a + w_in (k - a) + w_out (M - k) is done with ONE extra buffer:
before rehearsal the anchor buffer becomes  b = (1 - w_in) a + (w_in - w_out) k,  so that after
rehearsal  theta = b + w_out M,  and b then takes theta as the next anchor. The buffer is stored
scaled by 1 / (1 - w_out), which turns both updates into single-pass lerps:

    b' = lerp(a, k, (w_in - w_out) / (1 - w_out))        (before rehearsal)
    theta = lerp(b', M, w_out)                            (after rehearsal; = b + w_out M)

(w_out = 1 keeps the unscaled two-op form). Each function walks a flat tensor in chunks so that no
temporary of shard size is ever allocated, and so that an anchor kept in host memory is streamed
through the device chunk by chunk.
"""
from __future__ import annotations

from typing import Iterator

import torch

CHUNK = 1 << 22  # elements per chunk: 16 MiB of fp32, large enough to run at copy bandwidth


def chunks(numel: int, chunk: int = CHUNK) -> Iterator[tuple[int, int]]:
    for start in range(0, numel, chunk):
        yield start, min(chunk, numel - start)


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device else t.to(device, non_blocking=True)


F64_CHUNK = 1 << 20  # elements per float64 piece of the learning-signal sum: two 8 MiB temporaries at most


@torch.no_grad()
def abs_change_sum(theta: torch.Tensor, anchor: torch.Tensor, ranges: list[tuple[int, int]]) -> float:
    """sum |theta - anchor| over the valid ranges (padding excluded), in float64 throughout.

    An fp32 reduction over millions of elements drifts by 1e-4 relative, enough to move the interval
    across an integer boundary (e.g. 64 halved to 32 instead of 63). Each bounded piece is widened to
    float64 before the subtraction, so the difference and the sum are exact to float64 rounding; the
    running total stays on the device (one host sync at the end)."""
    total = torch.zeros((), dtype=torch.float64, device=theta.device)
    for start, length in ranges:
        for off, n in chunks(length, F64_CHUNK):
            a = _on(anchor.narrow(0, start + off, n), theta.device)
            d = theta.narrow(0, start + off, n).double()
            total += d.sub_(a.double()).abs_().sum()
    return float(total)


@torch.no_grad()
def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst <- src, chunked so a host<->device copy does not need a staging buffer of shard size."""
    for off, n in chunks(dst.numel()):
        dst.narrow(0, off, n).copy_(src.narrow(0, off, n), non_blocking=True)


def _scaled(w_out: float) -> bool:
    return w_out != 1.0


@torch.no_grad()
def prepare_buffer(buf: torch.Tensor, theta_k: torch.Tensor, w_in: float, w_out: float) -> None:
    """buf (anchor a) <- (1 - w_in) a + (w_in - w_out) theta_k, stored divided by (1 - w_out). One pass."""
    dev = theta_k.device
    for off, n in chunks(buf.numel()):
        b = _on(buf.narrow(0, off, n), dev)
        k = theta_k.narrow(0, off, n)
        if _scaled(w_out):
            b.lerp_(k, (w_in - w_out) / (1.0 - w_out))
        else:
            b.mul_(1.0 - w_in).add_(k, alpha=w_in - w_out)
        if b.data_ptr() != buf.narrow(0, off, n).data_ptr():
            buf.narrow(0, off, n).copy_(b, non_blocking=True)


@torch.no_grad()
def fuse_scalar(theta: torch.Tensor, buf: torch.Tensor, w_out: float) -> None:
    """theta (= theta_M) <- b + w_out theta_M, then buf <- theta (the new anchor)."""
    dev = theta.device
    for off, n in chunks(theta.numel()):
        t = theta.narrow(0, off, n)
        b = _on(buf.narrow(0, off, n), dev)
        if _scaled(w_out):
            torch.lerp(b, t, w_out, out=t)  # elementwise: writing into an input is safe
        else:
            t.add_(b)
        buf.narrow(0, off, n).copy_(t, non_blocking=True)


# bytes each merge moves through memory per fp32 element of the shard, in the scalar policies:
# prepare (read a, k; write b) + fuse (read b, M; write theta) + new anchor (read theta; write b)
SCALAR_FUSION_PASSES = 8


@torch.no_grad()
def fuse_importance(theta: torch.Tensor, anchor: torch.Tensor, theta_k: torch.Tensor,
                    score_in: torch.Tensor, q_in: float, score_out: torch.Tensor, q_out: float,
                    both: tuple[float, float], neither: tuple[float, float]) -> None:
    """Element-wise fusion of the importance policy; theta (= theta_M) <- fused, anchor <- theta.

    Masks m = score > global quantile. Per element: both masks -> `both` weights, neither ->
    `neither`, otherwise (m_in, m_out) as 0/1 (the released code's rule). Weights are built per
    chunk so no weight tensor of shard size exists.
    """
    dev = theta.device
    for off, n in chunks(theta.numel()):
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
        anchor.narrow(0, off, n).copy_(t, non_blocking=True)
