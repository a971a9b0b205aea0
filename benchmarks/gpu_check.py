"""One-rank ZeRO-3 bf16 check of the AimMerging plugin: step time, probe cost, fusion bandwidth, memory.

Run by benchmarks/gpu_check.sh on one GPU (a ~1.1B-parameter Llama built from a config, no weights
downloaded), or here on the CPU with a small model (`--cpu`, automatic when CUDA is absent):

    python benchmarks/gpu_check.py --cpu --out /tmp/gpu_check.json

Phases, all on one engine:
  1. plain:  N training steps with no plugin attached           -> step_seconds (median)
  2. probe:  the plugin attached with a probe every step          -> probe_step_seconds, probe_cost
            (steps on which the controller happened to merge are left out of the median)
  3. merge:  K explicit merges `plugin.merge(weights=(0.5, 0.5), rehearsal_steps=R)`
            -> fusion time, timed here around the fusion functions with the device synchronised,
               and the plugin's own record (fusion_seconds, fusion_bytes)
  4. copy:   torch copies of a shard-sized fp32 tensor on the same device -> copy bandwidth; the fusion
             is compared with the time a copy takes to move the same number of bytes (read + written)
Memory: the plugin's held_bytes() (by device/host), the allocator's growth when the plugin attaches,
torch.cuda.max_memory_allocated() before and after the plugin, and the merge's undo record (host memory
while a merge runs: theta_k + the optimizer's moments, 12 bytes per trainable parameter with Adam; see
`aim-ds estimate-memory`), from the plugin's merge records.

Writes JSON to --out (default: $OUT/gpu_check.json when OUT is set, else ./gpu_check.json).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import os
import platform
import statistics as _st
import sys
import time
from pathlib import Path

from aim_ds.experiment.modeling import tiny_llama_shape

REPO = Path(__file__).resolve().parents[1]

# ~1.1B parameters (TinyLlama-1.1B's shape), built from this config: no weights are downloaded
LLAMA_1B = dict(
    model_type="llama",
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
# small enough for two shared CPU cores, large enough that the fusion is more than call overhead
LLAMA_CPU = dict(
    model_type="llama",
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
LLAMA_TINY = tiny_llama_shape(rms_norm_eps=LLAMA_CPU["rms_norm_eps"])

PRESETS = {
    # name: (model, micro batch, sequence length, warm-up, plain steps, probe steps, merges, rehearsal steps)
    "gpu": (LLAMA_1B, 8, 512, 3, 10, 10, 3, 2),
    "cpu": (LLAMA_CPU, 2, 64, 1, 4, 4, 2, 1),
    "tiny": (LLAMA_TINY, 2, 16, 1, 2, 2, 2, 1),
}


def _single_rank_env() -> None:
    """Started without a launcher: be rank 0 of 1 on localhost."""
    from aim_ds.distributed import free_port

    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )


def default_out() -> str:
    out = os.environ.get("OUT")
    return os.path.join(out, "gpu_check.json") if out else os.path.abspath("gpu_check.json")


def ds_config(micro_batch: int, bf16: bool) -> dict:
    """ds_configs/gpu_zero3_bf16.json, adapted to a one-rank timing run (merging section set by the phases)."""
    cfg = json.loads((REPO / "ds_configs" / "gpu_zero3_bf16.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = 1
    cfg.pop("train_batch_size", None)
    cfg.pop("scheduler", None)  # constant LR: nothing here depends on a schedule
    cfg["steps_per_print"] = 10**9
    # torch's AdamW instead of DeepSpeed's fused one: no JIT build of fused_adam (nvcc, a minute or more)
    cfg["optimizer"]["params"]["torch_adam"] = True
    cfg["bf16"] = {"enabled": bool(bf16)}
    cfg["aim_merging"] = {"enabled": False}  # the plugin is attached with its own config in phase 2
    return cfg


class Sync:
    def __init__(self, cuda: bool):
        import torch

        self._sync = torch.cuda.synchronize if cuda else (lambda: None)

    def __call__(self):
        self._sync()


class FusionTimer:
    """Wraps aim_ds.ops.fusion's scalar fusion: device-synchronised time and the bytes it must move.

    Bytes are counted from the tensors passed in, each fp32 element read or written counted once (the
    bytes a single fused kernel must move; the ratio to a copy of as many bytes shows the overhead):
    fuse_scalar(theta, anchor, theta_k, ...) reads theta, anchor and theta_k and writes theta -> 4 shard
    passes; fuse_importance(theta, anchor, theta_k, score_in, q_in, score_out, ...) also reads the two
    scores -> 6.
    """

    PASSES = {
        "fuse_scalar": (lambda a: (a[0], a[1], a[2], a[0])),
        "fuse_importance": (lambda a: (a[0], a[1], a[2], a[3], a[5], a[0])),
    }

    def __init__(self, sync: Sync):
        from aim_ds.ops import fusion

        self.fusion, self.sync = fusion, sync
        self.seconds = 0.0
        self.bytes = 0
        self.calls = {k: 0 for k in self.PASSES}
        self.largest_numel = 0
        self._orig = {}
        for name, touched in self.PASSES.items():
            fn = getattr(fusion, name)
            self._orig[name] = fn
            setattr(fusion, name, self._wrap(name, fn, touched))

    def _wrap(self, name, fn, touched):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            self.sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.seconds += time.perf_counter() - t0
            self.bytes += sum(t.numel() * 4 for t in touched(args))  # fp32 elements of each pass
            self.calls[name] += 1
            self.largest_numel = max(self.largest_numel, args[0].numel())
            return out

        return wrapped

    def reset(self):
        self.seconds, self.bytes = 0.0, 0

    def restore(self):
        for name, fn in self._orig.items():
            setattr(self.fusion, name, fn)


def copy_bandwidth(numel: int, device, sync: Sync, reps: int, best: bool = False) -> float:
    """Bytes per second (read + written) of dst.copy_(src) for fp32 tensors of `numel` elements.

    The median of `reps` timed copies, or the fastest with best=True (for shared, noisy machines)."""
    import torch

    src = torch.randn(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * numel * 4 / (min(times) if best else _st.median(times))


def run(args) -> dict:
    import warnings

    # DeepSpeed 0.19 calls torch.distributed functions that torch 2.13 deprecates: one line per collective
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    import torch

    t_start = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.cpu
    preset = "gpu" if cuda else ("tiny" if args.tiny else "cpu")
    model_cfg, mb, seq, warm, n_plain, n_probe, n_merge, rehearsal = PRESETS[preset]
    mb = args.micro_batch or mb
    seq = args.seq_len or seq
    n_plain, n_probe = args.steps or n_plain, args.steps or n_probe
    n_merge = args.merges or n_merge
    _single_rank_env()
    if not cuda:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    import deepspeed
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    import aim_ds

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=_dt.timedelta(minutes=5))
    from aim_ds.distributed import release_cpu_shm_names

    release_cpu_shm_names()  # CPU only: DeepSpeed leaves ~69 MB per rank in /dev/shm otherwise
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    sync = Sync(cuda)
    torch.manual_seed(0)
    cfg_dict = dict(model_cfg)
    mcfg = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    dsc = ds_config(mb, bf16=not args.fp32)
    hf = HfDeepSpeedConfig(dsc)  # noqa: F841  (keep alive: the model is built inside zero.Init)
    model = AutoModelForCausalLM.from_config(mcfg)
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()], config=dsc)
    device = engine.device
    gen = torch.Generator().manual_seed(1)

    def batch():
        ids = torch.randint(0, mcfg.vocab_size, (mb, seq), generator=gen)
        return {
            "input_ids": ids.to(device),
            "attention_mask": torch.ones_like(ids).to(device),
            "labels": ids.clone().to(device),
        }

    def train_step(b):
        sync()
        t0 = time.perf_counter()
        loss = engine(**b).loss
        engine.backward(loss)
        engine.step()
        sync()
        return time.perf_counter() - t0

    # ---- phase 1: plain ZeRO-3
    train_batches = [batch() for _ in range(4)]
    for i in range(warm):
        train_step(train_batches[i % 4])
    plain = [train_step(train_batches[i % 4]) for i in range(n_plain)]
    peak_plain = torch.cuda.max_memory_allocated() if cuda else None
    alloc_before = torch.cuda.memory_allocated() if cuda else None

    # ---- phase 2: plugin attached, a probe on every step
    memory = [{k: v.cpu() for k, v in batch().items()} for _ in range(2)]
    aim_cfg = {
        "enabled": True,
        "interval_rule": "paper",
        "merge_first_task": True,
        "probe_interval": 1,
        "initial_interval": 128,
        "max_interval": 128,
        "weight_policy": "fixed",
        "w_in": 0.5,
        "w_out": 0.5,
        "anchor": "host" if args.anchor_host else "device",
    }
    plugin = aim_ds.attach(engine, memory, config=aim_cfg)
    plugin.start_task()
    sync()
    alloc_after = torch.cuda.memory_allocated() if cuda else None
    held = plugin.held_bytes()
    timer = FusionTimer(sync)
    for i in range(warm):
        train_step(train_batches[i % 4])
    probe_steps, merged_steps = [], 0
    for i in range(n_probe):
        before = plugin.merge_count
        t = train_step(train_batches[i % 4])
        if plugin.merge_count == before:
            probe_steps.append(t)
        else:
            merged_steps += 1
    probes_seen = sum(1 for r in plugin.trajectory if r.get("probe_loss") is not None)

    # ---- phase 3: explicit merges
    timer.reset()
    records, merge_wall, fusion_synced = [], [], []
    for _ in range(n_merge):
        before_s, before_b = timer.seconds, timer.bytes
        sync()
        t0 = time.perf_counter()
        rec = plugin.merge(weights=(0.5, 0.5), rehearsal_steps=rehearsal)
        sync()
        merge_wall.append(time.perf_counter() - t0)
        fusion_synced.append((timer.seconds - before_s, timer.bytes - before_b))
        records.append({k: v for k, v in rec.items() if k != "rehearsal_losses"})
    timer.restore()
    peak_all = torch.cuda.max_memory_allocated() if cuda else None

    # ---- phase 4: copy bandwidth on the same device
    # a copy that reads + writes the bytes one fusion touches (capped at 2 x 4 GiB: bandwidth is flat long before)
    f_bytes_med = int(_st.median(b for _, b in fusion_synced)) if fusion_synced else 0
    shard_numel = min(max(f_bytes_med // 8, timer.largest_numel, 1), 1 << 30)
    copy_bps = copy_bandwidth(shard_numel, device, sync, reps=5 if cuda else 3)

    step = _st.median(plain)
    probe_step = _st.median(probe_steps) if probe_steps else None
    f_sec = _st.median(s for s, _ in fusion_synced) if fusion_synced else None
    f_bytes = int(_st.median(b for _, b in fusion_synced)) if fusion_synced else None
    plug_sec = _st.median(r["fusion_seconds"] for r in records if "fusion_seconds" in r) if records else None
    plug_bytes = records[0].get("fusion_bytes") if records else None
    copy_same = f_bytes / copy_bps if f_bytes else None
    import resource

    result = {
        "schema": "aim_ds.gpu_check/1",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "cuda": cuda,
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__,
        },
        "preset": preset,
        "model": {"params": int(n_params), **{k: v for k, v in model_cfg.items()}},
        "dtype": "fp32" if args.fp32 else "bf16",
        "world_size": engine.world_size if hasattr(engine, "world_size") else 1,
        "micro_batch": mb,
        "seq_len": seq,
        "warmup_steps": warm,
        "anchor": aim_cfg["anchor"],
        # timings
        "step_seconds": step,
        "step_seconds_all": plain,
        "probe_step_seconds": probe_step,
        "probe_step_seconds_all": probe_steps,
        "probe_cost": (probe_step / step) if probe_step else None,
        "probes_seen": probes_seen,
        "controller_merges_during_probe_phase": merged_steps,
        "merges": n_merge,
        "rehearsal_steps": rehearsal,
        "merge_seconds_all": merge_wall,
        "fusion_seconds": f_sec,
        "fusion_bytes": f_bytes,
        "fusion_seconds_plugin_record": plug_sec,
        "fusion_bytes_plugin_record": plug_bytes,
        "fusion_passes_plugin_record": records[0].get("fusion_passes") if records else None,
        "fusion_bytes_per_second": (f_bytes / f_sec) if f_sec else None,
        "copy_bytes_per_second": copy_bps,
        "copy_numel": shard_numel,
        "copy_seconds_same_bytes": copy_same,
        "fusion_vs_copy": (f_sec / copy_same) if f_sec and copy_same else None,
        "fusion_over_step": (f_sec / step) if f_sec else None,
        "merge_records": records,
        # memory
        "plugin_bytes": held,
        "plugin_device_bytes": held["device"],
        "plugin_host_bytes": held["host"],
        "plugin_bytes_per_param": (held["device"] + held["host"]) / n_params,
        "allocated_growth_at_attach_bytes": (alloc_after - alloc_before) if cuda else None,
        "peak_memory_bytes": peak_all,
        "peak_memory_plain_bytes": peak_plain,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        # the undo record, measured in the merges above (it exists only during a merge)
        "undo": aim_cfg.get("undo", "host"),
        "undo_host_bytes": max((r.get("undo_host_bytes", 0) for r in records), default=None),
        "undo_disk_bytes": max((r.get("undo_disk_bytes", 0) for r in records), default=None),
        "seconds_total": time.perf_counter() - t_start,
    }
    undo = (result["undo_host_bytes"] or 0) + (result["undo_disk_bytes"] or 0)
    result["undo_bytes_per_param"] = undo / n_params
    result["merge_peak_host_bytes"] = held["host"] + (result["undo_host_bytes"] or 0)
    plugin.detach()
    del plugin
    # the other anchor placement: what the plugin holds on the device with "anchor": "host" (goal: 0 bytes)
    other = "device" if args.anchor_host else "host"
    alloc0 = torch.cuda.memory_allocated() if cuda else None
    plugin = aim_ds.attach(engine, memory, config=dict(aim_cfg, anchor=other))
    result[f"plugin_bytes_anchor_{other}"] = plugin.held_bytes()
    result[f"allocated_growth_at_attach_anchor_{other}_bytes"] = (
        (torch.cuda.memory_allocated() - alloc0) if cuda else None
    )
    plugin.detach()
    result["fusion_exactness"] = fusion_exactness(engine, memory, aim_cfg, lambda: train_step(train_batches[0]))
    return result


def fusion_exactness(engine, memory, aim_cfg: dict, train_step) -> dict:
    """For every "undo" x "anchor" pair: one training step moves the masters away from the anchor, then an
    explicit merge with weights (0.3, 0.6) whose rehearsal runs at lr 0 (so theta_M = theta_k and the fused
    value is a + 0.3 (theta_k - a), known from snapshots taken before the merge). Returns, per pair, the
    largest relative error of the fused masters and of the new anchor over the valid elements. Covers the
    accelerator-only copies: the host anchor streamed through the device, and with "undo": "off" the
    device-to-host reads of theta_k into the host anchor."""
    import tempfile

    import aim_ds

    out = {}
    opt = engine.optimizer
    groups = getattr(opt, "optimizer", opt).param_groups
    for undo in ("host", "nvme", "off"):
        for anchor in ("device", "host"):
            with tempfile.TemporaryDirectory() as folder:
                cfg = dict(aim_cfg, anchor=anchor, undo=undo, undo_path=folder if undo == "nvme" else None)
                plugin = aim_ds.attach(engine, memory, config=cfg)
                plugin.start_task()
                train_step()
                snap = [
                    (a.double().cpu(), g.master.double().cpu(), g.ranges)
                    for a, g in zip(plugin.anchor, plugin.shards.groups)
                ]
                lrs = [pg["lr"] for pg in groups]
                for pg in groups:
                    pg["lr"] = 0.0
                try:
                    plugin.merge(weights=(0.3, 0.6), rehearsal_steps=1)
                finally:
                    for pg, lr in zip(groups, lrs):
                        pg["lr"] = lr
                err_m = err_a = 0.0
                for (a, k, ranges), g, new_a in zip(snap, plugin.shards.groups, plugin.anchor):
                    ref = a + 0.3 * (k - a)
                    m, na = g.master.double().cpu(), new_a.double().cpu()
                    for st, n in ranges:
                        r = ref.narrow(0, st, n)
                        scale = float(r.abs().max()) or 1.0
                        err_m = max(err_m, float((m.narrow(0, st, n) - r).abs().max()) / scale)
                        err_a = max(err_a, float((na.narrow(0, st, n) - r).abs().max()) / scale)
                out[f"undo_{undo}_anchor_{anchor}"] = {"master_rel_err": err_m, "anchor_rel_err": err_a}
                plugin.detach()
    out["all_exact"] = all(v["master_rel_err"] <= 1e-6 and v["anchor_rel_err"] <= 1e-6 for v in out.values())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU with a small model (automatic without CUDA)")
    p.add_argument("--tiny", action="store_true", help="on the CPU: the smallest model (tests)")
    p.add_argument("--fp32", action="store_true", help="fp32 instead of bf16")
    p.add_argument("--anchor-host", action="store_true", help="aim_merging anchor: host")
    p.add_argument("--steps", type=int, default=None, help="timed steps per phase (preset's by default)")
    p.add_argument("--merges", type=int, default=None, help="explicit merges timed (preset's by default)")
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_check.json, else ./gpu_check.json)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = p.parse_args(argv)
    result = run(args)
    if int(os.environ.get("RANK", "0")) == 0:
        out = args.out or default_out()
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, out)
        keys = [
            "preset",
            "step_seconds",
            "probe_cost",
            "fusion_vs_copy",
            "fusion_over_step",
            "plugin_device_bytes",
            "plugin_bytes_per_param",
            "peak_memory_bytes",
        ]
        print(json.dumps({k: result[k] for k in keys}))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
