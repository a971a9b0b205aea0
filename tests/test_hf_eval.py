"""Evaluation with aim_ds.hf's replay collator (issue 33 item 4): a real HF Trainer over real DeepSpeed ZeRO-3 on
2 CPU ranks; the three tests read one launch (tests/scenarios_hf_eval.py)."""

import pytest

from tests.mp import run_ranks
from tests.scenarios_hf_eval import EVAL_BATCH, K

TIMEOUT = 600
TRAIN_ROWS, EVAL_ROWS = 4 + K, [-1] * EVAL_BATCH  # an evaluation batch: its own rows, no memory row (-1)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_eval")
    return run_ranks("tests.scenarios_hf_eval:eval_with_replay", 2, tmp, TIMEOUT, tmp=str(tmp))


def _batches(run: dict) -> list:
    """The training and evaluation batches of a train() (the plugin's memory batches, all memory rows, aside)."""
    return [c for c in run["calls"] if -1 in c]


def _matches_plain(e: dict) -> None:
    assert "error" not in e, e
    assert e["batches"] == [EVAL_ROWS], e
    assert e["rows"] == e["plain_rows"] == 2 * EVAL_BATCH, e  # what compute_metrics was handed
    assert e["loss"] == pytest.approx(e["plain_loss"], rel=1e-5), e


def test_evaluation_leaves_the_training_replay_draws(ranks):
    """(b) evaluation between training batches (at the start, after every step) neither takes memory rows nor
    moves the replay position: the training batches draw what they draw without any evaluation."""
    for r in ranks:
        plain, ev = _batches(r["plain"]), _batches(r["eval"])
        assert all(len(c) == TRAIN_ROWS for c in plain) and len(plain) == 4, plain
        draws = [c[4:] for c in plain]
        assert all(i >= 0 for d in draws for i in d), draws
        assert [c[4:] for c in ev if len(c) == TRAIN_ROWS] == draws, ev
        # one forgetting-signal record per training micro-batch, none from an evaluation forward
        assert r["plain"]["records"] == r["eval"]["records"] == 4, r


def test_evaluation_batches_hold_no_memory_rows_and_get_the_plain_loss(ranks):
    """(a) every evaluation collates its own rows only; compute_metrics sees only them; eval_loss is the one
    the Trainer computes without the replay collator and cb.compute_loss_func."""
    for r in ranks:
        ev = r["eval"]
        assert [c for c in _batches(ev) if len(c) != TRAIN_ROWS] == [EVAL_ROWS] * 5, ev["calls"]
        assert [(s, n) for s, _, n in ev["logged"]] == [(s, 2 * EVAL_BATCH) for s in range(5)], ev["logged"]
        _matches_plain(ev["after"])
        # the step-4 evaluation ran on the final weights: its loss is the plain evaluation's after train()
        assert ev["logged"][-1][1] == pytest.approx(ev["after"]["plain_loss"], rel=1e-5), ev


def test_evaluate_before_train(ranks):
    """(c) evaluate() before the callback's first train(): plain collation, the plain loss."""
    for r in ranks:
        _matches_plain(r["before"])
        # train() after it on the same Trainer runs DeepSpeed's inference engine (a transformers issue): one
        # clear error naming the way that works, not the shard layer's
        msg = r["train_after_evaluate"]
        assert msg.startswith("AimInputError") and "eval_on_start=True" in msg, msg
