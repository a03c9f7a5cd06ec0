"""Progress outside a terminal: periodic plain lines (counts and numbers only), not a rich bar
that shows nothing until the end."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress

from medtune import progress as P


def test_lines_are_periodic_and_end_with_the_total(monkeypatch):
    monkeypatch.setattr(P, "MIN_GAP_S", 0.0)
    out = io.StringIO()
    with P.LineProgress("train", stream=out) as bar:
        task = bar.add_task("train", total=100, completed=0, loss=float("nan"), tps=0.0)
        for step in range(1, 101):
            bar.update(task, completed=step, loss=1.0 / step, tps=1500.0)
    lines = out.getvalue().splitlines()
    assert len(lines) == P.LINES
    assert lines[0].startswith("train 10/100 loss=0.1 tps=1500 ")
    assert lines[-1].startswith("train 100/100 loss=0.01 ")


def test_advance_without_total_prints_once_at_the_end_and_disable_prints_nothing(monkeypatch):
    monkeypatch.setattr(P, "MIN_GAP_S", 3600.0)  # no periodic line fits in this test
    out = io.StringIO()
    with P.LineProgress("predict", stream=out) as bar:
        task = bar.add_task("predict", total=None, rate=0.0)
        for _ in range(7):
            bar.update(task, advance=3, rate=12.5)
    (line,) = out.getvalue().splitlines()
    assert line.startswith("predict 21 rate=12.5 ")
    quiet = io.StringIO()
    with P.LineProgress("x", disable=True, stream=quiet) as bar:
        bar.update(bar.add_task("x", total=2), advance=2)
    assert quiet.getvalue() == ""


def test_make_progress_picks_by_terminal():
    assert isinstance(P.make_progress("t", console=Console(file=io.StringIO())), P.LineProgress)
    rich_bar = P.make_progress("t", console=Console(file=io.StringIO(), force_terminal=True))
    assert isinstance(rich_bar, Progress)
    assert isinstance(P.make_progress("t", disable=True,
                                      console=Console(file=io.StringIO())), Progress)


def test_library_bars_turns_transformers_bars_off_inside_only_and_restores():
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        with P.library_bars(False):
            assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.is_progress_bar_enabled()
        with P.library_bars(True):
            assert hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # off already (HF_HUB_DISABLE_PROGRESS_BARS): stays off
        with P.library_bars(True):
            assert not hf_logging.is_progress_bar_enabled()
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
