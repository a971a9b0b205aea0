#!/usr/bin/env python
"""Continual-learning quality benchmark: run the driver (launch/train.py) for every method and seed,
then write a table of OP / BWT / FWT (mean and spread over seeds) into BENCHMARKS.md.

    .venv/bin/python benchmarks/cl_quality.py                       # Standard CL order 4, seeds 0 1
    .venv/bin/python benchmarks/cl_quality.py --benchmark default   # the generated default benchmark
    .venv/bin/python benchmarks/cl_quality.py --collect-only        # rebuild the table from runs/quality

Every run is ONE process (plain ``python launch/train.py``, world size 1, OMP_NUM_THREADS=1) into its own
folder ``runs/quality/<benchmark>/<method>-s<seed>``; ``--parallel`` runs go side by side (default 2, one
per core). ``single`` (each task alone from the initial model) runs first for each seed: it stores the
single-task scores in the driver's FWT cache (``--fwt-reference cache``), which the other methods of the
same seed and settings then read for FWT. Training is never reimplemented here: this file only builds
command lines, schedules them, reads ``results.json`` and formats markdown.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (  # noqa: F401
    PAIRED_NOTE,
    ROOT,
    band_label,
    driver_env,
    fmt,
    paired,
    paired_cell,
    seeds_text,
    work_tokens,
)

METHODS = ["single", "seqft", "replay", "fixed_merge", "aim", "aim_alone", "forever", "multitask"]
# table rows that are a driver method with other options: the paper's AimMerging alone (no memory rows in the
# training batches; its own best-measured config: a probe forward, R = S, forced activation at m + S)
VARIANTS = {"aim_alone": ("aim", ["--replay-rows", "0", "--deepspeed_config", "ds_configs/cpu_zero3_alone.json"])}
MERGING = ("aim", "aim_alone", "fixed_merge")
PAIRED = (*MERGING, "forever")  # the methods whose paired differences against the others are listed
# Settings chosen for Standard CL on the 2-core CPU machine (see BENCHMARKS.md for why).
STANDARD_PRESET = {
    "order": 4,
    "data_dir": "../shared/data/longsequence",
    "model": "configs/llama_2x256.json",
    "epochs": 2.0,
    "max_train": 800,
    "max_eval": 100,
    "lr": 1e-3,
    "batch_size": 16,
    "max_len": 128,
}
# Long Sequence (order 1, 15 tasks) on the same machine: one epoch of 320 examples per task (20 steps) and 40
# evaluation examples keep a run at 3-8 minutes (15 tasks x up to 15 evaluations each), so 7 methods x 2
# seeds fit in about an hour two at a time; only the tasks seen so far are evaluated (OP/BWT/FWT need no more).
LONG_PRESET = {
    **STANDARD_PRESET,
    "order": 1,
    "epochs": 1.0,
    "max_train": 320,
    "max_eval": 40,
    "eval_tasks": "seen",
}
PRESETS = {"standard": STANDARD_PRESET, "long": LONG_PRESET}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--benchmark",
        default="standard",
        help="'standard' (Standard CL, preset sizes below), 'long' (Long Sequence order 1, its preset), 'default' "
        "(the driver's embedded benchmark with the driver's own defaults), or anything the driver takes",
    )
    p.add_argument("--order", type=int, default=None, help="task order (standard: 4, long: 1)")
    p.add_argument("--data-dir", default=None, help="O-LoRA data folder (standard: ../shared/data/longsequence)")
    p.add_argument("--model", default=None, help="model config JSON (standard: configs/llama_2x256.json)")
    p.add_argument("--deepspeed-config", default=None, help="ds_config (default: the driver's)")
    p.add_argument(
        "--aim",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key of the ds_config's aim_merging section (repeatable; the driver's --aim)",
    )
    p.add_argument("--epochs", type=float, default=None, help="epochs per task")
    p.add_argument("--max-train", type=int, default=None, help="training examples per task")
    p.add_argument("--max-eval", type=int, default=None, help="evaluation examples per task")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--batch-size", type=int, default=None, help="micro batch (one rank)")
    p.add_argument("--max-len", type=int, default=None, help="max tokens per example (prompt truncated)")
    p.add_argument("--eval-tasks", choices=("all", "seen"), default=None, help="the driver's --eval-tasks")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--parallel", type=int, default=2, help="runs side by side (each one process, 1 thread)")
    p.add_argument("--extra", default="", help="extra driver arguments, one shell-quoted string")
    p.add_argument("--out-root", default="runs/quality", help="runs go to OUT_ROOT/<tag>/<method>-s<seed>")
    p.add_argument("--tag", default=None, help="sub-folder name and BENCHMARKS.md marker (default: the benchmark)")
    p.add_argument("--markdown", default="BENCHMARKS.md", help="file to write the table into")
    p.add_argument("--collect-only", action="store_true", help="do not run; tabulate existing results")
    p.add_argument("--skip-done", action="store_true", help="do not rerun a run whose results.json exists")
    p.add_argument("--note", default="", help="a paragraph to put under the table (e.g. why runs are missing)")
    p.add_argument("--no-markdown", action="store_true", help="print the table, do not edit the file")
    a = p.parse_args(argv)
    if a.benchmark in PRESETS:
        for k, v in PRESETS[a.benchmark].items():
            if getattr(a, k) is None:
                setattr(a, k, v)
    a.tag = a.tag or Path(a.benchmark).stem
    return a


def driver_args(a) -> list[str]:
    out = ["--benchmark", a.benchmark]
    for opt, val in [
        ("--order", a.order),
        ("--data-dir", a.data_dir),
        ("--model", a.model),
        ("--deepspeed_config", a.deepspeed_config),
        ("--epochs", a.epochs),
        ("--max-train", a.max_train),
        ("--max-eval", a.max_eval),
        ("--lr", a.lr),
        ("--batch-size", a.batch_size),
        ("--max-len", a.max_len),
        ("--eval-tasks", a.eval_tasks),
    ]:
        if val is not None:
            out += [opt, str(val)]
    for pair in a.aim:
        out += ["--aim", pair]
    return out + shlex.split(a.extra)


def run_dir(a, method, seed) -> Path:
    return ROOT / a.out_root / a.tag / f"{method}-s{seed}"


def shown_path(p: Path) -> str:
    """p relative to the checkout when inside it (shorter command lines), else absolute."""
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def build_jobs(a):
    """(name, cmd, out_dir, depends_on) with single first per seed."""
    jobs = []
    for seed in a.seeds:
        for m in (["single"] if "single" in a.methods else []) + [m for m in a.methods if m != "single"]:
            out = run_dir(a, m, seed)
            method, extra = VARIANTS.get(m, (m, []))
            cmd = [
                sys.executable,
                "launch/train.py",
                *driver_args(a),
                "--method",
                method,
                *extra,
                "--seed",
                str(seed),
                "--fwt-reference",
                "cache",
                "--output-dir",
                shown_path(out),
                "--overwrite",
                "--no-progress",
            ]
            dep = f"single-s{seed}" if (m != "single" and "single" in a.methods) else None
            jobs.append((f"{m}-s{seed}", cmd, out, dep))
    # singles of all seeds first so the pool starts on references; others keep seed order
    return sorted(jobs, key=lambda j: 0 if j[0].startswith("single-") else 1)


def run_all(a) -> dict[str, float]:
    env = driver_env()
    pending, running, done, walls = build_jobs(a), {}, set(), {}
    (ROOT / a.out_root / a.tag).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    started = f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC"
    while pending or running:
        for name, (proc, start, out, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                walls[name] = time.time() - start
                ok = proc.returncode == 0 and (out / "results.json").exists()
                print(
                    f"[{time.time() - t0:7.0f}s] {name}: {'ok' if ok else f'FAILED rc={proc.returncode}'} "
                    f"({walls[name]:.0f} s; log {log.name})",
                    flush=True,
                )
                done.add(name)
                del running[name]
        for job in list(pending):
            if len(running) >= a.parallel:
                break
            name, cmd, out, dep = job
            if dep is not None and dep not in done:
                continue
            pending.remove(job)
            if a.skip_done and (out / "results.json").exists():
                print(f"[{time.time() - t0:7.0f}s] {name}: done before, skipped", flush=True)
                done.add(name)
                continue
            logp = ROOT / a.out_root / a.tag / f"{name}.log"
            log = open(logp, "w")
            log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
            log.flush()
            print(f"[{time.time() - t0:7.0f}s] start {name}", flush=True)
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[name] = (proc, time.time(), out, log)
        time.sleep(2)
    total = time.time() - t0
    print(f"all runs finished in {total:.0f} s wall", flush=True)
    (ROOT / a.out_root / a.tag / "walls.json").write_text(
        json.dumps({"started": started, "total_s": total, "runs": walls}, indent=1)
    )
    return walls


# ----------------------------------------------------------------------------------------- tables


def _tokens(results) -> str:
    """Mean work_tokens in thousands; the forward-only ones in brackets when there are any."""
    w = [work_tokens(r["work"]) for r in results if r.get("work")]
    if not w:
        return "—"
    fb, fo = (statistics.fmean(x[i] for x in w) / 1000 for i in (0, 1))
    return f"{fb:.1f}" + (f" (+ {fo:.1f})" if fo else "")


def collect(a):
    res = {}
    for m in a.methods:
        for s in a.seeds:
            f = run_dir(a, m, s) / "results.json"
            if f.exists():
                res[(m, s)] = json.loads(f.read_text())
    return res


def table(a, res, cmdline: str, total_wall: float | None, started: str | None = None) -> str:
    any_r = next(iter(res.values()), None)
    if any_r is None:
        return "(no results)\n"
    tasks = [t["name"] for t in any_r["tasks"]]
    seeds = [s for s in a.seeds if any((m, s) in res for m in a.methods)]
    full = any_r.get("config", {})
    cfg = dict(full.get("args", {}))
    cfg["batch_size"] = cfg.get("batch_size") or full.get("micro_batch")
    L = [band_label(seeds), ""]
    L.append(f"Command: `{cmdline}`  ")
    L.append(
        (f"Runs started {started}; table" if started else "Table")
        + f" written {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: {os.cpu_count()}-core CPU "
        f"({platform.machine()}), shared with other jobs; every run ONE process (world size 1, "
        f"OMP_NUM_THREADS=1), {a.parallel} runs side by side"
        + (f"; all {len(res)} runs took {total_wall / 60:.1f} min wall." if total_wall else ".")
    )
    steps = any_r.get("steps", {}).get("per_task")
    model = cfg.get("model") or "configs/tiny_llama.json (driver default)"
    L.append(
        f"Model `{model}`; per task: {steps} driver steps "
        f"(epochs {cfg.get('epochs')}, batch {cfg.get('batch_size')}, max-train {cfg.get('max_train')}), "
        f"lr {cfg.get('lr')}, max-len {cfg.get('max_len')}, eval examples per task {cfg.get('max_eval') or 'all'}; "
        f"memory fraction {cfg.get('memory_fraction')}; ds_config "
        f"`{os.path.relpath(full.get('deepspeed_config_path') or '?', ROOT)}`; seeds {' '.join(map(str, seeds))}."
    )
    L.append("")
    L.append(
        "Mean ± sample std over seeds (n = number of seeds; per-seed values in the last columns, seed order "
        f"{' / '.join(map(str, seeds))}). OP = mean final accuracy; BWT = mean (final − just-learned) over "
        "tasks 1..T-1; FWT against the `single` run of the same seed (driver's FWT cache)."
    )
    L.append("")
    L.append(
        "| method | n | OP | BWT | FWT | OP per seed | BWT per seed | merges | engine steps | memory rows per batch "
        "| k tokens fwd+bwd (+ fwd only) | wall/run (s) |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in a.methods:
        rs = [res.get((m, s)) for s in seeds]
        got = [r for r in rs if r]
        if not got:
            continue
        ops = [r.get("OP") if r else None for r in rs]
        bwt = [r.get("BWT") if r else None for r in rs]
        fwt = [r.get("FWT") if r else None for r in rs]
        merges = seeds_text([r.get("merges") if r else None for r in rs], 0) if m in MERGING else "—"
        eng = seeds_text([r.get("steps", {}).get("engine") if r else None for r in rs], 0)
        wall = fmt([r.get("wall_time_s") for r in got], 0)
        rows = seeds_text(sorted({r.get("config", {}).get("replay_rows", 0) for r in got}), 0)
        tok = _tokens(got)
        if m == "single":
            L.append(
                f"| single (diagonal, reference) | {len(got)} | {fmt(ops)} | — | — | {seeds_text(ops)} | — | — | "
                f"{eng} | {rows} | {tok} | {wall} |"
            )
            continue
        L.append(
            f"| {m} | {len(got)} | {fmt(ops)} | {fmt(bwt)} | {fmt(fwt)} | {seeds_text(ops)} | "
            f"{seeds_text(bwt)} | {merges} | {eng} | {rows} | {tok} | {wall} |"
        )
    L.append("")
    L.append(
        "Final row per task (accuracy after the last task; `single`: each task's own score; mean over seeds, "
        "per-seed values in brackets):"
    )
    L.append("")
    L.append("| method | " + " | ".join(tasks) + " |")
    L.append("|---|" + "---|" * len(tasks))
    for m in a.methods:
        rs = [res.get((m, s)) for s in seeds]
        if not any(rs):
            continue
        cells = []
        for i, t in enumerate(tasks):
            vals = []
            for r in rs:
                if not r:
                    vals.append(None)
                elif m == "single":
                    sc = r.get("single_task_scores") or [r["matrix"][k][k] for k in range(len(tasks))]
                    vals.append(sc[i] if isinstance(sc, list) else sc.get(t))
                else:
                    vals.append(r["matrix"][-1][i])
            v = [x for x in vals if x is not None]
            cells.append(f"{statistics.fmean(v):.1f} [{seeds_text(vals)}]" if v else "—")
        L.append(f"| {m} | " + " | ".join(cells) + " |")
    L.append("")
    # just-learned diagonal (what each task reached right after training on it) for the sequential methods
    seq = [m for m in a.methods if m not in ("single", "multitask") and any(res.get((m, s)) for s in seeds)]
    if seq:
        L.append("Just-learned accuracy a[k][k] (mean over seeds), for reading BWT:")
        L.append("")
        L.append("| method | " + " | ".join(tasks) + " |")
        L.append("|---|" + "---|" * len(tasks))
        for m in seq:
            rs = [res.get((m, s)) for s in seeds if res.get((m, s))]
            cells = [f"{statistics.fmean(r['matrix'][k][k] for r in rs):.1f}" for k in range(len(tasks))]
            L.append(f"| {m} | " + " | ".join(cells) + " |")
        L.append("")
    L += paired_lines(res, a.methods, seeds)
    if a.note:
        L += [a.note, ""]
    return "\n".join(L)


def paired_lines(res, methods, seeds) -> list[str]:
    """Paired differences (by seed) of each merging method against the other sequential methods."""
    seq = [m for m in methods if m not in ("single", "multitask")]
    pairs = [(m, o) for m in seq if m in PAIRED for o in seq if o != m and not (o in PAIRED and o < m)]
    L = []
    for m, o in pairs:
        both = [s for s in seeds if res.get((m, s)) and res.get((o, s))]
        if not both:
            continue
        cells = [
            paired_cell([res[(m, s)][k] for s in both], [res[(o, s)][k] for s in both], both) for k in ("OP", "BWT")
        ]
        L.append(f"| {m} − {o} | {len(both)} | " + " | ".join(cells) + " |")
    if not L:
        return []
    return [PAIRED_NOTE, "", "| pair | seeds | OP | BWT |", "|---|---|---|---|"] + L + [""]


def write_markdown(path: Path, tag: str, body: str):
    start, end = f"<!-- quality:{tag} -->", f"<!-- /quality:{tag} -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        pre, rest = text.split(start, 1)
        _, post = rest.split(end, 1)
        text = pre + block + post
    else:
        text = text.rstrip("\n") + f"\n\n{block}\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None):
    a = parse_args(argv)
    argv_shown, skip = [], False
    for x in sys.argv[1:] if argv is None else argv:
        if skip:
            skip = False
        elif x == "--note":
            skip = True
        elif x != "--collect-only" and not x.startswith("--note="):
            argv_shown.append(x)
    cmdline = ".venv/bin/python benchmarks/cl_quality.py " + " ".join(shlex.quote(x) for x in argv_shown)
    total = started = None
    if not a.collect_only:
        run_all(a)
    wf = ROOT / a.out_root / a.tag / "walls.json"
    if wf.exists():
        w = json.loads(wf.read_text())
        total, started = w.get("total_s"), w.get("started")
    body = table(a, collect(a), cmdline.strip(), total, started)
    print(body)
    if not a.no_markdown:
        write_markdown(ROOT / a.markdown, a.tag, body)
        print(f"wrote {a.markdown} <!-- quality:{a.tag} -->")


if __name__ == "__main__":
    main()
