"""aim_ds.ops.fusion: pure tensor math on flat shards."""

import math

import numpy as np
import torch

from aim_ds.ops import fusion


def test_abs_change_sum_is_float64_exact_on_large_chunks():
    # 5M elements, two valid ranges (padding between and after them excluded), values of mixed magnitude:
    # an fp32 reduction over chunks this large is off by about 1e-5 relative
    g = torch.Generator().manual_seed(0)
    n = 5_000_000
    theta = (torch.randn(n, generator=g) * torch.logspace(-3, 1, n)).float()
    anchor = theta + torch.randn(n, generator=g) * 1e-3
    ranges = [(0, 3_000_000), (3_100_000, 1_800_000)]
    t64, a64 = theta.double().numpy(), anchor.double().numpy()
    ref = math.fsum(float(x) for r in ranges for x in [np.abs(t64[r[0] : r[0] + r[1]] - a64[r[0] : r[0] + r[1]]).sum()])
    got = fusion.abs_change_sum(theta, anchor, ranges)
    assert abs(got - ref) / ref < 1e-12, (got, ref)
    fp32 = sum(float(torch.dist(theta.narrow(0, s, l), anchor.narrow(0, s, l), p=1)) for s, l in ranges)
    assert abs(fp32 - ref) / ref > 1e-9  # the fp32 way would fail this test: the chunks are large enough
    # padding is excluded: a change there does not count
    theta[3_000_000:3_100_000] += 100.0
    assert fusion.abs_change_sum(theta, anchor, ranges) == got


def _streams(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 3 for _ in range(3))


def test_fuse_scalar_matches_the_method_and_is_exact_at_the_end_points():
    # a length that is no multiple of the CPU block or the chunk: the tail block is fused too
    n = 3 * fusion.CPU_BLOCK + 12345
    a, k, m = _streams(n)
    for w_in, w_out in ((0.7, 0.2), (0.5, 0.5), (0.1, 0.9)):
        theta = m.clone()
        fusion.fuse_scalar(theta, a, k, w_in, w_out)
        ref = a.double() + w_in * (k.double() - a.double()) + w_out * (m.double() - k.double())
        assert torch.allclose(theta.double(), ref, rtol=0, atol=4e-6), (w_in, w_out)
        assert torch.equal(a, _streams(n).__next__())  # the anchor is never written
    theta = m.clone()
    fusion.fuse_scalar(theta, a, k, 1.0, 0.0)  # keep the learning: theta_k bit for bit
    assert torch.equal(theta, k)
    theta = m.clone()
    fusion.fuse_scalar(theta, a, k, 0.0, 0.0)  # back to the anchor bit for bit
    assert torch.equal(theta, a)


def test_fusion_in_two_parts_without_theta_k_equals_the_one_pass_fusion():
    # undo "off": the anchor takes the terms without theta_M before rehearsal, theta_M's term comes after
    n = 2 * fusion.CPU_BLOCK + 99
    a, k, m = _streams(n, 2)
    for w in ((0.7, 0.2), (1.0, 0.0), (0.0, 0.0)):
        one = m.clone()
        fusion.fuse_scalar(one, a, k, *w)
        part, two = a.clone(), m.clone()
        fusion.fuse_scalar_anchor_part(part, k, *w)
        fusion.fuse_scalar_finish(two, part, w[1])
        if w[0] in (0.0, 1.0):  # the end points are exact here too
            assert torch.equal(two, one), w
        assert torch.allclose(two, one, rtol=0, atol=4e-6), w


def test_fuse_importance_matches_the_per_element_rule():
    n = 2 * fusion.CPU_BLOCK + 777
    a, k, m = _streams(n, 1)
    s_in, s_out = torch.rand(n), torch.rand(n)
    q_in, q_out, both, neither = 0.4, 0.6, (0.8, 0.3), (0.2, 0.1)
    theta = m.clone()
    fusion.fuse_importance(theta, a, k, s_in, q_in, s_out, q_out, both, neither)
    mi, mo = s_in > q_in, s_out > q_out
    w_in = torch.where(mi & mo, both[0], torch.where(~(mi | mo), neither[0], mi.double()))
    w_out = torch.where(mi & mo, both[1], torch.where(~(mi | mo), neither[1], mo.double()))
    ref = a.double() + w_in * (k.double() - a.double()) + w_out * (m.double() - k.double())
    assert torch.allclose(theta.double(), ref, rtol=0, atol=4e-6)


def test_copies_towards_the_host_are_waited_for():
    # a device-to-host copy into pinned memory returns before the data lands: the CPU op after it would read
    # stale memory, so only copies towards an accelerator may be queued
    assert fusion.may_overlap(torch.device("cpu")) is False
    assert fusion.may_overlap(torch.device("cuda", 0)) is True


def test_the_accelerator_chunk_path_forced_on_cpu(monkeypatch):
    # on an accelerator each function walks 16 MiB chunks instead of the CPU's cache-sized blocks: force that
    # path here with a length that leaves a tail chunk, and check every fusion against the formula
    monkeypatch.setattr(fusion, "_block", lambda device: fusion.CHUNK)
    n = fusion.CHUNK + 4321
    a, k, m = _streams(n, 3)
    w_in, w_out = 0.3, 0.6
    ref = a.double() + w_in * (k.double() - a.double()) + w_out * (m.double() - k.double())
    one = m.clone()
    fusion.fuse_scalar(one, a, k, w_in, w_out)
    assert torch.allclose(one.double(), ref, rtol=0, atol=4e-6)
    part, two = a.clone(), m.clone()  # undo "off": the anchor part first, theta_M's term after rehearsal
    fusion.fuse_scalar_anchor_part(part, k, w_in, w_out)
    fusion.fuse_scalar_finish(two, part, w_out)
    assert torch.allclose(two.double(), ref, rtol=0, atol=4e-6)
    ones = torch.ones(n)
    imp = m.clone()  # importance with every mask set: the `both` weights everywhere
    fusion.fuse_importance(imp, a, k, ones, 0.5, ones, 0.5, (w_in, w_out), (0.0, 0.0))
    assert torch.allclose(imp.double(), ref, rtol=0, atol=4e-6)
    dst = torch.empty(n)
    fusion.copy_into(dst, m)
    assert torch.equal(dst, m)
