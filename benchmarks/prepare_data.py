#!/usr/bin/env python
"""Build the data folders the Standard CL / Long Sequence benchmarks read, from the public releases.

    # O-LoRA's CL_Benchmark folder (github.com/cmnfriend/O-LoRA) -> the folder for --data-dir
    .venv/bin/python benchmarks/prepare_data.py olora O-LoRA/CL_Benchmark data/longsequence
    # Super-NaturalInstructions task files (github.com/allenai/natural-instructions, tasks/) -> a task list
    .venv/bin/python benchmarks/prepare_data.py superni natural-instructions/tasks data/superni \\
        --tasks task1572_samsum_summary task363_sst2_polarity_classification ...

``olora`` writes ``OUT/{train,dev}/<task>_T5.json``, one JSON list of ``{"id", "input", "output"}`` per task and
split, the layout ``aim_ds.data.load_olora_tasks`` reads (``--benchmark standard|long --data-dir OUT``). The
release keeps each split as ``<Category>/<Dataset>/{train,dev,test}.json`` (rows ``{"sentence", "label"}``) with
the label set in ``labels.json``; the input becomes the task's instruction, its options, the sentence and
``Answer:``, as in the folder the BENCHMARKS.md figures were measured on. Train keeps a seeded draw of at most
``--train`` rows (1000), dev at most ``--dev`` rows (500) of dev.json (test.json where a task has no dev.json),
so a task with fewer rows keeps all of them. The draw is this script's own: a folder built here holds the same
kind of rows as the measured one, not necessarily the same rows.

``superni`` writes ``OUT/<task>/{train,eval}.json`` and ``OUT/tasks.json`` (``{"tasks": [...]}``, metric
rougeL), the task-list file the driver takes as ``--benchmark OUT/tasks.json``: each instance's input after the
task's definition, its first reference output as the target, a seeded split into ``--train`` and ``--eval`` rows.

Both print the rows written per task and split; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

# benchmark task name -> (category folder, dataset folder) in O-LoRA's CL_Benchmark
OLORA_TASKS = {
    "mnli": ("NLI", "MNLI"),
    "cb": ("NLI", "CB"),
    "rte": ("NLI", "RTE"),
    "wic": ("WiC", "WiC"),
    "copa": ("COPA", "COPA"),
    "qqp": ("QQP", "QQP"),
    "boolqa": ("BoolQA", "BoolQA"),
    "multirc": ("MultiRC", "MultiRC"),
    "imdb": ("SC", "IMDB"),
    "yelp": ("SC", "yelp"),
    "amazon": ("SC", "amazon"),
    "sst-2": ("SC", "SST-2"),
    "dbpedia": ("TC", "dbpedia"),
    "agnews": ("TC", "agnews"),
    "yahoo": ("TC", "yahoo"),
}
# the instruction of each category, as the measured folder's inputs begin (COPA's is BoolQA's there too)
INSTRUCTIONS = {
    "NLI": 'What is the logical relationship between the "sentence 1" and the "sentence 2"? Choose one from the option.',
    "QQP": 'Whether the "first sentence" and the "second sentence" have the same meaning? Choose one from the option.',
    "SC": "What is the sentiment of the following paragraph? Choose one from the option.",
    "TC": "What is the topic of the following paragraph? Choose one from the option.",
    "BoolQA": "According to the following passage, is the question true or false? Choose one from the option.",
    "COPA": "According to the following passage, is the question true or false? Choose one from the option.",
    "MultiRC": "According to the following passage and question, is the candidate answer true or false? "
    "Choose one from the option.",
    "WiC": "Given a word and two sentences, whether the word is used with the same sense in both sentence? "
    "Choose one from the option.",
}


class PrepareError(ValueError):
    """Bad input to a converter; the message names the file and the fix."""


def _read_json(path: Path):
    if not path.is_file():
        raise PrepareError(f"{path} does not exist; pass the release's folder (see --help for the layout)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PrepareError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def _draw(rows: list, n: int | None, seed: str) -> list:
    """At most n rows, a seeded draw that keeps the release's order; all rows when there are no more than n."""
    if n is None or len(rows) <= n:
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def _write(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def olora_rows(records: list, labels: list[str], category: str, dataset: str, where: Path) -> list[dict]:
    head = f"{INSTRUCTIONS[category]} Option: {', '.join(labels)}."
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("sentence"), str) or not isinstance(r.get("label"), str):
            raise PrepareError(f'{where}: row {i} needs string "sentence" and "label" fields')
        out.append({"id": f"{dataset}_{i}", "input": f"{head}\n{r['sentence']}\nAnswer:", "output": r["label"]})
    return out


def prepare_olora(
    src: str | Path, out: str | Path, tasks: list[str], train: int | None, dev: int | None, seed: int
) -> dict:
    src, out = Path(src), Path(out)
    counts = {}
    for task in tasks:
        if task not in OLORA_TASKS:
            raise PrepareError(f"unknown task {task!r}; the release has {', '.join(OLORA_TASKS)}")
        category, dataset = OLORA_TASKS[task]
        folder = src / category / dataset
        labels = _read_json(folder / "labels.json")
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise PrepareError(f"{folder / 'labels.json'} must be a JSON list of label strings")
        dev_file = folder / "dev.json" if (folder / "dev.json").is_file() else folder / "test.json"
        counts[task] = {}
        for split, f, n in (("train", folder / "train.json", train), ("dev", dev_file, dev)):
            records = _read_json(f)
            if not isinstance(records, list):
                raise PrepareError(f"{f} must be a JSON list of rows")
            rows = _draw(olora_rows(records, labels, category, dataset, f), n, f"{seed}:{task}:{split}")
            _write(out / split / f"{task}_T5.json", rows)
            counts[task][split] = len(rows)
    return counts


def prepare_superni(src: str | Path, out: str | Path, tasks: list[str], train: int, eval_rows: int, seed: int) -> dict:
    src, out = Path(src), Path(out)
    listed, counts = [], {}
    for task in tasks:
        path = src / f"{task}.json"
        spec = _read_json(path)
        if not isinstance(spec, dict) or not isinstance(spec.get("Instances"), list):
            raise PrepareError(f'{path} must be a Super-NaturalInstructions task: an object with "Instances"')
        definition = " ".join(spec.get("Definition") or [])
        rows = []
        for i, inst in enumerate(spec["Instances"]):
            outputs = inst.get("output") if isinstance(inst, dict) else None
            if (
                not isinstance(outputs, list)
                or not outputs
                or not isinstance(outputs[0], str)
                or not isinstance(inst.get("input"), str)
            ):
                raise PrepareError(f'{path}: instance {i} needs an "input" string and a non-empty "output" list')
            text = f"{definition}\n\n{inst['input']}\nAnswer:" if definition else f"{inst['input']}\nAnswer:"
            rows.append({"id": str(inst.get("id", f"{task}_{i}")), "input": text, "output": outputs[0]})
        if len(rows) < 2:
            raise PrepareError(f"{path}: {len(rows)} instance(s); a task needs at least one train and one eval row")
        random.Random(f"{seed}:{task}").shuffle(rows)
        n_eval = min(eval_rows, len(rows) // 2)
        split = {"eval": rows[:n_eval], "train": rows[n_eval : n_eval + train]}
        for name, part in split.items():
            _write(out / task / f"{name}.json", part)
        listed.append({"name": task, "train": f"{task}/train.json", "eval": f"{task}/eval.json", "metric": "rougeL"})
        counts[task] = {k: len(v) for k, v in split.items()}
    _write(out / "tasks.json", {"tasks": listed})
    return counts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="source", required=True)
    o = sub.add_parser("olora", help="O-LoRA's CL_Benchmark folder -> {train,dev}/<task>_T5.json")
    o.add_argument("src", help="the release's CL_Benchmark folder (holds NLI/, SC/, TC/, ...)")
    o.add_argument("out", help="the folder to write (pass it to the benchmarks as --data-dir)")
    o.add_argument("--tasks", nargs="+", default=list(OLORA_TASKS), help="benchmark task names (default: all 15)")
    o.add_argument("--train", type=int, default=1000, help="at most this many train rows per task")
    o.add_argument("--dev", type=int, default=500, help="at most this many dev rows per task")
    o.add_argument("--seed", type=int, default=0, help="seed of the row draws")
    s = sub.add_parser("superni", help="Super-NaturalInstructions task files -> a task list (--benchmark PATH)")
    s.add_argument("src", help="the release's tasks/ folder (taskNNN_name.json files)")
    s.add_argument("out", help="the folder to write; the driver takes OUT/tasks.json")
    s.add_argument("--tasks", nargs="+", required=True, help="task file names without .json, in training order")
    s.add_argument("--train", type=int, default=1000, help="at most this many train rows per task")
    s.add_argument("--eval", type=int, default=100, help="at most this many eval rows per task")
    s.add_argument("--seed", type=int, default=0, help="seed of the split")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        if a.source == "olora":
            counts = prepare_olora(a.src, a.out, a.tasks, a.train, a.dev, a.seed)
        else:
            counts = prepare_superni(a.src, a.out, a.tasks, a.train, a.eval, a.seed)
    except PrepareError as e:
        print(f"prepare_data.py: error: {e}", file=sys.stderr)
        return 2
    for task, c in counts.items():
        print(task, " ".join(f"{k} {v}" for k, v in c.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
