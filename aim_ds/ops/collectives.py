"""Shard-local partial statistics and the small collectives that combine them.

Every collective the plugin issues goes through `all_reduce` / `broadcast` here, so the bytes it
communicates can be counted by wrapping these two functions (benchmarks/perf.py does). None of them
ever carries a tensor whose size depends on the model: scalars, short vectors, fixed histograms.

The rank-failure protocol: a failure a rank finds in its own work is agreed on (`agree`, with the message
aim_ds.errors.local_error makes), so every rank stops alike; a failure inside a collective, where no agreement
is possible, is published in the process group's store (`fatal_error`) so every rank's error names the rank
that failed first.
"""

from __future__ import annotations

import math

import torch

HIST_BINS = 1024
QUANTILE_REFINEMENTS = 3


def _dist():
    import deepspeed.comm as dist

    return dist


def all_reduce(t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    dist = _dist()
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    dist.all_reduce(t, op=ops[op], group=group)
    return t


def broadcast(t: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:
    _dist().broadcast(t, src=src, group=group)
    return t


def comm_device() -> torch.device:
    """Where small collective tensors live: the accelerator's device (gloo on CPU, nccl on GPU)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return torch.device("cpu") if acc.device_name() == "cpu" else torch.device(acc.current_device_name())


def mean_over_ranks(local_sum: float, local_count: float, group=None) -> float:
    """Mean of a per-rank quantity: one all-reduce of two fp64 scalars (16 bytes)."""
    t = torch.tensor([local_sum, local_count], dtype=torch.float64, device=comm_device())
    all_reduce(t, group=group)
    s, c = t.tolist()
    return s / c if c > 0 else float("nan")


def sum_over_ranks(*values: float, group=None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    all_reduce(t, group=group)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any rank (4 bytes)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=comm_device())
    all_reduce(t, op="max")
    return bool(t.item())


@torch.no_grad()
def global_quantile(parts: list[tuple[torch.Tensor, list[tuple[int, int]]]], q: float) -> float:
    """The q-quantile of the valid elements of every rank's flat tensors, without gathering them.

    Min/max and element counts are all-reduced, then a fixed-size histogram over the current bracket
    is all-reduced and the bracket narrowed to the bin that holds the quantile, QUANTILE_REFINEMENTS
    times: bytes communicated are O(HIST_BINS), whatever the model size. The answer lies within
    (max - min) / HIST_BINS**QUANTILE_REFINEMENTS of the exact quantile (it is a bin edge).
    """
    dev = comm_device()
    lo_hi = torch.tensor([math.inf, math.inf], dtype=torch.float64)
    n_local = 0
    for t, ranges in parts:
        for start, length in ranges:
            v = t.narrow(0, start, length)
            lo_hi[0] = min(lo_hi[0].item(), v.min().item())
            lo_hi[1] = min(lo_hi[1].item(), -v.max().item())
            n_local += length
    lo_hi = all_reduce(lo_hi.to(dev), op="min").cpu()
    lo, hi = lo_hi[0].item(), -lo_hi[1].item()
    n = int(sum_over_ranks(float(n_local))[0])
    if n == 0:
        return float("nan")
    if hi <= lo:
        return lo
    target = q * (n - 1)  # rank (0-based) of the quantile element, as torch.quantile's 'lower'
    below = 0.0  # elements strictly below the bracket
    for _ in range(QUANTILE_REFINEMENTS):
        hist = torch.zeros(HIST_BINS, dtype=torch.float64)
        width = (hi - lo) / HIST_BINS
        for t, ranges in parts:
            for start, length in ranges:
                v = t.narrow(0, start, length).double()
                inside = v[(v >= lo) & (v <= hi)]
                if inside.numel():
                    idx = ((inside - lo) / width).floor_().clamp_(0, HIST_BINS - 1).long()
                    hist += torch.bincount(idx, minlength=HIST_BINS).double()
        hist = all_reduce(hist.to(dev)).cpu()
        cum = torch.cumsum(hist, 0) + below
        b = int(torch.searchsorted(cum, torch.tensor(target, dtype=torch.float64), right=True).item())
        b = min(b, HIST_BINS - 1)
        below = cum[b - 1].item() if b > 0 else below
        lo, hi = lo + b * width, lo + (b + 1) * width
        if width == 0:
            break
    return lo


AGREE_MAX_BYTES = 4096  # per rank: an error message, not a log


def agree(error: str | None, exc_type: type[BaseException] = RuntimeError) -> None:
    """Every rank calls it; when any rank passes a message, every rank raises exc_type naming each failing rank.

    The message joins the failing ranks' messages, each prefixed "rank R: " (a message equal to a lower
    rank's is shortened to "same as rank Q"). Bad input found on one rank thus stops every rank at the same
    point instead of leaving the others to hang in their next collective. Wire cost: one all-reduce of
    `world` int64 lengths; only on error a second one of the messages' bytes (at most AGREE_MAX_BYTES each).
    Without an initialised process group (or with one rank) it raises on this process alone.
    """
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        if error is not None:
            raise exc_type(f"rank 0: {error}")
        return
    rank, world = tdist.get_rank(), tdist.get_world_size()
    dev = comm_device()
    data = b"" if error is None else error.encode("utf-8")[:AGREE_MAX_BYTES]
    sizes = torch.zeros(world, dtype=torch.int64, device=dev)
    sizes[rank] = 0 if error is None else len(data) + 1  # +1: an empty message is still an error
    sizes = all_reduce(sizes).cpu().tolist()
    if not any(sizes):
        return
    lengths = [max(0, s - 1) for s in sizes]
    buf = torch.zeros(max(1, sum(lengths)), dtype=torch.uint8)
    start = sum(lengths[:rank])
    if data:
        buf[start : start + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = all_reduce(buf.to(dev)).cpu()  # each rank fills only its own slice: the sum is a gather
    raw = bytes(buf.tolist())
    messages, parts, offset = {}, [], 0
    for r, (s, n) in enumerate(zip(sizes, lengths)):
        if s:
            msg = raw[offset : offset + n].decode("utf-8", errors="replace")
            same = next((q for q, m in messages.items() if m == msg), None)
            parts.append(f"rank {r}: " + (msg if same is None else f"same as rank {same}"))
            messages[r] = msg
        offset += n
    raise exc_type("; ".join(parts))


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
