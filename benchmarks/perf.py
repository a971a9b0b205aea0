"""Measured costs of the AimMerging plugin against its goals (issue 5), on CPU ranks (gloo).

    python benchmarks/perf.py [--quick] [--fusion] [--json PATH]

Launches its own multi-rank DeepSpeed runs (one process per rank, CPU accelerator, gloo; the in-rank jobs
are in perf_jobs.py) and reports, side by side from the same runs (never as timed assertions in tests):

  plugin_bytes_per_param_per_rank  {"1","2","3"}: max over ranks of the bytes of tensors the plugin holds
                                   (AimPlugin.held_bytes(), device + host) / total trainable parameters
                                   (goal 4/N; DeepSpeed pads each parameter's partition to ceil(numel/N),
                                   so on a tensor that does not split evenly a buffer shaped like the
                                   partition is a few elements over; the benchmark models split evenly)
  plugin_bytes_per_partition_element_per_rank  the same bytes / this rank's padded partition elements
                                   (sum of ceil(numel/N) over parameters); 4 = one fp32 copy of the
                                   partition = 4/N per padded parameter
  stat_bytes_per_step              bytes a rank passes to the plugin's collectives on a probed step
                                   without a merge, counted by wrapping aim_ds.ops.collectives.all_reduce /
                                   broadcast (tensor.numel() * element_size per call); also per model size
  fusion_vs_copy                   fusion time / time of a torch copy moving the same bytes (same rank)
  zero2                            the plugin bytes at ZeRO stage 2 (N = 1, 2, 3; partition = this rank's
                                   slices of DeepSpeed's flat fp32 groups) and fusion vs copy at N = 2
  autotp                           stat_bytes_per_step with DeepSpeed AutoTP ("tensor_parallel":
                                   {"autotp_size": 2}, ZeRO stage 1, fp32) on 2 ranks, at two model sizes
  fusion_over_step                 fusion time per merge / plain training step
  hook_overhead_no_probe           (plain step + time in the hook on a step with no probe, no merge) /
                                   plain step, the hook time per step taken on the rank that reached the
                                   hook's broadcast last (the others' extra is waiting for it); the max over
                                   ranks and the interleaved A/B ratio are reported beside it
  probe_cost                       probed step / plain step (interleaved, steps that merged left out)
  batch_probe_cost                 the same for the default probe_source "training_batch": plain step + the
                                   rows_loss of half the batch + the hook (last-arriving rank) / plain step
  end_to_end_aim_over_seqft        training wall time of `launch/train.py --method aim` / `--method seqft` on
                                   the driver's embedded default benchmark with the driver's default
                                   ds_config (ds_configs/cpu_zero3.json: the config whose quality
                                   BENCHMARKS.md reports), same data and training steps, evaluation
                                   excluded (results.json train_wall_s); the two run side by side (one
                                   process each) so machine load hits both; median over seeds. OP/BWT of
                                   the same runs are recorded beside it (end_to_end_runs)
  end_to_end_alternated_paper_defaults  a 2-task synthetic sequence with the paper defaults
                                   (`{"enabled": true}`) / the same without the plugin, alternated step by
                                   step on one engine (reported, no goal: not the quality config)

Plain and hooked steps are interleaved on one engine (the plain step calls DeepSpeed's own
`type(engine).step`, the hooked one the plugin's instance hook), so machine noise hits both alike.
Without --json a table is printed; --json PATH also writes the full record.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import statistics as _st
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the in-rank side (a sibling module: this script's own folder is on sys.path)
from perf_jobs import HOOK_REPS, MODELS, worker  # noqa: E402

GOALS = {  # figure: (goal, how it compares)
    "plugin_bytes_per_param_per_rank": ("<= 4/N", None),
    "stat_bytes_per_step": (64, "<="),
    "fusion_vs_copy": (1.5, "<="),
    "hook_overhead_no_probe": (1.01, "<="),
    "end_to_end_aim_over_seqft": (1.3, "<="),
}

PLANS = {
    # micro batch, seq, interleaved repetitions, explicit merges, steps per task (end to end), e2e repetitions
    # task_steps: the default config's first merge of task 1 is forced at 2 S_0 = 16 steps at the latest,
    # so fewer steps would time the probes but never a merge
    # driver_seeds: seeds of the seqft/aim driver pairs behind end_to_end_aim_over_seqft
    "quick": dict(model="small", mb=2, seq=64, reps=6, merges=5, task_steps=24, e2e_reps=1, driver_seeds=[0, 1, 2, 3]),
    "full": dict(
        model="medium", mb=4, seq=128, reps=16, merges=6, task_steps=48, e2e_reps=2, driver_seeds=[0, 1, 2, 3, 4, 5]
    ),
}


# =============================================================================== launching
def launch(spec: dict, world: int, timeout: float) -> list[dict]:
    """Run `worker(spec)` on `world` local CPU ranks; return each rank's result. Kills all ranks on timeout."""
    from aim_ds.distributed import run_local_ranks

    out = Path(tempfile.mkdtemp(prefix=f"aim_perf_{spec['job']}_w{world}_"))
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    codes, timed_out = run_local_ranks(
        lambda r, port: [sys.executable, __file__, "--worker", json.dumps(spec), str(out)],
        world,
        str(out),
        timeout,
        env=env,
        cwd=str(REPO),
    )
    if timed_out:
        raise RuntimeError(f"perf job {spec['job']} on {world} ranks timed out after {timeout:.0f} s; logs in {out}")
    results = []
    for r in range(world):
        f = out / f"rank{r}.json"
        if not f.exists():
            tail = (out / f"rank{r}.log").read_text()[-3000:]
            raise RuntimeError(f"perf job {spec['job']} rank {r} wrote no result (exit {codes[r]}):\n{tail}")
        res = json.loads(f.read_text())
        if res.get("error"):
            raise RuntimeError(f"perf job {spec['job']} rank {r} failed:\n{res['error']}")
        results.append(res["result"])
    return results


# =============================================================================== orchestration
def _loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages (the machine is shared: report them next to the timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


DRIVER = REPO / "launch" / "train.py"


def _driver_pair(methods, seed, root: Path, env, timeout: float) -> dict:
    """Two single-process driver runs side by side (same seed, same data and training steps); their results."""
    procs = {}
    for m in methods:
        out = root / f"{m}-s{seed}-{len(list(root.glob(f'{m}-s{seed}-*.log')))}"
        cmd = [
            sys.executable,
            str(DRIVER),
            "--method",
            m,
            "--seed",
            str(seed),
            "--batch-size",
            "16",
            "--fwt-reference",
            "none",
            "--no-progress",
            "--output-dir",
            str(out),
        ]
        log_f = open(f"{out}.log", "w")
        procs[m] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_f, stderr=subprocess.STDOUT), out, log_f)
    res = {}
    for m, (p, out, log_f) in procs.items():
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q, _, f in procs.values():
                q.kill()
                f.close()
            raise RuntimeError(
                f"perf: driver {m} seed {seed} timed out after {timeout:.0f} s; logs in {root}"
            ) from None
        log_f.close()
        if p.returncode != 0 or not (out / "results.json").exists():
            tail = Path(f"{out}.log").read_text()[-3000:]
            raise RuntimeError(f"perf: driver {m} seed {seed} failed (exit {p.returncode}):\n{tail}")
        res[m] = json.loads((out / "results.json").read_text())
        traj = out / "trajectory.csv"
        res[m]["probes"] = None
        if traj.exists():
            with open(traj) as f:
                res[m]["probes"] = sum(1 for row in csv.DictReader(f) if row.get("probe_loss") not in (None, ""))
    return res


def _summary(r: dict) -> dict:
    from common import work_tokens

    w = r.get("work") or {}
    fwd_bwd, fwd_only = work_tokens(w)
    return {
        "train_s": r["train_wall_s"],
        "OP": r["OP"],
        "BWT": r["BWT"],
        "engine_steps": r["steps"]["engine"],
        "merges": r["merges"],
        "probes": r.get("probes"),
        "replay_rows": r["config"].get("replay_rows"),
        "tokens_fwd_bwd": fwd_bwd,
        "tokens_fwd_only": fwd_only,
        "work": w,
    }


def driver_end_to_end(seeds, log=print, timeout: float = 600) -> list[dict]:
    """`launch/train.py` with the driver's default ds_config on the embedded default benchmark, one process per
    run (world 1, batch 16 = the 2-rank default's global batch): per seed, seqft and aim side by side, then replay
    (the same mixed memory rows as aim, no plugin) and aim side by side, so that machine load hits both runs of a
    pair alike. Returns per seed both ratios of train_wall_s, quality, engine steps and the tokens each run
    pushed through forward + backward (counted by the driver and the plugin)."""
    from common import driver_env

    env = driver_env()
    root = Path(tempfile.mkdtemp(prefix="aim_perf_e2e_"))
    runs = []
    for seed in seeds:
        a = _driver_pair(("seqft", "aim"), seed, root, env, timeout)
        b = _driver_pair(("replay", "aim"), seed, root, env, timeout)
        q, aim, rep, aim2 = (_summary(x) for x in (a["seqft"], a["aim"], b["replay"], b["aim"]))
        run = {
            "seed": seed,
            "seqft_train_s": q["train_s"],
            "aim_train_s": aim["train_s"],
            "ratio": aim["train_s"] / q["train_s"],
            "replay_train_s": rep["train_s"],
            "aim_train_s_beside_replay": aim2["train_s"],
            "ratio_over_replay": aim2["train_s"] / rep["train_s"],
            "tokens_ratio": aim["tokens_fwd_bwd"] / q["tokens_fwd_bwd"],
            "tokens_ratio_over_replay": aim["tokens_fwd_bwd"] / rep["tokens_fwd_bwd"],
            "seqft": q,
            "aim": aim,
            "replay": rep,
        }
        runs.append(run)
        log(
            f"perf:   seed {seed}: seqft {q['train_s']:.1f} s, aim {aim['train_s']:.1f} s (ratio {run['ratio']:.2f}); "
            f"replay {rep['train_s']:.1f} s, aim {aim2['train_s']:.1f} s (ratio {run['ratio_over_replay']:.2f}); "
            f"tokens aim/seqft {run['tokens_ratio']:.2f}; OP/BWT aim {aim['OP']:.1f}/{aim['BWT']:.1f}, "
            f"replay {rep['OP']:.1f}/{rep['BWT']:.1f}, seqft {q['OP']:.1f}/{q['BWT']:.1f}"
        )
    return runs


def measure(plan_name: str, log=print) -> dict:
    plan = PLANS[plan_name]
    t_start = time.perf_counter()
    base = dict(plan, bf16=True)
    out: dict = {
        "schema": "aim_ds.perf/1",
        "plan": plan_name,
        "plan_settings": plan,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "backend": "gloo (CPU)",
        "goals": {k: v[0] for k, v in GOALS.items()},
    }
    per_world = {}
    out["load_average"] = {"start": _loadavg()}
    # memory (and stat bytes) at N = 1 and 3; everything at N = 2
    for world, job in ((1, "memory"), (3, "memory"), (2, "full")):
        log(f"perf: {job} job on {world} rank(s), model {plan['model']} ...")
        t0 = time.perf_counter()
        # the full plan's N=2 job took 757 s on 2026-12-01: room for a slower or busier machine
        per_world[world] = launch(dict(base, job=job), world, timeout=900 if plan_name == "quick" else 2700)
        out["load_average"][f"after_{job}_w{world}"] = _loadavg()
        log(f"perf:   done in {time.perf_counter() - t0:.0f} s (load average {_loadavg()})")
    log("perf: statistics bytes with the tiny model on 2 ranks ...")
    tiny = launch(dict(base, job="memory", model="tiny"), 2, timeout=300)
    # ZeRO stage 2 (flat fp32 partitions): held bytes at N = 1, 2, 3; fusion vs copy at N = 2
    stage2 = {}
    for world in (1, 2, 3):
        log(f"perf: ZeRO-2 memory job on {world} rank(s) ...")
        spec = dict(base, job="memory", stage=2, fusion=world == 2)
        stage2[world] = launch(spec, world, timeout=600)
    out["load_average"]["after_stage2"] = _loadavg()
    # AutoTP (tensor_parallel.autotp_size 2) with ZeRO-1 on 2 ranks, fp32 (as the tests run it), two model sizes
    tp = {}
    for model in ("tiny", plan["model"]):
        log(f"perf: AutoTP 2 x ZeRO-1 statistics bytes, model {model} ...")
        tp[model] = launch(dict(base, job="tp", model=model, stage=1, tp=2, bf16=False), 2, timeout=600)
    out["load_average"]["after_tp"] = _loadavg()

    import deepspeed
    import torch  # noqa: F401  (versions)
    import transformers

    out["machine"].update(
        torch=torch.__version__, deepspeed=deepspeed.__version__, transformers=transformers.__version__
    )
    params = per_world[2][0]["params"]
    out["model"] = dict(MODELS[plan["model"]], params=params)
    out["world_sizes"] = {
        "plugin_bytes_per_param_per_rank": [1, 2, 3],
        "stat_bytes_per_step": [1, 2, 3],
        "timings": [2],
    }
    out["plugin_bytes_per_param_per_rank"] = {
        str(w): max(r["bytes_per_param"] for r in per_world[w]) for w in (1, 2, 3)
    }
    out["plugin_bytes_per_param_per_rank_goal"] = {str(w): 4 / w for w in (1, 2, 3)}
    # 4 bytes per element of the rank's padded partition (ceil(numel / N) per parameter) / total params
    out["plugin_bytes_per_param_per_rank_padded_bound"] = {
        str(w): max(4 * r["partition_numel"] / r["params"] for r in per_world[w]) for w in (1, 2, 3)
    }
    out["plugin_bytes_per_partition_element_per_rank"] = {
        str(w): max((r["held_bytes"]["device"] + r["held_bytes"]["host"]) / r["partition_numel"] for r in per_world[w])
        for w in (1, 2, 3)
    }
    out["partition_numel_by_world"] = {str(w): max(r["partition_numel"] for r in per_world[w]) for w in (1, 2, 3)}
    out["plugin_held_bytes_by_rank"] = {str(w): [r["held_bytes"] for r in per_world[w]] for w in (1, 2, 3)}

    def stat(results):
        return max((max(r["stat_bytes_probe_steps"], default=0) for r in results), default=0)

    # probed steps of both probe sources (a probe forward; the loss read off the training batch: the default)
    out["stat_bytes_per_step"] = max(
        max(stat(per_world[w]) for w in (1, 2, 3)),
        max(max(r["batch_probe"]["stat_bytes"], default=0) for r in per_world[2]),
    )
    out["stat_bytes_per_step_by_world"] = {str(w): stat(per_world[w]) for w in (1, 2, 3)}
    out["stat_bytes_per_step_by_model_params"] = {str(params): stat(per_world[2]), str(tiny[0]["params"]): stat(tiny)}
    out["stat_bytes_explicit_merge"] = per_world[2][0]["stat_bytes_explicit_merge"]
    out["zero2"] = {
        "plugin_bytes_per_param_per_rank": {str(w): max(r["bytes_per_param"] for r in stage2[w]) for w in (1, 2, 3)},
        "plugin_bytes_per_partition_element_per_rank": {
            str(w): max((r["held_bytes"]["device"] + r["held_bytes"]["host"]) / r["partition_numel"] for r in stage2[w])
            for w in (1, 2, 3)
        },
        "stat_bytes_per_step": max(stat(stage2[w]) for w in (1, 2, 3)),
        "fusion_vs_copy": max(r["summary"]["fusion_vs_copy"] for r in stage2[2]),
        "fusion_passes": stage2[2][0]["summary"]["fusion_passes"],
        "fusion_seconds": max(r["summary"]["fusion_seconds"] for r in stage2[2]),
        "fusion_bytes": stage2[2][0]["summary"]["fusion_bytes"],
    }
    out["autotp"] = {
        "config": "tensor_parallel.autotp_size 2, ZeRO stage 1, fp32, 2 ranks (tp group of 2, data parallel 1)",
        "stat_bytes_per_step": max(stat(tp[m]) for m in tp),
        "stat_bytes_per_step_by_model_params": {str(tp[m][0]["params"]): stat(tp[m]) for m in tp},
        "tp_sliced_params": {str(tp[m][0]["params"]): tp[m][0]["tp_sliced_params"] for m in tp},
        "stat_bytes_explicit_merge": {str(tp[m][0]["params"]): tp[m][0]["stat_bytes_explicit_merge"] for m in tp},
    }
    full0 = per_world[2][0]
    summaries = [r["summary"] for r in per_world[2]]
    # the slowest rank sets the pace of a collective step: take the max over ranks of each ratio
    for k in (
        "hook_overhead_no_probe",
        "hook_overhead_no_probe_ab",
        "probe_cost",
        "batch_probe_cost",
        "batch_probe_cost_ab",
        "fusion_vs_copy",
        "fusion_over_step",
        "end_to_end_alternated_paper_defaults",
    ):
        vals = [s[k] for s in summaries if s[k] is not None]
        out[k] = max(vals) if vals else None

    # Except for the hook's own time: the hook ends in a collective (the 8-byte decision broadcast), so a rank
    # that reaches it first waits there for the others, skew the step would spend in its next collective anyway,
    # not hook work. Per step, the rank that arrived last waited least: its hook time is what the hook adds to
    # the critical path. The max over ranks (which includes the waiting) is kept beside it.
    def last_arrival(get):
        lists = [get(r) for r in per_world[2]]
        return _st.median(min(x[i] for x in lists) for i in range(min(len(x) for x in lists)))

    for k in ("hook_overhead_no_probe", "batch_probe_cost"):
        out[f"{k}_max_over_ranks"] = out[k]
    out["hook_overhead_no_probe"] = 1 + last_arrival(lambda r: r["hook_seconds"]) / max(
        _st.median(r["plain_step_seconds"]) for r in per_world[2]
    )
    out["batch_probe_cost"] = 1 + (
        last_arrival(lambda r: r["batch_probe"]["hook_seconds"])
        + max(_st.median(r["batch_probe"]["rows_loss_seconds"]) for r in per_world[2])
    ) / max(_st.median(r["batch_probe"]["plain_step_seconds"]) for r in per_world[2])
    out["step_seconds"] = full0["summary"]["step_seconds"]
    out["fusion_seconds"] = max(s["fusion_seconds"] for s in summaries)
    out["fusion_bytes"] = full0["summary"]["fusion_bytes"]
    out["fusion_passes"] = full0["summary"]["fusion_passes"]
    out["fusion_passes_plugin_record"] = full0["fusion"][0]["plugin_passes"] if full0["fusion"] else None
    out["stat_bytes_no_probe_step"] = max(max(r["stat_bytes_no_probe_steps"], default=0) for r in per_world[2])
    out["stat_bytes_batch_probe_step"] = max(max(r["batch_probe"]["stat_bytes"], default=0) for r in per_world[2])
    out["e2e"] = full0["e2e"]
    # cross-check of the wall-time ratio from counted work (noise-free): each rehearsal step costs a plain
    # step, each probe (probe_cost - 1) of one; the measured ratio should agree when the machine is quiet
    e, train = full0["e2e"], 2 * plan["task_steps"]
    if out.get("probe_cost") and e["aim"]:
        out["end_to_end_alternated_from_counts"] = (
            1 + (_st.median(e["aim_rehearsal_steps"]) + _st.median(e["aim_probes"]) * (out["probe_cost"] - 1)) / train
        )
    log(f"perf: end to end, driver seqft / replay vs aim on the default benchmark, seeds {plan['driver_seeds']} ...")
    runs = driver_end_to_end(plan["driver_seeds"], log)
    out["end_to_end_runs"] = runs
    out["end_to_end_aim_over_seqft"] = _st.median(r["ratio"] for r in runs)
    out["end_to_end_aim_over_seqft_per_seed"] = [r["ratio"] for r in runs]
    # the plugin's own cost over the training it is added to: replay with the same mixed memory rows
    out["end_to_end_aim_over_replay"] = _st.median(r["ratio_over_replay"] for r in runs)
    # what a compute-bound accelerator pays: tokens through forward + backward, counted (noise-free)
    out["end_to_end_tokens_aim_over_seqft"] = _st.median(r["tokens_ratio"] for r in runs)
    out["end_to_end_tokens_aim_over_replay"] = _st.median(r["tokens_ratio_over_replay"] for r in runs)
    out["end_to_end_config"] = "ds_configs/cpu_zero3.json (the driver's default; quality in BENCHMARKS.md)"
    out["repetitions"] = {
        "interleaved_step_pairs": plan["reps"],
        "hook_and_batch_probe_step_pairs": max(plan["reps"], HOOK_REPS),
        "explicit_merges": plan["merges"],
        "e2e_repetitions": plan["e2e_reps"],
        "steps_per_task": plan["task_steps"],
        "driver_seeds": plan["driver_seeds"],
    }
    out["raw"] = {"world2_rank0": full0}
    out["load_average"]["end"] = _loadavg()
    out["seconds_total"] = time.perf_counter() - t_start
    out["goals_met"] = goals_met(out)
    return out


def goals_met(d: dict) -> dict:
    met = {}
    pb = d.get("plugin_bytes_per_param_per_rank") or {}
    met["plugin_bytes_per_param_per_rank"] = all(v <= 4 / int(w) * (1 + 1e-9) for w, v in pb.items()) if pb else None
    bound = d.get("plugin_bytes_per_param_per_rank_padded_bound") or {}
    if pb and bound:  # the same goal read on the padded partition DeepSpeed gives each rank
        met["plugin_bytes_per_param_per_rank_padded"] = all(v <= bound[w] * (1 + 1e-9) for w, v in pb.items())
    pe = d.get("plugin_bytes_per_partition_element_per_rank") or {}
    if pe:  # 4 bytes per padded partition element = 4/N per padded parameter
        met["plugin_bytes_per_partition_element_per_rank"] = all(v <= 4 * (1 + 1e-9) for v in pe.values())
    for k, (goal, op) in GOALS.items():
        if op and d.get(k) is not None:
            met[k] = d[k] <= goal
    z2 = d.get("zero2") or {}
    if z2.get("plugin_bytes_per_param_per_rank"):
        met["zero2_plugin_bytes_per_param_per_rank"] = all(
            v <= 4 / int(w) * (1 + 1e-9) for w, v in z2["plugin_bytes_per_param_per_rank"].items()
        )
    if z2.get("fusion_vs_copy") is not None:
        met["zero2_fusion_vs_copy"] = z2["fusion_vs_copy"] <= GOALS["fusion_vs_copy"][0]
    if (d.get("autotp") or {}).get("stat_bytes_per_step") is not None:
        met["autotp_stat_bytes_per_step"] = d["autotp"]["stat_bytes_per_step"] <= GOALS["stat_bytes_per_step"][0]
    return met


def table(d: dict) -> str:
    rows = [
        (
            "plugin bytes / param / rank",
            ", ".join(f"N={w}: {v:.6f} (<= {4 / int(w):.6f})" for w, v in d["plugin_bytes_per_param_per_rank"].items()),
            d["goals_met"].get("plugin_bytes_per_param_per_rank"),
        ),
        (
            "plugin bytes / padded partition element",
            ", ".join(
                f"N={w}: {v:.4f} (<= 4 = 4/N per padded param)"
                for w, v in d.get("plugin_bytes_per_partition_element_per_rank", {}).items()
            ),
            d["goals_met"].get("plugin_bytes_per_partition_element_per_rank"),
        ),
        (
            "stat bytes / step (probed, no merge)",
            f"{d['stat_bytes_per_step']} (<= 64; by model size {d['stat_bytes_per_step_by_model_params']})",
            d["goals_met"].get("stat_bytes_per_step"),
        ),
        ("fusion / copy of same bytes", f"{d['fusion_vs_copy']:.3f} (<= 1.5)", d["goals_met"].get("fusion_vs_copy")),
    ]
    z2, tp = d.get("zero2"), d.get("autotp")
    if z2:
        rows += [
            (
                "ZeRO-2: plugin bytes / param / rank",
                ", ".join(
                    f"N={w}: {v:.6f} (<= {4 / int(w):.6f})" for w, v in z2["plugin_bytes_per_param_per_rank"].items()
                ),
                d["goals_met"].get("zero2_plugin_bytes_per_param_per_rank"),
            ),
            (
                "ZeRO-2: fusion / copy of same bytes (N=2)",
                f"{z2['fusion_vs_copy']:.3f} (<= 1.5)",
                d["goals_met"].get("zero2_fusion_vs_copy"),
            ),
        ]
    if tp:
        rows.append(
            (
                "AutoTP 2 x ZeRO-1: stat bytes / step",
                f"{tp['stat_bytes_per_step']} (<= 64; by model size {tp['stat_bytes_per_step_by_model_params']})",
                d["goals_met"].get("autotp_stat_bytes_per_step"),
            )
        )
    rows += [
        (
            "hook overhead, no probe",
            f"{d['hook_overhead_no_probe']:.4f} (<= 1.01; with the waiting of the first-arriving "
            f"rank {d.get('hook_overhead_no_probe_max_over_ranks', float('nan')):.4f}; A/B {d['hook_overhead_no_probe_ab']:.3f})",
            d["goals_met"].get("hook_overhead_no_probe"),
        ),
        (
            "end to end AimMerging / SeqFT (driver, default config)",
            f"{d['end_to_end_aim_over_seqft']:.3f} (<= 1.3; "
            f"per seed {', '.join(f'{x:.2f}' for x in d['end_to_end_aim_over_seqft_per_seed'])})",
            d["goals_met"].get("end_to_end_aim_over_seqft"),
        ),
        ("end to end AimMerging / replay (same mixed memory rows)", f"{d['end_to_end_aim_over_replay']:.3f}", None),
        (
            "tokens fwd+bwd AimMerging / SeqFT (/ replay)",
            f"{d['end_to_end_tokens_aim_over_seqft']:.3f} (/ replay {d['end_to_end_tokens_aim_over_replay']:.3f})",
            None,
        ),
        ("end to end, alternated, paper defaults", f"{d['end_to_end_alternated_paper_defaults']:.3f}", None),
        (
            "probe step / plain step (probe forward every step)",
            f"{d['probe_cost']:.3f}" if d["probe_cost"] else "n/a",
            None,
        ),
        (
            "step with the loss read off the batch / plain step",
            f"{d['batch_probe_cost']:.4f} (A/B {d['batch_probe_cost_ab']:.3f})",
            None,
        ),
        ("fusion per merge / step", f"{d['fusion_over_step']:.4f}", None),
        (
            "fusion shard passes (measured / plugin)",
            f"{d['fusion_passes']:.2f} / {d['fusion_passes_plugin_record']}",
            None,
        ),
    ]
    w = max(len(r[0]) for r in rows)
    lines = [
        f"AimMerging perf ({d['plan']}): model {d['model']['params'] / 1e6:.1f}M params, gloo CPU ranks, "
        f"plain step {d['step_seconds']:.3f} s at N=2, {d['date']}, load average {d.get('load_average')}"
    ]
    for name, val, ok in rows:
        mark = "" if ok is None else ("  ok" if ok else "  MISSED")
        lines.append(f"  {name:<{w}}  {val}{mark}")
    for r in d.get("end_to_end_runs", []):
        lines.append(
            f"  end to end, seed {r['seed']}: SeqFT {r['seqft_train_s']:.1f} s (OP {r['seqft']['OP']:.1f}, "
            f"BWT {r['seqft']['BWT']:.1f}), AimMerging {r['aim_train_s']:.1f} s (OP {r['aim']['OP']:.1f}, "
            f"BWT {r['aim']['BWT']:.1f}; {r['aim']['engine_steps']} engine steps vs {r['seqft']['engine_steps']}, "
            f"{r['aim']['merges']} merges, {r['aim']['replay_rows']} memory rows per batch); replay "
            f"{r['replay_train_s']:.1f} s beside AimMerging {r['aim_train_s_beside_replay']:.1f} s (OP "
            f"{r['replay']['OP']:.1f}, BWT {r['replay']['BWT']:.1f}); tokens fwd+bwd {r['seqft']['tokens_fwd_bwd']} "
            f"/ {r['replay']['tokens_fwd_bwd']} / {r['aim']['tokens_fwd_bwd']} (seqft / replay / aim)"
        )
    e = d["e2e"]
    lines.append(
        f"  end to end, alternated, paper defaults: SeqFT {e['seqft']} s, AimMerging {e['aim']} s, merges "
        f"{e['aim_merges']}, rehearsal steps {e['aim_rehearsal_steps']}, probes {e['aim_probes']}; from counted "
        f"work {d.get('end_to_end_alternated_from_counts', float('nan')):.3f}"
    )
    return "\n".join(lines)


def measure_fusion(plan_name: str, log=print) -> dict:
    """fusion / copy alone, at ZeRO stages 2 and 3 on 2 ranks (the memory job with its fusion part): minutes,
    not the whole plan. The largest ratio over ranks, as in measure()."""
    base = dict(PLANS[plan_name], bf16=True)
    out: dict = {"schema": "aim_ds.perf.fusion/1", "plan": plan_name, "load_average": {"start": _loadavg()}}
    out["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    for stage in (2, 3):
        log(f"perf: fusion vs copy, ZeRO-{stage} on 2 ranks ...")
        res = [r["summary"] for r in launch(dict(base, job="memory", stage=stage, fusion=True), 2, timeout=600)]
        out[f"zero{stage}"] = {k: max(s[k] for s in res) for k in ("fusion_vs_copy", "fusion_seconds", "fusion_passes")}
        out[f"zero{stage}"]["fusion_bytes"] = res[0]["fusion_bytes"]
        out["load_average"][f"after_zero{stage}"] = _loadavg()
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1], argv[2])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small model, fewer repetitions (< 15 minutes here)")
    p.add_argument("--fusion", action="store_true", help="only fusion / copy at ZeRO-2 and ZeRO-3 (minutes)")
    p.add_argument("--json", metavar="PATH", help="write the full record as JSON to PATH")
    args = p.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    plan = "quick" if args.quick else "full"
    d = measure_fusion(plan, log=log) if args.fusion else measure(plan, log=log)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(d, indent=2))
    print(json.dumps(d, indent=2) if args.fusion else table(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
