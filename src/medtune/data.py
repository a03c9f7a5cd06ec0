"""Data in: task records from a table (``medtune.tables`` reads the files): find the text and
label columns, validate, normalize.

Every problem with the input raises DataError with one line naming the file, the row and the
column. Note text never appears in a message: it may hold PHI.

``split_data`` (medtune.datacard) and ``inspect_data`` / ``render_inspect`` (medtune.datainspect)
are importable from here too.
"""

from __future__ import annotations

import math
import sys
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from medtune.config import DataConfig
from medtune.errors import ConfigError, DataError
from medtune.tables import may_be_note, read_table, refuse_nested, shown
from medtune.tasks.mcqa import LETTERS, OPTION_COLUMNS, format_question
from medtune.tasks.protocol import LABEL_COLUMNS, TEXT_COLUMNS

TASKS = ("protocol", "mcqa")
MCQA_SHAPE = ("question", *OPTION_COLUMNS)  # the columns that make a file multiple choice
MCQA_COLUMNS = ["id", "question", *OPTION_COLUMNS, "cop", "subject_name", "choice_type", "exp"]



def __getattr__(name: str) -> Any:
    """Lazy re-export of the verbs built on this module (datacard imports data, not the reverse)."""
    if name == "split_data":
        from medtune.datacard import split_data

        return split_data
    if name in ("inspect_data", "render_inspect"):
        from medtune import datainspect

        return getattr(datainspect, name)
    raise AttributeError(f"module 'medtune.data' has no attribute '{name}'")


# ------------------------------------------------------------------------------ columns, labels


def _available(df: pd.DataFrame) -> str:
    """The column names for an error line; a name that may be a note (a file without a header
    row makes its first row the names) is not shown, and the missing header is suggested."""
    names = [shown(c, limit=32, words=3) for c in df.columns]
    listed = ", ".join(names[:30]) + (f", ... ({len(names)} in all)" if len(names) > 30 else "")
    if any(may_be_note(c, limit=32, words=3) for c in df.columns):
        listed += " (is the first line a header? names that may be note text are not shown)"
    return listed or "(none)"


def _find_column(df: pd.DataFrame, path: str | Path, role: str, explicit: str | None,
                 candidates: list[str], required: bool) -> str | None:
    by_lower: dict[str, str] = {}
    for column in df.columns:
        by_lower.setdefault(str(column).lower(), column)
    if explicit:
        if explicit in df.columns:
            return explicit
        if explicit.lower() in by_lower:
            return by_lower[explicit.lower()]
        raise DataError(f"{path}: {role} column '{shown(explicit)}' not found; available columns: "
                        f"{_available(df)}")
    for name in candidates:
        if name in by_lower:
            return by_lower[name]
    if required:
        hint = {"text": "set --text-column", "question": "set --text-column",
                "label": "set --label-column", "cop": "set --label-column"
                }.get(role, f"name the column '{role}'")
        if role in ("text", "label") and {"question", "opa", "cop"} <= set(by_lower):
            hint = ("a MedMCQA file (question, opa-opd, cop): pass --task mcqa (predict and "
                    "evaluate: with a model trained with it)")
        raise DataError(f"{path}: no {role} column (looked for {', '.join(candidates)}); "
                        f"available columns: {_available(df)}; {hint}")
    return None


def detect_columns(df: pd.DataFrame, path: str | Path, text_column: str | None = None,
                   label_column: str | None = None) -> tuple[str, str]:
    """(text column, label column), by the names given or among the usual names, any case."""
    text = _find_column(df, path, "text", text_column, TEXT_COLUMNS, True)
    label = _find_column(df, path, "label", label_column, LABEL_COLUMNS, True)
    assert text is not None and label is not None
    if text == label:
        raise DataError(f"{path}: text and label are the same column '{shown(text)}'")
    return text, label


def normalize_text(text: str) -> str:
    """Key for duplicate and leakage checks: Unicode compatibility-normalized (a precomposed
    "é" and "e" + combining accent, full-width and ASCII digits are one text), whitespace runs
    collapsed, case folded."""
    return " ".join(unicodedata.normalize("NFKC", text).split()).casefold()


def check_unseen_labels(known: Iterable[str], gold: Iterable[str], path: str | Path,
                        what: str = "label") -> list[str]:
    """The distinct ``gold`` labels not in ``known`` (a model's or training's label set).
    Some: one warning line on stderr, with the rows they cover and any that differ from a
    known label only in case; all of them: a DataError (a wrong label column, or a model
    trained on other labels, would make every row count as wrong)."""
    known, gold = set(known), [g for g in gold if g != ""]
    unseen = sorted(set(gold) - known)
    if not unseen:
        return []
    by_case = {k.casefold(): k for k in known}
    rows = sum(g not in known for g in gold)
    listed = ", ".join(repr(shown(u)) for u in unseen[:5]) + (" ..." if len(unseen) > 5 else "")
    near = [f"{shown(u)!r} ~ {shown(by_case[u.casefold()])!r}" for u in unseen
            if u.casefold() in by_case]
    hint = f"; differ only in case: {', '.join(near[:3])}" if near else ""
    if rows == len(gold):
        raise DataError(f"{path}: none of its {what}s is in the label set ({len(known)} labels; "
                        f"it has {listed}){hint}")
    print(f"warning: {path}: {rows} of {len(gold)} rows have a {what} outside the label set "
          f"({listed}){hint}; they count as errors", file=sys.stderr)
    return unseen


# -------------------------------------------------------------------------------------- loading


def _places(df: pd.DataFrame) -> list[str]:
    """Where each row of ``df`` is in its file, as the reader named it ("data row 3" in a CSV,
    "line 7" in JSON lines, "row 3" in Parquet)."""
    places = df.attrs.get("places")
    return list(places) if places is not None and len(places) == len(df) else \
        [f"row {i}" for i in range(1, len(df) + 1)]


def _ids(df: pd.DataFrame, path: str | Path, exclude: set[str]) -> list[str]:
    column = _find_column(df, path, "id", None, ["id"], False)
    if column is None or column in exclude:
        return [str(i) for i in range(len(df))]
    ids = df[column].str.strip()
    places = _places(df)
    empty = (ids == "").to_numpy().nonzero()[0]
    if len(empty):
        raise DataError(f"{path}: {places[empty[0]]}, column '{column}': empty id")
    dup = ids.duplicated().to_numpy().nonzero()[0]
    if len(dup):
        raise DataError(f"{path}: {places[dup[0]]}, column '{column}': duplicate id")
    return ids.tolist()


def _handle_empty(out: pd.DataFrame, path: str | Path, checks: dict[str, str],
                  drop_empty: bool) -> pd.DataFrame:
    """Raise on (or drop, counting them) rows whose checked columns are blank."""
    keep = pd.Series(True, index=out.index)
    by_column: dict[str, int] = {}
    for column, source in checks.items():
        empty = (out[column].astype(str).str.strip() == "").to_numpy()
        if empty.any() and not drop_empty:
            raise DataError(f"{path}: {out['_place'].iat[empty.nonzero()[0][0]]}, column "
                            f"'{source}': empty "
                            f"{'text' if column in ('text', 'question') else column} "
                            "(fill or remove such rows; `medtune data split` drops them)")
        by_column[source] = int((empty & keep.to_numpy()).sum())
        keep &= ~empty
    result = out[keep.to_numpy()].reset_index(drop=True)
    result.attrs["places"] = list(result.pop("_place"))
    result.attrs.update(dropped_empty=int((~keep).sum()), dropped_empty_by_column=by_column,
                        rows_read=len(out), source=str(path))
    return result


def _parse_cop(value: str, row: str, path: str | Path, column: str, cop_base: int) -> int:
    raw = value.strip()
    if raw.upper() in LETTERS:
        return LETTERS.index(raw.upper())
    value = shown(raw, 8)  # a long value may be a misplaced note: not echoed
    try:
        number = float(raw)
        if not math.isfinite(number) or number != int(number):
            raise ValueError
    except ValueError:
        raise DataError(f"{path}: {row}, column '{column}': answer '{value}' is not an "
                        f"option index ({cop_base}-{cop_base + 3}) or letter A-D") from None
    index = int(number) - cop_base
    if not 0 <= index <= 3:
        hint = " (1-based answers? pass --cop-base 1, or set data.cop_base=1)" \
            if cop_base == 0 and number == 4 else ""
        raise DataError(f"{path}: {row}, column '{column}': answer {value} out of "
                        f"range {cop_base}-{cop_base + 3}{hint}")
    return index


def check_cop_base(task: str, cop_base: int) -> None:
    """``cop_base`` (--cop-base / data.cop_base) is 0 or 1, and only given for multiple choice."""
    if cop_base not in (0, 1):
        raise ConfigError(f"--cop-base must be 0 or 1, got {cop_base}")
    if task == "protocol" and cop_base:
        raise ConfigError("--cop-base / data.cop_base numbers multiple-choice answers: it needs "
                          "--task mcqa (protocol labels are names)")


def refuse_blank_options(df: pd.DataFrame, path: str | Path, source: dict[str, str | None],
                         places: list[str]) -> None:
    """One error for the first blank option (A-D) of a question: the model would read "C. "."""
    for name in OPTION_COLUMNS:
        blank = (df[name].astype(str).str.strip() == "").to_numpy().nonzero()[0]
        if len(blank):
            raise DataError(f"{path}: {places[blank[0]]}, column '{shown(str(source[name]))}': "
                            "empty option (every question needs four)")


def _load_mcqa(df: pd.DataFrame, path: str | Path, question_column: str | None,
               cop_column: str | None, require_labels: bool, drop_empty: bool,
               cop_base: int) -> pd.DataFrame:
    question = _find_column(df, path, "question", question_column, ["question"], True)
    assert question is not None  # required: _find_column raised otherwise
    source: dict[str, str | None] = {"question": question}
    for name in OPTION_COLUMNS:
        source[name] = _find_column(df, path, name, None, [name], True)
    source["cop"] = _find_column(df, path, "cop", cop_column, ["cop"], require_labels)
    for name in ("subject_name", "choice_type", "exp"):
        source[name] = _find_column(df, path, name, None, [name], False)
    refuse_nested(df, path, [source[name] for name in ("question", *OPTION_COLUMNS, "cop")])
    out = pd.DataFrame({"id": _ids(df, path, {c for c in source.values() if c})})
    for name, column in source.items():
        out[name] = df[column].to_numpy() if column else ""
    out["_place"] = _places(df)  # where each row is in the file, kept past dropped rows
    checks = {"question": question}
    if source["cop"] and require_labels:
        checks["cop"] = source["cop"]
    out = _handle_empty(out, path, checks, drop_empty)
    refuse_blank_options(out, path, source, out.attrs["places"])
    attrs = out.attrs
    cop_col = source["cop"] or "cop"
    out["cop"] = [_parse_cop(v, row, path, cop_col, cop_base) if v.strip() else -1
                  for row, v in zip(attrs["places"], out["cop"], strict=True)]
    out["label"] = [LETTERS[c] if c >= 0 else "" for c in out["cop"]]
    records = out[["question", *OPTION_COLUMNS]].to_dict("records")
    out["text"] = [format_question(r) for r in records]
    out = out[[*MCQA_COLUMNS, "text", "label"]]
    out.attrs.update(attrs, task="mcqa", text_column=source["question"], label_column=source["cop"])
    return out


def load_labeled(path: str | Path, *, task: str = "protocol", text_column: str | None = None,
                 label_column: str | None = None, max_field_bytes: int = 1_000_000,
                 require_labels: bool = True, drop_empty: bool = False,
                 cop_base: int = 0) -> pd.DataFrame:
    """Read ``path`` into task records: protocol -> id, text, label; mcqa -> the MedMCQA
    columns plus text (question and options) and label (letter). ``df.attrs`` holds
    rows_read, dropped_empty, dropped_empty_by_column, text_column, label_column."""
    if task not in TASKS:
        raise ConfigError(f"unknown task '{task}' (expected one of: {', '.join(TASKS)})")
    check_cop_base(task, cop_base)
    df = read_table(path, max_field_bytes=max_field_bytes)
    if task == "mcqa":
        return _load_mcqa(df, path, text_column, label_column, require_labels, drop_empty,
                          cop_base)
    if text_column is None and set(MCQA_SHAPE) <= {str(c).lower() for c in df.columns}:
        raise DataError(f"{path}: a MedMCQA file (question, opa-opd columns) read as protocol "
                        "notes: pass --task mcqa (or data.task=mcqa; predict and evaluate: with "
                        "a model trained with it), or --text-column to read one column as notes")
    text = _find_column(df, path, "text", text_column, TEXT_COLUMNS, True)
    label = _find_column(df, path, "label", label_column, LABEL_COLUMNS, require_labels)
    if text == label:
        raise DataError(f"{path}: text and label are the same column '{shown(text)}'")
    assert text is not None
    refuse_nested(df, path, (text, label))
    out = pd.DataFrame({"id": _ids(df, path, {text, label or ""}),
                        "text": df[text].to_numpy(),
                        "label": df[label].str.strip().to_numpy() if label else "",
                        "_place": _places(df)}, dtype=str)
    checks = {"text": text, "label": label} if label and require_labels else {"text": text}
    out = _handle_empty(out, path, checks, drop_empty)
    if label and not label_column:  # a column picked by its name: swapped columns leak notes
        _refuse_text_labels(out["label"], path, label)
    out.attrs.update(task="protocol", text_column=text, label_column=label)
    return out


def _refuse_text_labels(labels: pd.Series, path: str | Path, column: str) -> None:
    """Refuse a label column that holds note text: many distinct values (at least 50 and 30% of
    the rows) or long ones (more than 8 words on average). Every command would otherwise print
    or write its "labels" (data inspect's table, the data card, labels.json)."""
    values = labels[labels != ""]
    distinct = values.unique()
    if len(distinct) == 0:
        return
    words = sum(len(str(v).split()) for v in distinct) / len(distinct)
    if (len(distinct) >= 50 and len(distinct) >= 0.3 * len(values)) or words > 8:
        raise DataError(f"{path}: column '{shown(column)}' does not look like labels "
                        f"({len(distinct)} distinct values in {len(values)} rows, {words:.1f} "
                        "words on average): are the text and label columns swapped? Pass "
                        "--label-column to use it anyway")


def load_for_training(path: str | Path, cfg: DataConfig, *, quiet: bool = False) -> pd.DataFrame:
    """The examples of ``path`` for training; rows with a blank text or label are dropped, with
    a warning (unless ``quiet``) that counts them per column, never their content."""
    df = load_labeled(path, task=cfg.task, text_column=cfg.text_column,
                      label_column=cfg.label_column, max_field_bytes=cfg.max_field_bytes,
                      drop_empty=True, cop_base=cfg.cop_base)
    dropped = {k: v for k, v in df.attrs.get("dropped_empty_by_column", {}).items() if v}
    where = ", ".join(f"{n} with an empty '{col}'" for col, n in dropped.items())
    if df.empty:  # said "no training rows left after holding out 0" before
        raise DataError(f"{path}: none of its {df.attrs['rows_read']} rows can be trained on "
                        f"({where})")
    if dropped and not quiet:
        print(f"warning: {path}: {df.attrs['dropped_empty']} of {df.attrs['rows_read']} rows "
              f"skipped ({where})", file=sys.stderr)
    return df


def hold_out(df: pd.DataFrame, cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, validation) when no validation file is given: a seeded slice of ``df``
    (data.val_fraction; none when 0, and training then runs without validation)."""
    frac = cfg.val_fraction
    n_val = max(1, int(len(df) * frac)) if frac > 0 else 0
    shuffled = df.sample(frac=1.0, random_state=cfg.seed)
    return shuffled.iloc[n_val:], shuffled.iloc[:n_val]
