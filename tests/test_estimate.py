"""aim-ds estimate-memory: ZeRO-3 numbers are DeepSpeed's own, plugin bytes follow the formula, bad input fails clearly."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from aim_ds.tools import cli
from aim_ds.tools.estimate import EstimateError, count_params, estimate, load_model_config
from tests.mp import aim_ds_cmd

stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")

REPO = Path(__file__).resolve().parents[1]
TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}

# (params, largest layer, world, nodes)
SETTINGS = [(13e9, 164e6, 8, 1), (13e9, 164e6, 16, 2), (7e9, 131e6, 4, 1), (1.1e9, 0, 1, 1), (70e9, 1.05e9, 64, 8)]
OFFLOADS = {"none": (False, False), "optimizer": (True, False), "both": (True, True)}


@pytest.mark.parametrize("params,largest,world,nodes", SETTINGS)
@pytest.mark.parametrize("offload", list(OFFLOADS))
@pytest.mark.parametrize("zero_init", [True, False])
def test_zero_numbers_are_deepspeeds(params, largest, world, nodes, offload, zero_init):
    e = estimate(params, world, nodes=nodes, offload=offload, largest_layer_params=largest, zero_init=zero_init)
    cpu, gpu, _ = stage3.estimate_zero3_model_states_mem_needs(
        total_params=int(params),
        largest_layer_params=int(largest),
        num_gpus_per_node=world // nodes,
        num_nodes=nodes,
        cpu_offload=OFFLOADS[offload][0],
        cpu_offload_params=OFFLOADS[offload][1],
        zero_init=zero_init,
        additional_buffer_factor=1.5,
    )
    assert (e.zero_host_bytes_per_node, e.zero_gpu_bytes) == (int(cpu), int(gpu))
    assert e.source == "deepspeed"


def test_matches_deepspeed_printed_table():
    """The public all_cold estimator prints GB per CPU / per GPU for each option: same numbers to 0.01 GB."""
    params, largest, world, nodes = 13e9, 164e6, 8, 1
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        stage3.estimate_zero3_model_states_mem_needs_all_cold(
            int(params), int(largest), num_gpus_per_node=world, num_nodes=nodes
        )
    rows = re.findall(
        r"([\d.]+)GB \|\s+([\d.]+)GB \| offload_param=(?:OffloadDeviceEnum\.)?(\w+)\s*, "
        r"offload_optimizer=(?:OffloadDeviceEnum\.)?(\w+)\s*, zero_init=(\d)",
        buf.getvalue(),
    )
    assert len(rows) == 6, buf.getvalue()
    for cpu_gb, gpu_gb, off_param, off_opt, zi in rows:
        offload = {("cpu", "cpu"): "both", ("none", "cpu"): "optimizer", ("none", "none"): "none"}[(off_param, off_opt)]
        e = estimate(params, world, nodes=nodes, offload=offload, largest_layer_params=largest, zero_init=zi == "1")
        assert f"{e.zero_host_bytes_per_node / 2**30:.2f}" == cpu_gb
        assert f"{e.zero_gpu_bytes / 2**30:.2f}" == gpu_gb


def test_param_only_offload_is_derived_from_deepspeeds_decomposition():
    p, L, n = 13e9, 164e6, 8
    none = estimate(p, n, offload="none", largest_layer_params=L)
    opt = estimate(p, n, offload="optimizer", largest_layer_params=L)
    both = estimate(p, n, offload="both", largest_layer_params=L)
    par = estimate(p, n, offload="param", largest_layer_params=L)
    assert par.source == "derived"
    # the parameter bytes (none - optimizer on the GPU) leave the GPU; the host gets both - optimizer
    assert abs(par.zero_gpu_bytes - (none.zero_gpu_bytes - (opt.zero_gpu_bytes - both.zero_gpu_bytes))) <= 2
    assert abs(par.zero_host_bytes_per_node - (both.zero_host_bytes_per_node - opt.zero_host_bytes_per_node)) <= 2


@pytest.mark.parametrize("world,nodes", [(1, 1), (2, 1), (3, 1), (8, 1), (16, 2)])
@pytest.mark.parametrize("offload", ["none", "optimizer", "param", "both"])
@pytest.mark.parametrize("anchor", ["device", "host"])
@pytest.mark.parametrize("policy,per_param", [("scalar", 4), ("importance", 24)])
def test_plugin_bytes_formula(world, nodes, offload, anchor, policy, per_param):
    p = 13e9
    e = estimate(p, world, nodes=nodes, offload=offload, anchor=anchor, policy=policy)
    assert e.plugin_bytes_per_rank == int(per_param * p / world)
    on_host = anchor == "host" or offload in ("optimizer", "both")  # buffers sit next to the fp32 masters
    g = world // nodes
    if on_host:
        assert (e.plugin_gpu_bytes, e.plugin_host_bytes_per_node) == (0, e.plugin_bytes_per_rank * g)
    else:
        assert (e.plugin_gpu_bytes, e.plugin_host_bytes_per_node) == (e.plugin_bytes_per_rank, 0)
    assert e.with_plugin_gpu_bytes == e.zero_gpu_bytes + e.plugin_gpu_bytes
    assert e.with_plugin_host_bytes_per_node == e.zero_host_bytes_per_node + e.plugin_host_bytes_per_node
    assert e.to_dict()["plugin_bytes_per_param_per_rank"] == per_param / world


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("offload", ["none", "optimizer"])
@pytest.mark.parametrize("undo", ["host", "nvme", "off"])
def test_undo_record_counted_per_rank_and_node(stage, offload, undo):
    # the undo record (theta_k + Adam's moments, fp32) at its merge-time peak: 12 P / N per rank, with or
    # without offload; host memory with undo "host", disk with "nvme", nothing with "off"
    p, world = 13e9, 8
    e = estimate(p, world, offload=offload, stage=stage, undo=undo)
    per_rank = 0 if undo == "off" else int(12 * p / world)
    assert e.undo_bytes_per_rank == per_rank
    assert e.undo_host_bytes_per_node == (per_rank * world if undo == "host" else 0)
    assert e.undo_disk_bytes_per_node == (per_rank * world if undo == "nvme" else 0)
    assert e.merge_peak_host_bytes_per_node == e.with_plugin_host_bytes_per_node + e.undo_host_bytes_per_node
    d = e.to_dict()
    assert d["undo"] == undo and d["merge_peak_host_bytes_per_node"] == e.merge_peak_host_bytes_per_node
    if undo == "host":  # the figure: 19.5 GB per rank, 156 GB per node for 13B on 8 GPUs
        assert (e.undo_bytes_per_rank, e.undo_host_bytes_per_node) == (19_500_000_000, 156_000_000_000)


def test_cli_shows_the_undo_record():
    rc, out, _ = _cli(["estimate-memory", "--params", "13e9", "--world-size", "8", "--offload", "optimizer"])
    assert rc == 0 and "per node (host), in a merge" in out and "undo record (host memory" in out
    rc, out, _ = _cli(["estimate-memory", "--params", "13e9", "--world-size", "8", "--undo", "nvme", "--json"])
    d = json.loads(out)
    assert d["undo_host_bytes_per_node"] == 0 and d["undo_disk_bytes_per_node"] == 156_000_000_000


@pytest.mark.parametrize(
    "kwargs,word",
    [
        (dict(total_params=13e9, world_size=8, undo="disk"), "undo"),
        (dict(total_params=-1, world_size=8), "params"),
        (dict(total_params=0, world_size=8), "params"),
        (dict(total_params=float("nan"), world_size=8), "params"),
        (dict(total_params=13e9, world_size=0), "world_size"),
        (dict(total_params=13e9, world_size=-8), "world_size"),
        (dict(total_params=13e9, world_size=8, nodes=3), "nodes"),
        (dict(total_params=13e9, world_size=8, nodes=0), "nodes"),
        (dict(total_params=13e9, world_size=8, offload="nvme"), "offload"),
        (dict(total_params=13e9, world_size=8, anchor="disk"), "anchor"),
        (dict(total_params=13e9, world_size=8, policy="mask"), "policy"),
        (dict(total_params=1e6, world_size=8, largest_layer_params=2e6), "largest_layer_params"),
    ],
)
def test_bad_input_one_clear_error(kwargs, word):
    with pytest.raises(EstimateError, match=rf"^{word}=.* is invalid: expected "):
        estimate(**kwargs)


def _cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    "argv,word",
    [
        (["--params", "-5", "--world-size", "8"], "params"),
        (["--params", "13e9", "--world-size", "0"], "world_size"),
        (["--params", "13e9", "--world-size", "8", "--nodes", "3"], "nodes"),
    ],
)
def test_cli_bad_input_is_one_line(argv, word):
    rc, out, err = _cli(["estimate-memory", *argv])
    assert rc == 2 and out == ""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"aim-ds estimate-memory: error: {word}="), err
    assert "Traceback" not in err


def test_cli_json_and_table():
    rc, out, _ = _cli(
        [
            "estimate-memory",
            "--params",
            "13e9",
            "--world-size",
            "8",
            "--offload",
            "both",
            "--anchor",
            "host",
            "--largest-layer-params",
            "164e6",
            "--json",
        ]
    )
    assert rc == 0
    d = json.loads(out)
    assert d["total_params"] == 13_000_000_000 and d["world_size"] == 8 and d["plugin_gpu_bytes"] == 0
    assert d["plugin_host_bytes_per_node"] == int(4 * 13e9 / 8) * 8
    rc, out, _ = _cli(["estimate-memory", "--params", "13e9", "--world-size", "8"])
    assert rc == 0 and "per GPU (device)" in out and "per node (host memory)" in out and "Largest layer" in out


def test_model_config_counts_like_deepspeed(tmp_path):
    """Meta-device count == deepspeed's model_to_params on the materialised model (tied embeddings once)."""
    from transformers import AutoModelForCausalLM

    for tie in (True, False):
        f = tmp_path / f"cfg{tie}.json"
        f.write_text(json.dumps({**TINY_LLAMA, "tie_word_embeddings": tie}))
        cfg = load_model_config(str(f))
        assert count_params(cfg) == stage3.model_to_params(AutoModelForCausalLM.from_config(cfg))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA))
    rc, out, _ = _cli(["estimate-memory", "--model-config", str(folder), "--world-size", "2", "--json"])
    assert rc == 0
    d = json.loads(out)
    assert (d["total_params"], d["largest_layer_params"]) == count_params(load_model_config(str(f)))


@pytest.mark.parametrize(
    "content,word",
    [(None, "does not exist"), ("{not json", "not readable JSON"), (json.dumps({"hidden_size": 8}), "model_type")],
)
def test_model_config_bad(tmp_path, content, word):
    f = tmp_path / "c.json"
    if content is not None:
        f.write_text(content)
    rc, out, err = _cli(["estimate-memory", "--model-config", str(f), "--world-size", "2"])
    assert rc == 2 and word in err and "Traceback" not in err


def test_console_script_entry_point():
    """`aim-ds` is installed from pyproject's [project.scripts]; run it as a user would (where the install is older
    than the checkout, its declared entry point run the way the script runs it: tests.mp.aim_ds_cmd)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run(
        aim_ds_cmd("estimate-memory", "--params", "1e9", "--world-size", "2", "--json"),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["plugin_bytes_per_rank"] == 2_000_000_000


def test_registry_is_the_only_place_to_add_a_command():
    assert cli.SUBCOMMANDS["estimate-memory"] == "aim_ds.tools.estimate"
    rc, out, _ = _cli(["--help"])
    assert rc == 0 and "estimate-memory" in out


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("offload", ["none", "optimizer"])
@pytest.mark.parametrize("params,largest,world,nodes", SETTINGS[:3])
def test_zero12_numbers_are_deepspeeds(stage, offload, params, largest, world, nodes):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    e = estimate(params, world, nodes=nodes, offload=offload, largest_layer_params=largest, stage=stage)
    cpu, gpu = estimate_zero2_model_states_mem_needs(
        int(params),
        num_gpus_per_node=world // nodes,
        num_nodes=nodes,
        cpu_offload=offload == "optimizer",
        additional_buffer_factor=1.5,
    )
    assert (e.stage, e.zero_host_bytes_per_node, e.zero_gpu_bytes, e.source) == (stage, int(cpu), int(gpu), "deepspeed")
    assert e.plugin_bytes_per_rank == int(4 * params / world)  # the plugin's buffer is the same at every stage
    assert e.plugin_location == ("host" if offload == "optimizer" else "device")


def test_stage_option_and_its_errors():
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["estimate-memory", "--params", "7e9", "--world-size", "4", "--stage", "2", "--json"]) == 0
    d = json.loads(buf.getvalue())
    assert d["stage"] == 2 and d["zero_gpu_bytes"] == 2 * 7_000_000_000 + int(18 * 7e9 / 4)
    with pytest.raises(EstimateError, match="parameter offload needs stage 3"):
        estimate(7e9, 4, offload="param", stage=2)
    with pytest.raises(EstimateError, match="stage"):
        estimate(7e9, 4, stage=0)


@pytest.mark.parametrize("stages,world,offload", [(2, 8, "none"), (4, 16, "none"), (4, 16, "optimizer")])
def test_pipeline_rows_are_the_heaviest_stage_cut_over_its_data_parallel_ranks(stages, world, offload):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as ds

    held = 4e9
    e = estimate(13e9, world, stage=1, offload=offload, pipeline_parallel_size=stages, stage_params=held)
    dp = world // stages
    assert e.stage_params == held and e.pipeline_parallel_size == stages
    assert e.zero_gpu_bytes == ds(int(held), num_gpus_per_node=dp, num_nodes=1, cpu_offload=offload != "none")[1]
    assert e.zero_host_bytes_per_node == ds(int(held), world, 1, cpu_offload=offload != "none")[0]
    assert e.plugin_bytes_per_rank == int(4 * held / dp) and e.undo_bytes_per_rank == int(12 * held / dp)
    even = estimate(13e9, world, stage=1, pipeline_parallel_size=stages)  # no stage count given: an even split
    assert even.stage_params == -(-int(13e9) // stages)


def test_pipeline_stage_params_split_the_layers_as_deepspeed_does(tmp_path):
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps({**TINY_LLAMA, "tie_word_embeddings": True}))
    from aim_ds.tools.estimate import heaviest_stage_params

    cfg = load_model_config(str(f))
    embed = 1000 * 64
    layer = 4 * 64 * 64 + 3 * 64 * 128 + 2 * 64  # attention, MLP, two norms
    # 2 stages: embedding + layer 0 | layer 1 + norm + the tied head (the embedding again)
    assert heaviest_stage_params(cfg, 2) == max(embed + layer, layer + 64 + embed)
    rc, out, _ = _cli(
        ["estimate-memory", "--model-config", str(f), "--world-size", "4", "--stage", "1"]
        + ["--pipeline-parallel-size", "2", "--json"]
    )
    assert rc == 0 and json.loads(out)["stage_params"] == heaviest_stage_params(cfg, 2)


@pytest.mark.parametrize(
    "kwargs,word",
    [
        (dict(stage=3, pipeline_parallel_size=2), "stage=3"),
        (dict(stage=1, pipeline_parallel_size=3), "divisor of world_size=8"),
        (dict(stage=1, pipeline_parallel_size=0), "pipeline_parallel_size=0"),
    ],
)
def test_pipeline_bad_input(kwargs, word):
    with pytest.raises(EstimateError, match=re.escape(word)):
        estimate(13e9, 8, **kwargs)
