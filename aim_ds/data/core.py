"""Task containers and loaders: O-LoRA format benchmark folders, user JSON task lists, the default.

Every problem with input data raises :class:`DataError` with one message naming the file or task
and saying how to fix it.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from .default import generate_default_tasks, generate_generation_tasks
from .tasks import DataError, Example, Task

MAX_CLASSES = 50  # a task with at most this many distinct train outputs is classification
EVAL_SEED = 0  # the eval subsample is fixed, independent of the run seed
NO_LABEL = "-"  # GLUE's "no gold label" marker (6 MNLI dev rows): such rows are dropped

ORDERS = {
    1: [
        "mnli",
        "cb",
        "wic",
        "copa",
        "qqp",
        "boolqa",
        "rte",
        "imdb",
        "yelp",
        "amazon",
        "sst-2",
        "dbpedia",
        "agnews",
        "multirc",
        "yahoo",
    ],
    2: [
        "multirc",
        "boolqa",
        "wic",
        "mnli",
        "cb",
        "copa",
        "qqp",
        "rte",
        "imdb",
        "sst-2",
        "dbpedia",
        "agnews",
        "yelp",
        "amazon",
        "yahoo",
    ],
    3: [
        "yelp",
        "amazon",
        "mnli",
        "cb",
        "copa",
        "qqp",
        "rte",
        "imdb",
        "sst-2",
        "dbpedia",
        "agnews",
        "yahoo",
        "multirc",
        "boolqa",
        "wic",
    ],
    4: ["dbpedia", "amazon", "yahoo", "agnews"],
    5: ["dbpedia", "amazon", "agnews", "yahoo"],
    6: ["yahoo", "amazon", "agnews", "dbpedia"],
}
BENCHMARK_ORDERS = {"long": (1, 2, 3), "standard": (4, 5, 6)}
KNOWN_TASKS = sorted(set(ORDERS[1]))


# ----------------------------------------------------------------------------------------------
# reading files


def read_examples(path: str | Path, task: str) -> list[Example]:
    """Read one JSON list of {"id", "input", "output"} (ids optional in user files)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"task {task!r}: data file {path} does not exist; check the path "
            f"(user task files are resolved relative to the task-list JSON file)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f"task {task!r}: {path} is not valid JSON ({e.msg} at line {e.lineno} "
            f"column {e.colno}); fix the file so it holds one JSON list of "
            f'{{"id", "input", "output"}} objects'
        ) from None
    except UnicodeDecodeError:
        raise DataError(f"task {task!r}: {path} is not UTF-8 text; re-save it as UTF-8 JSON") from None
    if not isinstance(rows, list):
        raise DataError(
            f"task {task!r}: {path} holds a JSON {type(rows).__name__}, expected a list "
            f'of {{"id", "input", "output"}} objects'
        )
    if not rows:
        raise DataError(f"task {task!r}: {path} is an empty list; every task needs at least one example in each split")
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("input"), str) or not isinstance(r.get("output"), str):
            what = f"keys {sorted(r)}" if isinstance(r, dict) else f"a {type(r).__name__}"
            raise DataError(
                f'task {task!r}: entry {i} of {path} has {what}; every entry needs string "input" and "output" fields'
            )
        out.append(Example(id=str(r.get("id", f"{task}_{i}")), input=r["input"], output=r["output"]))
    return out


def _subsample(examples: list[Example], n: int | None, rng: random.Random) -> list[Example]:
    if n is None or n >= len(examples):
        return list(examples)
    if n < 1:
        raise DataError(f"max_train/max_eval must be >= 1 (got {n})")
    idx = sorted(rng.sample(range(len(examples)), n))
    return [examples[i] for i in idx]


def _stratified(examples: list[Example], n: int | None, rng: random.Random) -> list[Example]:
    """Class-stratified subsample (proportional, largest remainders), original order kept."""
    if n is None or n >= len(examples):
        return list(examples)
    if n < 1:
        raise DataError(f"max_eval must be >= 1 (got {n})")
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(e.output, []).append(i)
    if len(groups) > MAX_CLASSES:
        return _subsample(examples, n, rng)
    total = len(examples)
    quota = {k: n * len(v) / total for k, v in groups.items()}
    take = {k: int(q) for k, q in quota.items()}
    rest = n - sum(take.values())
    for k in sorted(groups, key=lambda k: (-(quota[k] - take[k]), k))[:rest]:
        take[k] += 1
    chosen = []
    for k in sorted(groups):
        chosen += rng.sample(groups[k], take[k])
    return [examples[i] for i in sorted(chosen)]


def make_task(
    name: str,
    train: list[Example],
    eval: list[Example],
    metric: str | None = None,
    *,
    source: str = "",
    max_train: int | None = None,
    max_eval: int | None = None,
    seed: int = 0,
) -> Task:
    """Build a Task: subsample, infer metric/labels, check eval labels."""
    where = f" ({source})" if source else ""
    if not train:
        raise DataError(f"task {name!r}{where}: the train split is empty; give it at least one example")
    if not eval:
        raise DataError(f"task {name!r}{where}: the eval split is empty; give it at least one example")
    distinct = sorted({e.output for e in train})  # from the whole train split, not the subsample
    train = _subsample(train, max_train, random.Random(f"{seed}:{name}:train"))
    eval = _stratified(eval, max_eval, random.Random(f"{EVAL_SEED}:{name}:eval"))
    if metric is None:
        metric = "exact" if len(distinct) <= MAX_CLASSES else "rougeL"
    if metric not in ("exact", "rougeL"):
        raise DataError(
            f'task {name!r}{where}: metric {metric!r} is not supported; use "exact" '
            f'(classification, exact match) or "rougeL" (free text)'
        )
    labels = distinct if metric == "exact" and len(distinct) <= MAX_CLASSES else None
    if labels is not None:
        known = set(labels)
        for e in eval:
            if e.output not in known:
                raise DataError(
                    f"task {name!r}{where}: eval example {e.id!r} has label {e.output!r}, which never "
                    f"occurs in the train split (candidate labels: {labels}); fix the label or add "
                    f"train examples with it (classification scores rank the train labels)"
                )
    return Task(name=name, train=train, eval=eval, metric=metric, labels=labels)


# ----------------------------------------------------------------------------------------------
# O-LoRA folders


def load_olora_tasks(
    data_dir: str | Path, names: list[str], *, max_train: int | None = None, max_eval: int | None = None, seed: int = 0
) -> list[Task]:
    """Load tasks from an O-LoRA folder ``{train,dev}/<task>_T5.json``; eval = the dev split."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(
            f"data dir {root} does not exist; pass the folder that holds train/ and dev/ (e.g. .../longsequence)"
        )
    for split in ("train", "dev"):
        if not (root / split).is_dir():
            raise DataError(
                f"data dir {root} has no {split}/ folder; pass the folder that holds "
                f"train/<task>_T5.json and dev/<task>_T5.json (e.g. .../longsequence)"
            )
    tasks = []
    for name in names:
        train_path = root / "train" / f"{name}_T5.json"
        dev_path = root / "dev" / f"{name}_T5.json"
        if name not in KNOWN_TASKS and not train_path.exists():
            raise DataError(
                f"unknown task name {name!r}: not a benchmark task ({', '.join(KNOWN_TASKS)}) "
                f"and no {train_path}; check the spelling"
            )
        train = read_examples(train_path, name)
        dev = [e for e in read_examples(dev_path, name) if e.output != NO_LABEL]
        tasks.append(make_task(name, train, dev, source=str(root), max_train=max_train, max_eval=max_eval, seed=seed))
    return tasks


# ----------------------------------------------------------------------------------------------
# user JSON task list


def load_task_list(
    path: str | Path, *, max_train: int | None = None, max_eval: int | None = None, seed: int = 0
) -> list[Task]:
    """``{"tasks": [{"name", "train", "eval", "metric"?}, ...]}``, paths relative to this file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"task list {path} does not exist; pass an existing JSON file, "
            f"or one of the benchmarks 'default', 'standard', 'long'"
        )
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(
            f"task list {path} is not valid JSON ({e.msg} at line {e.lineno} column "
            f'{e.colno}); it must be {{"tasks": [{{"name", "train", "eval", "metric"}}, ...]}}'
        ) from None
    if not isinstance(spec, dict) or not isinstance(spec.get("tasks"), list) or not spec["tasks"]:
        raise DataError(
            f'task list {path} must be an object with a non-empty "tasks" list of '
            f'{{"name", "train", "eval", "metric"}} objects'
        )
    seen = set()
    for i, t in enumerate(spec["tasks"]):
        if not isinstance(t, dict) or not all(isinstance(t.get(k), str) for k in ("name", "train", "eval")):
            raise DataError(
                f'task list {path}: tasks[{i}] needs string fields "name", "train" and '
                f'"eval" (paths relative to {path.parent}); "metric" is optional'
            )
        unknown = set(t) - {"name", "train", "eval", "metric"}
        if unknown:
            raise DataError(
                f"task list {path}: tasks[{i}] ({t['name']!r}) has unknown keys "
                f"{sorted(unknown)}; allowed: name, train, eval, metric"
            )
        if t["name"] in seen:
            raise DataError(f"task list {path}: task name {t['name']!r} appears twice; names must be unique")
        seen.add(t["name"])
        metric = t.get("metric")
        if metric is not None and metric not in ("exact", "rougeL"):
            raise DataError(
                f'task list {path}: task {t["name"]!r} has metric {metric!r}; use "exact" '
                f'or "rougeL" (or omit it to infer)'
            )
    tasks = []
    for t in spec["tasks"]:
        train = read_examples(path.parent / t["train"], t["name"])
        ev = read_examples(path.parent / t["eval"], t["name"])
        tasks.append(
            make_task(
                t["name"],
                train,
                ev,
                t.get("metric"),
                source=str(path),
                max_train=max_train,
                max_eval=max_eval,
                seed=seed,
            )
        )
    return tasks


# ----------------------------------------------------------------------------------------------
# entry point


def load_tasks(
    benchmark: str,
    data_dir: str | None = None,
    order: int | None = None,
    max_train: int | None = None,
    max_eval: int | None = None,
    seed: int = 0,
) -> list[Task]:
    """Load a task sequence.

    benchmark: "default" (generated classification benchmark), "default-gen" (generated free-text
    tasks, metric rougeL), "standard" (orders 4-6, default 4), "long" (orders 1-3, default 1),
    "tasks:a,b,c" (named O-LoRA tasks from data_dir, in that order), or a path to a user JSON file.
    The eval split is the dev split for O-LoRA folders; it is subsampled to max_eval with a fixed
    seed (class-stratified); train is subsampled to max_train with ``seed``.
    """
    for n, what in ((max_train, "max_train"), (max_eval, "max_eval")):
        if n is not None and n < 1:
            raise DataError(f"{what} must be a positive integer or None (got {n})")
    if benchmark in ("default", "default-gen"):
        if order not in (None, 1):
            raise DataError(
                f"unknown order {order} for benchmark {benchmark!r}: it has one order; omit --order (or pass 1)"
            )
        raw = generate_default_tasks() if benchmark == "default" else generate_generation_tasks()
        return [
            make_task(
                t.name, t.train, t.eval, t.metric, source=benchmark, max_train=max_train, max_eval=max_eval, seed=seed
            )
            for t in raw
        ]
    if benchmark in BENCHMARK_ORDERS:
        allowed = BENCHMARK_ORDERS[benchmark]
        order = allowed[0] if order is None else order
        if order not in allowed:
            raise DataError(f"unknown order {order} for benchmark {benchmark!r}: choose one of {list(allowed)}")
        if data_dir is None:
            raise DataError(
                f"benchmark {benchmark!r} needs data_dir: the O-LoRA folder with "
                f"train/ and dev/ (e.g. .../longsequence)"
            )
        return load_olora_tasks(data_dir, ORDERS[order], max_train=max_train, max_eval=max_eval, seed=seed)
    if benchmark.startswith("tasks:"):
        names = [n.strip() for n in benchmark[len("tasks:") :].split(",") if n.strip()]
        if not names:
            raise DataError("benchmark 'tasks:' names no task; write e.g. tasks:dbpedia,agnews")
        if data_dir is None:
            raise DataError(f"benchmark {benchmark!r} needs data_dir: the O-LoRA folder with train/ and dev/")
        return load_olora_tasks(data_dir, names, max_train=max_train, max_eval=max_eval, seed=seed)
    p = Path(benchmark)
    if p.suffix == ".json" or p.exists():
        return load_task_list(p, max_train=max_train, max_eval=max_eval, seed=seed)
    raise DataError(
        f"unknown benchmark {benchmark!r}: use 'default', 'default-gen', 'standard', "
        f"'long', 'tasks:<name>,<name>' or a path to a task-list JSON file"
    )


def label_counts(task: Task) -> Counter:
    return Counter(e.output for e in task.train)
