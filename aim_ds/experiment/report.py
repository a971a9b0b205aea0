"""Result files of a driver run: atomic writers and the two plots (matplotlib, Agg backend).

* ``accuracy.png``: heatmap of the matrix a[k][i] (row = after training task k, column = task i).
* ``trajectory.png``: per global step, the probe loss on memory and the threshold delta (top), the
  learning signal Lambda at merges and the interval S (bottom), merges as vertical marks, task
  boundaries as dashed lines.  Methods without a plugin have empty probe columns; the plot then shows
  the training loss only (from ``losses``).
"""

from __future__ import annotations

import io
import json
import math

from ..control.trajectory import FIELDS as TRAJECTORY_FIELDS  # noqa: F401
from ..fileio import atomic_write_bytes, atomic_write_text, write_csv  # noqa: F401


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(_json_safe(obj), indent=2, sort_keys=False) + "\n")


def _save_fig(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_accuracy(path: str, matrix: list[list[float | None]], task_names: list[str], title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    k = len(matrix)
    n = len(task_names)
    data = np.full((k, n), np.nan)
    for r, row in enumerate(matrix):
        for c, v in enumerate(row):
            if v is not None:
                data[r, c] = v
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * n, 1.0 + 0.7 * k))
    im = ax.imshow(data, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    for r in range(k):
        for c in range(n):
            if not np.isnan(data[r, c]):
                ax.text(
                    c,
                    r,
                    f"{data[r, c]:.1f}",
                    ha="center",
                    va="center",
                    color="white" if data[r, c] < 60 else "black",
                    fontsize=8,
                )
    ax.set_xticks(range(n), task_names, rotation=30, ha="right")
    ax.set_yticks(range(k), [f"after {task_names[r] if r < n else r}" for r in range(k)])
    ax.set_xlabel("evaluated task")
    ax.set_title(title or "accuracy a[k][i] (%)")
    fig.colorbar(im, ax=ax, label="%")
    _save_fig(fig, path)
    plt.close(fig)


def plot_trajectory(path: str, rows: list[dict], losses: list[dict] | None = None, title: str = "") -> None:
    """rows: trajectory rows (task, step, ...); losses: dicts (task, step, loss) of the training loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def f(v):
        return None if v in (None, "") else float(v)

    # global step: the per-task step offset by the steps of the previous tasks
    last_in_task: dict[int, int] = {}
    for src in (rows or []), (losses or []):
        for r in src:
            t, s = int(f(r["task"])), int(f(r["step"]))
            last_in_task[t] = max(last_in_task.get(t, 0), s)
    offsets, acc = {}, 0
    for t in sorted(last_in_task):
        offsets[t] = acc
        acc += last_in_task[t]

    def g(r):
        return offsets.get(int(f(r["task"])), 0) + int(f(r["step"]))

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    if losses:
        a1.plot([g(r) for r in losses], [f(r["loss"]) for r in losses], lw=0.6, color="0.6", label="train loss")
    pr = [r for r in rows if f(r.get("probe_loss")) is not None]
    if pr:
        a1.plot(
            [g(r) for r in pr], [f(r["probe_loss"]) for r in pr], ".", ms=2, color="C0", label="probe loss (memory)"
        )
    th = [r for r in rows if f(r.get("threshold")) is not None]
    if th:
        a1.plot([g(r) for r in th], [f(r["threshold"]) for r in th], "-", lw=0.8, color="C3", label="threshold delta")
    a1.set_ylabel("loss")
    a1.legend(loc="upper right", fontsize=7)
    iv = [r for r in rows if f(r.get("interval")) is not None]
    if iv:
        a2.step([g(r) for r in iv], [f(r["interval"]) for r in iv], where="post", color="C2", label="interval S")
    a2.set_ylabel("interval S")
    ls = [r for r in rows if f(r.get("learning_signal")) is not None]
    if ls:
        a3 = a2.twinx()
        a3.plot(
            [g(r) for r in ls], [f(r["learning_signal"]) for r in ls], "o-", ms=3, color="C1", label="learning signal"
        )
        a3.set_ylabel("learning signal", color="C1")
    merges = [g(r) for r in rows if f(r.get("merge")) == 1]
    for ax in (a1, a2):
        for m in merges:
            ax.axvline(m, color="C4", lw=0.5, alpha=0.6)
        for t, off in offsets.items():
            if t > 0:
                ax.axvline(off, color="k", ls="--", lw=0.8)
    a2.set_xlabel(f"global training step   (purple: merges, {len(merges)}; dashed: task boundaries)")
    a1.set_title(title or "trajectory")
    _save_fig(fig, path)
    plt.close(fig)
