"""Progress on stderr: a rich bar on a terminal, plain periodic lines elsewhere (a log file, CI,
``nohup``), where a live bar would print nothing until the work ends. Counts and numbers only,
never note text."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

LINES = 10          # plain mode: about this many lines over the whole task
MIN_GAP_S = 5.0     # ... and at most one every few seconds, besides the last


class LineProgress:
    """The subset of ``rich.progress.Progress`` medtune uses (context manager, ``add_task``,
    ``update``), printing ``label done/total field=value ... elapsed`` lines."""

    def __init__(self, label: str, disable: bool = False, stream: Any = None) -> None:
        self.label, self.disable = label, disable
        self.stream = stream or sys.stderr
        self.tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for task in self.tasks.values():
            if not exc[0] and task["printed"] != task["completed"]:
                self._print(task)

    def add_task(self, name: str, total: float | None = None, completed: float = 0,
                 **fields: Any) -> int:
        key = len(self.tasks)
        now = time.monotonic()
        self.tasks[key] = {"total": total, "completed": completed, "fields": fields,
                           "start": now, "last": now, "printed": completed}
        return key

    def update(self, key: int, *, advance: float = 0, completed: float | None = None,
               **fields: Any) -> None:
        task = self.tasks[key]
        task["completed"] = (task["completed"] if completed is None else completed) + advance
        task["fields"].update(fields)
        total, now = task["total"], time.monotonic()
        step = max(1.0, (total or 0) / LINES)
        due = task["completed"] - task["printed"] >= step and now - task["last"] >= MIN_GAP_S
        if due or (total is not None and task["completed"] >= total):
            self._print(task)

    def _print(self, task: dict[str, Any]) -> None:
        task["printed"], task["last"] = task["completed"], time.monotonic()
        if self.disable:
            return
        done = f"{task['completed']:g}" + (f"/{task['total']:g}" if task["total"] else "")
        fields = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in task["fields"].items())
        elapsed = f"{time.monotonic() - task['start']:.0f}s"
        print(" ".join(p for p in (self.label, done, fields, elapsed) if p), file=self.stream,
              flush=True)


def make_progress(label: str, *columns: Any, disable: bool = False, console: Any = None):
    """A rich ``Progress`` with ``columns`` when stderr is a terminal, else ``LineProgress``."""
    from rich.console import Console
    from rich.progress import Progress

    console = console or Console(stderr=True)
    if console.is_terminal or disable:
        return Progress(*columns, console=console, disable=disable)
    return LineProgress(label)


def bench_progress(label: str, disable: bool = False):
    """A count bar for the benchmarks' loops (``label done/total`` lines in a log)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    return make_progress(label, TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                         TimeElapsedColumn(), disable=disable)


@contextmanager
def library_bars(enabled: bool) -> Iterator[None]:
    """Inside the block, transformers' own bars ("Loading weights", "Writing model shards") show
    only if ``enabled`` (and not turned off already, e.g. by ``HF_HUB_DISABLE_PROGRESS_BARS``);
    the setting is restored after. ``progress=False`` in medtune's API then means no bars at all,
    also on the other ranks of a distributed run."""
    from transformers.utils import logging as hf_logging

    turn_off = not enabled and hf_logging.is_progress_bar_enabled()
    if turn_off:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if turn_off:
            hf_logging.enable_progress_bar()
