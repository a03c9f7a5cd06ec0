"""Readers, validation, inspect and split, on tiny hand-written fixtures (invented text)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from medtune.config import DataConfig
from medtune.data import (
    check_unseen_labels,
    detect_columns,
    inspect_data,
    load_labeled,
    normalize_text,
    render_inspect,
    split_data,
)
from medtune.errors import DataError, MedtuneError
from medtune.tables import read_table

BODY_PARTS = ["Knee MRI", "Wrist XR", "Ankle CT"]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def notes_frame(per_label: int = 20, labels: list[str] = BODY_PARTS) -> pd.DataFrame:
    """Distinct invented notes: label i, note j."""
    rows = [{"text": f"Invented note {j} about the {label.split()[0].lower()} of patient {j * 7}",
             "label": label} for label in labels for j in range(per_label)]
    return pd.DataFrame(rows)


def notes_csv(tmp_path: Path, df: pd.DataFrame, name: str = "notes.csv") -> Path:
    path = tmp_path / name
    df.to_csv(path, index=False)
    return path


def cfg(**kw) -> DataConfig:
    return DataConfig(**{"min_count": 1, **kw})


def error_of(fn, *args, **kw) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------ bad input, one by one


def test_missing_file(tmp_path):
    msg = error_of(read_table, tmp_path / "nope.csv")
    assert "nope.csv" in msg and "not found" in msg


def test_unknown_format(tmp_path):
    msg = error_of(read_table, write(tmp_path / "notes.xlsx", "a,b\n1,2\n"))
    assert "'.xlsx'" in msg and ".csv" in msg and ".parquet" in msg


def test_empty_file(tmp_path):
    assert "empty" in error_of(read_table, write(tmp_path / "e.csv", "\n  \n"))
    assert "no data rows" in error_of(read_table, write(tmp_path / "h.csv", "text,label\n"))


def test_missing_column_lists_available(tmp_path):
    path = write(tmp_path / "n.csv", "body,answer\nfoo,bar\n")
    msg = error_of(load_labeled, path)
    assert "n.csv" in msg and "text column" in msg and "body, answer" in msg
    df = read_table(path)
    msg = error_of(detect_columns, df, path, text_column="body")
    assert "label column" in msg and "body, answer" in msg
    assert "'note'" in error_of(detect_columns, df, path, text_column="note", label_column="answer")


def test_a_headerless_file_does_not_show_its_first_note_as_column_names(tmp_path):
    path = write(tmp_path / "h.csv", "a1,r/o PE MRN 99887766,L-Spine\nb2,chest pain,CT Head\n")
    msg = error_of(load_labeled, path)
    assert "99887766" not in msg and "r/o" not in msg
    assert "a1" in msg and "L-Spine" in msg and "is the first line a header?" in msg


def test_empty_text(tmp_path):
    path = write(tmp_path / "n.csv", "text,label\nfine note,A\n   ,B\n")
    msg = error_of(load_labeled, path)
    assert "n.csv" in msg and "row 2" in msg and "'text'" in msg and "empty text" in msg
    df = load_labeled(path, drop_empty=True)
    assert df.attrs["dropped_empty"] == 1 and df["label"].tolist() == ["A"]


def test_empty_label(tmp_path):
    path = write(tmp_path / "n.csv", "note,protocol\nfirst,A\nsecond,\nthird,C\n")
    msg = error_of(load_labeled, path)
    assert "row 2" in msg and "'protocol'" in msg and "empty label" in msg
    assert load_labeled(path, drop_empty=True).attrs["dropped_empty"] == 1
    assert load_labeled(path, require_labels=False)["label"].tolist() == ["A", "", "C"]


def test_non_utf8_bytes_csv_and_jsonl(tmp_path):
    path = tmp_path / "n.csv"
    path.write_bytes(b'text,label\nok note,A\n"multi\nline",B\ncaf\xe9 note,C\n')
    msg = error_of(read_table, path)
    assert "data row 3" in msg and "'text'" in msg and "UTF-8" in msg
    offset = path.read_bytes().index(b"\xe9")
    assert f"byte offset {offset}" in msg
    jpath = tmp_path / "n.jsonl"
    jpath.write_bytes(b'{"text": "a", "label": "A"}\n{"text": "b\xff", "label": "B"}\n')
    assert "line 2" in error_of(read_table, jpath)


def test_ragged_csv_row(tmp_path):
    path = write(tmp_path / "n.csv", "text,label\na,A\nb,B,extra\n")
    msg = error_of(read_table, path)
    assert "data row 2" in msg and "expected 2 fields, got 3" in msg


def test_bad_json_line(tmp_path):
    path = write(tmp_path / "n.jsonl", '{"text": "a", "label": "A"}\n\n{"text": "b", "label"\n')
    assert "line 3" in error_of(read_table, path)
    path = write(tmp_path / "l.jsonl", '{"text": "a", "label": "A"}\n["not", "an", "object"]\n')
    assert "line 2" in error_of(read_table, path)


def test_field_over_limit_small_limit(tmp_path):
    path = write(tmp_path / "n.csv", "text,label\nshort,A\n" + "x" * 40 + ",B\n")
    msg = error_of(read_table, path, max_field_bytes=30)
    assert "data row 2" in msg and "'text'" in msg and "40 bytes" in msg
    assert len(read_table(path, max_field_bytes=40)) == 2
    jpath = write(tmp_path / "n.jsonl", '{"text": "ok"}\n{"text": "' + "é" * 20 + '"}\n')
    assert "line 2" in error_of(read_table, jpath, max_field_bytes=30)  # 40 bytes, 20 chars


def test_field_over_one_megabyte(tmp_path):
    path = write(tmp_path / "big.csv", "text,label\nsmall,A\n" + "y" * 1_100_000 + ",B\n")
    msg = error_of(read_table, path)
    assert "data row 2" in msg and "1100000 bytes" in msg and "1000000" in msg


def test_cop_out_of_range(tmp_path):
    head = "id,question,opa,opb,opc,opd,cop\n"
    path = write(tmp_path / "q.csv", head + "q1,What?,a,b,c,d,0\nq2,Which?,a,b,c,d,4\n")
    msg = error_of(load_labeled, path, task="mcqa")
    assert "row 2" in msg and "'cop'" in msg and "pass --cop-base 1, or set data.cop_base=1" in msg
    one_based = load_labeled(write(tmp_path / "q1.csv", head + "q1,What?,a,b,c,d,1\n"
                                   "q2,Which?,a,b,c,d,4\n"), task="mcqa", cop_base=1)
    assert one_based["cop"].tolist() == [0, 3] and one_based["label"].tolist() == ["A", "D"]
    assert "row 2" in error_of(load_labeled, path.with_name("q1.csv"), task="mcqa")
    gap = write(tmp_path / "q2.csv", head + "q1,,a,b,c,d,0\nq2,Why?,a,b,c,d,1\nq3,How?,a,b,c,d,9\n")
    assert "row 3" in error_of(load_labeled, gap, task="mcqa", drop_empty=True)


def test_all_labels_filtered_by_min_count(tmp_path):
    path = notes_csv(tmp_path, notes_frame(per_label=4))
    out = tmp_path / "splits"
    msg = error_of(split_data, path, out, cfg(min_count=10))
    assert "all labels filtered out by min_count=10 (largest label has 4 rows)" in msg
    assert not out.exists()  # a failing split leaves nothing behind


def test_min_count_that_keeps_one_label_is_refused(tmp_path):
    df = pd.concat([notes_frame(per_label=12, labels=BODY_PARTS[:1]),
                    notes_frame(per_label=4, labels=BODY_PARTS[1:])])
    out = tmp_path / "splits"
    msg = error_of(split_data, notes_csv(tmp_path, df), out, cfg(min_count=10))
    assert f"min_count=10 keeps 1 of {len(BODY_PARTS)} labels" in msg
    assert "second largest has 4 rows" in msg and not out.exists()


def test_unseen_labels_warn_with_a_case_hint_and_all_unseen_is_an_error(capsys):
    unseen = check_unseen_labels(["Knee MRI", "Wrist XR"],
                                 ["Knee MRI", "Spine MRI", "Hip CT", "knee mri"], "test.csv")
    assert unseen == ["Hip CT", "Spine MRI", "knee mri"]
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: test.csv: 3 of 4 rows have a label outside the label set")
    assert "'knee mri' ~ 'Knee MRI'" in line
    assert check_unseen_labels(["a"], ["a"], "x") == []
    with pytest.raises(DataError, match=r"^t.csv: none of its gold labels is in the label set "
                                        r"\(2 labels; it has 'XR'\)"):
        check_unseen_labels(["Knee MRI", "Wrist XR"], ["XR", "XR"], "t.csv", "gold label")


# ---------------------------------------------------------------------------------- formats


def test_csv_index_column_and_both_naming_styles(tmp_path):
    styled = write(tmp_path / "a.csv", ',input,radiology_labels\n0,"Note one, with comma",Knee\n'
                                        "1,Note two,Wrist\n")
    plain = write(tmp_path / "b.csv", 'text,label\n"Note one, with comma",Knee\nNote two,Wrist\n')
    assert list(read_table(styled).columns) == ["input", "radiology_labels"]
    a, b = load_labeled(styled), load_labeled(plain)
    assert a.equals(b)
    assert a["id"].tolist() == ["0", "1"] and a["text"][0] == "Note one, with comma"
    assert detect_columns(read_table(styled), styled) == ("input", "radiology_labels")
    indexed = write(tmp_path / "c.csv", "index,Text,Label\n3,n1,A\n8,n2,B\n")
    assert list(read_table(indexed).columns) == ["Text", "Label"]
    kept = write(tmp_path / "d.csv", "index,text,label\n3,n1,A\n1,n2,B\n")  # not a running index
    assert "index" in read_table(kept).columns


def test_tsv_txt_jsonl_parquet(tmp_path):
    tsv = write(tmp_path / "n.tsv", "note\tclass\nfirst, with comma\tA\nsecond\tB\n")
    txt = write(tmp_path / "n.txt", "note|class\nfirst, with comma|A\nsecond|B\n")
    jsonl = write(tmp_path / "n.jsonl", '{"id": "x1", "note": "first, with comma", "class": "A"}\n'
                                        '{"id": "x2", "note": "second", "class": "B", "n": 2}\n')
    parquet = tmp_path / "n.parquet"
    pd.DataFrame({"note": ["first, with comma", "second"], "class": ["A", "B"],
                  "n": [1, None]}).to_parquet(parquet)
    for path in (tsv, txt, jsonl, parquet):
        df = load_labeled(path)
        assert df["text"].tolist() == ["first, with comma", "second"], path
        assert df["label"].tolist() == ["A", "B"], path
    assert load_labeled(jsonl)["id"].tolist() == ["x1", "x2"]
    assert read_table(jsonl)["n"].tolist() == ["", "2"]
    assert read_table(parquet)["n"].tolist() == ["1.0", ""]


def test_mcqa_load(tmp_path):
    path = write(tmp_path / "q.jsonl", json.dumps({"question": "Which bone?", "opa": "tibia",
                                                   "opb": "ulna", "opc": "femur", "opd": "radius",
                                                   "cop": 2}) + "\n")
    df = load_labeled(path, task="mcqa")
    assert df.loc[0, "label"] == "C" and df.loc[0, "cop"] == 2 and df.loc[0, "exp"] == ""
    assert df.loc[0, "text"].startswith("Which bone?") and "C. femur" in df.loc[0, "text"]


def test_normalize_text():
    assert normalize_text("  Pain\tin\n the KNEE ") == "pain in the knee"
    # one text however its characters are encoded: it must not land in train and in test
    assert normalize_text("caf\u00e9 pain") == normalize_text("cafe\u0301 pain")
    assert normalize_text("L\uff14 disc") == normalize_text("L4 disc")


# ------------------------------------------------------------------------------------ inspect


def test_inspect_counts_and_no_text_without_examples(tmp_path, capsys):
    df = pd.concat([notes_frame(per_label=5), pd.DataFrame([
        {"text": "Invented note 0 about the knee of patient 0", "label": "Knee MRI"},  # exact dup
        {"text": "INVENTED  note 1 about the knee of patient 7", "label": "Wrist XR"},  # conflict
        {"text": "Secret phrase zebra", "label": "Knee MRl"},  # near-duplicate label
    ])])
    path = notes_csv(tmp_path, df)
    other = notes_csv(tmp_path, notes_frame(per_label=2), "other.csv")
    summary = inspect_data(path, against=other, tokenizer=lambda texts, **_: {
        "input_ids": [t.split() for t in texts]})
    dups = summary["duplicates"]
    assert dups["exact_duplicate_rows"] == 1 and dups["normalized_duplicate_rows"] == 2
    assert dups["conflict_groups"] == 1 and dups["conflict_rows"] == 2
    assert [(p["a"], p["b"]) for p in summary["near_duplicate_labels"]] == [("Knee MRI",
                                                                           "Knee MRl")]
    assert summary["leakage"]["shared_texts"] == 6 and summary["text_tokens"]["max"] == 9
    assert summary["phi"] == {"rows_with_phi": 0, "spans": {}}
    dumped = json.dumps(summary)
    assert "zebra" not in dumped and "examples" not in summary
    render_inspect(summary)
    printed = capsys.readouterr().out
    assert "Leakage" in printed and "Knee MRl" in printed and "Invented" not in printed
    shown = inspect_data(path, show_examples=True)
    assert "zebra" not in json.dumps(shown)
    assert shown["examples"]["conflicts"][0]["text"].endswith("patient 7")
    render_inspect(shown)
    assert "Invented" in capsys.readouterr().out


def test_inspect_counts_phi_like_spans_without_showing_them(tmp_path, capsys):
    df = pd.DataFrame({"text": ["Seen by Dr. Alice Wong on 03/14/2023 for knee pain",
                                "call 555-234-5678 re wrist", "plain knee note"] * 2,
                       "label": ["Knee MRI", "Wrist XR", "Knee MRI"] * 2})
    summary = inspect_data(notes_csv(tmp_path, df))
    assert summary["phi"] == {"rows_with_phi": 4, "spans": {"NAME": 2, "DATE": 2, "PHONE": 2}}
    render_inspect(summary)
    printed = capsys.readouterr().out
    assert "PHI-like spans in 4 of 6 notes" in printed and "PHONE" in printed
    for secret in ("Alice", "Wong", "03/14/2023", "555-234-5678"):
        assert secret not in printed and secret not in json.dumps(summary)


# -------------------------------------------------------------------------------------- split


def read_splits(out: Path) -> dict[str, pd.DataFrame]:
    return {s: pd.read_csv(out / f"{s}.csv", dtype=str, keep_default_na=False)
            for s in ("train", "val", "test")}


def test_split_stratified_deterministic_leakage_free(tmp_path):
    df = notes_frame(per_label=40, labels=[*BODY_PARTS, "Hip CT"])
    df = df[~((df["label"] == "Hip CT") & (df.index % 2 == 0))]  # 20 Hip CT rows
    path = notes_csv(tmp_path, df)
    card = split_data(path, tmp_path / "s0", cfg(seed=0))
    split_data(path, tmp_path / "s0b", cfg(seed=0))
    split_data(path, tmp_path / "s1", cfg(seed=1))
    s0, s0b, s1 = (read_splits(tmp_path / d) for d in ("s0", "s0b", "s1"))
    assert card["split_sizes"] == {"train": 112, "val": 14, "test": 14}
    for split in ("train", "val", "test"):
        assert s0[split].equals(s0b[split])
        counts = s0[split]["label"].value_counts()
        share = len(s0[split]) / len(df)
        for label, total in df["label"].value_counts().items():
            assert abs(counts[label] - total * share) <= 1, (split, label)
    assert not s0["test"].equals(s1["test"])
    keys = [set(s0[s]["text"].map(normalize_text)) for s in ("train", "val", "test")]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    labels = json.loads((tmp_path / "s0" / "labels.json").read_text())
    assert labels["labels"] == sorted([*BODY_PARTS, "Hip CT"]) and labels["counts"]["Hip CT"] == 20
    assert "| Hip CT |" in (tmp_path / "s0" / "data_card.md").read_text()


def test_split_dedups_and_resolves_conflicts(tmp_path):
    base = notes_frame(per_label=10)
    extra = pd.DataFrame([
        {"text": "Invented note 0 about the knee of patient 0", "label": "Knee MRI"},  # exact
        {"text": " invented NOTE 0 about the  knee of patient 0", "label": "Knee MRI"},  # case/ws
        {"text": "Swollen elbow after a fall", "label": "Knee MRI"},  # 2 vs 1: majority wins
        {"text": "swollen elbow after a fall", "label": "Knee MRI"},
        {"text": "Swollen elbow  after a fall", "label": "Wrist XR"},
        {"text": "Clicking jaw on waking", "label": "Wrist XR"},  # 1 vs 1: tie, dropped
        {"text": "clicking jaw on waking", "label": "Ankle CT"},
        {"text": "", "label": "Ankle CT"},  # empty, dropped and counted
        {"text": "Rare label note", "label": "Elbow US"},  # under min_count
    ])
    path = notes_csv(tmp_path, pd.concat([base, extra]))
    card = split_data(path, tmp_path / "out", cfg(min_count=2))
    assert card["rows_read"] == 39 and card["empty_dropped"] == 1
    assert card["exact_duplicate_rows"] == 1 and card["normalized_duplicate_rows"] == 5
    c = card["conflicts"]
    assert (c["groups"], c["resolved_by_majority"], c["dropped_ties"]) == (2, 1, 1)
    assert c["minority_rows_removed"] == 1 and c["rows_dropped_in_ties"] == 2
    assert card["labels_filtered"] == {"Elbow US": 1} and card["rows_after_dedup"] == 32
    rows = pd.concat(read_splits(tmp_path / "out").values())
    assert len(rows) == 31 and card["leakage_across_splits"] == 0
    elbow = rows[rows["text"].str.lower() == "swollen elbow after a fall"]
    assert elbow["label"].tolist() == ["Knee MRI"] and "clicking" not in " ".join(rows["text"])
    assert rows["text"].str.contains("  ").sum() == 0  # whitespace collapsed
    md = (tmp_path / "out" / "data_card.md").read_text()
    assert "2 groups" in md and "1 ties dropped" in md and "Elbow US: 1" in md


def test_split_mcqa_keeps_all_letters(tmp_path):
    rows = [{"id": f"q{i}", "question": f"Invented question {i}?", "opa": "one", "opb": "two",
             "opc": "three", "opd": "four", "cop": i % 4, "subject_name": "Anatomy"}
            for i in range(40)]
    path = tmp_path / "q.parquet"
    pd.DataFrame(rows).to_parquet(path)
    card = split_data(path, tmp_path / "out", DataConfig(task="mcqa", min_count=50))
    assert card["labels_kept"] == {"A": 10, "B": 10, "C": 10, "D": 10}
    assert card["min_count"] is None and card["split_sizes"] == {"train": 32, "val": 4, "test": 4}
    test = read_splits(tmp_path / "out")["test"]
    assert sorted(test["label"]) == ["A", "B", "C", "D"]
    assert list(test.columns[:7]) == ["id", "question", "opa", "opb", "opc", "opd", "cop"]


def test_split_refuses_non_empty_dir_and_leaves_it(tmp_path):
    path = notes_csv(tmp_path, notes_frame())
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(MedtuneError, match="not empty"):
        split_data(path, out, cfg())
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    split_data(path, out, cfg(), overwrite=True)
    assert sorted(os.listdir(out)) == ["data_card.json", "data_card.md", "labels.json",
                                       "test.csv", "train.csv", "val.csv"]


def test_failing_split_leaves_no_files(tmp_path):
    bad = write(tmp_path / "bad.csv", "text,label\na,A\nb,B,C\n")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(DataError, match=r"data row 2 \(line 3\): expected 2 fields, got 3"):
        split_data(bad, empty_dir, cfg())
    assert list(empty_dir.iterdir()) == []
    with pytest.raises(DataError, match="expected 2 fields"):
        split_data(bad, tmp_path / "new", cfg())
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "empty"]


def test_split_scrubs_phi_before_dedup(tmp_path):
    df = pd.concat([notes_frame(per_label=10), pd.DataFrame([
        {"text": "Knee pain, write to ann.lee@example.org", "label": "Knee MRI"},
        {"text": "Knee pain, write to bo.kim@example.net", "label": "Knee MRI"},
    ])])
    card = split_data(notes_csv(tmp_path, df), tmp_path / "out", cfg(scrub_phi=True))
    assert card["phi_scrubbed"] and card["rows_changed_by_phi_scrub"] == 2
    assert card["normalized_duplicate_rows"] == 1  # identical once the addresses are replaced
    written = "".join((tmp_path / "out" / f"{s}.csv").read_text() for s in ("train", "val", "test"))
    assert "example.org" not in written and "example.net" not in written


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_json_object_as_text_is_refused_naming_the_place(tmp_path, suffix):
    """A JSON object or array where a note (or label) belongs is an error, in training data and
    in streamed prediction input alike; nested values in other columns are kept as JSON text."""
    from medtune.predict_io import iter_records

    rows = [{"text": "chest pain", "label": "CT Chest", "meta": {"site": 1}},
            {"text": {"body": "a note"}, "label": "CT Head"}]
    path = tmp_path / f"notes{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows))
        place = "record 2"
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        place = "line 2"
    expected = f"{path}: {place}, column 'text': a JSON object or array, expected a string"
    with pytest.raises(DataError) as info:
        load_labeled(path)
    assert str(info.value) == expected
    with pytest.raises(DataError) as info:  # prediction streams the same file
        list(iter_records(path)[0])
    assert str(info.value) == expected
    rows[1] = {"text": "head trauma", "label": ["CT Head"]}
    path.write_text(json.dumps(rows) if suffix == ".json" else
                    "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"column 'label': a JSON object or array"):
        load_labeled(path)
    rows[1]["label"] = "CT Head"
    path.write_text(json.dumps(rows) if suffix == ".json" else
                    "".join(json.dumps(r) + "\n" for r in rows))
    assert list(load_labeled(path)["label"]) == ["CT Chest", "CT Head"]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_boolean_cells_read_alike_for_training_and_prediction(tmp_path, suffix):
    """A true/false label cell is "true"/"false" in training (labels.json) and in the streamed
    prediction input's gold column alike: predict's accuracy compares like with like."""
    from medtune.predict_io import iter_records

    rows = [{"text": f"note {i}", "label": i % 2 == 0} for i in range(6)]
    path = tmp_path / f"flags{suffix}"
    if suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trained = list(load_labeled(path)["label"])
    chunk = next(iter_records(path)[0])
    assert trained == ["true", "false"] * 3
    assert list(chunk.gold) == trained  # used to be "True"/"False"


def test_missing_column_errors_name_options_that_exist(tmp_path):
    path = tmp_path / "q.csv"
    pd.DataFrame({"stem": ["a?"], "opa": ["x"], "opb": ["y"], "opc": ["z"], "opd": ["w"],
                  "cop": [0]}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"no question column .*; set --text-column$"):
        load_labeled(path, task="mcqa")
    with pytest.raises(DataError, match=r"no opd column .*; name the column 'opd'$"):
        load_labeled(_without(path, "opd"), task="mcqa", text_column="stem")
    blank = tmp_path / "blank.csv"
    blank.write_text("text,label\n,CT Head\n")
    with pytest.raises(DataError, match=r"empty text \(fill or remove such rows"):
        load_labeled(blank)


def _without(path, column):
    df = pd.read_csv(path).drop(columns=[column])
    out = path.with_name(f"no-{column}.csv")
    df.to_csv(out, index=False)
    return out


def test_inspect_with_swapped_columns_prints_no_note_as_a_label(tmp_path, capsys):
    note = "Invented 54 yo with left flank pain and hematuria since Tuesday, assess for stones"
    df = pd.DataFrame({"text": ["CT Urography", "MRI Brain with and without contrast"] * 3,
                       "label": [note, note.replace("54", "61")] * 3})
    path = notes_csv(tmp_path, df)
    with pytest.raises(DataError, match="are the text and label columns swapped"):
        inspect_data(path)
    summary = inspect_data(path, label_column="label")  # insisted on: lengths only
    render_inspect(summary)
    printed = capsys.readouterr().out
    assert "hematuria" not in printed and "characters, not shown" in printed
    as_json = json.dumps(summary)  # what --json prints: it held the notes as label names
    assert "hematuria" not in as_json and "characters, not shown" in as_json
    assert sum(summary["labels"].values()) == 6 and len(summary["labels"]) == 2  # 2 labels
    shown_all = inspect_data(path, label_column="label", show_examples=True)  # asked for text
    assert any("hematuria" in label for label in shown_all["labels"])
    df = df.rename(columns={"text": "label", "label": "text"})  # the right way round
    render_inspect(inspect_data(notes_csv(tmp_path, df, "right.csv")))
    assert "MRI Brain with and without contrast" in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_streamed_prediction_input_knows_its_row_count(tmp_path, suffix):
    """The progress total: CSV rows with quoted line breaks and blank lines count as the reader
    reads them."""
    from medtune.predict_io import iter_records

    df = pd.DataFrame({"text": [f"note {i}\nsecond line" for i in range(7)], "label": ["a"] * 7})
    path = tmp_path / f"in{suffix}"
    if suffix == ".parquet":
        df.to_parquet(path)
    elif suffix == ".jsonl":
        path.write_text("\n".join(df.to_json(orient="records", lines=True).splitlines()) + "\n\n")
    else:
        df.to_csv(path, index=False, sep="\t" if suffix == ".tsv" else ",")
        path.write_text(path.read_text() + "\n\n")
    chunks, total = iter_records(path, chunk_rows=3)
    assert total == 7 == sum(len(c.texts) for c in chunks)


def test_swapped_columns_are_refused_before_any_label_is_printed(tmp_path):
    """Notes in the 'label' column (columns renamed or swapped) would be printed by data inspect
    and written to the data card and labels.json; an explicit --label-column still reads them."""
    notes = [f"patient {i} reports worsening pain after a fall, rule out fracture" for i in range(60)]
    path = tmp_path / "swapped.csv"
    pd.DataFrame({"text": ["CT Head", "L-Spine"] * 30, "label": notes}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"column 'label' does not look like labels \(60 distinct"):
        load_labeled(path)
    assert len(load_labeled(path, label_column="label")) == 60
    few = tmp_path / "long.csv"  # few rows, but labels as long as notes
    pd.DataFrame({"text": ["a", "b"], "label": notes[:2]}).to_csv(few, index=False)
    with pytest.raises(DataError, match="are the text and label columns swapped"):
        load_labeled(few)
    many = tmp_path / "many.csv"  # a large label set that is not text: accepted
    pd.DataFrame({"text": [f"note {i}" for i in range(400)],
                  "label": [f"code {i % 60}" for i in range(400)]}).to_csv(many, index=False)
    assert load_labeled(many)["label"].nunique() == 60


def test_split_with_val_fraction_zero_writes_no_val_file(tmp_path):
    path = notes_csv(tmp_path, notes_frame(per_label=10))
    card = split_data(path, tmp_path / "out", cfg(val_fraction=0.0))
    assert card["split_sizes"]["val"] == 0 and card["split_sizes"]["test"] > 0
    written = sorted(p.name for p in (tmp_path / "out").glob("*.csv"))
    assert written == ["test.csv", "train.csv"]  # not a header-only val.csv train --val rejects


def test_split_refuses_an_output_holding_its_input_even_with_overwrite(tmp_path):
    path = notes_csv(tmp_path, notes_frame(per_label=10))
    before = Path(path).read_bytes()
    with pytest.raises(MedtuneError, match="is or contains the input"):
        split_data(path, tmp_path, cfg(), overwrite=True)
    assert Path(path).read_bytes() == before and not (tmp_path / "train.csv").exists()


def test_json_lines_errors_name_the_line_as_the_reader_does(tmp_path):
    path = tmp_path / "gaps.jsonl"  # blank lines: record 2 sits on line 4
    path.write_text('{"id": "a", "text": "CT head", "label": "CT Head"}\n\n\n'
                    '{"id": "b", "text": "", "label": "CT Head"}\n')
    assert error_of(load_labeled, path).startswith(f"{path}: line 4, column 'text': empty text")
    path.write_text('{"id": "a", "text": "CT head", "label": "CT Head"}\n\n'
                    '{"id": "a", "text": "MR knee", "label": "CT Head"}\n')
    assert error_of(load_labeled, path) == f"{path}: line 3, column 'id': duplicate id"


def test_an_unlabelled_copy_in_the_other_file_is_not_a_label_conflict(tmp_path):
    from medtune.data import inspect_data

    here = notes_csv(tmp_path, notes_frame(per_label=2))
    there = notes_frame(per_label=2).assign(label="")  # the same notes, unlabelled
    there.loc[0, "label"] = "Wrist XR"  # one labelled differently: the only conflict
    summary = inspect_data(here, against=notes_csv(tmp_path, there, "other.csv"))
    assert summary["leakage"]["shared_texts"] == 6
    assert summary["leakage"]["shared_with_different_labels"] == 1


def test_a_medmcqa_file_read_as_protocol_notes_is_told_to_use_task_mcqa(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text("question,opa,opb,opc,opd,cop\nWhich?,a,b,c,d,1\n")
    assert error_of(load_labeled, path).endswith(
        "q.csv: a MedMCQA file (question, opa-opd columns) read as protocol notes: pass --task "
        "mcqa (or data.task=mcqa; predict and evaluate: with a model trained with it), or "
        "--text-column to read one column as notes")


def test_a_split_medmcqa_file_read_as_protocol_is_refused_too(tmp_path):
    # data split's MCQA output has text and label columns besides question and opa-opd
    path = write(tmp_path / "train.csv", "id,question,opa,opb,opc,opd,cop,text,label\n"
                 "q1,Which?,a,b,c,d,1,Which?,B\n")
    assert "read as protocol notes: pass --task mcqa" in error_of(load_labeled, path)
    assert load_labeled(path, text_column="text")["label"].tolist() == ["B"]  # as asked


def test_a_blank_mcqa_option_is_an_error_naming_row_and_column(tmp_path):
    head = "id,question,opa,opb,opc,opd,cop\n"
    path = write(tmp_path / "q.csv", head + "q1,What?,a,b,c,d,0\nq2,Which?,a,b, ,d,1\n")
    msg = error_of(load_labeled, path, task="mcqa", drop_empty=True)
    assert msg.endswith("q.csv: data row 2, column 'opc': empty option (every question needs four)")
    jsonl = write(tmp_path / "q.jsonl", '{"question": "What?", "opa": "a", "opb": "b", '
                  '"opc": "c", "opd": null, "cop": 0}\n')
    assert "line 1, column 'opd': empty option" in error_of(load_labeled, jsonl, task="mcqa")


@pytest.mark.parametrize("seed", range(4))
def test_a_label_with_one_row_keeps_it_in_train(tmp_path, seed):
    df = pd.concat([notes_frame(per_label=1, labels=["Rare XR"]),
                    notes_frame(per_label=3, labels=["Common CT"])], ignore_index=True)
    path = notes_csv(tmp_path, df)
    card = split_data(path, tmp_path / "s", cfg(seed=seed, val_fraction=0.0, test_fraction=0.5))
    assert card["split_sizes"]["test"] == 2
    assert "Rare XR" in set(pd.read_csv(tmp_path / "s" / "train.csv")["label"])
