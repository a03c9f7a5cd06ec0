"""A run's metrics.jsonl (one JSON row per logged step, appended) and its loss plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medtune.fsutil import atomic_file, write_text


def metric_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of metrics.jsonl; a line torn by a crash mid-append (SIGKILL, full disk) is skipped."""
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def drop_metrics_after(path: Path, step: int) -> dict[str, Any]:
    """Resume: rows logged after the checkpoint belong to steps that are about to be redone.
    Returns the rows of ``step`` merged (the summary of a run resumed at its last step)."""
    if not path.exists():
        return {}
    rows = [r for r in metric_rows(path) if r.get("step", 0) <= step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    last: dict[str, Any] = {}
    for r in rows:
        if r.get("step") == step:
            last.update(r)
    return last


def plot_losses(metrics: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metric_rows(metrics)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    for pts, name in ((tr, "train loss"), (va, "val loss")):
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o" if name == "val loss" else None, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.legend()
    fig.tight_layout()
    with atomic_file(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
