"""aim_ds.hf with a real HF Trainer, Accelerate and peft over real DeepSpeed ZeRO-3 on 2 CPU ranks.
Several checks share one launch (each launch pays ~15 s of imports per rank)."""

import pytest

from tests.mp import run_ranks

pytest.importorskip("peft")
TIMEOUT = 600


def test_contract_three_tasks_and_lora_trainer(tmp_path):
    r0, r1 = run_ranks("tests.scenarios_hf:contract_and_lora", 2, tmp_path, TIMEOUT, tmp=str(tmp_path))
    c = r0["contract"]
    assert c["tasks"] == [0, 1, 2] and c["csv"]
    assert c["merges_by_task"][0] == 0 and c["merges_by_task"][1] >= 1 and c["merges_by_task"][2] >= 1, c
    assert r1["contract"]["rows"] == 0  # the trajectory lives on rank 0
    assert c["digest"] == r1["contract"]["digest"]  # ranks agree on the weights
    assert len(c["fusion_err"]) == sum(c["merges_by_task"])
    assert max(c["fusion_err"]) < 1e-6 and min(c["moved"]) > 1e-4, c  # fusion as the gathered reference
    assert all(r == taken for r, taken in c["rehearsal"]), c["rehearsal"]
    assert c["work"]["probe_forwards"] > 0  # probe_source memory_forward: the plugin's own probe forwards
    lo = r0["lora"]
    assert lo["merges"] >= 1 and max(lo["fusion_err"]) < 1e-6 and min(lo["moved"]) > 1e-4, lo
    assert lo["base_compared"] == lo["base_total"] and lo["base_max_abs"] == 0.0, (
        lo
    )  # frozen base weights bit-unchanged
    # plugin memory: 4 bytes per TRAINABLE parameter / N (one fp32 anchor shard, padding included)
    assert lo["held"]["device"] == 4 * lo["local_numel"]
    assert lo["valid_numel"] + r1["lora"]["valid_numel"] == lo["trainable"] < 5000, lo


def test_replay_collator_gas2_and_disabled_identical(tmp_path):
    r0, r1 = run_ranks("tests.scenarios_hf:replay_and_disabled", 2, tmp_path, TIMEOUT, tmp=str(tmp_path))
    rp = r0["replay"]
    assert rp["merges"] and rp["rehearsal"], rp
    # gradient accumulation 2 under Accelerate: each rehearsal is exactly R optimizer steps, not R x 2
    assert all(r == taken for r, taken in rp["rehearsal"]), rp["rehearsal"]
    assert rp["probe_rows_task1"] == rp["rows_task1"] > 0  # the forgetting signal read off the mixed rows
    assert max(rp["fusion_err"]) < 1e-6
    # at a merge step the Trainer logs the training step's gradient norm, not the rehearsal's (which differs),
    # and after the merge the engine reports the training step's again
    for logged, before, after, rehearsal in rp["norms"]:
        assert logged == pytest.approx(before, rel=1e-6) and after == before, rp["norms"]
        assert rehearsal != pytest.approx(before, rel=1e-3), rp["norms"]
    assert len(rp["norms"]) == len(rp["merges"])
    d = r0["disabled"]
    assert d["with"] == d["without"] == r1["disabled"]["with"]


def test_raw_lora_without_task_type_and_accelerate_loop(tmp_path):
    r0, r1 = run_ranks("tests.scenarios_hf:raw_lora_and_accelerate", 2, tmp_path, TIMEOUT, tmp=str(tmp_path))
    lo = r0["raw_lora"]
    assert lo["fusion_err"] < 1e-6 and lo["moved"] > 1e-4 and lo["base_max_abs"] == 0.0, lo
    assert lo["held"]["device"] == 4 * lo["local_numel"]
    assert lo["valid_numel"] + r1["raw_lora"]["valid_numel"] == lo["trainable"]
    acc = r0["accelerate"]
    assert acc["task1_steps"] == 6, acc  # one optimizer step per accumulation window
    assert acc["explicit_r"] == acc["explicit_steps"] == 3, acc


def test_trainer_checkpoint_resume_mid_task(tmp_path):
    r0, r1 = run_ranks("tests.scenarios_hf:resume", 2, tmp_path, TIMEOUT, tmp=str(tmp_path))
    assert r0["merges"] >= 1, r0["traj_a"]
    assert "checkpoint-3" in r0["saved"]
    assert r0["files"] == ["aim_plugin_rank00000_of_00002.pt", "aim_plugin_rank00001_of_00002.pt"]
    assert r0["resumed"] == r0["full"] == r1["resumed"]
    assert r0["traj_b"] == r0["traj_a"]


def test_bad_input_one_error_on_every_rank(tmp_path):
    res = run_ranks("tests.scenarios_hf:bad_inputs", 2, tmp_path, TIMEOUT, tmp=str(tmp_path))
    assert res[0]["stage2"]["merges"] >= 1, res[0]["stage2"]
    for r in res:
        assert r["no_memory_task1"]["type"] == "AimInputError" and "no memory" in r["no_memory_task1"]["message"]
        assert r["stage2"]["type"] is None, r["stage2"]  # served since the ZeRO-1/2 adapters
        assert r["no_trainable"]["type"] == "AimInputError" and "no trainable" in r["no_trainable"]["message"], r


def test_input_consumer_follows_pass_through_wrappers_only():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from aim_ds.experiment.evaluation import keeps_logits
    from aim_ds.plugin.memory import input_consumer as _input_consumer
    from tests.scenarios import tiny_config

    base = LlamaForCausalLM(tiny_config())
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))  # no task_type: (*args, **kwargs)
    assert type(peft_model).__name__ == "PeftModel"
    assert _input_consumer(peft_model) is base
    assert _input_consumer(base) is base
    # the causal-LM wrapper names input_ids etc. but hands logits_to_keep on to the base model: followed too
    causal = get_peft_model(
        LlamaForCausalLM(tiny_config()), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    )
    assert type(causal).__name__ == "PeftModelForCausalLM"
    assert isinstance(_input_consumer(causal), LlamaForCausalLM) and keeps_logits(causal)
    ids = torch.randint(0, 50, (2, 7))
    keep = torch.tensor([5, 6])
    assert causal(input_ids=ids, logits_to_keep=keep).logits.shape[1] == 2  # really applied, not swallowed

    class Swallows(torch.nn.Module):  # takes anything, calls nothing we can follow: stays the one checked
        def forward(self, **kwargs):
            return None

    m = Swallows()
    assert _input_consumer(m) is m


def test_trl_sft_trainer_with_the_callback(tmp_path):
    pytest.importorskip("trl")
    r0, _ = run_ranks("tests.scenarios_hf:trl_sft", 2, tmp_path, TIMEOUT, tmp=str(tmp_path))
    assert r0["merges"][0] == 0 and r0["merges"][1] >= 1 and r0["probe_forwards"] > 0, r0
