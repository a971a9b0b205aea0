"""benchmarks/gpu_check.sh on the CPU (tiny model): the same launcher path the GPU run takes, JSON keys and plausibility.

Timings are never asserted against goals here (two shared cores): only that they are finite and positive.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

KEYS = [
    "step_seconds",
    "probe_step_seconds",
    "probe_cost",
    "fusion_seconds",
    "fusion_bytes",
    "fusion_bytes_per_second",
    "copy_bytes_per_second",
    "fusion_vs_copy",
    "fusion_over_step",
    "plugin_bytes",
    "plugin_device_bytes",
    "plugin_host_bytes",
    "plugin_bytes_per_param",
    "peak_memory_bytes",
    "model",
    "machine",
    "merge_records",
    "fusion_seconds_plugin_record",
    "fusion_bytes_plugin_record",
    "undo_host_bytes",
    "undo_bytes_per_param",
    "merge_peak_host_bytes",
]


def _plugin_available() -> bool:
    try:
        import aim_ds.plugin  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _plugin_available(), reason="aim_ds.plugin (the lead's module) does not import yet")
@pytest.mark.timeout(300)
def test_gpu_check_cpu_variant(tmp_path):
    env = dict(
        os.environ,
        OUT=str(tmp_path),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        PYTHON=sys.executable,
        TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"),
    )
    cmd = ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu", "--tiny"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads((tmp_path / "gpu_check.json").read_text())
    missing = [k for k in KEYS if k not in d]
    assert not missing, missing
    assert d["machine"]["cuda"] is False and d["preset"] == "tiny" and d["world_size"] == 1
    for k in (
        "step_seconds",
        "probe_step_seconds",
        "fusion_seconds",
        "fusion_bytes_per_second",
        "copy_bytes_per_second",
        "fusion_vs_copy",
        "fusion_over_step",
        "probe_cost",
    ):
        assert isinstance(d[k], float) and math.isfinite(d[k]) and d[k] > 0, (k, d[k])
    assert 0.2 < d["probe_cost"] < 10  # a probe forward costs less than a few training steps
    assert d["probes_seen"] >= 1  # the plugin did probe in phase 2
    # the undo record: theta_k + Adam's two moments in host memory, 12 B per trainable parameter (world 1)
    assert 11.9 < d["undo_bytes_per_param"] < 12.2, d["undo_bytes_per_param"]
    assert d["merge_peak_host_bytes"] == d["plugin_host_bytes"] + d["undo_host_bytes"]
    assert len(d["merge_records"]) == d["merges"] >= 1
    assert all(rec["merged"] for rec in d["merge_records"])
    # scalar policy, one rank: the plugin holds one fp32 copy of the (unpadded) partition = 4 bytes / param
    assert d["plugin_bytes_per_param"] == pytest.approx(4.0, rel=0.01)
    assert d["plugin_bytes"]["device"] + d["plugin_bytes"]["host"] == d["plugin_device_bytes"] + d["plugin_host_bytes"]
    # on a CPU-only machine every tensor lives in host memory; the plugin reports it all as "device" memory
    # (the masters' own device) whatever the anchor setting, since host and device are the same memory
    assert d["plugin_device_bytes"] > 0
    # the fusion touches whole shards: at least 3 fp32 passes (read anchor + theta, write)
    shard_bytes = 4 * d["model"]["params"]
    assert d["fusion_bytes"] >= 3 * shard_bytes  # median bytes of one merge
    assert d["peak_memory_bytes"] is None and d["peak_rss_bytes"] > 0
    # every undo x anchor pair fuses exactly (on the GPU this covers the device<->host copies)
    exact = d["fusion_exactness"]
    assert len(exact) == 7 and exact["all_exact"] is True, exact
