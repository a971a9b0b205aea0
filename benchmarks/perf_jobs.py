"""The in-rank side of benchmarks/perf.py: one DeepSpeed engine per rank (Bench), the plugin's collective
bytes (CollectiveCounter) and the jobs perf.py launches on its CPU ranks (gloo); each rank writes its result
as JSON for the launcher to read."""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import statistics as _st
import sys
import time
import traceback
from pathlib import Path

from aim_ds.experiment.modeling import tiny_llama_shape

MODELS = {
    # Hidden sizes are multiples of 6, so every tensor (each has a hidden-size factor) splits evenly over 1, 2
    # and 3 ranks and DeepSpeed adds no partition padding, as on real models over 8 GPUs (13B Llama: 5120 = 8 x
    # 640); the padding on uneven tensors is reported apart (plugin_bytes_per_partition_element_per_rank).
    # ~4.8M parameters: --quick
    "small": dict(
        model_type="llama",
        vocab_size=2048,
        hidden_size=288,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=3,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
    # ~31M parameters: the full run
    "medium": dict(
        model_type="llama",
        vocab_size=8192,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
    # for "the same for every model size"
    "tiny": tiny_llama_shape(),
}

# the hook and batch-probe phases compare cheap steps whose ratios are noisy: at least this many pairs
HOOK_REPS = 30


class CollectiveCounter:
    """Wraps aim_ds.ops.collectives.all_reduce / broadcast: bytes (numel * element_size) and calls, this rank."""

    def __init__(self):
        from aim_ds.ops import collectives

        self.collectives = collectives
        self.bytes = 0
        self.calls = 0
        self._orig = {}
        for name in ("all_reduce", "broadcast"):
            fn = getattr(collectives, name)
            self._orig[name] = fn
            setattr(collectives, name, self._wrap(fn))

    def _wrap(self, fn):
        @functools.wraps(fn)
        def wrapped(t, *args, **kwargs):
            self.bytes += t.numel() * t.element_size()
            self.calls += 1
            return fn(t, *args, **kwargs)

        return wrapped

    def restore(self):
        for name, fn in self._orig.items():
            setattr(self.collectives, name, fn)


class Bench:
    """One engine on this rank, with plain and hooked steps and synthetic task data."""

    def __init__(self, spec: dict):
        import deepspeed
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        self.torch = torch
        self.spec = spec
        deepspeed.init_distributed(dist_backend="gloo", timeout=_dt.timedelta(minutes=5))
        from aim_ds.distributed import release_cpu_shm_names

        release_cpu_shm_names()  # DeepSpeed leaves ~69 MB per rank in /dev/shm otherwise
        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.stage, tp = spec.get("stage", 3), spec.get("tp", 1)
        self.dp_rank = self.rank // tp  # the ranks of one tensor-parallel group must see the same batches
        torch.manual_seed(0)
        cfg = dict(MODELS[spec["model"]])
        self.mcfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        self.ds_config = {
            "train_micro_batch_size_per_gpu": spec["mb"],
            "gradient_accumulation_steps": 1,
            "steps_per_print": 10**9,
            "gradient_clipping": 1.0,
            "bf16": {"enabled": spec.get("bf16", True)},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0, "torch_adam": True}},
            "zero_optimization": {"stage": self.stage},
            "aim_merging": {"enabled": True},  # the paper defaults: what the alternated end to end measures
        }
        if self.stage == 3:
            self.ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        if tp > 1:  # DeepSpeed AutoTP slices the linear layers over tp ranks (with ZeRO stage 0-2)
            self.ds_config["tensor_parallel"] = {"autotp_size": tp}
        self._hf = HfDeepSpeedConfig(self.ds_config)
        model = AutoModelForCausalLM.from_config(self.mcfg)
        self.n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=list(model.parameters()), config=self.ds_config
        )
        self.batches = {t: [self.task_batch(t, i) for i in range(4)] for t in (0, 1)}
        self.memory = [self.task_batch(0, 100 + i) for i in range(2)]

    def task_batch(self, task: int, i: int) -> dict:
        """Task t: sequences x_{j+1} = (a_t x_j + b_t) mod V; learnable, and task 1 overwrites task 0."""
        torch = self.torch
        g = torch.Generator().manual_seed(1000 * task + 10 * i + self.dp_rank * 7919)
        v, (mb, seq) = self.mcfg.vocab_size, (self.spec["mb"], self.spec["seq"])
        a, b = (3, 1) if task == 0 else (5, 7)
        x = torch.empty(mb, seq, dtype=torch.long)
        x[:, 0] = torch.randint(0, v, (mb,), generator=g)
        for j in range(1, seq):
            x[:, j] = (a * x[:, j - 1] + b) % v
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}

    def step(self, batch: dict, hooked: bool, record=None, record_times=None) -> float:
        """One training step; with record (a plugin with probe_source "training_batch") the second half of the
        batch stands for memory rows and their loss is recorded (timed into record_times)."""
        e = self.engine
        t0 = time.perf_counter()
        out = e(**{k: v.to(e.device) for k, v in batch.items()})
        loss = out.loss
        if record is not None:
            import aim_ds

            t1 = time.perf_counter()
            record.record_probe_loss(
                *aim_ds.rows_loss(out.logits, batch["labels"], slice(batch["labels"].shape[0] // 2, None))
            )
            record_times.append(time.perf_counter() - t1)
        e.backward(loss)
        if hooked:
            e.step()  # the plugin's instance hook (or DeepSpeed's own step when none is attached)
        else:
            type(e).step(e)  # DeepSpeed's own step, bypassing any hook
        return time.perf_counter() - t0

    def attach(self, **cfg):
        import aim_ds

        plugin = aim_ds.attach(self.engine, self.memory, config=dict({"enabled": True}, **cfg))
        plugin.start_task()
        return plugin


def _timed_method(obj, name: str, sink: list):
    fn = getattr(obj, name)

    @functools.wraps(fn)
    def wrapped(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            sink.append(time.perf_counter() - t0)

    setattr(obj, name, wrapped)


def _alternate(b: Bench, plugin, counter, n: int, record: bool = False) -> dict:
    """n pairs on one engine after one warm-up hooked step: DeepSpeed's own step (bypassing the hook), then the
    hooked step on the same batch, so that load from other processes hits both alike. Per pair: both step
    times, the plugin's collective bytes, whether it merged, and the time inside the hook; with record
    (probe_source "training_batch") the hooked step records the loss of its batch's second half as memory
    rows, timed into "rows"."""
    out = {"plain": [], "hooked": [], "bytes": [], "merged": [], "hook": [], "rows": []}
    _timed_method(plugin, "_after_step", out["hook"])
    rec = plugin if record else None
    b.step(b.batches[1][0], hooked=True, record=rec, record_times=out["rows"])
    out["hook"].clear(), out["rows"].clear()
    for i in range(n):
        bt = b.batches[1][i % 4]
        out["plain"].append(b.step(bt, hooked=False))
        c0, m0 = counter.bytes, plugin.merge_count
        out["hooked"].append(b.step(bt, hooked=True, record=rec, record_times=out["rows"]))
        out["bytes"].append(counter.bytes - c0)
        out["merged"].append(plugin.merge_count != m0)
    return out


def job_memory(b: Bench) -> dict:
    """Bytes the plugin holds (scalar policy) after attach and after one merge; stat bytes on probed steps."""
    counter = CollectiveCounter()
    plugin = b.attach(merge_first_task=True, probe_interval=1, initial_interval=128, max_interval=128)
    held_attach = plugin.held_bytes()
    b.step(b.batches[0][0], hooked=True)
    per_step = []
    for i in range(b.spec.get("probe_steps", 3)):
        before_b, before_m = counter.bytes, plugin.merge_count
        b.step(b.batches[0][i % 4], hooked=True)
        if plugin.merge_count == before_m:
            per_step.append(counter.bytes - before_b)
    before_b = counter.bytes
    plugin.merge(weights=(0.5, 0.5), rehearsal_steps=1)
    merge_bytes = counter.bytes - before_b
    held = plugin.held_bytes()
    plugin.detach()
    counter.restore()
    # the plugin's buffers are shaped like the rank's partitions, which DeepSpeed pads to ceil(numel / N)
    # per parameter: 4 bytes per partition element is the floor for a buffer of that shape
    if b.stage == 3:
        padded = sum(
            p.partition_numel() if hasattr(p, "partition_numel") else p.numel() for p in b.engine.module.parameters()
        )
    else:  # stage 1/2: this rank's slices of the flat fp32 groups, padded by DeepSpeed to split evenly
        padded = sum(t.numel() for t in b.engine.optimizer.single_partition_of_fp32_groups)
    res = {
        "stage": b.stage,
        "params": b.n_params,
        "partition_numel": padded,
        "held_bytes_at_attach": held_attach,
        "held_bytes": held,
        "bytes_per_param": (held["device"] + held["host"]) / b.n_params,
        "stat_bytes_probe_steps": per_step,
        "stat_bytes_explicit_merge": merge_bytes,
    }
    if b.spec.get("fusion"):  # fusion vs copy on a fresh attach (this engine, this stage)
        plugin = b.attach(merge_first_task=True, probe_interval=10**6, initial_interval=128, max_interval=128)
        b.step(b.batches[0][0], hooked=True)
        res["fusion"], res["fusion_shard_numel"], res["copy_bytes_per_second"] = _fusion(b, plugin)
        plugin.detach()
        res["summary"] = _fusion_summary(res["fusion"], res["fusion_shard_numel"], res["copy_bytes_per_second"])
    return res


def job_tp(b: Bench) -> dict:
    """Statistics bytes on probed steps without a merge with AutoTP (the plugin's collectives span every rank)."""
    res = job_memory(b)
    res["tp_size"] = b.spec["tp"]
    res["tp_sliced_params"] = sum(1 for p in b.engine.module.parameters() if getattr(p, "tensor_model_parallel", False))
    return res


def _fusion(b: Bench, plugin):
    """Explicit merges without rehearsal, timed around the fusion functions; the bandwidth of a torch copy
    moving the bytes one fusion touches."""
    from benchmarks.gpu_check import FusionTimer, Sync, copy_bandwidth

    timer = FusionTimer(Sync(False))
    fusion = []
    for _ in range(b.spec["merges"]):
        s0, by0 = timer.seconds, timer.bytes
        rec = plugin.merge(weights=(0.5, 0.5), rehearsal_steps=0)
        fusion.append(
            {
                "seconds": timer.seconds - s0,
                "bytes": timer.bytes - by0,
                "plugin_seconds": rec.get("fusion_seconds"),
                "plugin_bytes": rec.get("fusion_bytes"),
                "plugin_passes": rec.get("fusion_passes"),
            }
        )
    timer.restore()
    # the copy reads + writes as many bytes as one fusion touches (the definition), the fastest of
    # several: on a shared 2-core machine the minimum is the estimate least disturbed by other processes
    f_bytes_med = int(_st.median(f["bytes"] for f in fusion))
    copy_bps = copy_bandwidth(max(f_bytes_med // 8, 1), b.engine.device, Sync(False), reps=11, best=True)
    return fusion, timer.largest_numel, copy_bps


def _fusion_summary(fusion: list, shard_numel: int, copy_bps: float) -> dict:
    f_sec = min(f["seconds"] for f in fusion)  # fastest merge: see the copy in _fusion
    f_bytes = _st.median(f["bytes"] for f in fusion)
    return {
        "fusion_seconds": f_sec,
        "fusion_seconds_median": _st.median(f["seconds"] for f in fusion),
        "fusion_bytes": f_bytes,
        "fusion_passes": f_bytes / (4 * shard_numel) if shard_numel else None,
        "fusion_vs_copy": f_sec / (f_bytes / copy_bps),
    }


def job_full(b: Bench) -> dict:
    import aim_ds

    spec, reps = b.spec, b.spec["reps"]
    res = job_memory(b)
    res["memory_job"] = True

    counter = CollectiveCounter()
    hreps = max(reps, HOOK_REPS)
    # ---- hook overhead: no probe (probe_interval beyond the run), no merge (S = 128 > the steps here)
    plugin = b.attach(merge_first_task=True, probe_interval=10**6, initial_interval=128, max_interval=128)
    no_probe = _alternate(b, plugin, counter, hreps)
    merges_in_hook_phase = plugin.merge_count
    plugin.detach()

    # ---- probe cost: a probe forward on every step (steps that merged left out)
    plugin = b.attach(merge_first_task=True, probe_interval=1, initial_interval=128, max_interval=128)
    pr = _alternate(b, plugin, counter, reps)
    probed = [t for t, m in zip(pr["hooked"], pr["merged"]) if not m]
    probe_bytes = [x for x, m in zip(pr["bytes"], pr["merged"]) if not m]

    # ---- fusion: explicit merges without rehearsal, timed around the fusion functions
    fusion, shard_numel, copy_bps = _fusion(b, plugin)
    plugin.detach()

    # ---- the default config's forgetting signal (probe_source "training_batch"): the loss of memory rows already
    # in the batch, read off the training forward, then one 16-byte all-reduce; no probe forward, no merge (S = 128)
    plugin = b.attach(merge_first_task=True, probe_source="training_batch", initial_interval=128, max_interval=128)
    tb = _alternate(b, plugin, counter, hreps, record=True)
    tb_probes = sum(1 for r in plugin.trajectory if r.get("probe_loss") is not None)
    plugin.detach()
    counter.restore()

    # ---- end to end: 2 tasks x task_steps, SeqFT vs the default aim_merging config, step by step alternated on
    # one engine (the SeqFT step is DeepSpeed's own step, bypassing the hook; the AimMerging step goes through
    # the hook, with its probes, rehearsal and fusion): load from other processes hits both sums alike.
    # Both steps update the same weights, so the controller sees a model trained twice as fast as in a real
    # run; the merge/rehearsal/probe counts are reported beside the ratio (and end_to_end_alternated_from_counts).
    e2e = {
        "seqft": [],
        "aim": [],
        "aim_merges": [],
        "aim_rehearsal_steps": [],
        "aim_probes": [],
        "mode": "alternated per step on one engine (SeqFT = DeepSpeed's step, AimMerging = the hooked step)",
    }
    for _ in range(spec["e2e_reps"]):
        t_seq = t_aim = 0.0
        t0 = time.perf_counter()
        plugin = aim_ds.attach(b.engine, b.memory)  # config from the ds_config: {"enabled": true} = defaults
        t_aim += time.perf_counter() - t0
        steps0 = b.engine.global_steps  # counts every optimizer step, rehearsal ones too
        for task in (0, 1):
            t0 = time.perf_counter()
            plugin.start_task(memory=b.memory)
            t_aim += time.perf_counter() - t0
            for i in range(spec["task_steps"]):
                bt = b.batches[task][i % 4]
                if i % 2 == 0:
                    t_seq += b.step(bt, hooked=False)
                    t_aim += b.step(bt, hooked=True)
                else:
                    t_aim += b.step(bt, hooked=True)
                    t_seq += b.step(bt, hooked=False)
        e2e["aim_rehearsal_steps"].append(b.engine.global_steps - steps0 - 4 * spec["task_steps"])
        e2e["seqft"].append(t_seq)
        e2e["aim"].append(t_aim)
        e2e["aim_merges"].append(plugin.merge_count)
        e2e["aim_probes"].append(sum(1 for r in plugin.trajectory if r.get("probe_loss") is not None))
        plugin.detach()

    plain, hook_times = no_probe["plain"], no_probe["hook"]
    step = _st.median(plain)
    fsum = _fusion_summary(fusion, shard_numel, copy_bps)
    res.update(
        {
            "plain_step_seconds": plain,
            "hooked_step_seconds": no_probe["hooked"],
            "hook_seconds": hook_times,
            "merges_in_hook_phase": merges_in_hook_phase,
            "stat_bytes_no_probe_steps": no_probe["bytes"],
            "plain_step_seconds_probe_phase": pr["plain"],
            "probed_step_seconds": probed,
            "stat_bytes_probed_steps": probe_bytes,
            "fusion": fusion,
            "fusion_shard_numel": shard_numel,
            "copy_bytes_per_second": copy_bps,
            "batch_probe": {
                "hook_seconds": tb["hook"],
                "rows_loss_seconds": tb["rows"],
                "plain_step_seconds": tb["plain"],
                "step_seconds": tb["hooked"],
                "stat_bytes": tb["bytes"],
                "probes_seen": tb_probes,
            },
            "e2e": e2e,
            "summary": {
                "step_seconds": step,
                "hook_overhead_no_probe": 1 + _st.median(hook_times) / step,
                "hook_overhead_no_probe_ab": _st.median(no_probe["hooked"]) / step,
                "probe_cost": _st.median(probed) / _st.median(pr["plain"]) if probed else None,
                "batch_probe_cost": 1 + (_st.median(tb["hook"]) + _st.median(tb["rows"])) / _st.median(tb["plain"]),
                "batch_probe_cost_ab": _st.median(tb["hooked"]) / _st.median(tb["plain"]),
                **fsum,
                "fusion_over_step": fsum["fusion_seconds"] / step,
                "end_to_end_alternated_paper_defaults": _st.median(e2e["aim"]) / _st.median(e2e["seqft"]),
            },
        }
    )
    return res


JOBS = {"memory": job_memory, "full": job_full, "tp": job_tp}


def worker(spec_json: str, outdir: str) -> None:
    import warnings

    # DeepSpeed 0.19 calls torch.distributed functions that torch 2.13 deprecates: one line per collective
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    spec = json.loads(spec_json)
    rank = int(os.environ.get("RANK", "0"))
    try:
        result, error = JOBS[spec["job"]](Bench(spec)), None
    except BaseException:
        result, error = None, traceback.format_exc()
    tmp = Path(outdir) / f".rank{rank}.json"
    tmp.write_text(json.dumps({"result": result, "error": error}))
    tmp.replace(Path(outdir) / f"rank{rank}.json")
    if error:
        sys.exit(1)
