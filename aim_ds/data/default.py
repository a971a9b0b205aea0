"""The generated default benchmark (no downloads, fully seeded).

Classification family ("default"): every task shares one input format and one label set,

    "Task: alpha. Words: lop mar pav"  ->  "green"

Sixteen pseudo-words fall into four categories; a task's label is the category of the LAST word
sent through a task-specific label permutation (alpha, beta, gamma, delta). Any two of the four
maps agree on at most one category of four, and each earlier map agrees with delta's on exactly
one, so a model that answers an earlier task with a later task's rule scores about 25% (chance) or
0%. The deciding word ends the prompt, so each task alone is an easy lookup: a 2-layer, 64-wide
Llama learns it to 100% in 25-40 steps at batch 16 (lr 3e-3). Measured with 80 steps per task
(python benchmarks/calibrate_default.py, 1 CPU thread, ~1 min): seqft OP 41.1 / BWT -78.5;
2% mixed replay OP 54.5 / BWT -60.7; a fixed-interval merge (S = R = 8, weights 0.5/0.5)
OP 77.1 / BWT -30.5. The task name is in the prompt, so the tasks are distinguishable in
principle and memory-based methods can keep them.
See benchmarks/calibrate_default.py for the measurement.

Generation family ("default-gen", metric rougeL): the same input format (4 words), the output is a
word sequence: echo (the last word twice; learned by the tiny model in ~60 steps), copy, reverse,
swap (the first two words swapped). For exercising the generation/ROUGE-L path; only echo is
quickly learnable.
"""

from __future__ import annotations

import random

from .tasks import Example, Task

DEFAULT_DATA_SEED = 1234
WORDS = ["lop", "mar", "nix", "tup", "bex", "dov", "fip", "gam", "hul", "jor", "kes", "lun", "mib", "pav", "rix", "sol"]
LABELS = ["red", "blue", "green", "gold"]
# task name, label permutation (category c of the LAST word -> LABELS[perm[c]]). Any two maps agree on
# at most one category and every earlier map agrees with the last one on exactly one, so a model
# that answers an earlier task with the last task's rule scores about 25% (chance), not 100%.
CLASSIFICATION_RULES = [
    ("alpha", (0, 1, 2, 3)),
    ("beta", (0, 2, 3, 1)),
    ("gamma", (1, 0, 3, 2)),
    ("delta", (0, 3, 1, 2)),
    ("epsilon", (2, 3, 1, 0)),  # only when num_tasks > 4
    ("zeta", (3, 2, 0, 1)),
]
GENERATION_RULES = ["echo", "copy", "reverse", "swap"]


def _category(rng_seed: int) -> dict[str, int]:
    rng = random.Random(f"{rng_seed}:categories")
    words = list(WORDS)
    rng.shuffle(words)
    return {w: i % len(LABELS) for i, w in enumerate(words)}


def _inputs(rng: random.Random, n: int, n_words: int) -> list[list[str]]:
    return [[rng.choice(WORDS) for _ in range(n_words)] for _ in range(n)]


def prompt(task: str, words: list[str]) -> str:
    """The prompt ends with the last word (the deciding one for classification)."""
    return f"Task: {task}. Words: {' '.join(words)}"


def generate_default_tasks(
    seed: int = DEFAULT_DATA_SEED, num_tasks: int = 4, n_train: int = 640, n_eval: int = 200, n_words: int = 3
) -> list[Task]:
    """The conflicting classification tasks (exact match, labels red/blue/green/gold)."""
    if not 1 <= num_tasks <= len(CLASSIFICATION_RULES):
        raise ValueError(f"num_tasks must be in [1, {len(CLASSIFICATION_RULES)}] (got {num_tasks})")
    cat = _category(seed)
    tasks = []
    for name, perm in CLASSIFICATION_RULES[:num_tasks]:
        rng = random.Random(f"{seed}:{name}")
        splits = []
        for split, n in (("train", n_train), ("eval", n_eval)):
            ex = []
            for i, words in enumerate(_inputs(rng, n, n_words)):
                ex.append(
                    Example(id=f"{name}-{split}-{i}", input=prompt(name, words), output=LABELS[perm[cat[words[-1]]]])
                )
            splits.append(ex)
        tasks.append(Task(name=name, train=splits[0], eval=splits[1], metric="exact", labels=sorted(LABELS)))
    return tasks


def _transform(rule: str, words: list[str]) -> list[str]:
    if rule == "copy":
        return list(words)
    if rule == "reverse":
        return words[::-1]
    if rule == "echo":
        return [words[-1], words[-1]]
    if rule == "swap":
        return [words[1], words[0]] + words[2:]
    raise ValueError(rule)


def generate_generation_tasks(
    seed: int = DEFAULT_DATA_SEED,
    rules: list[str] | None = None,
    n_train: int = 640,
    n_eval: int = 100,
    n_words: int = 4,
) -> list[Task]:
    """Free-text tasks (metric rougeL): the output is a transformed copy of the input words."""
    tasks = []
    for rule in rules or GENERATION_RULES:
        rng = random.Random(f"{seed}:gen:{rule}")
        splits = []
        for split, n in (("train", n_train), ("eval", n_eval)):
            splits.append(
                [
                    Example(id=f"{rule}-{split}-{i}", input=prompt(rule, w), output=" ".join(_transform(rule, w)))
                    for i, w in enumerate(_inputs(rng, n, n_words))
                ]
            )
        tasks.append(Task(name=rule, train=splits[0], eval=splits[1], metric="rougeL", labels=None))
    return tasks
