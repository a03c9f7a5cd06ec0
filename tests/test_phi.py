"""medtune.phi: every Safe Harbor identifier type is scrubbed, clinical content survives."""

from __future__ import annotations

import itertools
import json

import pandas as pd
import pytest

from medtune import phi
from medtune.errors import MedtuneError
from medtune.phi import PLACEHOLDERS, find_phi, scrub_text
from medtune.phi_synth import PATTERN_TYPES, evaluate_scrubber, synth_phi
from medtune.scrub import scrub_file

# (text, identifier that must disappear, placeholder that must appear)
IDENTIFIERS = [
    ("Seen by Dr. Alice Wong today.", "Alice Wong", "[NAME]"),
    ("Mrs. O'Neil-Barker called back.", "O'Neil-Barker", "[NAME]"),
    ("referred by Tobias Lindqvist for CT.", "Tobias Lindqvist", "[NAME]"),
    ("Patient: Haddad, Ingrid. CT A/P.", "Haddad, Ingrid", "[NAME]"),
    ("John Smith presented with flank pain.", "John Smith", "[NAME]"),
    ("Read by Marisol Varga, MD.", "Marisol Varga", "[NAME]"),
    ("Name: SMITH, JOHN", "SMITH, JOHN", "[NAME]"),
    ("DOB 01/02/1950, CT today.", "01/02/1950", "[DATE]"),
    ("Prior CT 2023-01-02 was normal.", "2023-01-02", "[DATE]"),
    ("Admitted Jan 2, 2023 for PE.", "Jan 2, 2023", "[DATE]"),
    ("Surgery on 2 January 2023.", "2 January 2023", "[DATE]"),
    ("MVA 3/4, neck pain since.", "3/4", "[DATE]"),
    ("s/p TKA 6/17, now fever.", "6/17", "[DATE]"),
    ("Last CT in March 2021.", "March 2021", "[DATE]"),
    ("Fall on 25-Aug-2021.", "25-Aug-2021", "[DATE]"),
    ("92 yo F with hip pain.", "92", "[AGE]"),
    ("Age 95, fell at home.", "95", "[AGE]"),
    ("A 95-year-old man.", "95", "[AGE]"),
    ("97F presents with SOB.", "97", "[AGE]"),
    ("Call (555) 234-5678 with results.", "234-5678", "[PHONE]"),
    ("cell 555.234.5678", "555.234.5678", "[PHONE]"),
    ("Fax: 555-234-9999", "555-234-9999", "[FAX]"),
    ("email j.okafor@example.org please", "j.okafor@example.org", "[EMAIL]"),
    ("SSN 123-45-6789 on file", "123-45-6789", "[SSN]"),
    ("MRN: 1234567", "1234567", "[MRN]"),
    ("acct # 55-1234-98", "55-1234-98", "[MRN]"),
    ("record no. A998877", "A998877", "[MRN]"),
    ("member ID XJH123456789", "XJH123456789", "[ID]"),
    ("DEA BX1234567 on the script", "BX1234567", "[ID]"),
    ("see https://portal.example.org/records/12 now", "portal.example.org", "[URL]"),
    ("www.clinic-example.net", "clinic-example", "[URL]"),
    ("from host 10.0.0.12 at night", "10.0.0.12", "[IP]"),
    ("logged from 2001:db8::8a2e:370", "2001:db8::8a2e:370", "[IP]"),
    ("lives at 42 Oak Street, Apt 4B, Springfield, IL 62704", "Oak Street", "[ADDRESS]"),
    ("lives at 42 Oak Street, Springfield, IL 62704", "Springfield", "[ADDRESS]"),
    ("Springfield, IL 62704", "62704", "[ZIP]"),
    ("lives at 42 Oak Street, Springfield 02139, pain", "02139", "[ADDRESS]"),  # no state
    ("fell at 4 Elm Ave., Apt 2, North Andover 01845.", "Andover", "[ADDRESS]"),
    ("mailing address PO Box 1234", "Box 1234", "[ADDRESS]"),
    ("zip 60611-1234", "60611", "[ZIP]"),
    ("Mrs. LaToya Jenkins called.", "Toya", "[NAME]"),  # inner capitals: the whole name
    ("Seen by Dr. DeLuca.", "Luca", "[NAME]"),
    ("Patient: DeShawn Williams", "DeShawn", "[NAME]"),
    ("Dr. O\u2019Brien reviewed.", "Brien", "[NAME]"),  # a curly apostrophe
    ("Wren Lindqvist, M.D. reviewed.", "Lindqvist", "[NAME]"),
    ("Okafor, Thaddeus MD", "Okafor", "[NAME]"),
    ("Dr. ALLEN signed.", "ALLEN", "[NAME]"),
    ("Dr.Smith called.", "Smith", "[NAME]"),
    ("DOB 14MAR2020.", "14MAR2020", "[DATE]"),
    ("Seen on Mar-14-2020.", "Mar-14-2020", "[DATE]"),
    ("Symptoms since 2020-03.", "2020-03", "[DATE]"),
    ("A 120 yo woman.", "120", "[AGE]"),
    ("92yF with a fall.", "92", "[AGE]"),
    # an all-caps title after a cue word; MRS and PROF. anywhere
    ("SEEN BY DR. SMITH TODAY", "SMITH", "[NAME]"),
    ("REFERRED BY DR JOHN SMITH", "JOHN", "[NAME]"),
    ("DISCUSSED WITH DR. J. OKAFOR", "OKAFOR", "[NAME]"),
    ("PAGED DR VARGA", "VARGA", "[NAME]"),
    ("seen by DR. Lindqvist", "Lindqvist", "[NAME]"),
    ("SPOKE WITH MS. GARCIA NP", "GARCIA", "[NAME]"),
    ("MRS. JONES CALLED", "JONES", "[NAME]"),
    ("PROF. ALLEN REVIEWED", "ALLEN", "[NAME]"),
]

CLINICAL = [
    "Pain on Main St since Monday, WBC 12000 on 3 occasions.",
    "MRI L-spine: L4-L5 disc herniation, T2 weighted hyperintensity.",
    "CT A/P with contrast, 100 mL IV.", "Metoprolol 5 mg IV.", "70 yo M with CAD.",
    "89 yo F, lives alone.", "BP 120/80, HR 95, SpO2 92%.", "5/10 pain, now 3/10.",
    "Motor strength 4/5 in LLE.", "3/6 systolic murmur.", "Visual acuity 20/20.",
    "Hx of C5-C6 ACDF in 2015.", "Plt 250,000; Hgb 12.5.", "GCS 15/15.", "Take 1/2 tab q6h.",
    "paraplegia 2/2 MVA.", "Titrate 10-20-40 mg.", "Positive Murphy sign.", "Temp 95 F.",
    "Hodgkin lymphoma, Crohn disease.", "Glucose 126 mg/dL.", "CA 19-9 elevated, NIHSS 14.",
    "Apgar 8/9.", "EF 55-60%.", "ICD-10 M54.5.", "Spoke with the patient at bedside.",
    "per Interventional Radiology", "Afib, MS, DM", "Blood cultures 2/2 sets positive.",
    "seen by Physical Therapy", "Per Nephrology Recs.", "Austin Flint murmur.",
    "Charles Bonnet syndrome.", "Per ID: 1250 mg vancomycin.", "viral load 1200000 copies/mL",
    "temperature of 101 F", "4/6 holosystolic murmur", "5/5 throughout.", "Apgars 8/9.",
    "hx of MS. Lesions stable.", "severe MR. Echo shows LVH.",
    "DM WITH DR. NO PRIOR IMAGING.", "HX OF DR. BILATERAL LE PAIN.", "HX MS. MRI BRAIN.",
    "SEVERE MR. ECHO TODAY.", "per MR ANGIOGRAM", "CALLED MS JONES", "PROFESSIONAL",
]


@pytest.mark.parametrize(("text", "secret", "placeholder"), IDENTIFIERS)
def test_each_identifier_type_is_scrubbed(text, secret, placeholder):
    out = scrub_text(text)
    assert secret not in out
    assert placeholder in out


@pytest.mark.parametrize(("text", "expected"), [
    ("Dr. Smith and Dr. Jones", "Dr. [NAME] and Dr. [NAME]"),  # the second one was kept
    ("Mrs. Okafor called. Mrs. Okafor again.", "Mrs. [NAME] called. Mrs. [NAME] again."),
    ("Jones, MD and Brown, MD", "[NAME], MD and [NAME], MD"),
    # a name ends at its line: the next line's capitalised words and the line breaks stay
    ("Referred by Dr. Okafor\nDiagnosis Pneumonia", "Referred by Dr. [NAME]\nDiagnosis Pneumonia"),
    ("Dr. Okafor\n\nDr. Varga", "Dr. [NAME]\n\nDr. [NAME]"),
    # a drug after a name is not part of it (it was eaten as a second surname)
    ("Dr. Smith Lisinopril 10 mg", "Dr. [NAME] Lisinopril 10 mg"),
    ("Pt: Mr. Jones Metoprolol", "Pt: Mr. [NAME] Metoprolol"),
    ("Seen by Dr. Patel Lasix Daily", "Seen by Dr. [NAME] Lasix Daily"),
    ("Mr. Lasix called.", "Mr. [NAME] called."),  # a name's only word is never taken for a drug
    ("SEEN BY DR. SMITH TODAY, CALL DR. LEE WITH RESULTS",
     "SEEN BY DR. [NAME] TODAY, CALL DR. [NAME] WITH RESULTS"),
])
def test_every_name_in_a_note_is_scrubbed_and_lines_are_kept(text, expected):
    assert scrub_text(text) == expected


def test_every_placeholder_type_is_exercised():
    produced = {p for _, _, p in IDENTIFIERS}
    assert produced == set(PLACEHOLDERS)


@pytest.mark.parametrize("text", CLINICAL)
def test_clinical_content_survives(text):
    assert scrub_text(text) == text
    assert find_phi(text) == []


@pytest.mark.parametrize(("text", "expected"), [
    ("Dr. Jos\u00e9 N\u00fa\u00f1ez reviewed.", "Dr. [NAME] reviewed."),
    ("Mr. M\u00fcller was admitted.", "Mr. [NAME] was admitted."),
    ("Patient: Ren\u00e9e Dubois", "Patient: [NAME]"),
    ("Patient: Rene\u0301e Dubois", "Patient: [NAME]"),  # decomposed accent
    ("Dr. Ana Garc\u00eda consulted.", "Dr. [NAME] consulted."),
    ("Dr. \u0141ukasz \u017b\u00f3\u0142w saw pt", "Dr. [NAME] saw pt"),
    ("Seen 2021\u201303\u201314.", "Seen [DATE]."),
    ("Phone 555\u2011123\u20114567.", "Phone [PHONE]."),
    ("SSN 123\u201345\u20136789", "SSN [SSN]"),
    ("DOB \uff10\uff11/\uff10\uff12/1950", "DOB [DATE]"),  # full-width digits
])
def test_accented_names_and_unicode_dashes_are_scrubbed_like_ascii(text, expected):
    assert scrub_text(text) == expected  # never half a name: "Dr. [NAME]\u00e9 N\u00fa\u00f1ez"


@pytest.mark.parametrize("text", ["L4\u2013L5 disc, 5\u201310 mg.", "caf\u00e9 au lait spots",
                                  "Pain 5/10 \u2014 better.", "\u60a3\u8005 CT \u80f8\u90e8"])
def test_unicode_clinical_text_survives(text):
    assert scrub_text(text) == text


def test_ages_at_most_89_and_bare_years_stay():
    assert scrub_text("89 yo M, in 2019, aged 67") == "89 yo M, in 2019, aged 67"
    assert scrub_text("90 yo M") == "[AGE] yo M"


def test_spans_are_sorted_typed_and_disjoint():
    text = ("Pt John Smith, 92 yo M, MRN: 1234567, seen by Dr. Wong on 01/02/2023; call "
            "555-234-5678, fax 555-234-9999, jsmith@example.org, BP 120/80.")
    spans = find_phi(text)
    assert [s for s, _, _ in spans] == sorted(s for s, _, _ in spans)
    assert all(e1 <= s2 for (_, e1, _), (s2, _, _) in itertools.pairwise(spans))
    assert {k for _, _, k in spans} == {"NAME", "AGE", "MRN", "DATE", "PHONE", "FAX", "EMAIL"}
    assert all(f"[{k}]" in PLACEHOLDERS for _, _, k in spans)
    assert "BP 120/80" in scrub_text(text)


def test_scrubbing_is_idempotent():
    texts = [t for t, _ in synth_phi(400, seed=7)] + [t for t, _, _ in IDENTIFIERS] + CLINICAL
    for text in texts:
        once = scrub_text(text)
        assert scrub_text(once) == once


def test_synth_phi_gold_spans_are_valid_and_deterministic():
    data = synth_phi(300, seed=3)
    assert data == synth_phi(300, seed=3)
    assert data != synth_phi(300, seed=4)
    kinds = set()
    for text, spans in data:
        for start, end, kind in spans:
            assert 0 <= start < end <= len(text) and text[start:end].strip() == text[start:end]
            kinds.add(kind)
    assert kinds == {p[1:-1] for p in PLACEHOLDERS}


def test_evaluate_scrubber_recall_on_pattern_types():
    report = evaluate_scrubber(n=2000, seed=0)
    for kind in PATTERN_TYPES:
        assert report["support"][kind] >= 100, kind
        assert report["recall"][kind] >= 0.98, (kind, report["recall"][kind])
    assert report["recall_pattern_types"] >= 0.98
    assert report["precision_overall"] >= 0.95
    assert report["recall_names"] is not None and 0.5 < report["recall_names"] <= 1.0


SECRETS = ["Alice Wong", "555-234-5678", "123-45-6789", "jsmith@example.org", "01/02/1950"]


def _table() -> pd.DataFrame:
    return pd.DataFrame({
        "text": ["Seen by Dr. Alice Wong, call 555-234-5678.", "SSN 123-45-6789, BP 120/80.",
                 "email jsmith@example.org; DOB 01/02/1950", "L4-L5 disc, 70 yo M."],
        "label": ["L-Spine", "CT Urography", "Pulmonary Embolus", "L-Spine"],
    })


@pytest.mark.parametrize("ext", ["csv", "jsonl", "parquet"])
def test_scrub_file_writes_scrubbed_table_and_counts_only(tmp_path, capsys, ext):
    src = tmp_path / f"notes.{ext}"
    df = _table()
    {"csv": lambda p: df.to_csv(p, index=False),
     "jsonl": lambda p: df.to_json(p, orient="records", lines=True),
     "parquet": lambda p: df.to_parquet(p, index=False)}[ext](src)
    out = tmp_path / f"clean.{ext}"
    counts = scrub_file(src, out)
    reader = {"csv": pd.read_csv, "parquet": pd.read_parquet,
              "jsonl": lambda p: pd.read_json(p, lines=True)}[ext]
    back = reader(out)
    assert list(back["label"]) == list(df["label"])
    assert back["text"].iloc[3] == "L4-L5 disc, 70 yo M."
    assert "BP 120/80" in back["text"].iloc[1]
    blob = out.read_text(errors="ignore") if ext != "parquet" else " ".join(back["text"])
    dumped = json.dumps(counts)
    captured = capsys.readouterr()
    for secret in SECRETS:
        assert secret not in blob
        assert secret not in dumped and secret not in captured.out + captured.err
    assert counts["rows"] == 4 and counts["rows_changed"] == 3
    assert counts["spans"] == {"NAME": 1, "DATE": 1, "PHONE": 1, "EMAIL": 1, "SSN": 1}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_scrub_file_changes_only_the_text_column(tmp_path, ext):
    df = _table().assign(age=[34, 56, None, 22], flag=[True, False, True, False],
                         score=[0.5, 1.25, float("nan"), 3.0])
    src, out = tmp_path / f"notes.{ext}", tmp_path / f"clean.{ext}"
    if ext == "parquet":
        df.assign(age=df["age"].astype("Int64")).to_parquet(src, index=False)
        scrub_file(src, out)
        back, before = pd.read_parquet(out), pd.read_parquet(src)
        for column in ("age", "flag", "score", "label"):
            assert back[column].dtype == before[column].dtype, column
            assert back[column].equals(before[column]), column
    else:
        rows = [{**r, "meta": {"site": "A", "by": "Dr. Alice Wong"}} for r in
                df.drop(columns="score").to_dict("records")]
        rows[2]["age"] = None
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
        counts = scrub_file(src, out)
        back_rows = [json.loads(line) for line in out.read_text().splitlines()]
        for old, new in zip(rows, back_rows, strict=True):
            assert {k: new[k] for k in ("label", "age", "flag")} == \
                {k: old[k] for k in ("label", "age", "flag")}  # 34 stays 34, null stays null
            assert new["meta"] == old["meta"]  # not a column medtune reads: left as it is
        assert counts["rows_changed"] == 3
        assert counts["not_scrubbed"] == {"meta": 4}  # counted, so the CLI can warn
        back = pd.DataFrame(back_rows)
    assert "Alice Wong" not in " ".join(back["text"]) and "[NAME]" in back["text"].iloc[0]


@pytest.mark.parametrize("ext", ["csv", "jsonl"])
def test_scrub_file_also_scrubs_named_columns_and_counts_the_rest(tmp_path, ext):
    df = _table().assign(history=["wife Maria Lopez called 555-987-6543", "none", "none",
                                  "DOB 03/04/1961"],
                         referrer=["Dr. Bob Stone", "", "", ""])
    src = tmp_path / f"notes.{ext}"
    df.to_csv(src, index=False) if ext == "csv" else \
        df.to_json(src, orient="records", lines=True)
    plain = scrub_file(src, tmp_path / f"a.{ext}")
    assert plain["not_scrubbed"] == {"history": 3, "referrer": 1}  # name, phone, date
    assert "also" not in plain
    counts = scrub_file(src, tmp_path / f"b.{ext}", also=["history", "referrer"])
    assert counts["also"] == ["history", "referrer"] and "not_scrubbed" not in counts
    assert counts["rows_changed"] == 4  # row 4's history had a date: the row changed
    text = (tmp_path / f"b.{ext}").read_text()
    for secret in ["555-987-6543", "03/04/1961", "Bob Stone", *SECRETS]:
        assert secret not in text
    assert "Maria Lopez" not in text
    back = pd.read_csv(tmp_path / "b.csv") if ext == "csv" else \
        pd.read_json(tmp_path / "b.jsonl", lines=True)
    assert list(back["label"]) == list(df["label"])
    with pytest.raises(MedtuneError, match=r"--also: no column 'nope'"):
        scrub_file(src, tmp_path / f"c.{ext}", also=["nope"])
    assert not (tmp_path / f"c.{ext}").exists()


def test_scrub_file_without_label_column(tmp_path):
    src = tmp_path / "notes.csv"
    pd.DataFrame({"note": ["Dr. Alice Wong on 01/02/2023", "no phi here at all"]}).to_csv(
        src, index=False)
    counts = scrub_file(src, tmp_path / "out.csv")
    back = pd.read_csv(tmp_path / "out.csv")
    assert counts["column"] == "note"
    assert back["note"].iloc[0] == "Dr. [NAME] on [DATE]"


def test_scrub_file_refuses_overwrite_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    src = tmp_path / "notes.csv"
    _table().to_csv(src, index=False)
    out = tmp_path / "clean.csv"
    out.write_text("keep me")
    with pytest.raises(MedtuneError, match="exists"):
        scrub_file(src, out)
    assert out.read_text() == "keep me"

    from medtune import synth

    def broken_writer(df, tmp, suffix):
        tmp.write_text("half a table")
        raise OSError("disk full")

    monkeypatch.setattr(synth, "write_table_by_extension", broken_writer)
    fresh = tmp_path / "fresh.csv"
    with pytest.raises(OSError):
        scrub_file(src, fresh)
    assert not fresh.exists()
    with pytest.raises(OSError):
        scrub_file(src, out, overwrite=True)
    assert out.read_text() == "keep me"  # the old file stays whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.csv", "notes.csv"]


def test_scrub_file_rejects_same_path_and_bad_extension(tmp_path):
    src = tmp_path / "notes.csv"
    _table().to_csv(src, index=False)
    with pytest.raises(MedtuneError, match="output must differ from the input file"):
        scrub_file(src, src, overwrite=True)
    with pytest.raises(MedtuneError, match="extension"):
        scrub_file(src, tmp_path / "out.xlsx")
    assert [p[1:-1] for p in PLACEHOLDERS] == phi.TYPES


@pytest.mark.parametrize("unit", ["1.", "a.b@", "MRN A1-", "1-", "1/", "ab:", "Dr. Aa Bb "])
@pytest.mark.timeout(120)  # a hang guard, not a speed target: linear scans take ~0.3 s here
def test_long_adversarial_fields_stay_linear(unit):
    # each of these once took minutes on 30 k characters (backtracking in an unbounded pattern)
    text = unit * (60_000 // len(unit))
    spans = find_phi(text)
    assert all(0 <= a < b <= len(text) for a, b, _ in spans)


def test_parquet_binary_and_list_columns_are_scrubbed_too(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(pa.table({
        "text": pa.array([b"Seen by Dr. Alice Wong.", b"CT head."], type=pa.binary()),
        "label": ["CT Head", "CT Head"],
        "notes": pa.array([["call 555-234-5678", "ok"], []], type=pa.list_(pa.string()))}), src)
    counts = scrub_file(src, out, also=["notes"])
    assert counts["rows_changed"] == 1 and counts["spans"] == {"NAME": 1, "PHONE": 1}
    back = pq.read_table(out)
    assert back.column("text").to_pylist() == [b"Seen by Dr. [NAME].", b"CT head."]
    assert back.column("notes").to_pylist() == [["call [PHONE]", "ok"], []]


def test_json_rows_mixing_types_in_a_field_cannot_go_to_parquet_one_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "CT head", "label": "CT Head", "extra": "a"}\n'
                   '{"text": "CT head too", "label": "CT Head", "extra": 7}\n')
    with pytest.raises(MedtuneError, match=r"out.parquet: column 'extra' mixes int, str values"):
        scrub_file(src, tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists() and list(tmp_path.iterdir()) == [src]


def test_nested_json_fields_are_written_to_csv_as_json(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "Seen by Dr. Alice Wong.", "label": "CT Head", '
                   '"meta": {"site": "north", "codes": [1, 2]}}\n')
    scrub_file(src, tmp_path / "out.csv")
    back = pd.read_csv(tmp_path / "out.csv")
    assert json.loads(back["meta"][0]) == {"site": "north", "codes": [1, 2]}  # was a Python repr
    assert back["text"][0] == "Seen by Dr. [NAME]."


def test_scrub_file_mcqa_scrubs_the_question_options_and_explanation(tmp_path):
    src, out = tmp_path / "q.csv", tmp_path / "out.csv"
    pd.DataFrame([{"question": "Dr. Alice Wong asks: which nerve?", "opa": "Ulnar",
                   "opb": "call 555-234-5678", "opc": "Median", "opd": "Axillary", "cop": 0,
                   "exp": "Seen by Dr. Bob Stone."}]).to_csv(src, index=False)
    counts = scrub_file(src, out, task="mcqa")
    assert counts["column"] == "question" and counts["also"] == ["opa", "opb", "opc", "opd", "exp"]
    row = pd.read_csv(out).iloc[0]
    assert row["question"] == "Dr. [NAME] asks: which nerve?" and row["opb"] == "call [PHONE]"
    assert row["exp"] == "Seen by Dr. [NAME]." and row["cop"] == 0
    assert "not_scrubbed" not in counts
