"""Streamed reading and writing of prediction files (used by ``predict`` and ``spark``).

Input is read in chunks of ``chunk_rows`` rows: CSV/TSV record by record
(``tables.delimited_rows``), Parquet via pyarrow record batches, JSONL line by line (a
single-array .json file is read whole). Columns are found with the same names and rules as
``medtune.data``. Output rows are appended chunk by chunk to one CSV or Parquet file (the caller
gives a temporary path and renames it at the end).
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from medtune.errors import ConfigError, DataError, MedtuneError


# ---------------------------------------------------------------------------------- input
@dataclass
class Chunk:
    """Up to ``chunk_rows`` input rows: ids, texts (MCQA: formatted question), gold or None."""

    ids: list[str]
    texts: list[str]
    gold: list[str] | None


def _cell(value: Any, where: str) -> str:
    """A cell as text, by ``medtune.data``'s rules (a JSON/Parquet true reads "true", as the
    labels a model was trained on did)."""
    from medtune.tables import _as_str

    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{where}: not valid UTF-8") from None
    return _as_str(value)


def _raw_chunks(path: Path, rows: int) -> tuple[Iterator[pd.DataFrame], int | None]:
    """String DataFrames of ``rows`` rows each, and the row count when the format knows it."""
    from medtune.tables import DELIMITED, JSON_LINES, PARQUET, SUPPORTED, _sniff, read_table, shown

    suffix = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    if suffix in PARQUET:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several unrelated types
            raise DataError(f"{path}: cannot read Parquet ({type(exc).__name__})") from None

        def parquet() -> Iterator[pd.DataFrame]:
            batches = pf.iter_batches(batch_size=rows)
            while True:
                try:
                    batch = next(batches, None)
                except Exception as exc:  # a corrupt page after a valid footer
                    raise DataError(f"{path}: cannot read Parquet ({type(exc).__name__})") \
                        from None
                if batch is None:
                    return
                yield pd.DataFrame({name: [_cell(v, f"{path}: column '{shown(name)}'")
                                           for v in col.to_pylist()]
                                    for name, col in zip(batch.schema.names, batch.columns,
                                                         strict=True)}, dtype=str)
        return parquet(), pf.metadata.num_rows
    if suffix in DELIMITED:
        with open(path, encoding="utf-8-sig", errors="replace") as fh:
            sep = DELIMITED[suffix] or _sniff(fh.readline())
        return _delimited(path, sep, rows), _count_delimited(path, sep)
    if suffix in JSON_LINES:
        with open(path, encoding="utf-8-sig", errors="replace") as fh:
            head = fh.read(4096).lstrip()
        if head.startswith("["):  # one JSON array: not streamable, read whole
            df = read_table(path)
            return (df.iloc[i:i + rows] for i in range(0, len(df), rows)), len(df)
        with open(path, "rb") as raw:  # a progress total: one cheap pass over the lines
            total = sum(1 for line in raw if line.strip())
        return _json_lines(path, rows), total
    raise DataError(f"{path}: unknown file format '{suffix}'; supported: {SUPPORTED}")


def _count_delimited(path: Path, sep: str) -> int | None:
    """Data rows of a delimited file by the reader's own rules (a progress total; one pass
    without building frames); None when the file is malformed (the reader then says where)."""
    from medtune.tables import delimited_rows

    try:
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
            return max(0, sum(1 for _ in delimited_rows(path, fh, sep)) - 1)
    except MedtuneError:
        return None


def _delimited(path: Path, sep: str, rows: int) -> Iterator[pd.DataFrame]:
    """A delimited file in DataFrames of ``rows`` rows, by training's rules
    (``medtune.tables.delimited_rows``), read a line at a time: memory stays bounded."""
    from medtune.tables import _BAD_UTF8, delimited_rows, shown

    # undecodable bytes pass as surrogates and are caught in their record: the error names the
    # row and column (a strict decoder fails a block ahead, somewhere in the next 8 KB)
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        records = delimited_rows(path, fh, sep)
        header = next(records)
        if any(_BAD_UTF8.search(name) for name in header):
            raise DataError(f"{path}: header: not valid UTF-8; re-save the file as UTF-8")
        batch: list[list[str]] = []
        for number, record in enumerate(records, 1):
            for value, column in zip(record, header, strict=False):
                if _BAD_UTF8.search(value):
                    raise DataError(f"{path}: data row {number}, column '{shown(column)}': not "
                                    "valid UTF-8; re-save the file as UTF-8")
            batch.append(record)
            if len(batch) == rows:
                yield pd.DataFrame(batch, columns=header, dtype=str)
                batch = []
        if batch:
            yield pd.DataFrame(batch, columns=header, dtype=str)


def _json_lines(path: Path, rows: int) -> Iterator[pd.DataFrame]:
    from medtune.tables import parse_json

    batch: list[dict[str, Any]] = []
    places: list[str] = []
    with open(path, encoding="utf-8-sig") as fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                item = parse_json(line, path, f"line {lineno}")
                if not isinstance(item, dict):
                    raise DataError(f"{path}: line {lineno}: expected a JSON object")
                batch.append(item)
                places.append(f"line {lineno}")
                if len(batch) == rows:
                    yield _records_frame(batch, places)
                    batch, places = [], []
        except UnicodeDecodeError:
            raise DataError(f"{path}: not valid UTF-8; re-save the file as UTF-8") from None
    if batch:
        yield _records_frame(batch, places)


def _records_frame(items: list[dict[str, Any]], places: list[str]) -> pd.DataFrame:
    from medtune.tables import nested_places

    columns: dict[str, None] = {}
    for item in items:
        columns.update(dict.fromkeys(item))
    df = pd.DataFrame({c: [_cell(it.get(c), c) for it in items] for c in columns}, dtype=str)
    df.attrs["nested"] = nested_places(items, places)
    return df


def iter_records(data: str | Path, *, task: str = "protocol", text_column: str | None = None,
                 label_column: str | None = None, chunk_rows: int = 2048,
                 cop_base: int = 0) -> tuple[Iterator[Chunk], int | None]:
    """Stream ``data`` as Chunks. Columns are found (and checked) on the first chunk, so a bad
    file fails before any model is loaded. Ids: the ``id`` column, else the row number from 0
    (as ``data.load_labeled``)."""
    from medtune.data import TASKS, _find_column, _parse_cop, check_cop_base, refuse_blank_options
    from medtune.tables import DELIMITED, refuse_nested, shown
    from medtune.tasks.mcqa import LETTERS, OPTION_COLUMNS, format_question
    from medtune.tasks.protocol import LABEL_COLUMNS, TEXT_COLUMNS

    if task not in TASKS:
        raise ConfigError(f"unknown task '{task}' (expected one of: {', '.join(TASKS)})")
    check_cop_base(task, cop_base)
    path = Path(data)
    raw, total = _raw_chunks(path, chunk_rows)
    first = next(raw, None)
    if first is None or len(first) == 0:
        raise DataError(f"{path}: no data rows")
    if task == "mcqa":
        text = _find_column(first, path, "question", text_column, ["question"], True)
        options = [_find_column(first, path, c, None, [c], True) for c in OPTION_COLUMNS]
        label = _find_column(first, path, "cop", label_column, ["cop"], False)
    else:
        text = _find_column(first, path, "text", text_column, TEXT_COLUMNS, True)
        label = _find_column(first, path, "label", label_column, LABEL_COLUMNS, False)
        options = []
        if text == label:
            raise DataError(f"{path}: text and label are the same column '{shown(text)}'")
    id_col = _find_column(first, path, "id", None, ["id"], False)
    id_col = None if id_col in {text, label, *options} else id_col

    # rows named as `data` names them: "data row N" (after a CSV's header), else "row N"
    row = "data row" if path.suffix.lower() in DELIMITED else "row"

    def chunks() -> Iterator[Chunk]:
        offset, seen = 0, set()
        for df in itertools.chain([first], raw):
            refuse_nested(df, path, (text, label, *options))
            missing = [c for c in (text, label, id_col, *options) if c and c not in df.columns]
            if missing:  # JSON lines may leave a key out of a whole chunk: same as blank
                df = df.assign(**dict.fromkeys(missing, ""))
            n = len(df)
            if id_col:
                ids = [str(v).strip() for v in df[id_col]]
                for i, v in enumerate(ids):
                    if not v or v in seen:
                        what = "empty" if not v else "duplicate"
                        raise DataError(f"{path}: {row} {offset + i + 1}, column '{id_col}': "
                                        f"{what} id")
                    seen.add(v)
            else:
                ids = [str(offset + i) for i in range(n)]
            if task == "mcqa":
                cols = df[[text, *options]].set_axis(["question", *OPTION_COLUMNS], axis=1)
                # a blank question is answered but abstains; a blank option is an error
                at = (cols["question"].astype(str).str.strip() != "").to_numpy().nonzero()[0]
                refuse_blank_options(cols.iloc[at], path,
                                     dict(zip(OPTION_COLUMNS, options, strict=True)),
                                     [f"{row} {offset + int(i) + 1}" for i in at])
                texts = [format_question(r) for r in cols.to_dict("records")]
                gold = None if not label else [
                    LETTERS[_parse_cop(v, f"{row} {offset + i + 1}", path, label, cop_base)]
                    if str(v).strip() else "" for i, v in enumerate(df[label])]
            else:
                texts = [str(v) for v in df[text]]
                gold = None if not label else [str(v).strip() for v in df[label]]
            yield Chunk(ids=ids, texts=texts, gold=gold)
            offset += n

    return chunks(), total


# ---------------------------------------------------------------------------------- output
OUTPUT_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
BOOL_COLUMNS = ("abstained", "in_label_set", "snapped")


def output_format(output: str | Path) -> str:
    suffix = Path(output).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise MedtuneError(f"{output}: output must end in .csv or .parquet")
    return OUTPUT_FORMATS[suffix]


class ChunkWriter:
    """Append DataFrames of the same columns to one CSV or Parquet file."""

    def __init__(self, path: Path, fmt: str):
        self.path, self.fmt, self.rows = path, fmt, 0
        self._pq: Any = None  # a pyarrow ParquetWriter from the first Parquet chunk on

    def write(self, df: pd.DataFrame) -> None:
        if self.fmt == "csv":
            df.to_csv(self.path, mode="a" if self.rows else "w", header=not self.rows,
                      index=False)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            types = {c: pa.bool_() if c in BOOL_COLUMNS else
                     pa.float64() if c == "confidence" else pa.string() for c in df.columns}
            schema = pa.schema([(c, t) for c, t in types.items()])
            table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
            if self._pq is None:
                self._pq = pq.ParquetWriter(self.path, schema)
            self._pq.write_table(table)
        self.rows += len(df)

    def close(self) -> None:
        if self._pq is not None:
            self._pq.close()
            self._pq = None


def rows_frame(chunk: Chunk, rows: list[dict[str, Any]], *, mode: str, snap: bool,
               keep_text: bool) -> pd.DataFrame:
    """The predictions-file columns of CONTRACTS.md for one chunk, in order."""
    def top_k(value: Any) -> str:
        if isinstance(value, str):  # already JSON (Spark)
            return value
        return json.dumps([[lab, round(float(p), 6)] for lab, p in value])

    cols: dict[str, Any] = {
        "id": chunk.ids,
        "prediction": [r["prediction"] for r in rows],
        "confidence": [float(r["confidence"]) for r in rows],
        "abstained": [bool(r["abstained"]) for r in rows],
        "top_k": [top_k(r["top_k"]) for r in rows]}
    if mode == "generate":
        cols["raw_output"] = [r["raw_output"] for r in rows]
        cols["in_label_set"] = [bool(r["in_label_set"]) for r in rows]
        if snap:
            cols["snapped"] = [bool(r.get("snapped", False)) for r in rows]
    if chunk.gold is not None:
        cols["gold"] = chunk.gold
    if keep_text:
        cols["text"] = chunk.texts
    return pd.DataFrame(cols)


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int | None) -> Iterator[Callable[[int, float], None]]:
    """A rich bar on stderr with notes/s; it shows counts only, never text."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from medtune.progress import make_progress

    bar = make_progress("predict", TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]:.1f} notes/s"), TimeElapsedColumn(),
                        disable=not enabled)
    with bar:
        task = bar.add_task("predict", total=total, rate=0.0)
        done = [0]

        def advance(n: int, elapsed: float) -> None:
            done[0] += n
            bar.update(task, advance=n, rate=done[0] / max(elapsed, 1e-9))

        yield advance
