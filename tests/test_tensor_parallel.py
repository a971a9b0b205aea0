"""Tensor parallelism: DeepSpeed AutoTP (it trains on the CPU accelerator over gloo) and a Megatron-style
mpu. The plugin's statistics must equal those of the same model and data at TP=1: the element count
exactly (a parameter every TP rank holds whole is counted once), the learning signal, probe losses and
merged model to float tolerance."""

import pytest

from tests.mp import run_ranks

TIMEOUT = 600


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """TP=1 runs of the same data, by data-parallel size (launched once per module)."""
    cache = {}

    def get(dp):
        if dp not in cache:
            cache[dp] = run_ranks(
                "tests.scenarios_zero:tp_signal", dp, tmp_path_factory.mktemp("ref"), TIMEOUT, tp=1, mode="none"
            )[0]
        return cache[dp]

    return get


def _check(res, ref, sliced):
    r0 = res[0]
    total = r0["total_params"]
    assert ref["count"] == total and ref["tp_size"] == 1
    for r in res:
        assert r["tp_size"] == 2, r
        assert r["count"] == total, r  # every element counted once over TP x DP ranks
        assert r["learning_signal"] == pytest.approx(ref["learning_signal"], rel=1e-5), (r, ref)
        assert r["merged_loss"] == pytest.approx(ref["merged_loss"], rel=1e-5), (r, ref)  # the TP=1 merge
        assert (r["sliced"] > 0) == sliced, r
        assert r["mismatch_error"] and "tensor-parallel" in r["mismatch_error"], r
    assert ref["mismatch_error"] is None
    # decisions come from global rank 0; its probe losses (reduced over data parallel) are the TP=1 ones
    probes = [x for x in r0["probe_losses"] if x is not None]  # the explicit merge's row has no probe
    assert len(probes) == 3 and probes == pytest.approx([x for x in ref["probe_losses"] if x is not None], rel=1e-5)
    assert all(r["probe_losses"] == [] for r in res[1:])


def test_autotp_tp2_dp1_matches_tp1_and_resumes(tmp_path, reference):
    res = run_ranks("tests.scenarios_zero:tp_signal", 2, tmp_path, TIMEOUT, tp=2, mode="autotp", work=str(tmp_path))
    _check(res, reference(1), sliced=True)
    for r in res:
        assert r["resumed_weights_equal"] and r["resumed_state_equal"], r  # save + load at TP=2, bit-exact
        assert "tensor-parallel size 1, this run has 2" in r["plugin_tp_error"], r
        assert "tensor-parallel size 1, this run has 2" in r["ckpt_tp_error"], r  # refused on every rank


def test_megatron_mpu_tp2_dp1_matches_tp1(tmp_path, reference):
    # a hand-made mpu over real gloo groups, the model not sliced: every parameter is held whole by both TP ranks
    res = run_ranks("tests.scenarios_zero:tp_signal", 2, tmp_path, TIMEOUT, tp=2, mode="mpu")
    _check(res, reference(1), sliced=False)


def test_autotp_tp2_dp2_matches_tp1(tmp_path, reference):
    res = run_ranks("tests.scenarios_zero:tp_signal", 4, tmp_path, TIMEOUT, tp=2, mode="autotp")
    _check(res, reference(2), sliced=True)
