"""The run's outputs, written by rank 0: results.json, trajectory.csv, losses.csv and the two plots."""

from __future__ import annotations

import os
import time

from .args import PLUGIN_METHODS

AIM_METHODS = tuple(m for m in PLUGIN_METHODS if m != "forever")  # the methods that read "aim_merging"


def metrics(method: str, matrix: list, single_scores) -> dict:
    K = len(matrix[0])
    if method == "single":
        return {"OP": sum(matrix[i][i] for i in range(K)) / K, "BWT": None, "FWT": 0.0}
    if method == "multitask":
        return {"OP": sum(matrix[-1]) / K, "BWT": None, "FWT": None}
    from aim_ds.experiment.evaluation import cl_metrics

    return dict(cl_metrics(matrix, single_scores))


def write_results(state, res: dict, ds_config: dict, info, t0: float) -> None:
    """t0: the process start (wall_time_s counts from it)."""
    from aim_ds.experiment import report

    cfg, out = state.cfg, state.out_dir
    names = [t.name for t in state.tasks]
    matrix = res["matrix"]
    m = metrics(cfg.method, matrix, state.single_scores)
    plugin = res.get("plugin")
    wall = time.time() - t0
    report.write_json(os.path.join(out, "results.json"), results_record(state, res, ds_config, info, m, wall))
    traj_path = os.path.join(out, "trajectory.csv")
    rows = res.get("trajectory_rows")
    if plugin is not None:
        plugin.write_trajectory_csv(traj_path)
    else:
        rows = [
            {"task": r["task"], "step": r["step"], "interval": None, "activations": None, "merge": 0}
            for r in res["losses"]
        ]
        report.write_csv(traj_path, rows, report.TRAJECTORY_FIELDS)
    report.write_csv(os.path.join(out, "losses.csv"), res["losses"], ["task", "step", "loss"])
    title = f"{cfg.benchmark} / {cfg.method} / seed {cfg.seed}"
    report.plot_accuracy(
        os.path.join(out, "accuracy.png"), matrix, names, f"{title}: OP {_fmt(m.get('OP'))} BWT {_fmt(m.get('BWT'))}"
    )
    report.plot_trajectory(os.path.join(out, "trajectory.png"), rows, res["losses"], title)
    print(
        f"[aim_ds] {cfg.method}: OP {_fmt(m.get('OP'))}  BWT {_fmt(m.get('BWT'))}  "
        f"FWT {_fmt(m.get('FWT'))}  merges {res['merges']}  wall {wall:.1f}s  -> {out}",
        flush=True,
    )


def results_record(state, res: dict, ds_config: dict, info, m: dict, wall: float) -> dict:
    """What results.json holds."""
    cfg, tasks, matrix, plugin = state.cfg, state.tasks, res["matrix"], res.get("plugin")
    notes = []
    section = ds_config.get("aim_merging")
    if cfg.method not in AIM_METHODS and (section or {}).get("enabled", bool(section)):
        notes.append(
            f"the ds_config's aim_merging section is enabled but --method {cfg.method} does not use "
            "AimMerging: it was not attached"
        )
    return {
        "method": cfg.method,
        "benchmark": cfg.benchmark,
        "order": cfg.order,
        "data_dir": cfg.data_dir,
        "tasks": [
            {
                "name": t.name,
                "metric": t.metric,
                "n_train": len(t.train),
                "n_eval": len(t.eval),
                "labels": t.labels,
                "memory": len(mem),
            }
            for t, mem in zip(tasks, state.memories)
        ],
        "matrix": matrix,
        "OP": m.get("OP"),
        "BWT": m.get("BWT"),
        "FWT": m.get("FWT"),
        "single_task_scores": state.single_scores,
        "fwt_reference": state.fwt_source,
        "final_row": dict(zip([t.name for t in tasks], matrix[-1])),
        "steps": {"train": res["train_steps"], "engine": res["engine_steps"], "per_task": state.steps_per_task},
        "merges": res["merges"],
        # tokens through forward + backward (training batches, rehearsal) and forward only (probes), rank 0
        "work": {**res["work"], **(plugin.work if plugin is not None else {})},
        "wall_time_s": round(wall, 2),
        "train_wall_s": round(res["train_wall_s"], 2),
        "eval_wall_s": round(res["eval_wall_s"], 2),
        "setup_wall_s": round(state.setup_s, 2),
        "world_size": info.world_size,
        "tensor_parallel": state.tp,  # ranks per tensor-parallel group; world_size / tensor_parallel data-parallel
        "pipeline_parallel": state.pp,  # pipeline stages; data-parallel ranks = world_size / (stages x tensor_parallel)
        "launcher": info.launcher,
        "config": {
            "args": cfg.options(),
            "micro_batch": state.micro,
            "memory_batch": state.mem_bs,
            "replay_rows": state.replay_rows,
            "deepspeed_config_path": cfg.deepspeed_config,
            "deepspeed_config": ds_config,
            **_method_config(state.aim_cfg),
        },
        "notes": notes,
        "checkpoints": {
            "every": cfg.checkpoint_every,
            "dir": state.ckpt_dir if cfg.checkpoint_every else None,
            "resumed_from": state.resume.tag_dir if state.resume else None,
        },
    }


def _fmt(v):
    return "n/a" if v is None else f"{v:.2f}"


def _method_config(plugin_cfg) -> dict:
    """The plugin's parsed config under its ds_config section's name ("aim_merging", or "forever")."""
    from aim_ds.config import ForeverConfig

    if isinstance(plugin_cfg, ForeverConfig):
        return {"aim_merging": None, "forever": plugin_cfg.to_dict()}
    return {"aim_merging": plugin_cfg.to_dict() if plugin_cfg is not None else None}
