"""Offline parts of aim_ds.checkpoint (no process group): partition layout arithmetic, plugin-state
resharding, tag resolution, CLI errors."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from aim_ds import checkpoint as ckpt
from aim_ds.checkpoint import format as fmt
from aim_ds.checkpoint import layout


def _layout(world, sub_group_size=None):
    params = [("a", [1], 1), ("b", [2], 2), ("c", [3, 1], 3), ("d", [7], 7), ("e", [10, 10], 100), ("f", [33], 33)]
    base = {
        "world_size": 1,
        "sub_group_size": sub_group_size,
        "sub_groups": [
            {"param_group": 0, "partition_count": 1, "params": [[n, s, k, k] for n, s, k in params[:4]]},
            {"param_group": 1, "partition_count": 1, "params": [[n, s, k, k] for n, s, k in params[4:]]},
        ],
    }
    return layout.split_layout(base, world)


@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("size", [None, 4, 40])
def test_scatter_gather_roundtrip(world, size):
    lay = _layout(world, size)
    for g in lay["sub_groups"]:
        for _, s, k, pn in g["params"]:
            assert pn == math.ceil(k / world) and math.prod(s) == k
    gen = torch.Generator().manual_seed(world)
    full = {n: torch.randn(k, generator=gen) for sg in lay["sub_groups"] for n, _, k, _ in sg["params"]}
    shards = layout.scatter(full, lay)
    assert [[t.numel() for t in r] for r in shards] == [layout.flat_sizes(lay)] * world
    back = layout.gather(shards, lay)
    assert all(torch.equal(back[n], full[n]) for n in full)
    if size == 4:  # sub-group boundaries follow DeepSpeed's rule (close a group once it reaches the size)
        for sg in lay["sub_groups"][:-1]:
            assert sum(p[3] for p in sg["params"]) >= 4 or sg["params"][-1][0] in ("d", "f")


def test_reshard_plugin_state_3_to_2():
    old, new = _layout(3, 4), _layout(2, 40)
    gen = torch.Generator().manual_seed(0)
    full = {
        k: {n: torch.randn(x, generator=gen) for sg in old["sub_groups"] for n, _, x, _ in sg["params"]}
        for k in ("anchor", "theta_k", "i_in", "u_out")
    }
    sc = {k: layout.scatter(v, old) for k, v in full.items()}
    states = [
        {
            "enabled": True,
            "config": {"x": 1},
            "task_index": 2,
            "step_in_task": 5,
            "merge_count": 3,
            "rank": r,
            "world_size": 3,
            "controller": {"S": 4} if r == 0 else None,
            "trajectory": [{"step": 1}] if r == 0 else [],
            "probe_position": 10 + r,
            "rehearsal_position": r,
            "anchor": sc["anchor"][r],
            "theta_k": sc["theta_k"][r],
            "ema": {"i_in": sc["i_in"][r], "u_out": sc["u_out"][r]},
        }
        for r in range(3)
    ]
    out = layout.reshard_plugin(states, old, new)
    assert len(out) == 2
    assert out[0]["controller"] == {"S": 4} and out[1]["controller"] is None
    assert out[0]["trajectory"] == [{"step": 1}] and out[1]["trajectory"] == []
    assert [o["rank"] for o in out] == [0, 1] and all(o["world_size"] == 2 for o in out)
    assert all(o["task_index"] == 2 and o["merge_count"] == 3 for o in out)
    for key, path in (
        ("anchor", ("anchor",)),
        ("theta_k", ("theta_k",)),
        ("i_in", ("ema", "i_in")),
        ("u_out", ("ema", "u_out")),
    ):
        back = layout.gather([layout.get_path(o, path) for o in out], new)
        assert all(torch.equal(back[n], full[key][n]) for n in back), key
    assert states[0]["ema"]["i_in"] is sc["i_in"][0]  # inputs untouched


def test_unknown_tensor_entry_refused():
    with pytest.raises(ckpt.CheckpointError, match="does not know how to reshard"):
        list(layout.shard_lists({"anchor": [torch.zeros(1)], "odd": torch.zeros(3)}, 1))


def test_find_latest_and_tags(tmp_path):
    assert ckpt.find_latest(str(tmp_path / "none")) is None
    assert ckpt.find_latest(str(tmp_path)) is None
    for i, t in enumerate(["x", "y"]):
        (tmp_path / t).mkdir()
        (tmp_path / t / ckpt.MANIFEST).write_text(json.dumps({"format": ckpt.FORMAT, "saved_at_ns": i}))
    (tmp_path / ".tmp-z").mkdir()
    assert ckpt.complete_tags(str(tmp_path)) == ["x", "y"]
    assert ckpt.find_latest(str(tmp_path)) == "y"  # no `latest`: the newest complete tag
    (tmp_path / "latest").write_text("x")
    assert ckpt.find_latest(str(tmp_path)) == "x"
    (tmp_path / "latest").write_text("z")
    with pytest.raises(ckpt.CheckpointError, match="names tag 'z'.*Complete tags there"):
        ckpt.find_latest(str(tmp_path))
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.resolve_tag(str(tmp_path / "none"), None)


@pytest.mark.parametrize("tag", ["", ".tmp-a", "a/b", "latest"])
def test_bad_tags(tag):
    with pytest.raises(ckpt.CheckpointError):
        fmt.check_tag(tag)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from aim_ds.tools import cli

    assert cli.main(["convert", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    assert cli.main(["reshard", str(tmp_path), str(tmp_path / "busy"), "--world-size", "2"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli.main(["reshard", str(tmp_path), str(tmp_path / "o"), "--world-size", "0"]) == 2
    assert not os.path.exists(tmp_path / "o")


def test_resolve_resume(tmp_path):
    assert ckpt.resolve_resume(None, str(tmp_path)) is None
    assert ckpt.resolve_resume("auto", str(tmp_path / "ckpt")) is None  # nothing yet: start fresh
    (tmp_path / "ckpt" / "t1").mkdir(parents=True)
    (tmp_path / "ckpt" / "t1" / ckpt.MANIFEST).write_text(json.dumps({"format": ckpt.FORMAT}))
    (tmp_path / "ckpt" / "latest").write_text("t1")
    d = str(tmp_path / "ckpt")
    assert ckpt.resolve_resume("auto", d) == (d, "t1")
    assert ckpt.resolve_resume(d, "unused") == (d, "t1")
    assert ckpt.resolve_resume(os.path.join(d, "t1"), "unused") == (d, "t1")
    with pytest.raises(ckpt.CheckpointError, match="no such directory"):
        ckpt.resolve_resume(str(tmp_path / "missing"), d)
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "ckpt" / "t1" / ".." / ".."), d)


def test_rng_state_roundtrip():
    import random

    import numpy as np

    s = ckpt.rng_state()
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt.set_rng_state(s)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a


def test_check_output_dir(tmp_path):
    from aim_ds.fileio import OutputDirError, check_output_dir

    check_output_dir(str(tmp_path / "new"))  # missing: fine, and not created
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    check_output_dir(str(tmp_path / "empty"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    with pytest.raises(OutputDirError) as e:
        check_output_dir(str(tmp_path / "busy"), fix="pass --overwrite")
    assert str(e.value) == f"{tmp_path / 'busy'} exists and is not empty; pass --overwrite (nothing was written)"
    assert isinstance(e.value, ValueError)
    check_output_dir(str(tmp_path / "busy"), overwrite=True)
    with pytest.raises(OutputDirError, match="is not a folder"):
        check_output_dir(str(tmp_path / "busy" / "f"), overwrite=True)


def test_diff_config():
    assert ckpt.diff_config({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == [
        "b: checkpoint 2, now 3",
        "c: checkpoint None, now 4",
    ]
    assert ckpt.diff_config(None, None) == []


def test_resave_of_the_latest_tag_swaps_atomically(tmp_path, monkeypatch):
    """Re-saving the tag `latest` names: the new version replaces the old in one atomic exchange, so no
    moment exists where `latest` names a missing tag (a crash there used to leave no loadable checkpoint)."""
    from aim_ds.checkpoint import runtime
    from aim_ds.fileio import exchange_paths

    for name, text in (("t", "old"), (".tmp-t", "new")):
        (tmp_path / name).mkdir()
        (tmp_path / name / ckpt.MANIFEST).write_text(json.dumps({"format": ckpt.FORMAT, "v": text}))
    (tmp_path / "latest").write_text("t")
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").mkdir()
    if not exchange_paths(str(tmp_path / "a"), str(tmp_path / "b")):
        pytest.skip("this file system cannot swap two paths atomically (the two-rename fallback is used)")
    assert (tmp_path / "a").is_dir() and (tmp_path / "b").read_text() == "a"

    def no_rename(*a):
        raise AssertionError("two renames: a window without the tag")

    monkeypatch.setattr(runtime.os, "rename", no_rename)
    runtime._commit(str(tmp_path), "t", keep_last=None)
    monkeypatch.undo()
    assert json.loads((tmp_path / "t" / ckpt.MANIFEST).read_text())["v"] == "new"
    assert ckpt.find_latest(str(tmp_path)) == "t"
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == []
