"""aim_ds.hf's mixed replay and fault paths (issue 29 item 5, issue 25) with a real HF Trainer and TRL's
SFTTrainer over real DeepSpeed ZeRO-3 on 2 CPU ranks; several checks share one launch."""

import pytest

from tests.mp import run_ranks

TIMEOUT = 600


def test_replay_draws_seeded_differ_and_resume_exactly(tmp_path):
    from aim_ds.data.batching import seeded_stream

    res = run_ranks("tests.scenarios_hf_replay:replay_draws_and_resume", 2, tmp_path, TIMEOUT, tmp=str(tmp_path))
    for rank, r in enumerate(res):
        draws = r["draws"]  # task 1: 96 rows / (4 per rank x 2 ranks) = 12 micro-batches, one draw each
        assert len(draws) == 12, draws
        # (a) memory batches are collated without replay rows: memory_batch_size rows each, not + K
        assert r["memory_rows"] == [[4, 4]], r["memory_rows"]
        # seeded: batch c on rank r takes stream positions (c x world + r) x K .. + K, seed = 0 + 7 x 1 + 1
        assert r["replay_seed"] == 8
        assert draws == [seeded_stream(16, (c * 2 + rank) * 2, 2, 8) for c in range(12)]
        assert len({tuple(d) for d in draws}) > 4 and all(a != b for a, b in zip(draws, draws[1:])), draws
        # checkpoint-3 = 6 micro-batches: the resumed runs draw the uninterrupted run's rows from there on
        for name in ("resumed", "patched"):  # (d) "patched": the loop runs under another frame name
            got = r[name]
            assert "error" not in got, got
            assert got["draws"] == draws[6:], (name, got["draws"])
            assert got["digest"] == res[0]["full"], name  # bit for bit, every rank
        assert r["records"] == 24  # one forgetting-signal record per training micro-batch (12 per task)
    assert res[0]["resumed"]["traj"] == res[0]["traj"] == res[0]["patched"]["traj"]
    assert sum(row["merge"] for row in res[0]["traj"]) >= 1


def test_bind_holds_one_train_and_workers_refused(tmp_path):
    res = run_ranks("tests.scenarios_hf_replay:bind_and_workers", 2, tmp_path, TIMEOUT, tmp=str(tmp_path))
    for r in res:
        # (c) a Trainer bound for task 0 does not capture task 1: the plugin attaches to task 1's engine
        assert r["bind"]["engine_is_task1"], r["bind"]
        w = r["workers"]  # (b) the replay collator in worker processes: one clear error before training
        assert w["type"] == "AimInputError" and "dataloader_num_workers=0" in w["message"], w
    assert res[0]["bind"]["merges_task1"] >= 1, res[0]["bind"]


def test_trl_sft_trainer_mixed_replay_compute_loss_override(tmp_path):
    pytest.importorskip("trl")
    res = run_ranks("tests.scenarios_hf_replay:trl_mixed_replay", 2, tmp_path, TIMEOUT, tmp=str(tmp_path))
    r0 = res[0]
    assert r0["merges"][0] == 0 and r0["merges"][1] >= 1, r0
    assert r0["probe_rows_task1"] == r0["rows_task1"] > 0, r0  # the forgetting signal from the mixed rows
    assert r0["probe_forwards"] == 0, r0  # training_batch: the plugin runs no probe forward of its own
    for r in res:
        # one record per training micro-batch: SFTTrainer's no-grad metrics forward is not a probe
        assert all(s["records"] == s["micro_batches"] > 0 for s in r["steps"]), r["steps"]
        assert r["draws"] == r["steps"][1]["micro_batches"], r


def test_compute_loss_func_counts_tokens_as_the_trainer():
    """With no replay rows the loss is the model's own loss under the Trainer's num_items_in_batch; with
    memory_weight the memory rows' (sum, tokens) handed to the plugin are the same cross-entropy's."""
    import torch
    from transformers import LlamaForCausalLM

    from aim_ds.hf import AimMergingCallback
    from aim_ds.ops.losses import split_token_loss
    from tests.scenarios import tiny_config

    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(tiny_config())
    ids = torch.randint(0, 50, (6, 10))
    labels = ids.clone()
    labels[:, :3] = -100
    labels[4, 5:] = -100
    n_items = int((labels[:, 1:] != -100).sum()) + 17  # as if other ranks and micro-batches held 17 more
    out = model(input_ids=ids)
    cb = AimMergingCallback()
    ref = model(input_ids=ids, labels=labels, num_items_in_batch=n_items).loss
    assert torch.allclose(cb.compute_loss_func(out, labels, n_items), ref, atol=1e-6)
    cb = AimMergingCallback(replay_rows=2, memory_weight=0.3)
    cb._rows = [None] * 4  # memory set: the last 2 rows of every batch are memory rows

    class Probe:
        enabled, records_probe_loss, got = True, True, None

        def record_probe_loss(self, s, n):
            self.got = (s, n)

    cb.plugin = Probe()
    loss = cb.compute_loss_func(out, labels, None)
    new_sum, new_n, mem_sum, mem_n = split_token_loss(out.logits, labels, 4)
    assert torch.allclose(loss, 0.7 * new_sum / new_n + 0.3 * mem_sum / mem_n, atol=1e-6)
    assert cb.plugin.got[1] == int(mem_n) == int((labels[4:, 1:] != -100).sum())
    assert cb.plugin.got[0] == pytest.approx(float(mem_sum.detach()), rel=1e-6)


def test_hyperparameter_search_trial_folder_gets_the_state(tmp_path):
    pytest.importorskip("optuna")
    (r,) = run_ranks("tests.scenarios_hf_replay:hp_search_trial_folder", 1, tmp_path, TIMEOUT, tmp=str(tmp_path / "o"))
    # every file of the trial's checkpoints, the callback's included, lies under run-0/
    assert list(r) == ["run-0"], r
    assert "aim_plugin_rank00000_of_00001.pt" in r["run-0"] and "trainer_state.json" in r["run-0"], r


def test_seeded_stream_is_the_drivers_order():
    """The stream the replay collator draws from is the one the driver cuts its batches from: a fresh seeded
    shuffle per pass, ranks disjoint within a global batch, any position drawn again alike."""
    import random

    from aim_ds.data.batching import rank_batches, seeded_stream

    n, seed = 10, 3
    passes = []
    for e in range(3):
        idx = list(range(n))
        random.Random(seed * 1000003 + e).shuffle(idx)
        passes += idx
    assert seeded_stream(n, 0, 30, seed) == passes
    assert seeded_stream(n, 17, 5, seed) == passes[17:22]  # a resumed draw: a pure function of the position
    got = [rank_batches(list(range(n)), 7, 2, r, 2, seed) for r in range(2)]
    for s in range(7):
        assert got[0][s] + got[1][s] == passes[4 * s : 4 * s + 4]
