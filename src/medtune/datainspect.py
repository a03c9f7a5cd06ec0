"""`data inspect`: what a data file holds before anyone trains on it.

Label counts, text lengths, exact and normalized duplicates, texts carrying conflicting labels,
labels that look like misspellings of each other, PHI-like spans in the notes (``medtune.phi``'s
patterns) and leakage against a second file. Counts
only: note text appears only with ``show_examples`` (it may hold PHI).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

from medtune.data import load_labeled, normalize_text
from medtune.datacard import EXAMPLE_CHARS, duplicate_stats, near_duplicate_labels

N_EXAMPLES = 3


def _length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    values = np.asarray(lengths, dtype=float)
    return {"min": int(values.min()), "mean": round(float(values.mean()), 1),
            "p50": round(float(np.percentile(values, 50)), 1),
            "p95": round(float(np.percentile(values, 95)), 1),
            "max": int(values.max())}


def _token_lengths(tokenizer: Any, texts: list[str]) -> list[int]:
    if isinstance(tokenizer, str | Path):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    lengths: list[int] = []
    for start in range(0, len(texts), 1024):
        ids = tokenizer(texts[start: start + 1024], add_special_tokens=False)["input_ids"]
        lengths.extend(len(x) for x in ids)
    return lengths


def _clip(text: str) -> str:
    return text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + "..."


def _examples(df: pd.DataFrame, keys: pd.Series, shared: set[str]) -> dict[str, list[Any]]:
    sizes = keys.value_counts()
    first = df.groupby(keys, sort=False)["text"].first()
    labels = df.groupby(keys, sort=False)["label"].agg(lambda s: s.value_counts().to_dict())
    conflicts = [k for k in sizes.index if len([lb for lb in labels[k] if lb]) > 1]
    return {
        "duplicates": [{"text": _clip(first[k]), "rows": int(n)}
                       for k, n in sizes[sizes > 1].head(N_EXAMPLES).items()],
        "conflicts": [{"text": _clip(first[k]), "labels": labels[k]}
                      for k in conflicts[:N_EXAMPLES]],
        "leaked": [_clip(first[k]) for k in sorted(shared)[:N_EXAMPLES]],
    }


def _phi_counts(texts: list[str]) -> dict[str, Any]:
    """Rows whose text holds PHI-like spans, and the spans per type (~4,000 notes/s)."""
    from collections import Counter

    from medtune.phi import TYPES, find_phi

    spans: Counter[str] = Counter()
    rows = 0
    for text in texts:
        found = find_phi(text)
        rows += bool(found)
        spans.update(kind for _, _, kind in found)
    return {"rows_with_phi": rows, "spans": {k: spans[k] for k in TYPES if spans[k]}}


def _conflict(a: frozenset[str], b: frozenset[str]) -> bool:
    """Both copies labelled, differently (an unlabelled copy is no conflict)."""
    a, b = a - {""}, b - {""}
    return bool(a) and bool(b) and a != b


def inspect_data(path: str | Path, *, against: str | Path | None = None, task: str = "protocol",
                 text_column: str | None = None, label_column: str | None = None,
                 tokenizer: Any = None, show_examples: bool = False,
                 cop_base: int = 0) -> dict[str, Any]:
    """A JSON-able summary of ``path`` (and of its overlap with ``against``)."""
    df = load_labeled(path, task=task, text_column=text_column, label_column=label_column,
                      require_labels=False, drop_empty=True, cop_base=cop_base)
    keys = df["text"].map(normalize_text)
    labelled = df["label"] != ""
    texts = df["text"].tolist()
    summary: dict[str, Any] = {
        "source": str(path), "task": task,
        "columns": {"text": df.attrs.get("text_column"), "label": df.attrs.get("label_column")},
        "rows_read": df.attrs["rows_read"], "empty_dropped": df.attrs["dropped_empty"],
        "rows": len(df), "rows_without_label": int((~labelled).sum()),
        "labels": {str(k): int(v) for k, v in df.loc[labelled, "label"].value_counts().items()},
        "text_chars": _length_stats([len(t) for t in texts]),
        "text_tokens": _length_stats(_token_lengths(tokenizer, texts)) if tokenizer else None,
        "duplicates": duplicate_stats(df, keys),
        "near_duplicate_labels": near_duplicate_labels(df["label"].tolist())
        if task == "protocol" else [],
        "phi": _phi_counts(texts),
        "leakage": None,
    }
    shared: set[str] = set()
    if against is not None:
        other = load_labeled(against, task=task, text_column=text_column,
                             label_column=label_column, require_labels=False, drop_empty=True,
                             cop_base=cop_base)
        other_keys = other["text"].map(normalize_text)
        shared = set(keys) & set(other_keys)
        here = df.groupby(keys)["label"].agg(frozenset)
        there = other.groupby(other_keys)["label"].agg(frozenset)
        ours, theirs = set(df.loc[labelled, "label"]), set(other["label"]) - {""}
        summary["leakage"] = {
            "against": str(against), "against_rows": len(other),
            "shared_texts": len(shared),
            "rows_here": int(keys.isin(shared).sum()),
            "rows_there": int(other_keys.isin(shared).sum()),
            "shared_with_different_labels": sum(_conflict(here[k], there[k]) for k in shared),
            "labels_only_here": sorted(ours - theirs),
            "labels_only_there": sorted(theirs - ours),
        }
    if show_examples:
        summary["examples"] = _examples(df, keys, shared)
    else:  # the JSON view hides what the table hides: a "label" that may be a note
        _hide_note_labels(summary)
    return summary


def _hide_note_labels(summary: dict[str, Any]) -> None:
    """Replace, in place, every label of ``summary`` that may be note text (a text column passed
    as --label-column) by its length, as the printed tables do."""
    counts: dict[str, int] = {}
    seen: Counter[str] = Counter()
    for label, n in summary["labels"].items():
        name = _label(label)
        seen[name] += 1  # two hidden labels of one length stay two entries
        counts[name if seen[name] == 1 else f"{name} #{seen[name]}"] = n
    summary["labels"] = counts
    for pair in summary["near_duplicate_labels"]:
        pair["a"], pair["b"] = _label(pair["a"]), _label(pair["b"])
    leak = summary["leakage"]
    if leak is not None:
        for key in ("labels_only_here", "labels_only_there"):
            leak[key] = [_label(x) for x in leak[key]]


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    return table


def _row(table: Table, *cells: Any) -> None:
    table.add_row(*(Text(str(c)) for c in cells))  # Text: no rich markup in labels or paths


def _label(label: str) -> str:
    """A label as printed: protocol names pass ("MRI Brain with and without contrast"), text
    long enough to be a note (swapped columns) is replaced by its length."""
    from medtune.tables import shown

    return shown(label, limit=80, words=10)


def render_inspect(summary: dict[str, Any]) -> None:
    """Print the summary as tables on stdout."""
    console = Console()
    overview = _table("Overview", "item", "value")
    _row(overview, "file", summary["source"])
    _row(overview, "task", summary["task"])
    _row(overview, "columns", f"text={summary['columns']['text']} "
                              f"label={summary['columns']['label']}")
    for key in ("rows_read", "empty_dropped", "rows", "rows_without_label"):
        _row(overview, key.replace("_", " "), summary[key])
    console.print(overview)

    labels = _table(f"Labels ({len(summary['labels'])})", "label", "rows", "share")
    total = sum(summary["labels"].values()) or 1
    for label, n in summary["labels"].items():  # a label column holding notes prints none
        _row(labels, _label(label), n, f"{100 * n / total:.1f}%")
    console.print(labels)

    lengths = _table("Text length", "unit", "min", "mean", "p50", "p95", "max")
    for unit in ("chars", "tokens"):
        stats = summary.get(f"text_{unit}")
        if stats:
            _row(lengths, unit, *(stats[k] for k in ("min", "mean", "p50", "p95", "max")))
    console.print(lengths)

    dups = _table("Duplicates", "check", "count")
    for key, n in summary["duplicates"].items():
        _row(dups, key.replace("_", " "), n)
    console.print(dups)

    phi = summary.get("phi")
    if phi and phi["rows_with_phi"]:
        console.print(f"PHI-like spans in {phi['rows_with_phi']} of {summary['rows']} notes "
                      "(medtune data scrub or data.scrub_phi=true replaces them)")
        table = _table("", "type", "spans")
        for kind, n in phi["spans"].items():
            _row(table, kind, n)
        console.print(table)
    elif phi:
        console.print("PHI-like spans: none found (pattern based, see medtune.phi)")

    if summary["near_duplicate_labels"]:
        near = _table("Possible near-duplicate labels", "label", "label", "ratio", "edits")
        for pair in summary["near_duplicate_labels"]:
            _row(near, _label(pair["a"]), _label(pair["b"]), pair["ratio"],
                 pair["edit_distance"] or "-")
        console.print(near)

    leak = summary.get("leakage")
    if leak:
        table = _table(f"Leakage against {Path(leak['against']).name}", "check", "value")
        for key in ("against_rows", "shared_texts", "rows_here", "rows_there",
                    "shared_with_different_labels"):
            _row(table, key.replace("_", " "), leak[key])
        for key in ("labels_only_here", "labels_only_there"):
            _row(table, key.replace("_", " "), ", ".join(map(_label, leak[key])) or "-")
        console.print(table)

    examples = summary.get("examples")
    if examples:
        table = _table("Examples (--show-examples)", "kind", "text", "detail")
        for item in examples["duplicates"]:
            _row(table, "duplicate", item["text"], f"{item['rows']} rows")
        for item in examples["conflicts"]:
            _row(table, "conflict", item["text"], item["labels"])
        for text in examples["leaked"]:
            _row(table, "leaked", text, "")
        console.print(table)
