"""aim_ds.ops.collectives.agree: one cross-rank error agreement (2 real gloo ranks, and without a process group)."""

from __future__ import annotations

import pytest

from tests.mp import run_ranks

pytestmark = pytest.mark.timeout(300)


def test_agree_on_two_ranks(tmp_path):
    res = run_ranks("tests.agree_scenarios:agree_cases", 2, tmp_path, timeout=240)
    assert res[0] == res[1], res  # every rank raises the very same error
    out = res[0]
    assert out["_alive"] == 2.0
    for exc in ("RuntimeError", "_Refused", "SystemExit"):
        assert out[f"none/{exc}"] is None
        assert out[f"rank1/{exc}"] == [exc, "rank 1: bad memory row 3"]
        assert out[f"both_differ/{exc}"] == [exc, "rank 0: problem 0; rank 1: problem 1"]
        assert out[f"both_same/{exc}"] == [exc, "rank 0: same problem; rank 1: same as rank 0"]
        assert out[f"empty_message/{exc}"] == [exc, "rank 0: "]
        kind, msg = out[f"long_unicode/{exc}"]
        assert kind == exc and msg.startswith("rank 1: ééé") and len(msg.encode()) <= 4096 + len("rank 1: ") + 3


def test_agree_without_process_group():
    from aim_ds.ops.collectives import agree

    agree(None)
    with pytest.raises(KeyError, match="rank 0: nope"):
        agree("nope", exc_type=KeyError)


def test_plugin_input_error_on_every_rank(tmp_path):
    """The plugin's caller keeps its exception type (AimInputError) and every rank names the failing rank."""
    res = run_ranks("tests.ckpt_scenarios:plugin_memory_refused", 2, tmp_path, timeout=240)
    assert res[0]["error"] == res[1]["error"], res
    assert res[0]["error"].startswith("rank 1: aim_merging: the rehearsal memory is empty on rank 1"), res
    assert all(r["alive"] and r["attached"] for r in res), res
