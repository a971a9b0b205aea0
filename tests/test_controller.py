"""aim_ds.control.controller / aim_ds.control.policies: the pure merge controller (no torch, no distributed).

The expected schedules below are derived BY HAND from the rules in ../shared/docs/aimmerging.md
(section 2.1 / 2.2) and written out literally; the derivation of each merge is in the comments.
Learning-signal sums are chosen so that every Lambda and every ratio is an exact binary fraction.
"""

import json
import math
import random

import pytest

from aim_ds.config import AimConfig
from aim_ds.control.controller import ControllerPlan, MergeController, StepDecision, threshold_window
from aim_ds.control.policies import PaperRule, ReferenceRule, signals_weights


def make(**kw) -> MergeController:
    return MergeController(AimConfig.from_dict(kw))


def run(ctrl, until, losses=None, sums=None, default=1.0, record=None):
    """Drive ctrl to step `until`: the probe loss of step j is losses.get(j, default), given only when
    ctrl.wants_probe(); at each merge, abs_change_sum = sums[b] (b = 1-based merge index in the task),
    numel = 1. Returns (decisions, merges) where merges rows are
    (step, S_before, A, forced, S_new, R, w_in, w_out, Lambda)."""
    losses = losses or {}
    decisions, merges = record if record is not None else ([], [])
    while ctrl.step < until:
        j = ctrl.step + 1
        loss = losses.get(j, default) if ctrl.wants_probe() else None
        d = ctrl.observe(loss)
        decisions.append(d)
        if d.merge:
            p = ctrl.on_merge(sums[ctrl.merges + 1], 1)
            assert p.step == d.step
            merges.append(
                (
                    d.step,
                    d.interval,
                    d.activations,
                    d.forced,
                    p.interval,
                    p.rehearsal_steps,
                    p.w_in,
                    p.w_out,
                    p.learning_signal,
                )
            )
    return decisions, merges


# ---------------------------------------------------------------------- small pure pieces
def test_threshold_window_is_floor_two_thirds_plus_one():
    assert [threshold_window(s) for s in (1, 2, 3, 4, 8, 40, 64, 128)] == [1, 2, 3, 3, 6, 27, 43, 86]


@pytest.mark.parametrize(
    "a,s,expected",
    [
        (2, 70, (0.5, 0.5)),
        (2, 71, (0.4, 0.6)),
        (1, 70, (0.6, 0.4)),
        (1, 71, (0.5, 0.5)),
        (0, 8, (0.6, 0.4)),
        (3, 128, (0.4, 0.6)),
        (5, 2, (0.5, 0.5)),
    ],
)
def test_signals_table(a, s, expected):
    assert signals_weights(a, s) == expected


def test_paper_rule_pure():
    r = PaperRule(min_interval=2, max_interval=128, window=3, gamma_up=2.0, gamma_down=2.0)
    assert r.next_interval(8, [1.0, 2.0], 2) == 8  # fewer than L_w values: no change
    assert r.next_interval(8, [1.0, 2.0, 3.0], 3) == 4  # u=2 > d=0: shrink
    assert r.next_interval(8, [3.0, 2.0, 1.0], 3) == 16  # d=2 > u=0: grow
    assert r.next_interval(8, [1.0, 3.0, 2.0], 3) == 8  # u=1 == d=1: keep
    assert r.next_interval(8, [1.0, 1.0, 1.0], 3) == 8  # equal neighbours are neither
    assert r.next_interval(8, [1.0, 2.0, 2.0], 3) == 4  # u=1, d=0
    assert r.next_interval(8, [9.0, 9.0, 1.0, 2.0, 3.0], 5) == 4  # only the last 3 count
    assert r.next_interval(3, [1.0, 2.0, 3.0], 3) == 2  # int(1.5)=1 -> S_min 2
    assert r.next_interval(100, [3.0, 2.0, 1.0], 3) == 128  # 200 -> S_max
    g = PaperRule(min_interval=2, max_interval=128, window=4, gamma_up=1.5, gamma_down=1.5)
    assert g.next_interval(8, [1.0, 2.0, 1.0, 0.0], 4) == 12  # u=1 < d=2: int(8*1.5)
    assert g.next_interval(12, [0.0, 1.0, 2.0, 1.0], 4) == 8  # u=2 > d=1: int(12/1.5)
    assert g.next_interval(9, [0.0, 1.0, 2.0, 1.0], 4) == 6  # int(9/1.5)=6


def test_reference_rule_pure():
    r = ReferenceRule(min_interval=2, max_interval=128, cold_start=3)
    assert r.next_interval(8, [1.0, 4.0], 4) == 8  # merge 4: still cold
    assert r.next_interval(8, [1.0, 4.0], 5) == 2  # merge 5: floor(8/4)=2
    assert r.next_interval(8, [4.0, 1.0], 5) == 40  # floor(8*(4+1))
    assert r.next_interval(63, [1.25, 1.0], 5) == 128  # c=1 (63<64): floor(63*2.25)=141 -> 128
    assert r.next_interval(60, [1.25, 1.0], 5) == 128  # floor(60*2.25)=135 -> 128
    assert r.next_interval(40, [1.25, 1.0], 5) == 90  # floor(40*2.25)
    assert r.next_interval(64, [1.25, 1.0], 5) == 112  # c=0.5 (S>=64): floor(64*1.75)
    assert r.next_interval(128, [1.0, 1.0], 5) == 64  # r=1: floor(128/1)=128 >= 64 -> halved
    assert r.next_interval(64, [1.0, 1.0], 5) == 32  # exactly 64 is halved
    assert r.next_interval(63, [1.0, 1.0], 5) == 63  # 63 is not
    assert r.next_interval(127, [1.0, 1.25], 5) == 50  # floor(127/1.25)=101 -> 50
    assert r.next_interval(8, [1.0, 100.0], 5) == 2  # floor(0.08)=0 -> S_min
    assert r.next_interval(8, [0.0, 0.0], 5) == 8  # 0/0: keep
    assert r.next_interval(8, [0.0, 1.0], 5) == 2  # infinite rise: S_min
    assert r.next_interval(8, [1.0, 0.0], 5) == 128  # infinite fall: S_max
    r0 = ReferenceRule(min_interval=2, max_interval=128, cold_start=0)
    assert r0.next_interval(8, [2.0], 1) == 8  # nothing to compare with
    assert r0.next_interval(8, [1.0, 2.0], 2) == 4  # cold_start 0: from the 2nd merge


# ---------------------------------------------------------------------- forgetting signal
def test_threshold_activations_and_merge_by_interval():
    c = make(interval_rule="reference")
    c.start_task(1)
    ds = [c.observe(1.0) for _ in range(5)]
    assert [d.threshold for d in ds] == [None] * 5  # still inside the window of 6
    d6 = c.observe(1.0)
    assert d6.threshold == 2.0 and d6.activations == 0  # 2.0 * mean(1,1,1,1,1,1)
    d7 = c.observe(2.0)  # h >= delta (equality counts)
    assert (d7.activations, d7.merge) == (1, False)  # j=7 < m+S=8
    d8 = c.observe(0.5)
    assert (d8.step, d8.activations, d8.merge, d8.forced) == (8, 1, True, False)


def test_activation_cap_merges_before_the_interval():
    c = make(interval_rule="reference", initial_interval=40, activation_cap=2)
    c.start_task(1)
    for _ in range(27):  # window floor(80/3)+1 = 27
        d = c.observe(1.0)
    assert d.threshold == 2.0
    assert c.observe(2.5).activations == 1
    d = c.observe(3.0)
    assert (d.step, d.activations, d.merge) == (29, 2, True)  # 29 < 40 but A reached the cap


def test_forced_activation_at_m_plus_multiple_s():
    c = make(interval_rule="reference", forced_activation_multiple=3)
    c.start_task(1)
    ds = [c.observe(1.0) for _ in range(24)]
    assert [d.merge for d in ds] == [False] * 23 + [True]
    assert (ds[-1].forced, ds[-1].activations) == (True, 1)
    assert not any(d.forced for d in ds[:-1])


def test_probe_interval_only_probed_steps_count():
    c = make(interval_rule="reference", probe_interval=2)
    c.start_task(1)
    wants, out = [], []
    losses = {2: 1.0, 4: 2.0, 6: 3.0, 8: 4.0}
    for j in range(1, 9):
        wants.append(c.wants_probe())
        out.append(c.observe(losses[j] if wants[-1] else None))
    assert wants == [False, True] * 4
    assert out[5].threshold == 4.0  # 2 * mean(1, 2, 3)
    assert (out[7].activations, out[7].merge) == (1, True)  # step 8: 4.0 >= 4.0


def test_window_without_probe_takes_the_first_probe_after_it():
    c = make(interval_rule="reference", probe_interval=10)
    c.start_task(1)
    decisions, merges = run(c, 30, losses={10: 3.0, 20: 1.5, 30: 3.0}, sums={1: 8.0, 2: 8.0})
    by = {d.step: d for d in decisions}
    assert by[6].threshold is None  # window 1..6 held no probe
    assert (by[10].threshold, by[10].activations) == (6.0, 0)  # first probe sets delta, no activation
    assert (by[16].merge, by[16].forced) == (True, True)  # forced at m + 2S = 16
    assert by[21].threshold is None and by[22].threshold == 3.0  # window 17..22 held step 20
    assert (by[30].activations, by[30].merge, by[30].forced) == (1, True, False)
    assert [m[0] for m in merges] == [16, 30]


def test_non_finite_probe_losses_are_skipped():
    c = make(interval_rule="reference")
    c.start_task(1)
    ds = [c.observe(x) for x in (math.nan, 7.0, 1.0, 1.0, 1.0, 1.0)]
    assert ds[0].probe_loss is None
    assert ds[5].threshold == pytest.approx(4.4)  # 2 * mean(7,1,1,1,1)
    assert c.observe(math.inf).activations == 0


def test_inactive_on_task_zero_unless_merge_first_task():
    c = make(interval_rule="reference")
    with pytest.raises(RuntimeError):
        c.observe(1.0)
    c.start_task(0)
    assert not c.active and not c.wants_probe()
    ds = [c.observe(100.0) for _ in range(100)]
    assert not any(d.merge for d in ds) and c.step == 100
    c2 = make(interval_rule="reference", merge_first_task=True)
    c2.start_task(0)
    assert c2.active and c2.wants_probe()
    assert [d.step for d in [c2.observe(1.0) for _ in range(16)] if d.merge] == [16]


def test_plan_inactive_keeps_the_interval():
    c = make(interval_rule="reference")
    c.start_task(0)
    for _ in range(5):
        c.observe(None)
    p = c.plan_inactive(10.0, 2)
    assert p == ControllerPlan(
        step=5, interval=8, rehearsal_steps=8, w_in=0.6, w_out=0.4, learning_signal=10.0 / 2 / 8, policy="signals"
    )
    assert c.interval == 8 and c.learning_signals == ()


def test_fixed_rule_merges_every_s0_and_never_probes():
    c = make(interval_rule="fixed", initial_interval=5)
    c.start_task(1)
    assert not c.wants_probe()
    decisions, merges = run(c, 15, default=1e9, sums={1: 5.0, 2: 10.0, 3: 0.0})
    assert not c.wants_probe()
    assert all(d.threshold is None and d.activations == 0 for d in decisions)
    assert merges == [
        (5, 5, 0, False, 5, 5, 0.6, 0.4, 1.0),
        (10, 5, 0, False, 5, 5, 0.6, 0.4, 2.0),
        (15, 5, 0, False, 5, 5, 0.6, 0.4, 0.0),
    ]


def test_weight_policies_and_rehearsal_constant():
    c = make(interval_rule="fixed", weight_policy="fixed", w_in=0.7, w_out=0.9, rehearsal_steps=3)
    c.start_task(1)
    run(c, 7)
    d = c.observe(None)
    assert d.merge
    assert c.on_merge(4.0, 4) == ControllerPlan(8, 8, 3, 0.7, 0.9, 0.125, "fixed")
    c = make(interval_rule="fixed", weight_policy="importance")
    c.start_task(1)
    run(c, 7)
    c.observe(None)
    p = c.on_merge(0.0, 1)
    assert (p.w_in, p.w_out, p.policy) == (0.5, 0.5, "importance")


def test_on_merge_rejects_bad_signals():
    c = make()
    c.start_task(1)
    with pytest.raises(ValueError):
        c.on_merge(1.0, 0)
    with pytest.raises(ValueError):
        c.on_merge(math.nan, 10)


# ---------------------------------------------------------------------- reference-rule parity
# Scenario A: no forgetting (probe losses all 1.0 < delta = 2.0): every merge is a forced activation
# at m + 2S. Defaults of the released code: S_0=8, S_min=2, S_max=128, cold_start=3.
#  b  step  S_b  Lambda = sum/S_b      rule                                        S_new  weights (A=1)
#  1   16    8   8/8     = 1.0         cold start                                   8     S_b<=70: .6/.4
#  2   32    8   16/8    = 2.0         cold start                                   8
#  3   48    8   4/8     = 0.5         cold start                                   8
#  4   64    8   17.5/8  = 2.1875      cold start (a rise of 4.375: misread -> 2)   8
#  5   80    8   2.5/8   = 0.3125      fall r=7, S=8<64: c=1: floor(8*(7+1))        64
#  6  208   64   16/64   = 0.25        fall r=1.25, S=64>=64: c=.5: floor(64*1.75)  112
#  7  432  112   35/112  = 0.3125      rise 1.25: floor(112/1.25)=89 >=64 -> 44     44    S_b>70: .5/.5
#  8  520   44   440/44  = 10.0        rise 32: floor(44/32)=1 -> S_min              2
#  9  524    2   20/2    = 10.0        equal: r=1: floor(2/1)=2                      2
SUMS_A = {1: 8.0, 2: 16.0, 3: 4.0, 4: 17.5, 5: 2.5, 6: 16.0, 7: 35.0, 8: 440.0, 9: 20.0}
EXPECTED_A = [
    (16, 8, 1, True, 8, 8, 0.6, 0.4, 1.0),
    (32, 8, 1, True, 8, 8, 0.6, 0.4, 2.0),
    (48, 8, 1, True, 8, 8, 0.6, 0.4, 0.5),
    (64, 8, 1, True, 8, 8, 0.6, 0.4, 2.1875),
    (80, 8, 1, True, 64, 8, 0.6, 0.4, 0.3125),
    (208, 64, 1, True, 112, 64, 0.6, 0.4, 0.25),
    (432, 112, 1, True, 44, 112, 0.5, 0.5, 0.3125),
    (520, 44, 1, True, 2, 44, 0.6, 0.4, 10.0),
    (524, 2, 1, True, 2, 2, 0.6, 0.4, 10.0),
]


def test_reference_parity_forced_cold_start_and_long_intervals():
    c = make(interval_rule="reference")
    c.start_task(1)
    _, merges = run(c, 527, sums=SUMS_A)  # the 10th merge would be at 528
    assert merges == EXPECTED_A
    assert c.interval == 2 and c.merges == 9 and c.last_learning_signal == 10.0


# Scenario B: real activations, the activation cap and all four rows of the weight table.
#  seg m   S  window            probes                               -> merge
#  1   0   8  1..6   (delta 2)   7: 2.0 (A=1), 8: 0.5                    @8   A=1 .6/.4   L=8/8=1.0
#  2   8   8  9..14  [1,2,3,1,2,3] delta 4.0; 15: 4.0 A=1, 16: 5.0 A=2   @16  A=2 .5/.5   L=12/8=1.5
#  3  16   8  all 1.0                                                forced @32  .6/.4   L=6/8=.75
#  4  32   8  33: nan (skipped), 34: 7 -> delta 4.4; 39: 4.0, 40: inf  forced @48        L=8/8=1.0
#  5  48   8  all 1.0                          forced @64; L=2/8=.25, fall r=4: floor(8*5)=40
#  6  64  40  65..91 delta 2; 92,93,94: 2.5 -> A=3 = cap               @94 (<104) A=3 .5/.5
#             L=10/40=.25 = previous: r=1: floor(40/1)=40 (<64, no halving)
#  7  94  40  all 1.0             forced @174 .6/.4; L=5/40=.125, fall r=2, c=1: floor(40*3)=120
#  8 174 120  175..255 delta 2; 256, 257: 3.0 -> A=2; merge at j >= 294  @294 A=2 S_b>70: .4/.6
#             L=15/120=.125, r=1: floor(120/1)=120 >= 64 -> halved to 60
LOSSES_B = {
    7: 2.0,
    8: 0.5,
    9: 1.0,
    10: 2.0,
    11: 3.0,
    12: 1.0,
    13: 2.0,
    14: 3.0,
    15: 4.0,
    16: 5.0,
    33: math.nan,
    34: 7.0,
    39: 4.0,
    40: math.inf,
    92: 2.5,
    93: 2.5,
    94: 2.5,
    256: 3.0,
    257: 3.0,
}
SUMS_B = {1: 8.0, 2: 12.0, 3: 6.0, 4: 8.0, 5: 2.0, 6: 10.0, 7: 5.0, 8: 15.0}
EXPECTED_B = [
    (8, 8, 1, False, 8, 8, 0.6, 0.4, 1.0),
    (16, 8, 2, False, 8, 8, 0.5, 0.5, 1.5),
    (32, 8, 1, True, 8, 8, 0.6, 0.4, 0.75),
    (48, 8, 1, True, 8, 8, 0.6, 0.4, 1.0),
    (64, 8, 1, True, 40, 8, 0.6, 0.4, 0.25),
    (94, 40, 3, False, 40, 40, 0.5, 0.5, 0.25),
    (174, 40, 1, True, 120, 40, 0.6, 0.4, 0.125),
    (294, 120, 2, False, 60, 120, 0.4, 0.6, 0.125),
]


def test_reference_parity_activations_cap_and_weight_table():
    c = make(interval_rule="reference")
    c.start_task(1)
    decisions, merges = run(c, 300, losses=LOSSES_B, sums=SUMS_B)
    assert merges == EXPECTED_B
    by = {d.step: d for d in decisions}
    assert by[5].threshold is None and by[6].threshold == 2.0
    assert by[13].threshold is None and by[14].threshold == 4.0
    assert by[38].threshold == pytest.approx(4.4) and by[39].activations == 0
    assert by[90].threshold is None and by[91].threshold == 2.0
    assert [by[j].activations for j in (92, 93, 94)] == [1, 2, 3]
    assert [by[j].interval for j in (64, 65, 174, 175, 294, 295)] == [8, 40, 40, 120, 120, 60]


def test_next_task_resets_everything():
    c = make(interval_rule="reference")
    c.start_task(1)
    run(c, 300, losses=LOSSES_B, sums=SUMS_B)
    c.start_task(2)
    assert (c.task_index, c.step, c.interval, c.merges, c.activations) == (2, 0, 8, 0, 0)
    assert c.threshold is None and c.last_learning_signal is None and c.learning_signals == ()
    _, merges = run(c, 16, sums={1: 8.0})
    assert merges == [(16, 8, 1, True, 8, 8, 0.6, 0.4, 1.0)]


# ---------------------------------------------------------------------- paper rule schedule
# Forced merges only (A=1). L_w=3, gammas 2.
#  b  step S_b Lambda   window            u,d   S_new
#  1   16   8  1        [1]               -      8
#  2   32   8  2        [1,2]             -      8
#  3   48   8  3        [1,2,3]           2,0    4
#  4   56   4  2        [2,3,2]           1,1    4
#  5   64   4  1        [3,2,1]           0,2    8
#  6   80   8  .5       [2,1,.5]          0,2   16
#  7  112  16  .25                        0,2   32
#  8  176  32  .125                       0,2   64
#  9  304  64  .0625                      0,2  128
# 10  560 128  .03125                     0,2  128 (clamped)   weights S_b=128>70: .5/.5
# 11  816 128  1        [.0625,.03125,1]  1,1  128
# 12 1072 128  2        [.03125,1,2]      2,0   64
SUMS_P = {1: 8.0, 2: 16.0, 3: 24.0, 4: 8.0, 5: 4.0, 6: 4.0, 7: 4.0, 8: 4.0, 9: 4.0, 10: 4.0, 11: 128.0, 12: 256.0}
EXPECTED_P = [
    (16, 8, 1, True, 8, 8, 0.6, 0.4, 1.0),
    (32, 8, 1, True, 8, 8, 0.6, 0.4, 2.0),
    (48, 8, 1, True, 4, 8, 0.6, 0.4, 3.0),
    (56, 4, 1, True, 4, 4, 0.6, 0.4, 2.0),
    (64, 4, 1, True, 8, 4, 0.6, 0.4, 1.0),
    (80, 8, 1, True, 16, 8, 0.6, 0.4, 0.5),
    (112, 16, 1, True, 32, 16, 0.6, 0.4, 0.25),
    (176, 32, 1, True, 64, 32, 0.6, 0.4, 0.125),
    (304, 64, 1, True, 128, 64, 0.6, 0.4, 0.0625),
    (560, 128, 1, True, 128, 128, 0.5, 0.5, 0.03125),
    (816, 128, 1, True, 128, 128, 0.5, 0.5, 1.0),
    (1072, 128, 1, True, 64, 128, 0.5, 0.5, 2.0),
]


def test_paper_rule_shrink_keep_grow_clamp():
    c = make()  # paper is the default rule
    c.start_task(1)
    _, merges = run(c, 1072, sums=SUMS_P)
    assert merges == EXPECTED_P


# ---------------------------------------------------------------------- checkpoint / replay
@pytest.mark.parametrize("cut", [3, 15, 36, 93, 200, 256, 294])
def test_state_dict_replay_is_exact(cut):
    def fresh():
        c = make(interval_rule="reference")
        c.start_task(1)
        return c

    full = run(fresh(), 300, losses=LOSSES_B, sums=SUMS_B)
    first = fresh()
    rec = run(first, cut, losses=LOSSES_B, sums=SUMS_B)
    sd = json.loads(json.dumps(first.state_dict(), allow_nan=False))  # strict JSON
    second = make(interval_rule="reference")
    second.load_state_dict(sd)
    assert second.state_dict() == first.state_dict()
    run(second, 300, losses=LOSSES_B, sums=SUMS_B, record=rec)
    assert rec == full
    assert isinstance(rec[0][0], StepDecision)


def test_state_dict_replay_paper_with_probe_interval():
    def fresh():
        c = make(probe_interval=3)
        c.start_task(2)
        return c

    losses = {j: (1.0 + (j % 7) * 0.45) for j in range(1, 400)}
    sums = {b: float(b % 3 + 1) for b in range(1, 200)}
    full = run(fresh(), 399, losses=losses, sums=sums)
    assert len(full[1]) >= 5  # the scenario does merge
    first = fresh()
    rec = run(first, 137, losses=losses, sums=sums)
    second = make(probe_interval=3)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    run(second, 399, losses=losses, sums=sums, record=rec)
    assert rec == full


def test_load_state_dict_rejects_a_different_rule_or_version():
    a = make(interval_rule="reference")
    a.start_task(1)
    with pytest.raises(ValueError):
        make(interval_rule="paper").load_state_dict(a.state_dict())
    with pytest.raises(ValueError):
        make(interval_rule="reference").load_state_dict({**a.state_dict(), "version": 99})


# ---------------------------------------------------------------------- de-noised signals (issue 24)
def noisy_trace(cv: float, n: int, seed: int, rise_at: int | None = None, rise: float = 1.0) -> dict:
    """Memory-loss trace: gamma noise of coefficient of variation `cv` around 1.0 (the CV measured within
    a segment on the benchmarks is 0.45-0.63), times `rise` from step `rise_at` on (a real rise)."""
    rng = random.Random(seed)
    shape = 1.0 / cv**2
    return {
        j: rng.gammavariate(shape, 1.0 / shape) * (rise if rise_at is not None and j >= rise_at else 1.0)
        for j in range(1, n + 1)
    }


# long enough to read many steps after each window: no forced activation, one threshold for the whole trace
QUIET = dict(initial_interval=60, forced_activation_multiple=10, activation_cap=1000, max_interval=128)
DENOISED = dict(forgetting_ema=0.8, threshold_rule="mean_std", threshold_std=3.0)


def activations_after_window(cfg: dict, losses: dict, until: int) -> list[int]:
    """Steps at which the activation count rose (one task; a merge decision is not committed, so the
    threshold of the first window stays and every later step is compared with it)."""
    c = make(**cfg)
    c.start_task(1)
    got, last = [], 0
    for j in range(1, until + 1):
        d = c.observe(losses[j])
        if d.activations > last:
            got.append(j)
        last = d.activations
    return got


@pytest.mark.parametrize("cv", [0.45, 0.63])
def test_denoised_threshold_ignores_noise_of_the_measured_cv(cv):
    # window = steps 1..41; steps 42..119 are stationary noise: the de-noised rule (EMA 0.8, mean + 3 std) stays
    # quiet on 95% of them, 10x quieter than a raw-loss threshold close to the mean (factor 1.25, the issue-19
    # trial), which fires on the noise
    quiet, noisy = [], []
    for seed in range(20):
        losses = noisy_trace(cv, 119, seed)
        quiet.append(len(activations_after_window({**QUIET, **DENOISED}, losses, 119)))
        noisy.append(len(activations_after_window({**QUIET, "threshold_factor": 1.25}, losses, 119)))
    steps = 20 * (119 - 41)
    assert sum(quiet) / steps < 0.05, quiet
    assert sum(noisy) / steps > 0.1, noisy  # the test can fail: the raw signal does cross such thresholds
    assert sum(quiet) < sum(noisy) / 5


@pytest.mark.parametrize("cv", [0.45, 0.63])
def test_denoised_threshold_fires_on_a_real_rise(cv):
    # the memory loss rises 1.5x at step 60 (what a task switch or real forgetting does): the EMA + mean + 3 std
    # rule fires within 30 steps on 18 of 20 seeds (median delay about 8 steps: the EMA's lag) and seldom before
    # the rise; factor 2 on the raw loss (the default) fires before the rise, on the noise, on twice as many seeds or more
    delays, early, early_raw = [], 0, 0
    for seed in range(20):
        losses = noisy_trace(cv, 119, seed, rise_at=60, rise=1.5)
        got = activations_after_window({**QUIET, **DENOISED}, losses, 89)
        delays.append(next((j - 60 for j in got if j >= 60), None))
        early += any(j < 60 for j in got)
        early_raw += any(j < 60 for j in activations_after_window(QUIET, losses, 89))
    assert sum(d is not None for d in delays) >= 18, delays
    assert sorted(d if d is not None else 99 for d in delays)[10] <= 10, delays
    assert early <= 4 and early_raw >= 2 * early, (early, early_raw)


def test_mean_std_threshold_is_the_window_mean_plus_k_ema_noise():
    c = make(initial_interval=3, threshold_rule="mean_std", threshold_std=2.0, forgetting_ema=0.5)
    c.start_task(1)  # window = 3 steps; EMA: 1.0, 2.0, 1.5
    for loss in (1.0, 3.0, 1.0):
        d = c.observe(loss)
    raw_std = math.sqrt(((1 - 5 / 3) ** 2 * 2 + (3 - 5 / 3) ** 2) / 3)
    assert d.signal == 1.5
    assert d.threshold == pytest.approx(1.5 + 2.0 * raw_std * math.sqrt(0.5 / 1.5))
    c2 = make(initial_interval=3, threshold_rule="mean_std", threshold_std=1.0)  # beta 0: the raw std itself
    c2.start_task(1)
    for loss in (1.0, 3.0, 1.0):
        d = c2.observe(loss)
    assert d.threshold == pytest.approx(5 / 3 + raw_std)


def test_lr_sqrt_learning_signal_is_constant_for_a_constant_speed_task():
    # a random walk: displacement = c * mean lr * sqrt(steps). The default per-step signal follows the lr
    # schedule and 1/sqrt(S); lr_sqrt gives the same value for every segment, so S only moves with the task
    def lambdas(signal):
        c = make(learning_signal=signal, threshold_factor=100.0, initial_interval=4, max_interval=64)
        c.start_task(1)
        out, lrs = [], []
        for j in range(1, 400):
            lr = 1e-3 * 0.5 * (1 + math.cos(math.pi * j / 400))  # cosine decay
            lrs.append(lr)
            if c.observe(1.0, lr).merge:
                n = len(lrs)
                p = c.on_merge(0.7 * (sum(lrs) / n) * math.sqrt(n) * 1000, 1000)
                out.append((p.learning_signal, p.interval))
                lrs = []
        return out

    lr_sqrt = lambdas("lr_sqrt")
    assert len(lr_sqrt) >= 10 and all(lam == pytest.approx(0.7) for lam, _ in lr_sqrt), lr_sqrt
    per_step = [lam for lam, _ in lambdas("per_step")]
    assert per_step[-1] < 0.2 * per_step[1]  # the default reads the decaying schedule as convergence


def test_lr_sqrt_without_a_learning_rate_is_one_clear_error():
    c = make(learning_signal="lr_sqrt", initial_interval=2, threshold_factor=100.0)
    c.start_task(1)
    for _ in range(4):
        d = c.observe(1.0)
    assert d.merge
    with pytest.raises(ValueError, match="needs the learning rate of each step"):
        c.on_merge(1.0, 1)
    with pytest.raises(ValueError, match="lr must be"):
        c.observe(1.0, float("nan"))


@pytest.mark.parametrize("retries", [0, 2])
def test_an_undone_merge_is_retried_within_the_budget_then_the_segment_is_given_up(retries):
    c = make(initial_interval=4, merge_retries=retries, threshold_factor=100.0)
    c.start_task(1)
    attempts = []
    for _ in range(30):
        d = c.observe(1.0, 1e-3)
        if d.merge:
            attempts.append(d.step)
            c.merge_undone()  # every merge fails
    # forced activation at 8, then `retries` retries on the next steps, then a new segment from there
    first = list(range(8, 9 + retries))
    assert attempts[: len(first)] == first
    assert attempts[len(first)] == first[-1] + 8  # one attempt per forced interval, not one per step
    assert c.interval == 4 and c.merges == 0


def test_state_dict_round_trip_keeps_the_new_signal_state():
    cfg = dict(initial_interval=4, forgetting_ema=0.7, threshold_rule="mean_std", learning_signal="lr_sqrt")
    losses = noisy_trace(0.5, 200, 3, rise_at=90, rise=1.6)

    def drive(c, start, stop, rec):
        for j in range(start, stop):
            d = c.observe(losses[j], 1e-3 * (1 - j / 400))
            rec.append(d)
            if d.merge:
                rec.append(c.on_merge(0.01 * j, 10))
        return rec

    a = make(**cfg)
    a.start_task(1)
    full = drive(a, 1, 200, [])
    b = make(**cfg)
    b.start_task(1)
    part = drive(b, 1, 77, [])
    c = make(**cfg)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    assert drive(c, 77, 200, part) == full
    old = {k: v for k, v in b.state_dict().items() if k not in ("window", "window_raw", "ema", "retries")}
    make(**cfg).load_state_dict({**old, "version": 1, "window_sum": 2.0, "window_count": 2})  # version 1 loads


# ---------------------------------------------------------------------- S_0 from the task's length
@pytest.mark.parametrize("steps,expected", [(50, 12), (200, 50), (800, 128), (4, 2)])
def test_initial_interval_fraction_scales_s0_with_the_task(steps, expected):
    c = make(initial_interval_fraction=0.25)  # clamped to [min_interval 2, max_interval 128]
    c.start_task(1, steps=steps)
    assert c.interval == expected
    _, merges = run(c, steps, sums={i: 1.0 for i in range(1, 100)})
    assert merges[0][:4] == (min(2 * expected, steps), expected, 1, True)  # no rise: forced at m + 2 S_0


def test_initial_interval_fraction_needs_the_length_and_excludes_initial_interval():
    from aim_ds.config import ConfigError

    c = make(initial_interval_fraction=0.5)
    with pytest.raises(ValueError, match="initial_interval_fraction 0.5 needs each task's length: pass steps="):
        c.start_task(1)
    c.start_task(0, steps=10)  # an inactive task still takes its S_0 from its length
    assert c.interval == 5
    with pytest.raises(ConfigError, match="initial_interval.*ignored when initial_interval_fraction is set"):
        AimConfig.from_dict({"initial_interval": 16, "initial_interval_fraction": 0.25})
    with pytest.raises(ConfigError, match="initial_interval_fraction"):
        AimConfig.from_dict({"initial_interval_fraction": 1.5})
    plain = make()
    plain.start_task(1, steps=1000)  # without the key the length changes nothing
    assert plain.interval == 8


def test_replay_reproduces_a_run_with_initial_interval_fraction():
    """aim-ds replay takes each task's length from its recorded steps, so it rebuilds S_0 as the run did."""
    from aim_ds.control.trajectory import TrajectoryRow
    from aim_ds.tools import replay as controller_replay

    cfg = AimConfig.from_dict({"initial_interval_fraction": 0.2, "interval_rule": "reference", "cold_start": 0})
    losses = noisy_trace(0.45, 200, 5, rise_at=70, rise=1.8)
    ctrl, rows = MergeController(cfg), []
    for t, n in ((1, 60), (2, 140)):
        ctrl.start_task(t, steps=n)
        for _ in range(n):
            d = ctrl.observe(losses[ctrl.step + 1])
            row = TrajectoryRow.of_step(t, d, d.probe_loss, False).as_dict()
            if d.merge:
                p = ctrl.on_merge(0.05 * d.step, 10)
                row.update(merge=1, interval=p.interval, w_in=p.w_in, w_out=p.w_out, abs_change_sum=0.05 * d.step,
                           numel=10, rehearsal_steps=p.rehearsal_steps, learning_signal=p.learning_signal)  # fmt: skip
            rows.append(row)
    recorded = controller_replay.merges(rows)
    assert {m[2] for m in recorded if m[0] == 1} != {m[2] for m in recorded if m[0] == 2}  # S_0 differed by task
    assert controller_replay.merges(controller_replay.replay(rows, cfg)) == recorded
