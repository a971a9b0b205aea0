"""The generated default benchmark (no downloads, fully seeded).

Classification family ("default"): every task shares one input format and one label set,

    "Task: alpha. Words: lop mar nix. Answer:"  ->  "red"

Sixteen pseudo-words fall into four categories; a task's label is the category of ONE position
(the first or the last word) sent through a task-specific label permutation:

    alpha: first word, map A      beta:  last word, map B
    gamma: first word, map C      delta: last word, map D

C is a derangement of A and D of B, so gamma rewrites exactly the mapping alpha taught (a model
that answers alpha prompts with gamma's rule scores 0%), and delta does the same to beta, while
the first/last switch makes the other pair of tasks fall to chance (25%). Each task alone is an
easy lookup a 2-layer, 64-wide Llama learns in a few dozen steps; sequential fine-tuning forgets
badly (BWT far below -20 points). The task name is in the prompt, so the tasks are distinguishable
in principle: replay / multi-task training can keep all of them.

Generation family ("default-gen", metric rougeL): the same inputs, the output is a word sequence
(copy, reverse, rotate left, swap the first two words).
"""
from __future__ import annotations

import random

from .core import Example, Task

DEFAULT_DATA_SEED = 1234
WORDS = ["lop", "mar", "nix", "tup", "bex", "dov", "fip", "gam",
         "hul", "jor", "kes", "lun", "mib", "pav", "rix", "sol"]
LABELS = ["red", "blue", "green", "gold"]
# task name, label permutation (category c of the LAST word -> LABELS[perm[c]]). Any two maps agree on
# at most one category and every earlier map agrees with the last one on exactly one, so a model
# that answers an earlier task with the last task's rule scores about 25% (chance), not 100%.
CLASSIFICATION_RULES = [
    ("alpha", (0, 1, 2, 3)),
    ("beta", (0, 2, 3, 1)),
    ("gamma", (1, 0, 3, 2)),
    ("delta", (0, 3, 1, 2)),
    ("epsilon", (2, 3, 1, 0)),     # only when num_tasks > 4
    ("zeta", (3, 2, 0, 1)),
]
GENERATION_RULES = ["copy", "reverse", "rotate", "swap"]


def _category(rng_seed: int) -> dict[str, int]:
    rng = random.Random(f"{rng_seed}:categories")
    words = list(WORDS)
    rng.shuffle(words)
    return {w: i % len(LABELS) for i, w in enumerate(words)}


def _inputs(rng: random.Random, n: int, n_words: int) -> list[list[str]]:
    return [[rng.choice(WORDS) for _ in range(n_words)] for _ in range(n)]


def prompt(task: str, words: list[str], answer: bool = False) -> str:
    """Classification prompts end with the deciding word; generation prompts with "Answer:"."""
    return f"Task: {task}. Words: {' '.join(words)}" + (". Answer:" if answer else "")


def generate_default_tasks(seed: int = DEFAULT_DATA_SEED, num_tasks: int = 4, n_train: int = 640,
                           n_eval: int = 200, n_words: int = 3) -> list[Task]:
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
                ex.append(Example(id=f"{name}-{split}-{i}", input=prompt(name, words),
                                  output=LABELS[perm[cat[words[-1]]]]))
            splits.append(ex)
        tasks.append(Task(name=name, train=splits[0], eval=splits[1], metric="exact",
                          labels=sorted(LABELS)))
    return tasks


def _transform(rule: str, words: list[str]) -> list[str]:
    if rule == "copy":
        return list(words)
    if rule == "reverse":
        return words[::-1]
    if rule == "rotate":
        return words[1:] + words[:1]
    if rule == "swap":
        return [words[1], words[0]] + words[2:]
    raise ValueError(rule)


def generate_generation_tasks(seed: int = DEFAULT_DATA_SEED, rules: list[str] | None = None,
                              n_train: int = 640, n_eval: int = 100, n_words: int = 4) -> list[Task]:
    """Free-text tasks (metric rougeL): the output is a transformed copy of the input words."""
    tasks = []
    for rule in rules or GENERATION_RULES:
        rng = random.Random(f"{seed}:gen:{rule}")
        splits = []
        for split, n in (("train", n_train), ("eval", n_eval)):
            splits.append([Example(id=f"{rule}-{split}-{i}", input=prompt(rule, w, answer=True),
                                   output=" ".join(_transform(rule, w)))
                           for i, w in enumerate(_inputs(rng, n, n_words))])
        tasks.append(Task(name=rule, train=splits[0], eval=splits[1], metric="rougeL", labels=None))
    return tasks
