"""Reading tables: CSV/TSV (delimiter sniffed for .txt), JSON lines or array, Parquet, as string
cells; one DataError line naming the file, row and column for every problem, never the note
text (``shown``). ``medtune.data`` builds task records on top of this.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from medtune.errors import DataError, describe

DELIMITED = {".csv": ",", ".tsv": "\t", ".txt": None}  # None: sniff the delimiter
JSON_LINES = {".jsonl", ".ndjson", ".json"}
PARQUET = {".parquet", ".pq"}
SUPPORTED = ", ".join([*DELIMITED, *sorted(JSON_LINES), *sorted(PARQUET)])

_BAD_UTF8 = re.compile("[\udc80-\udcff]")  # what undecodable bytes become under surrogateescape
_UNNAMED = re.compile(r"^Unnamed: \d+$")
_INTEGER = r"\d+"


def may_be_note(value: Any, limit: int = 40, words: int = 4) -> bool:
    """Whether ``value`` may be note text (a headerless file's first row, a note in the label
    column): longer than ``limit``, more than ``words`` words, or holding something the PHI
    scrubber finds (a short note "r/o PE MRN 99887766")."""
    from medtune.phi import find_phi

    text = str(value)
    return len(text) > limit or len(text.split()) > words or bool(find_phi(text))


def shown(value: Any, limit: int = 40, words: int = 4) -> str:
    """``value`` for an error or warning line, its length instead where it ``may_be_note``."""
    text = str(value)
    if may_be_note(text, limit, words):
        return f"<{len(text)} characters, not shown>"
    # one line, whatever the file holds: control characters are escaped
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def read_table(path: str | Path, *, max_field_bytes: int = 1_000_000) -> pd.DataFrame:
    """Read a CSV/TSV/TXT, JSON-lines or Parquet file; every column a string, "" if missing."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a data file")
    suffix = path.suffix.lower()
    if suffix in PARQUET:
        df, where = _read_parquet(path)
    elif suffix in DELIMITED or suffix in JSON_LINES:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
        skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
        if not raw[skip:].strip():
            raise DataError(f"{path}: file is empty")
        try:
            text, bad = raw[skip:].decode("utf-8"), None
        except UnicodeDecodeError as exc:
            text, bad = raw[skip:].decode("utf-8", errors="surrogateescape"), exc.start + skip
        if suffix in JSON_LINES:
            df, where = _read_json(path, text, bad)
        else:
            df, where = _read_delimited(path, text, bad, DELIMITED[suffix] or _sniff(text))
    else:
        named = f"'{suffix}'" if suffix else "(no extension)"
        raise DataError(f"{path}: unknown file format {named}; supported: {SUPPORTED}")
    if len(df) == 0:
        raise DataError(f"{path}: no data rows")
    _check_field_sizes(path, df, where, max_field_bytes)
    df = _drop_index_columns(df)
    df.attrs["places"] = where  # each row's place for error lines: "data row 3", "line 7"
    return df


def _sniff(text: str) -> str:
    """Delimiter of a .txt table: the most frequent of tab , ; | in the header line."""
    header = text.split("\n", 1)[0]
    counts = {d: header.count(d) for d in ("\t", ",", ";", "|")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def _header(path: Path, record: list[str]) -> list[str]:
    names = [name.strip() or f"Unnamed: {i}" for i, name in enumerate(record)]
    for i, name in enumerate(names):
        if _BAD_UTF8.search(name):
            raise DataError(f"{path}: header, column {i + 1}: not valid UTF-8; re-save as UTF-8")
        if name in names[:i]:
            raise DataError(f"{path}: header: duplicate column name '{shown(name)}'")
    return names


def delimited_rows(path: Path, lines: Iterable[str], delimiter: str) -> Iterator[list[str]]:
    """The header (names stripped and unique), then every data row of a delimited text, read
    as ``lines`` yields it: blank lines skipped; a row whose field count differs from the
    header's, a CSV syntax error or a missing header is one DataError naming file, row and line.
    Shared by training's reader and prediction's streaming reader."""
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # sizes are checked in bytes (training) or not at all
    reader = csv.reader(lines, delimiter=delimiter)
    header: list[str] | None = None
    n, end = 0, 0  # data rows so far; the line the previous record ended on
    try:
        for record in reader:
            start, end = end + 1, reader.line_num
            if not record or (len(record) == 1 and not record[0].strip()):
                continue  # blank line
            if header is None:
                header = _header(path, record)
                yield header
                continue
            n += 1
            if len(record) != len(header):
                spans = "" if start == end else \
                    f" (a quoted field runs from line {start} to {end}: is a quote left open?)"
                raise DataError(f"{path}: data row {n} (line {start}): expected {len(header)} "
                                f"fields, got {len(record)}{spans}")
            yield record
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({exc})") from None
    finally:
        csv.field_size_limit(old_limit)
    if header is None:
        raise DataError(f"{path}: file is empty")


def _read_delimited(path: Path, text: str, bad: int | None, delimiter: str):
    records = delimited_rows(path, io.StringIO(text, newline=""), delimiter)
    header = next(records)
    rows: list[list[str]] = []
    for record in records:
        if bad is not None:
            for value, column in zip(record, header, strict=True):
                if _BAD_UTF8.search(value):
                    raise DataError(f"{path}: data row {len(rows) + 1}, column '{shown(column)}': "
                                    f"not valid UTF-8 (byte offset {bad}); re-save the file as UTF-8")
        rows.append(record)
    df = pd.DataFrame(rows, columns=header, dtype=str) if rows else pd.DataFrame(columns=header)
    return df, [f"data row {i}" for i in range(1, len(rows) + 1)]


def _as_str(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # Python or NumPy bool
        return "true" if value else "false"
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def nested_places(records: list[dict[str, Any]], where: list[str]) -> dict[str, str]:
    """Column -> place (``where``) of its first JSON object or array: a cell that is no text."""
    found: dict[str, str] = {}
    for record, place in zip(records, where, strict=True):
        for key, value in record.items():
            if isinstance(value, dict | list) and key not in found:
                found[key] = place
    return found


def refuse_nested(df: pd.DataFrame, path: str | Path, columns: Sequence[str | None]) -> None:
    """One line naming the place and column where a text or label cell is a JSON object or
    array (``df.attrs['nested']``, set by the JSON readers) instead of a string."""
    nested = df.attrs.get("nested", {})
    for column in columns:
        if column and column in nested:
            raise DataError(f"{path}: {nested[column]}, column '{shown(column)}': a JSON object "
                            "or array, expected a string")


def _frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    columns: dict[str, None] = {}
    for record in records:
        columns.update(dict.fromkeys(record))
    data = {c: [_as_str(r.get(c)) for r in records] for c in columns}
    return pd.DataFrame(data, dtype=str)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # "\ud83d": half of a UTF-16 pair


def parse_json(text: str, path: str | Path, where: str | None = None) -> Any:
    """``json.loads`` whose every failure is a one-line DataError naming ``where`` (default: the
    line of a syntax error, else "file"): syntax, nesting too deep, integers too long, and
    escaped lone surrogates ("\\ud800"), which no UTF-8 writer, tokenizer or Arrow column
    accepts."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: {where or f'line {exc.lineno}'}: invalid JSON ({exc.msg})") \
            from None
    except RecursionError:
        raise DataError(f"{path}: {where or 'file'}: invalid JSON (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer over sys.get_int_max_str_digits() digits
        raise DataError(f"{path}: {where or 'file'}: invalid JSON "
                        f"({str(exc).split(':')[0]})") from None
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{path}: {where or 'file'}: invalid text (a \\u escape of half a "
                            "UTF-16 surrogate pair)") from None
    return value


def _read_json(path: Path, text: str, bad: int | None):
    lines = text.split("\n")
    if bad is not None:
        match = _BAD_UTF8.search(text)
        lineno = text.count("\n", 0, match.start() if match else 0) + 1
        raise DataError(f"{path}: line {lineno}: not valid UTF-8 (byte offset {bad}); "
                        "re-save the file as UTF-8")
    if text.lstrip().startswith("["):  # a .json file holding one array of objects
        data = parse_json(text, path)
        where = [f"record {i}" for i in range(1, len(data) + 1)]
    else:
        data, where = [], []
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            data.append(parse_json(line, path, f"line {lineno}"))
            where.append(f"line {lineno}")
    for item, place in zip(data, where, strict=True):
        if not isinstance(item, dict):
            raise DataError(f"{path}: {place}: expected a JSON object, got {type(item).__name__}")
    df = _frame(data)
    df.attrs["nested"] = nested_places(data, where)
    return df, where


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for unreadable files
        raise DataError(f"{path}: cannot read Parquet ({describe(exc)})") from None
    data: dict[str, list[str]] = {}
    for name, column in zip(table.column_names, table.columns, strict=True):
        values = []
        for i, value in enumerate(column.to_pylist()):
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}: row {i + 1}, column '{shown(name)}': not valid UTF-8 "
                                    f"(byte offset {exc.start} in the field)") from None
            values.append(_as_str(value))
        data[name] = values
    df = pd.DataFrame(data, dtype=str)
    return df, [f"row {i}" for i in range(1, len(df) + 1)]


def _check_field_sizes(path: Path, df: pd.DataFrame, where: list[str], limit: int) -> None:
    first: tuple[int, str, int] | None = None
    for column in df.columns:
        values = df[column]
        # bytes >= chars >= bytes / 4: only fields longer than limit / 4 chars can be too big
        for i in (values.str.len() > limit // 4).to_numpy().nonzero()[0]:
            size = len(values.iat[i].encode("utf-8", errors="surrogateescape"))
            if size > limit and (first is None or i < first[0]):
                first = (int(i), column, size)
                break
    if first is not None:
        i, column, size = first
        raise DataError(f"{path}: {where[i]}, column '{shown(column)}': field is {size} bytes, over "
                        f"the limit of {limit} (max_field_bytes)")


def _drop_index_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Drop index columns a spreadsheet or ``to_csv`` left behind: unnamed all-integer (or
    all-empty) columns, and an 'index' column holding increasing integers."""
    drop = []
    for column in df.columns:
        values = df[column]
        if _UNNAMED.match(column):
            if (values == "").all() or values.str.fullmatch(_INTEGER).all():
                drop.append(column)
        elif column.lower() == "index" and values.str.fullmatch(_INTEGER).all():
            numbers = pd.to_numeric(values, errors="coerce")
            if (numbers.diff().iloc[1:] > 0).all():
                drop.append(column)
    return df.drop(columns=drop) if drop else df
