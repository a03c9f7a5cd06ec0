"""`medtune data scrub`: a table in, the same table out with PHI replaced (``medtune.phi`` finds
it) in the text column and any columns named with ``also``; every other column keeps its
values and types. Counts only, never text, come back.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medtune.errors import DataError
from medtune.fsutil import atomic_file, check_output_file
from medtune.phi import TYPES, find_phi, replace_spans
from medtune.tasks.protocol import TEXT_COLUMNS


def _text_column(df: Any, path: Path, text_column: str | None) -> str:
    """The text column: as detect_columns finds it, or (files without labels) the given name or
    the first usual text column name present."""
    from medtune.data import detect_columns  # same tier; imported when used

    try:
        return str(detect_columns(df, path, text_column=text_column)[0])
    except DataError:
        by_lower = {str(c).lower(): str(c) for c in df.columns}
        wanted = [text_column] if text_column else [*TEXT_COLUMNS, "question"]
        for name in wanted:
            if name.lower() in by_lower:
                return by_lower[name.lower()]
        raise


def _scrub_value(value: Any, counts: Counter[str]) -> Any:
    """A cell with every string in it scrubbed (JSON objects and arrays too); other values,
    nulls and numbers, as they are. ``counts`` gains the spans found, per type."""
    if isinstance(value, str):
        spans = find_phi(value)
        counts.update(kind for _, _, kind in spans)
        return replace_spans(value, spans)
    if isinstance(value, dict):
        return {key: _scrub_value(item, counts) for key, item in value.items()}
    if isinstance(value, list | tuple) or type(value).__name__ == "ndarray":  # Parquet lists
        return [_scrub_value(item, counts) for item in value]
    if isinstance(value, bytes):  # a Parquet binary column of text, stored back as bytes
        try:
            return _scrub_value(value.decode("utf-8"), counts).encode("utf-8")
        except UnicodeDecodeError:
            return value  # not text
    return value


def _check_parquet_columns(frame: Any, output: Path) -> None:
    """One error line for a column Parquet cannot store (JSON rows mixing text and numbers in
    one field), before anything is written; never the values themselves."""
    from medtune.tables import shown

    for column in frame.columns:
        kinds = {type(v).__name__ for v in frame[column]
                 if v is not None and not (isinstance(v, float) and v != v)}
        if len(kinds) > 1:
            raise DataError(f"{output}: column '{shown(str(column))}' mixes {', '.join(sorted(kinds))} "
                            "values, which one Parquet column cannot hold; write .jsonl or .csv")


def _typed_input(path: Path, strings: Any) -> Any:
    """``path``'s rows with the types it stores (read_table has already checked the file and
    gives every cell as a string): Parquet as Arrow typed it, JSON as its parsed objects (a
    list of dicts), delimited text as the strings themselves."""
    from medtune.tables import JSON_LINES, PARQUET, parse_json

    suffix = path.suffix.lower()
    if suffix in PARQUET:
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pandas()
    if suffix in JSON_LINES:
        text = path.read_text(encoding="utf-8-sig")
        if text.lstrip().startswith("["):
            return parse_json(text, path)
        return [parse_json(line, path) for line in text.split("\n") if line.strip()]
    return strings


def _columns_to_scrub(df: Any, path: Path, text_column: str | None,
                      also: Sequence[str]) -> list[str]:
    """The text column, then each of ``also`` (each must be a column of ``path``)."""
    from medtune.tables import shown

    columns = [_text_column(df, path, text_column)]
    for name in also:
        if name not in df.columns:
            raise DataError(f"{path}: --also: no column '{shown(name)}' (columns: "
                            f"{', '.join(shown(c) for c in df.columns)})")
        if name not in columns:
            columns.append(name)
    return columns


def _phi_left(rows: list[dict[str, Any]], skip: list[str]) -> dict[str, int]:
    """Column -> PHI-like spans in it, for the columns not scrubbed (``skip`` are)."""
    left: dict[str, Counter[str]] = {}
    for row in rows:
        for key, value in row.items():
            if key not in skip:
                _scrub_value(value, left.setdefault(str(key), Counter()))
    return {key: sum(c.values()) for key, c in left.items() if c}


def scrub_file(path: str | Path, output: str | Path, *, text_column: str | None = None,
               also: Sequence[str] = (), overwrite: bool = False, task: str = "protocol") -> dict:
    """Write ``path``'s table to ``output`` with its text column (and the ``also`` columns)
    scrubbed, atomically. ``task="mcqa"``: the question, its four options and ``exp`` (if
    there is one). The other columns keep their values and types (numbers, booleans,
    nulls, nested JSON), as far as the output format can hold them; those in which PHI-like
    spans remain are counted in ``not_scrubbed`` (column -> spans).

    Returns counts (rows, rows changed, spans per type); never any text.
    """
    import pandas as pd

    from medtune.synth import write_table_by_extension
    from medtune.tables import read_table

    path, output = Path(path), Path(output)
    check_output_file(output, overwrite)
    if output.resolve() == path.resolve():
        raise DataError(f"{output}: output must differ from the input file")
    suffix = output.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".parquet", ".pq"):
        raise DataError(f"{output}: unsupported extension (use .csv, .jsonl or .parquet)")
    df = read_table(path)  # checks the file: encoding, shape, field sizes, one-line errors
    if task == "mcqa":
        from medtune.tasks.mcqa import OPTION_COLUMNS

        text_column = text_column or "question"
        also = [*OPTION_COLUMNS, *(["exp"] if "exp" in df.columns else []), *also]
    elif task != "protocol":
        raise DataError(f"unknown task '{task}' (protocol, mcqa)")
    columns = _columns_to_scrub(df, path, text_column, also)
    typed = _typed_input(path, df)
    rows = typed if isinstance(typed, list) else typed.to_dict("records")
    counts: Counter[str] = Counter()
    scrubbed: list[dict[str, Any]] = []
    changed = 0
    for row in rows:
        found = sum(counts.values())
        scrubbed.append({c: _scrub_value(row[c], counts) for c in columns if c in row})
        changed += sum(counts.values()) > found  # a row with at least one span
    with atomic_file(output) as tmp:
        if isinstance(typed, list) and suffix == ".jsonl":  # JSON to JSON: each object as it was
            with open(tmp, "w", encoding="utf-8") as fh:
                for row, new in zip(rows, scrubbed, strict=True):
                    fh.write(json.dumps({**row, **new}, ensure_ascii=False) + "\n")
        else:
            frame = pd.DataFrame(rows) if isinstance(typed, list) else typed
            for c in columns:
                frame[c] = [new.get(c) for new in scrubbed]
            if suffix in (".parquet", ".pq") and isinstance(typed, list):
                _check_parquet_columns(frame, output)
            if suffix == ".csv" and isinstance(typed, list):  # nested JSON as JSON, not repr
                for c in frame.columns:
                    frame[c] = [json.dumps(v, ensure_ascii=False) if isinstance(v, dict | list)
                                else v for v in frame[c]]
            write_table_by_extension(frame, tmp, suffix)
    out = {"input": str(path), "output": str(output), "column": columns[0],
           "rows": len(df), "rows_changed": changed,
           "spans": {k: counts[k] for k in TYPES if counts[k]}, "total_spans": sum(counts.values())}
    if columns[1:]:
        out["also"] = columns[1:]
    left = _phi_left(rows, columns)
    if left:
        out["not_scrubbed"] = left
    return out
