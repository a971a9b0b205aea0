"""Multi-rank scenario for evaluation with aim_ds.hf's replay collator (issue 33 item 4): a real HF Trainer over
real DeepSpeed ZeRO-3 on CPU ranks (gloo), run by tests/mp.py; tests/test_hf_eval.py asserts on it."""

from __future__ import annotations

import os

from transformers import Trainer, default_data_collator

from tests.scenarios_hf import args_for, ds_cfg, new_model, task_rows
from tests.scenarios_hf_replay import TRAINING_BATCH, Recording, _key

K, EVAL_BATCH = 2, 3  # training batches: 4 new-task rows + K memory rows; evaluation batches: 3 rows


class Inner:
    """The collator inside replay_collator: records every batch it collates, each row as its index in the
    memory list (-1 for a row not in it)."""

    def __init__(self, memory):
        self.index = {_key(r): i for i, r in enumerate(memory)}
        self.calls = []

    def __call__(self, features):
        features = list(features)
        self.calls.append([self.index.get(_key(f), -1) for f in features])
        return default_data_collator(features)


def _rows_metric(pred) -> dict:
    return {"rows": int(pred.label_ids.shape[0])}  # the rows compute_metrics was handed, all ranks


def _evaluate_both(tr, inner) -> dict:
    """trainer.evaluate() with the replay collator and cb.compute_loss_func, then the same evaluation without
    them (the inner collator, the Trainer's own loss): their eval_loss and rows, and the replay one's batches."""
    start = len(inner.calls)
    try:
        got = tr.evaluate()
    except Exception as e:  # noqa: BLE001 - today's code may fail here; the test reads the outcome
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    batches = inner.calls[start:]
    saved = tr.data_collator, tr.compute_loss_func
    tr.data_collator, tr.compute_loss_func = inner, None
    try:
        ref = tr.evaluate()
    finally:
        tr.data_collator, tr.compute_loss_func = saved
    return {
        "loss": got["eval_loss"],
        "rows": got["eval_rows"],
        "batches": batches,
        "plain_loss": ref["eval_loss"],
        "plain_rows": ref["eval_rows"],
    }


def _trainer(args, memory, rows, eval_rows):
    """A Trainer with mixed replay (K memory rows, memory_weight 0.5) and a recording inner collator."""
    cb, inner = Recording(replay_rows=K, memory_weight=0.5), Inner(memory)
    cb.set_memory(memory)
    tr = Trainer(
        model=new_model(args),
        args=args,
        train_dataset=rows,
        eval_dataset=eval_rows,
        data_collator=cb.replay_collator(inner),
        compute_loss_func=cb.compute_loss_func,
        compute_metrics=_rows_metric,
        callbacks=[cb],
    )
    return tr, cb, inner


def eval_with_replay(tmp):
    """One task with mixed replay (training_batch probe), 4 steps, twice: without any evaluation, and with an
    evaluation at the start and after every step (eval_strategy "steps") and evaluate() after train(). Then
    evaluate() on a third Trainer and callback before any train(), and that Trainer's train() (which transformers
    runs on the inference engine evaluate() built: refused). Returns the batches the inner collator saw and the evaluations' results."""
    memory, rows, eval_rows = task_rows(0, n=16), task_rows(1, n=32), task_rows(2, n=2 * EVAL_BATCH)
    cfg, out = ds_cfg(TRAINING_BATCH), {}
    evaluating = dict(eval_strategy="steps", eval_steps=1, eval_on_start=True, per_device_eval_batch_size=EVAL_BATCH)
    for name, kw in (("plain", {}), ("eval", evaluating)):
        tr, cb, inner = _trainer(args_for(os.path.join(tmp, name), cfg, steps=4, **kw), memory, rows, eval_rows)
        tr.train()
        out[name] = res = {"calls": list(inner.calls), "records": cb.records}  # training and evaluation batches
        res["logged"] = [(h["step"], h["eval_loss"], h["eval_rows"]) for h in tr.state.log_history if "eval_loss" in h]
        if kw:
            res["after"] = _evaluate_both(tr, inner)
    args = args_for(os.path.join(tmp, "before"), cfg, per_device_eval_batch_size=EVAL_BATCH)
    tr, _, inner = _trainer(args, memory, rows, eval_rows)
    out["before"] = _evaluate_both(tr, inner)
    try:
        tr.train()
        out["train_after_evaluate"] = "no error"
    except Exception as e:  # noqa: BLE001 - the expected path: one clear error
        out["train_after_evaluate"] = f"{type(e).__name__}: {str(e)[:400]}"
    return out
