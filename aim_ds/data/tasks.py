"""The task types every data module shares: an example, a task, and the error bad data raises. The loaders
(core.py) and the generated default benchmark (default.py) both take them from here."""

from __future__ import annotations

from dataclasses import dataclass, field


class DataError(ValueError):
    """Bad benchmark input; the message names the file or task and the fix."""


@dataclass
class Example:
    id: str
    input: str
    output: str


@dataclass
class Task:
    name: str
    train: list[Example]
    eval: list[Example]
    metric: str = "exact"  # "exact" | "rougeL"
    labels: list[str] | None = field(default=None)  # candidate labels (classification) or None

    @property
    def is_classification(self) -> bool:
        return self.labels is not None


__all__ = ["DataError", "Example", "Task"]
