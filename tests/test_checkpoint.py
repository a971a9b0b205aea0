"""Checkpoints: atomic save/load with the plugin, crash during save, keep-last, bad inputs on every rank,
conversion to a Hugging Face folder (model and anchor), and 2 -> 1 -> 2 resharding.

Three multi-rank launches (2, 1, 2 CPU ranks) share one module-scoped work directory; the offline tools
(convert, reshard) run in the pytest process between them.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.mp import run_ranks

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def saved(work):
    return run_ranks("tests.ckpt_scenarios:save_resume", 2, work, timeout=400, work=str(work))


def test_save_load_resume_bit_identical(saved):
    for r, res in enumerate(saved):
        assert res["loaded_state_equal"] and res["loaded_anchor_equal"], res
        assert res["loaded_weights_diff"] == 0.0, res
        assert res["resumed_weights_diff"] == 0.0, res
        assert res["resumed_state_equal"] and res["resumed_anchor_equal"], res
        assert res["client"] == {"rank": r, "note": "x"}, res
        assert res["global_steps"][0] == res["global_steps"][1] and res["lr"][0] == res["lr"][1], res
        assert res["task_index"] == 1 and res["merges"] >= 2, res
        assert res["anchor_gather_vs_after_merge"] == 0.0, res


def test_crash_during_save_keeps_previous(saved):
    for res in saved:
        assert res["crashed"] and res["latest_after_crash"] == "a" and res["found"] == "a", res
        assert res["tmp_b_complete"], res
        assert res["extra"] == {"task": 1, "step": 4}, res  # the crash happened after every file was written


def test_keep_last(saved):
    res = saved[0]
    assert res["tags_after_keep"] == ["c", "d"], res
    assert [n for n in res["dir_after_keep"] if n.startswith(".")] == [], res


@pytest.mark.parametrize(
    "case,words",
    [
        ("missing_rank_file", ["aim_plugin_rank00001_of_00002.pt", "missing"]),
        ("truncated", ["optim_states.pt", "truncated"]),
        ("dangling_latest", ["latest", "global_step999", "Complete tags"]),
        ("missing_tag", ["'nope'", "does not exist"]),
        ("task_fingerprint", ["task sequence", "tasks-v2"]),
        ("aim_config", ["aim_merging", "initial_interval"]),
        ("other_model", ["another model", "mlp", "[32, 70]"]),
    ],
)
def test_bad_input_errors_on_every_rank(saved, case, words):
    msgs = [res["errors"][case] for res in saved]
    for m in msgs:
        assert m is not None, (case, msgs)
        for w in words:
            assert w in m, (case, w, m)
    assert all(isinstance(res["errors"]["_still_alive"], float) for res in saved)


def test_convert_model_and_anchor(saved, work):
    from transformers import AutoModelForCausalLM

    from aim_ds.tools import cli

    ref = torch.load(work / "ref_two.pt", weights_only=False)
    out = work / "hf_model"
    assert cli.main(["convert", str(work / "two"), str(out)]) == 0
    m = AutoModelForCausalLM.from_pretrained(out)
    sd = {k: v.float() for k, v in m.state_dict().items()}
    assert sd.keys() == ref["model"].keys()
    assert max((sd[k] - ref["model"][k]).abs().max().item() for k in sd) == 0.0
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)("w3 w5")["input_ids"] == [5, 7]  # saved with the checkpoint
    outa = work / "hf_anchor"
    tok_dir = work / "tok"
    AutoTokenizer.from_pretrained(out).save_pretrained(tok_dir)
    assert (
        cli.main(
            [
                "convert",
                str(work / "two"),
                str(outa),
                "--tag",
                "a",
                "--what",
                "anchor",
                "--tokenizer",
                str(tok_dir),
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    assert (outa / "tokenizer.json").exists()
    ma = AutoModelForCausalLM.from_pretrained(outa)
    sa = {k: v.float() for k, v in ma.state_dict().items()}
    assert max((sa[k] - ref["anchor"][k]).abs().max().item() for k in sa) == 0.0
    assert max((sa[k] - ref["model"][k]).abs().max().item() for k in sa) > 0  # anchor is not the live weights
    # refuses an existing non-empty output dir, a missing tag; leaves nothing behind
    assert cli.main(["convert", str(work / "two"), str(out)]) == 2
    assert cli.main(["convert", str(work / "two"), str(work / "x"), "--tag", "zz"]) == 2
    assert not (work / "x").exists()
    assert [n for n in os.listdir(work) if n.startswith(".tmp-")] == []


def test_reshard_2_1_2(saved, work):
    from aim_ds.tools import cli

    assert cli.main(["reshard", str(work / "two"), str(work / "r1"), "--world-size", "1"]) == 0
    one = run_ranks(
        "tests.ckpt_scenarios:reshard_leg",
        1,
        work,
        timeout=300,
        work=str(work),
        src=str(work / "r1"),
        out=str(work / "one"),
        expect_world_error=str(work / "two"),
        ref=str(work / "ref_two.pt"),
        save_ref=str(work / "ref_one.pt"),
    )[0]
    assert "aim-ds reshard" in one["world_error"] and "2 ranks" in one["world_error"], one
    assert one["weights_diff"] == 0.0 and one["anchor_diff"] == 0.0, one
    assert one["controller_equal"] and one["trajectory_equal"] and one["scalars_equal"], one
    assert one["layout_matches"] and one["finite"], one
    assert cli.main(["reshard", str(work / "one"), str(work / "r2"), "--world-size", "2"]) == 0
    two = run_ranks(
        "tests.ckpt_scenarios:reshard_leg",
        2,
        work,
        timeout=300,
        work=str(work),
        src=str(work / "r2"),
        out=None,
        ref=str(work / "ref_one.pt"),
    )
    for res in two:
        assert res["weights_diff"] == 0.0 and res["anchor_diff"] == 0.0, res
        assert res["scalars_equal"] and res["layout_matches"] and res["finite"], res
    assert two[0]["controller_equal"] and two[0]["trajectory_equal"], two[0]
