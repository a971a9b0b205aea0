"""Checkpoint durability (issue 29, item 3) on real DeepSpeed engines (2 CPU ranks, gloo): every file and folder
of a saved tag is fsynced whatever DeepSpeed names it (stage 1-2's mp_rank_00_model_states.pt, tensor-parallel
names); a commit interrupted between the two renames of the no-renameat2 path (NFS) is recovered."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.mp import run_ranks

TIMEOUT = 300


@pytest.mark.parametrize("stage,tp", [(1, 1), (3, 1), (1, 2)])
def test_every_file_and_folder_of_a_tag_is_fsynced(tmp_path, stage, tp):
    ckpt = tmp_path / "ckpt"
    res = run_ranks(
        "tests.scenarios_faults:save_records_fsync", 2, tmp_path, TIMEOUT, ckpt_dir=str(ckpt), stage=stage, tp=tp
    )
    synced = {p.replace(".tmp-t", "t", 1) for r in res for p in r["synced"]}  # written under .tmp-t, then renamed
    tag = ckpt / "t"
    files = {str(p.relative_to(ckpt)) for p in tag.rglob("*") if p.is_file()}
    folders = {str(p.relative_to(ckpt)) for p in [tag, *tag.rglob("*")] if p.is_dir()}
    assert files - synced == set(), sorted(files - synced)  # a power loss could truncate these
    assert folders - synced == set(), sorted(folders - synced)  # ... or lose these folders' entries
    assert "." in synced  # the rename of .tmp-t to t, and `latest`


def _interrupted_commit(ckpt, roll_forward: bool):
    """The state a crash leaves between the two renames of _commit's fallback (no renameat2 exchange): TAG moved
    aside to .del-TAG-N, the new version still at .tmp-TAG (complete: its manifest is written), `latest` = TAG."""
    tag = ckpt / "t"
    if roll_forward:
        shutil.copytree(tag, ckpt / ".tmp-t")
        m = json.loads((ckpt / ".tmp-t" / "aim_manifest.json").read_text())
        m["extra"] = {"version": "new"}
        (ckpt / ".tmp-t" / "aim_manifest.json").write_text(json.dumps(m))
    os.rename(tag, ckpt / ".del-t-123")
    assert (ckpt / "latest").read_text().strip() == "t"


def test_commit_interrupted_between_renames_is_recovered(tmp_path):
    from aim_ds.checkpoint import find_latest, model_state_dict, read_manifest

    saved = tmp_path / "saved"
    run_ranks("tests.scenarios_faults:save_records_fsync", 2, tmp_path, TIMEOUT, ckpt_dir=str(saved), stage=1)
    before = model_state_dict(str(saved))
    for roll_forward in (False, True):
        ckpt = tmp_path / f"ckpt-{roll_forward}"
        shutil.copytree(saved, ckpt)
        _interrupted_commit(ckpt, roll_forward)
        assert find_latest(str(ckpt)) == "t", roll_forward
        assert read_manifest(str(ckpt))["extra"] == ({"version": "new"} if roll_forward else None)
        after = model_state_dict(str(ckpt))
        assert after.keys() == before.keys() and all((after[k] == before[k]).all() for k in before)
        assert not (ckpt / (".tmp-t" if roll_forward else ".del-t-123")).exists()  # moved into place
