"""aim_ds.fusion: pure tensor math on flat shards."""

import math

import numpy as np
import torch

from aim_ds import fusion


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
