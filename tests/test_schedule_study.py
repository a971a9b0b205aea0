"""benchmarks/schedule_study.py: the cause it gives each merge is the controller's own (no training runs)."""

import json
import random
import sys
from pathlib import Path

from aim_ds.config import AimConfig
from aim_ds.control.controller import MergeController
from aim_ds.control.trajectory import FIELDS, TrajectoryRow

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import schedule_study  # noqa: E402


def _run(tmp_path, cfg: AimConfig, seed: int):
    """Drive the pure controller on noisy probe losses with forgetting bursts; write the run folder the driver
    would, and return the controller's own cause per merge."""
    rng, ctrl, rows, truth = random.Random(seed), MergeController(cfg), [], []
    for task in range(3):
        ctrl.start_task(task)
        seen_activation = False
        for _ in range(120):
            burst = rng.random() < 0.04
            loss = rng.uniform(0.8, 1.2) * (3.0 if burst else 1.0) if rng.random() > 0.1 else None
            d = ctrl.observe(loss)
            seen_activation |= d.activations > 0 and not d.forced
            row = TrajectoryRow(task, d.step, d.probe_loss, d.threshold, d.activations, d.interval)
            if d.merge:
                p = ctrl.on_merge(abs_change_sum=rng.uniform(1, 5) * 1000, numel=1000)
                row.merge, row.interval, row.rehearsal_steps = 1, p.interval, p.rehearsal_steps
                cap = (
                    d.activations >= cfg.activation_cap
                    and not d.forced
                    and d.step < truth_last(truth, task) + d.interval
                )
                truth.append((task, d.step, "forced" if d.forced else "cap" if cap else "activation"))
            rows.append(row.as_dict())
    with open(tmp_path / "trajectory.csv", "w") as f:
        f.write(",".join(FIELDS) + "\n")
        for r in rows:
            f.write(",".join("" if r[k] is None else repr(r[k]) for k in FIELDS) + "\n")
    res = {"OP": 50.0, "BWT": -1.0, "steps": {"engine": 360}, "tasks": [{"name": f"t{i}"} for i in range(3)]}
    res["config"] = {"aim_merging": cfg.to_dict()}
    (tmp_path / "results.json").write_text(json.dumps(res))
    return truth


def truth_last(truth, task):
    steps = [s for t, s, _ in truth if t == task]
    return steps[-1] if steps else 0


def test_causes_match_the_controller(tmp_path):
    cfg = AimConfig.from_dict({"enabled": True, "initial_interval": 6, "probe_source": "memory_forward"})
    truth = _run(tmp_path, cfg, seed=3)
    _, segs, _ = schedule_study.load(tmp_path)
    got = [(s["task"], s["step"], s["cause"]) for s in segs]
    assert got == truth
    causes = {c for _, _, c in truth}
    assert {"forced", "activation"} <= causes  # both kinds occur, so a wrong rule would be caught
    out = schedule_study.summary_row(tmp_path)
    n_forced = sum(c == "forced" for _, _, c in truth)
    assert f"| {sum(c == 'activation' for _, _, c in truth)} / {n_forced} / " in out


def test_versus_pairs_runs_by_seed(tmp_path):
    for group, ops in (("a", (40.0, 42.0, 41.0)), ("b", (30.0, 31.0, 32.0))):
        for seed, op in enumerate(ops):
            d = tmp_path / group / f"aim-s{seed}"
            d.mkdir(parents=True)
            (d / "results.json").write_text(json.dumps({"OP": op, "BWT": -op / 10}))
    a = sorted((tmp_path / "a").iterdir())
    b = sorted((tmp_path / "b").iterdir())
    assert schedule_study.compare(a, b) == "| a − b | 0 1 2 | +10.0 ± 0.6 (ahead) | -1.0 ± 0.1 (behind) |"
    assert schedule_study.compare(a, b[:2]).startswith(
        "| a − b | 0 1 | +10.5 ± 0.5 (level (2 seeds))"
    )  # seed 2 left out
