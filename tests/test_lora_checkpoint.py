"""aim-ds convert of a LoRA run's checkpoint (issue 29, item 2) at ZeRO stages 0-3 and after aim-ds reshard:
the frozen base weights are taken from where DeepSpeed keeps them at that stage, or convert refuses."""

from __future__ import annotations

import pytest
import torch

from tests.mp import run_ranks

TIMEOUT = 300


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_lora_checkpoint_converts_to_peft_merge(tmp_path, stage):
    from safetensors.torch import load_file

    from aim_ds.tools import cli

    ckpt, ref = tmp_path / "ckpt", tmp_path / "ref.pt"
    run_ranks(
        "tests.scenarios_faults:lora_checkpoint",
        2,
        tmp_path,
        TIMEOUT,
        ckpt_dir=str(ckpt),
        stage=stage,
        ref_path=str(ref),
    )
    expected = torch.load(ref)
    sources = [ckpt]
    if stage == 3:  # a resharded (universal) checkpoint holds only the optimizer's parameters in its fragments
        assert cli.main(["reshard", str(ckpt), str(tmp_path / "r1"), "--world-size", "1"]) == 0
        sources.append(tmp_path / "r1")
    for src in sources:
        out = tmp_path / f"conv-{src.name}"
        assert cli.main(["convert", str(src), str(out)]) == 0, src
        got = load_file(str(out / "model.safetensors"))
        assert set(got) == set(expected), (src, sorted(set(got) ^ set(expected)))
        for k, v in expected.items():
            assert torch.allclose(got[k].float(), v, rtol=1e-5, atol=1e-6), (src, k)
