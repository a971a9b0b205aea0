"""Multi-rank checkpoint scenarios (run by tests/mp.py): save/load/resume, crash during save, keep-last,
bad inputs on every rank, and the legs of 2 -> 1 -> 2 resharding. Reference tensors for the pytest side
(conversion checks) are written with torch.save into the scenario's `work` directory."""

from __future__ import annotations

import os
import shutil

import deepspeed
import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

import aim_ds
from aim_ds import checkpoint as ckpt
from aim_ds.checkpoint import format as ckpt_format
from aim_ds.checkpoint import runtime as ckpt_runtime
from tests import scenarios as sc

AIM = {
    "enabled": True,
    "interval_rule": "fixed",
    "initial_interval": 3,
    "min_interval": 2,
    "max_interval": 16,
    "rehearsal_steps": 1,
    "weight_policy": "importance",
}  # importance: theta_k and EMA shards travel too
FP = "tasks-v1"


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1, **{f"w{i}": i + 2 for i in range(sc.VOCAB - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


def _engine(model_config=None, seed=0):
    cfg = sc.ds_config("bf16", aim=AIM, scheduler=True)  # the GPU configs are bf16: its files and reshard path
    # several optimizer sub-groups whose boundaries move with the world size: resharding must re-split them
    cfg["zero_optimization"]["sub_group_size"] = 3000
    torch.manual_seed(seed)
    unset_hf_deepspeed_config()
    sc._keep.append(HfDeepSpeedConfig(cfg))
    model = LlamaForCausalLM._from_config(model_config or sc.tiny_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def _barrier():
    deepspeed.comm.barrier()


def _plugin_state(plugin) -> dict:
    sd = plugin.state_dict()
    return {k: v for k, v in sd.items() if k not in ("anchor", "theta_k", "ema")}


def _anchor(plugin):
    return [t.detach().cpu().clone() for t in plugin.anchor]


def _same_tensors(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _same_dicts(a: dict, b: dict) -> float:
    """max |a - b| over every tensor (0.0 = bit-equal on these values)."""
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _error_of(fn) -> str | None:
    try:
        fn()
    except ckpt.CheckpointError as e:
        return str(e)
    return None


def save_resume(work: str):
    """2 ranks. Task 0 (4 steps), task 1 (4 steps: merge at 3), save 'a'; uninterrupted: 5 more steps.
    A crash in the save of 'b' keeps latest on 'a'; a fresh engine+plugin loads 'auto' (= 'a') and its 5
    steps give bit-identical weights and plugin state; keep_last; every bad input errs on every rank."""
    r = sc.rank()
    d = os.path.join(work, "run")
    e1 = _engine()
    p1 = aim_ds.attach(e1, sc.memory())
    p1.start_task()
    sc.train_steps(e1, 4, seed=0)
    p1.start_task(sc.memory(offset=3000))
    sc.train_steps(e1, 3, seed=100)
    anchor_full = sc.full_fp32(e1)  # right after the merge at step 3 the anchor is the weights
    sc.train_steps(e1, 1, seed=200)
    saved_w = sc.full_fp32(e1)
    saved_state, saved_anchor = _plugin_state(p1), _anchor(p1)
    path = ckpt.save_checkpoint(
        e1,
        p1,
        d,
        tag="a",
        client_state={"rank": r, "note": "x"},
        keep_last=2,
        task_fingerprint=FP,
        tokenizer=tiny_tokenizer(),
        extra={"task": 1, "step": 4},
    )
    gathered = _gathered_anchor(e1, p1)
    if r == 0:  # checkpoint 'a' and its reference go to the conversion and resharding checks
        shutil.copytree(d, os.path.join(work, "two"), ignore=shutil.ignore_patterns(".tmp-*"))
        torch.save({"model": saved_w, "anchor": gathered, "state": saved_state}, os.path.join(work, "ref_two.pt"))
    _barrier()
    sc.train_steps(e1, 5, seed=300)
    final_w, final_state, final_anchor = sc.full_fp32(e1), _plugin_state(p1), _anchor(p1)

    # crash inside save 'b' after every file of .tmp-b is written, before the rename (rank 0 commits)
    def boom(save_dir, tag, keep_last):
        raise RuntimeError("simulated crash")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ckpt_runtime, "_commit", boom)
        try:
            ckpt.save_checkpoint(e1, p1, d, tag="b", keep_last=2, task_fingerprint=FP)
            crashed = False
        except RuntimeError:
            crashed = True
    _barrier()
    with open(os.path.join(d, "latest")) as f:
        latest_after_crash = f.read().strip()
    tmp_b_complete = os.path.isfile(os.path.join(d, ".tmp-b", ckpt.MANIFEST))
    found = ckpt.find_latest(d)
    extra = ckpt.read_manifest(d)["extra"]

    e2 = _engine(seed=1)  # different init: everything must come from the checkpoint
    p2 = aim_ds.attach(e2, sc.memory(offset=3000))
    client = ckpt.load_checkpoint(e2, p2, d, tag="auto", task_fingerprint=FP)
    loaded_state, loaded_anchor = _plugin_state(p2), _anchor(p2)
    loaded_w = sc.full_fp32(e2)
    sc.train_steps(e2, 5, seed=300)
    res = {
        "path": path,
        "crashed": crashed,
        "anchor_gather_vs_after_merge": _same_dicts(gathered, anchor_full),
        "latest_after_crash": latest_after_crash,
        "found": found,
        "extra": extra,
        "tmp_b_complete": tmp_b_complete,
        "client": {k: client.get(k) for k in ("rank", "note")},
        "loaded_state_equal": loaded_state == saved_state,
        "loaded_anchor_equal": _same_tensors(loaded_anchor, saved_anchor),
        "loaded_weights_diff": _same_dicts(loaded_w, saved_w),
        "resumed_weights_diff": _same_dicts(sc.full_fp32(e2), final_w),
        "resumed_state_equal": _plugin_state(p2) == final_state,
        "resumed_anchor_equal": _same_tensors(_anchor(p2), final_anchor),
        "merges": p2.merge_count,
        "task_index": p2.task_index,
        "global_steps": [e1.global_steps, e2.global_steps],
        "lr": [e1.optimizer.param_groups[0]["lr"], e2.optimizer.param_groups[0]["lr"]],
    }
    # keep_last=2: 'c' then 'd' -> only c, d remain ('a' pruned, the crashed .tmp-b cleaned)
    ckpt.save_checkpoint(e2, p2, d, tag="c", keep_last=2, task_fingerprint=FP)
    ckpt.save_checkpoint(e2, p2, d, tag="d", keep_last=2, task_fingerprint=FP)
    res["tags_after_keep"] = ckpt.complete_tags(d)
    res["dir_after_keep"] = sorted(os.listdir(d))
    res["errors"] = _bad_inputs(work, d)
    return res


def _bad_inputs(work: str, d: str) -> dict:
    r = sc.rank()
    e3 = _engine(seed=2)
    p3 = aim_ds.attach(e3, sc.memory(offset=3000))
    errors = {}

    def variant(name, edit):
        vd = os.path.join(work, "bad-" + name)
        if r == 0:
            shutil.copytree(d, vd)
            edit(vd)
        _barrier()
        return vd

    def missing_rank_file(vd):
        os.unlink(os.path.join(vd, "d", ckpt.plugin_file(1, 2)))

    def truncated(vd):
        f = [x for x in os.listdir(os.path.join(vd, "d")) if "zero_pp_rank_1_" in x and "optim" in x][0]
        p = os.path.join(vd, "d", f)
        with open(p, "r+b") as fh:
            fh.truncate(os.path.getsize(p) // 2)

    def dangling_latest(vd):
        with open(os.path.join(vd, "latest"), "w") as fh:
            fh.write("global_step999")

    for name, edit in (
        ("missing_rank_file", missing_rank_file),
        ("truncated", truncated),
        ("dangling_latest", dangling_latest),
    ):
        vd = variant(name, edit)
        errors[name] = _error_of(lambda vd=vd: ckpt.load_checkpoint(e3, p3, vd, task_fingerprint=FP))
    errors["missing_tag"] = _error_of(lambda: ckpt.load_checkpoint(e3, p3, d, tag="nope"))
    errors["task_fingerprint"] = _error_of(lambda: ckpt.load_checkpoint(e3, p3, d, task_fingerprint="tasks-v2"))
    p3.detach()
    p4 = aim_ds.attach(e3, sc.memory(offset=3000), config=dict(AIM, initial_interval=5))
    errors["aim_config"] = _error_of(lambda: ckpt.load_checkpoint(e3, p4, d))
    p4.detach()
    other = sc.tiny_config()
    other.intermediate_size = 64
    e5 = _engine(model_config=other)
    p5 = aim_ds.attach(e5, sc.memory(offset=3000))
    errors["other_model"] = _error_of(lambda: ckpt.load_checkpoint(e5, p5, d))
    # after all of these the process group still works (nobody hung in a collective)
    errors["_still_alive"] = float(sc.engine_loss(e3, sc.batch(5)))
    return errors


def reshard_leg(
    work: str,
    src: str,
    out: str,
    expect_world_error: str | None = None,
    ref: str | None = None,
    save_ref: str | None = None,
):
    """Load the resharded checkpoint `src` into a fresh engine+plugin on this world size; check weights and
    gathered anchor against `ref` (saved by the previous leg); train 2 steps; save a checkpoint to `out`
    and (rank 0) its reference weights/anchor/plugin state to `save_ref`."""
    r = sc.rank()
    res = {}
    e = _engine(seed=5)
    p = aim_ds.attach(e, sc.memory(offset=3000))
    if expect_world_error:
        res["world_error"] = _error_of(lambda: ckpt.load_checkpoint(e, p, expect_world_error))
    ckpt.load_checkpoint(e, p, src, task_fingerprint=FP)
    w = sc.full_fp32(e)
    anchor = _gathered_anchor(e, p)
    state = _plugin_state(p)
    if ref is not None:
        rf = torch.load(ref, weights_only=False)
        res["weights_diff"] = _same_dicts(w, rf["model"])
        if anchor is not None:
            res["anchor_diff"] = _same_dicts(anchor, rf["anchor"])
        res["controller_equal"] = (state.get("controller") == rf["state"].get("controller")) if r == 0 else None
        res["trajectory_equal"] = (state["trajectory"] == rf["state"]["trajectory"]) if r == 0 else None
        res["scalars_equal"] = all(state[k] == rf["state"][k] for k in ("task_index", "step_in_task", "merge_count"))
    res["layout_matches"] = (
        ckpt.engine_layout(e)["sub_groups"]
        == ckpt_format.read_tag_manifest(os.path.join(src, ckpt.find_latest(src)))["layout"]["sub_groups"]
    )
    losses = sc.train_steps(e, 2, seed=700)
    res["losses"] = losses
    res["merges_after"] = p.merge_count
    res["finite"] = all(torch.isfinite(v).all().item() for v in sc.full_fp32(e).values())
    if out is not None:
        w2, a2, s2 = sc.full_fp32(e), _gathered_anchor(e, p), _plugin_state(p)
        ckpt.save_checkpoint(e, p, out, tag="leg", task_fingerprint=FP)
        if r == 0 and save_ref:
            torch.save({"model": w2, "anchor": a2, "state": s2}, save_ref)
    return res


def _gathered_anchor(engine, plugin):
    """The full anchor, gathered independently of aim_ds.checkpoint: each rank's valid shard elements are
    placed by the parameters' own ds_tensor views (DeepSpeed's partitioning), then summed over ranks."""
    full = {}
    names = {p: n for n, p in engine.module.named_parameters()}
    world, r = deepspeed.comm.get_world_size(), sc.rank()
    for g, a in zip(plugin.shards.groups, plugin.anchor):
        off = 0
        for prm in engine.optimizer.fp16_groups[g.index]:
            pn = prm.partition_numel()
            flat = torch.zeros(pn * world)
            flat[r * pn : (r + 1) * pn] = a[off : off + pn].cpu()
            full[names[prm]] = (flat, prm.ds_numel, tuple(prm.ds_shape))
            off += pn
    out = {}
    for n, (flat, numel, shape) in full.items():
        deepspeed.comm.all_reduce(flat)
        out[n] = flat[:numel].reshape(shape).clone()
    return out


# ---------------------------------------------------------------------------------------------- killed saves
def crash_save_run(d: str, steps: int, switch: int, kill_fraction: float | None = None, reference: str | None = None):
    """One launch of a run that saves after every step (tags stepNNN, keep_last=2): resumes the newest complete
    checkpoint in `d` (--resume auto), or starts fresh. Task 0 runs steps [0, switch), task 1 the rest.

    kill_fraction None: train to `steps` and return what the run ended with; with `reference` (a new folder),
    then also run the whole schedule uninterrupted from scratch in this launch, saving there, and return both.
    Otherwise: time this launch's first save, then, right before its second, rank 0 starts a killer that
    SIGKILLs the launch's whole process group after kill_fraction x that save's duration (written to
    d/../kill-<launch>.json), and waits to be killed. Each step's loss goes to d/../losses-<launch>-rank<R>.json
    as soon as it is made, so a killed launch keeps its record.
    """
    out = _train_from_latest(d, steps, switch, kill_fraction)
    return out if reference is None else {"run": out, "reference": _train_from_latest(reference, steps, switch)}


def _train_from_latest(d: str, steps: int, switch: int, kill_fraction: float | None = None) -> dict:
    import json
    import subprocess
    import time

    r = sc.rank()
    found = ckpt.resolve_resume("auto", d)
    done = 0 if found is None else ckpt.read_manifest(*found)["extra"]["step"]
    e = _engine()
    p = aim_ds.attach(e, sc.memory() if done <= switch else sc.memory(offset=3000))
    if found is None:
        p.start_task()
    else:
        ckpt.load_checkpoint(e, p, *found, task_fingerprint=FP)
    launch, losses, save_s = f"{time.time_ns()}", {}, []
    log = os.path.join(os.path.dirname(d), f"losses-{launch}-rank{r}.json")
    for s in range(done, steps):
        if s == switch:
            p.start_task(sc.memory(offset=3000))
        losses[s] = sc.train_steps(e, 1, seed=1000 + 10 * s)[0]
        with open(log, "w") as f:
            json.dump(losses, f)
        if kill_fraction is not None and len(save_s) == 1 and r == 0:
            delay = kill_fraction * save_s[0]
            with open(os.path.join(os.path.dirname(d), f"kill-{launch}.json"), "w") as f:
                json.dump(
                    {
                        "tag": f"step{s + 1:03d}",
                        "previous": f"step{s:03d}",
                        "delay_s": delay,
                        "first_save_s": save_s[0],
                        "resumed_from": found and found[1],
                    },
                    f,
                )
            subprocess.Popen(["sh", "-c", f"sleep {delay:.4f}; kill -KILL -{os.getpgid(0)}"])
        t0 = time.perf_counter()
        ckpt.save_checkpoint(
            e,
            p,
            d,
            tag=f"step{s + 1:03d}",
            keep_last=2,
            task_fingerprint=FP,
            client_state={"step": s + 1},
            extra={"step": s + 1},
        )
        save_s.append(time.perf_counter() - t0)
        if kill_fraction is not None and len(save_s) == 2:
            time.sleep(120)  # the killer ends this launch; a missed kill fails the test by its timeout
            raise RuntimeError(f"not killed (process group {os.getpgid(0)})")
    w = sc.full_fp32(e)
    out = {
        "resumed_from": found and found[1],
        "weights": _sha(w[n] for n in sorted(w)),
        "anchor": _sha(_anchor(p)),
        "state": _sha([json.dumps(_plugin_state(p), sort_keys=True, default=str)]),
        "merges": p.merge_count,
        "task_index": p.task_index,
        "losses": losses,
        "save_s": save_s,
    }
    p.detach()
    return out


def _sha(items) -> str:
    import hashlib

    h = hashlib.sha256()
    for x in items:
        h.update(
            x.encode() if isinstance(x, str) else x.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        )
    return h.hexdigest()


def plugin_memory_refused():
    """2 ranks: rank 1 alone gives an empty rehearsal memory to attach(); every rank raises the plugin's
    AimInputError naming rank 1, and the process group still works afterwards."""
    e = _engine()
    try:
        aim_ds.attach(e, [] if sc.rank() == 1 else sc.memory())
        error = None
    except aim_ds.plugin.AimInputError as err:
        error = str(err)
    p = aim_ds.attach(e, sc.memory())
    return {"error": error, "alive": sc.train_steps(e, 1, seed=5)[0] > 0, "attached": p.enabled}
