"""`interval_rule: "reference"` against an independent re-enactment of the released trainer's schedule.

`released_schedule` below is written from the method description (../shared/docs/aimmerging.md, 2.1 and
2.2) as the released trainer's loop runs it, without importing anything from aim_ds: one probe per step,
a threshold from the first floor(2S/3)+1 steps, activations, the forced activation at m + 2S, the merge
rule, then at a merge: R = `outer_iterations` as it stands (the interval in force; the update comes
after the rehearsal), Lambda = sum / numel / S, the weight table from (A, S before the update), and
the ratio rule after the cold start. The traces cover steady, rising, spiky and plateau losses,
threshold ties (h == delta exactly), activation-cap bursts and several tasks in a row; every merge's
step, activation count, interval, learning signal, weights and R must agree.
"""

import math
import random

import pytest

from aim_ds.config import AimConfig
from aim_ds.control.controller import MergeController

S0, S_MIN, S_MAX, COLD, FACTOR, CAP, FORCED = 8, 2, 128, 3, 2.0, 3, 2


def released_schedule(losses, sums, numel):
    """Merges of one task as (step, A, S_in_force, R, Lambda, w_in, w_out, S_next)."""
    outer_iterations = S0
    last, a, window, delta, prev_lam, merges, out = 0, 0, [], None, None, 0, []
    for j, h in enumerate(losses, start=1):
        w = 2 * outer_iterations // 3 + 1
        if j - last <= w:
            window.append(h)
            if j - last == w:
                delta = FACTOR * (sum(window) / len(window))
        elif h >= delta:
            a += 1
        if a == 0 and j >= last + FORCED * outer_iterations:
            a = 1
        if not ((j >= last + outer_iterations and a >= 1) or a >= CAP):
            continue
        merges += 1
        r = outer_iterations  # the rehearsal loop runs before this merge's interval update
        lam = sums[merges] / numel / outer_iterations
        if a >= 2:
            w_in, w_out = (0.5, 0.5) if outer_iterations <= 70 else (0.4, 0.6)
        else:
            w_in, w_out = (0.6, 0.4) if outer_iterations <= 70 else (0.5, 0.5)
        s = outer_iterations
        if merges > COLD + 1:
            if lam >= prev_lam:  # the description's formulas, literally: S / (L_b / L_b-1), S * (L_b-1 / L_b + c)
                s = max(S_MIN, math.floor(s / (lam / prev_lam)))
                if s >= 64:
                    s = s // 2
            else:
                c = 1 if s < 64 else 0.5
                s = min(S_MAX, math.floor(s * (prev_lam / lam + c)))
        out.append((j, a, outer_iterations, r, lam, w_in, w_out, s))
        prev_lam, outer_iterations, last, a, window, delta = lam, s, j, 0, [], None
    return out


def controller_schedule(ctrl, task, losses, sums, numel):
    ctrl.start_task(task)
    out = []
    for h in losses:
        d = ctrl.observe(h)
        if d.merge:
            p = ctrl.on_merge(sums[ctrl.merges + 1], numel)
            out.append(
                (d.step, d.activations, d.interval, p.rehearsal_steps, p.learning_signal, p.w_in, p.w_out, p.interval)
            )
    return out


def _dyadic(x: float) -> float:
    return round(x * 64) / 64  # exact binary fractions: ties compare as the trainer's floats would


def trace(kind: str, n: int, rng: random.Random) -> list[float]:
    if kind == "steady":
        return [_dyadic(1.0 + rng.uniform(-0.05, 0.05)) for _ in range(n)]
    if kind == "rising":
        return [_dyadic(1.0 + j / n * 3.0 + rng.uniform(0, 0.2)) for j in range(n)]
    if kind == "spiky":
        return [
            _dyadic(1.0 + (rng.uniform(1.5, 4.0) if rng.random() < 0.08 else rng.uniform(0, 0.3))) for _ in range(n)
        ]
    if kind == "plateaus":
        level, out = 1.0, []
        for j in range(n):
            if j % rng.choice((37, 53, 71)) == 0:
                level = rng.choice((0.5, 1.0, 2.0, 4.0))
            out.append(level)
        return out
    if kind == "ties":  # constant 1.0 with bursts of exactly 2.0 = delta: equality must count as an activation
        return [2.0 if rng.random() < 0.1 else 1.0 for _ in range(n)]
    if kind == "bursts":  # runs of high losses that reach the activation cap before the interval
        out = []
        while len(out) < n:
            out += [1.0] * rng.randint(5, 30) + [5.0] * rng.randint(1, 6)
        return out[:n]
    raise ValueError(kind)


def signal_sums(kind: str, merges: int, rng: random.Random) -> dict[int, float]:
    """abs |theta - anchor| sums per merge: rising, falling, equal, zero-free random walks, big jumps."""
    if kind == "equal":
        return {b: 64.0 for b in range(1, merges + 1)}
    if kind == "falling":
        return {b: 4096.0 / b for b in range(1, merges + 1)}
    if kind == "rising":
        return {b: 8.0 * b for b in range(1, merges + 1)}
    return {
        b: _dyadic(rng.uniform(0.1, 10.0)) * (rng.choice((1, 1, 1, 30)) if kind == "jumps" else 1)
        for b in range(1, merges + 1)
    }


CASES = [
    (k, s, seed)
    for k in ("steady", "rising", "spiky", "plateaus", "ties", "bursts")
    for s in ("equal", "falling", "rising", "walk", "jumps")
    for seed in range(3)
]


@pytest.mark.parametrize("kind,sums_kind,seed", CASES)
def test_reference_rule_matches_the_released_schedule(kind, sums_kind, seed):
    rng = random.Random(f"{kind}-{sums_kind}-{seed}")
    ctrl = MergeController(AimConfig.from_dict({"interval_rule": "reference"}))
    numel = rng.choice((1, 1000, 4096))
    total = 0
    for task in (1, 2, 3):  # several tasks: every task restarts the released loop's state
        losses = trace(kind, 900, rng)
        sums = signal_sums(sums_kind, 900, rng)
        expected = released_schedule(losses, sums, numel)
        assert controller_schedule(ctrl, task, losses, sums, numel) == expected
        total += len(expected)
    assert total >= 9


def test_the_traces_reach_every_branch():
    """The cases above must exercise what they claim: R != the new S, the cap, ties, long intervals."""
    seen = set()
    for kind, sums_kind, seed in CASES:
        rng = random.Random(f"{kind}-{sums_kind}-{seed}")
        numel = rng.choice((1, 1000, 4096))
        for _ in (1, 2, 3):
            losses = trace(kind, 900, rng)
            for _j, a, s, r, _lam, _w_in, _w_out, s_next in released_schedule(
                losses, signal_sums(sums_kind, 900, rng), numel
            ):
                seen.add("R differs from the new S" if r != s_next else "R equals the new S")
                seen.add(f"A={min(a, 3)}")
                seen.add("S > 70" if s > 70 else "S <= 70")
    assert {"R differs from the new S", "A=1", "A=2", "A=3", "S > 70", "S <= 70"} <= seen, seen


def test_r_is_the_interval_in_force_during_the_cold_start_and_after():
    """Hand-checked: forced merges every 2S, the sums halving each merge; R lags the new S by one merge."""
    ctrl = MergeController(AimConfig.from_dict({"interval_rule": "reference"}))
    sums = {b: 2.0**-b for b in range(1, 20)}  # Lambda falls by 2 each merge (ratio 1/2): S -> S * 3
    got = controller_schedule(ctrl, 1, [1.0] * 200, sums, 1)
    steps = [m[0] for m in got]
    assert steps == [16, 32, 48, 64, 80, 128]
    assert [m[3] for m in got] == [8, 8, 8, 8, 8, 24]  # R = S in force: S_0 through the 5th merge
    # the new S: 8 * (2 + 1) = 24, then Lambda falls 6-fold (the divisor grew 3x): 24 * 7 = 168 -> S_max
    assert [m[7] for m in got] == [8, 8, 8, 8, 24, 128]
