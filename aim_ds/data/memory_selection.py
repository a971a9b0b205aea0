"""The rehearsal memory buffer: a fixed, seeded sample of a task's training set."""

from __future__ import annotations

import random

from .tasks import Example, Task


def select_memory(task: Task, fraction: float, seed: int) -> list[Example]:
    """Seeded memory sample of ``task.train``.

    n = max(1, round(fraction * len(train))). Classification tasks (``task.labels`` set): the n
    slots are spread as evenly as possible over the classes present in train, at least one per
    class (so n is raised to the class count when needed); a class with too few examples gives its
    spare slots to the others. Generation tasks: n examples drawn uniformly at random.
    The result is shuffled (seeded), so any prefix is a fair sample.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"memory fraction must be in (0, 1] (got {fraction})")
    rng = random.Random(f"{seed}:{task.name}:memory")
    train = task.train
    n = max(1, round(fraction * len(train)))
    if task.labels is None:
        chosen = rng.sample(range(len(train)), min(n, len(train)))
    else:
        groups: dict[str, list[int]] = {}
        for i, e in enumerate(train):
            groups.setdefault(e.output, []).append(i)
        classes = sorted(groups)
        n = min(max(n, len(classes)), len(train))
        # water-filling: small classes take what they have, the rest share evenly; the last few
        # slots go to random classes that still have examples
        take, left = {}, n
        by_size = sorted(classes, key=lambda c: (len(groups[c]), c))
        for i, c in enumerate(by_size):
            take[c] = min(len(groups[c]), left // (len(by_size) - i))
            left -= take[c]
        while left > 0:
            spare = [c for c in classes if take[c] < len(groups[c])]
            for c in rng.sample(spare, min(left, len(spare))):
                take[c] += 1
                left -= 1
        chosen = []
        for c in classes:
            chosen += rng.sample(groups[c], take[c])
        rng.shuffle(chosen)
    return [train[i] for i in chosen]
