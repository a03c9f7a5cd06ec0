"""medtune.synth: deterministic, learnable-but-not-trivial protocol notes and MCQA questions."""

from __future__ import annotations

import inspect
import re
from collections import Counter, defaultdict

import pandas as pd
import pytest

from medtune import synth, synth_facts
from medtune.errors import MedtuneError
from medtune.synth import (
    MAX_CHARS,
    MIN_CHARS,
    PROTOCOLS,
    SHARED,
    synth_mcqa,
    synth_protocol,
    synth_unlabelled,
    write_synth,
)

MCQA_COLUMNS = ["id", "question", "opa", "opb", "opc", "opd", "cop", "subject_name",
                "choice_type", "exp"]


def test_protocol_is_deterministic_per_seed():
    a = synth_protocol(400, seed=3)
    b = synth_protocol(400, seed=3)
    c = synth_protocol(400, seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert (a["text"] != c["text"]).mean() > 0.9


def test_protocol_shape_and_lengths():
    df = synth_protocol(1000, seed=0)
    assert list(df.columns) == ["id", "text", "label"]
    assert df["id"].is_unique and all(isinstance(i, str) for i in df["id"])
    lengths = df["text"].str.len()
    assert lengths.min() >= MIN_CHARS and lengths.max() <= MAX_CHARS
    assert set(df["label"]) <= set(PROTOCOLS)
    assert df["text"].nunique() > 980  # varied phrasing, few exact repeats


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("imbalance", [0.0, 1.0, 3.0])
def test_every_label_appears_with_enough_rows(seed, imbalance):
    assert len(PROTOCOLS) >= 22 and len(set(PROTOCOLS)) == len(PROTOCOLS)
    df = synth_protocol(3 * len(PROTOCOLS), seed=seed, imbalance=imbalance)
    assert set(df["label"]) == set(PROTOCOLS)


def test_symptoms_are_shared_across_protocols():
    df = synth_protocol(4000, seed=0)
    labels_with = defaultdict(set)
    for text, label in zip(df["text"], df["label"], strict=True):
        for phrase in ("flank pain", "back pain", "headache", "chest pain", "hematuria", "SOB"):
            if re.search(rf"\b{re.escape(phrase)}\b", text):
                labels_with[phrase].add(label)
    assert {"CT Urography", "Renal Stone Protocol", "US Renal"} <= labels_with["flank pain"]
    assert {"L-Spine", "T-Spine"} <= labels_with["back pain"]
    assert {"CT Head without contrast", "MRI Brain with and without contrast"} <= \
        labels_with["headache"]
    assert all(len(labels) >= 2 for labels in labels_with.values())
    # every shared group really is used by two or more protocols' notes
    groups_multi = [g for g, opts in SHARED.items()
                    if len({lbl for t, lbl in zip(df["text"], df["label"], strict=True)
                            if any(o in t for o in opts.split("|") if len(o) > 6)}) >= 2]
    assert len(groups_multi) >= 10


def test_negations_abbreviations_and_typos_occur():
    text = " ".join(synth_protocol(2000, seed=0)["text"])
    for marker in ("denies ", "no ", "h/o", "r/o", "s/p", " yo ", "y.o."):
        assert marker in text, marker
    # typos: long words that appear nowhere in the generator's own tables and templates
    source = inspect.getsource(synth) + inspect.getsource(synth_facts)
    vocab = set(re.findall(r"[a-z]+", source.lower()))
    words = [w for w in re.findall(r"[A-Za-z]+", text) if len(w) >= 5]
    unknown = [w for w in words if w.lower() not in vocab]
    assert 0.002 < len(unknown) / len(words) < 0.05


def test_imbalance_shapes_class_sizes():
    n = 26 * 200
    flat = synth_protocol(n, seed=0, imbalance=0.0)["label"].value_counts()
    skew = synth_protocol(n, seed=0, imbalance=1.0)["label"].value_counts()
    steep = synth_protocol(n, seed=0, imbalance=2.0)["label"].value_counts()
    assert flat.max() / flat.min() < 1.6
    first, last = PROTOCOLS[0], PROTOCOLS[-1]
    assert skew[first] / skew[last] > 4  # expected 7.25x
    assert steep[first] / steep[last] > skew[first] / skew[last]


def test_label_noise_flips_exactly_the_requested_fraction():
    clean = synth_protocol(1000, seed=5)
    noisy = synth_protocol(1000, seed=5, label_noise=0.1)
    assert (clean["text"] == noisy["text"]).all()  # same notes, only labels differ
    changed = clean["label"] != noisy["label"]
    assert changed.sum() == 100
    assert set(noisy["label"]) <= set(PROTOCOLS)
    with pytest.raises(MedtuneError):
        synth_protocol(10, label_noise=1.5)


def test_learnable_but_not_keyword_trivial():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train, test = synth_protocol(2400, seed=10), synth_protocol(600, seed=11)
    vec = TfidfVectorizer(sublinear_tf=True)
    model = LogisticRegression(max_iter=300, C=5, tol=1e-3).fit(vec.fit_transform(train["text"]),
                                                                 train["label"])
    acc = (model.predict(vec.transform(test["text"])) == test["label"]).mean()
    assert 0.85 <= acc < 0.99

    # the single most label-precise word present decides: good, but clearly not perfect
    by_word: dict[str, Counter] = defaultdict(Counter)
    for text, label in zip(train["text"], train["label"], strict=True):
        for word in set(re.findall(r"[a-z0-9/]+", text.lower())):
            by_word[word][label] += 1
    rule = {w: (c.most_common(1)[0][1] / sum(c.values()), c.most_common(1)[0][0])
            for w, c in by_word.items() if sum(c.values()) >= 5}
    majority = train["label"].mode()[0]
    hits = 0
    for text, label in zip(test["text"], test["label"], strict=True):
        found = [rule[w] for w in set(re.findall(r"[a-z0-9/]+", text.lower())) if w in rule]
        hits += (max(found)[1] if found else majority) == label
    assert hits / len(test) < 0.97


def test_unlabelled_notes():
    notes = synth_unlabelled(300, seed=2)
    assert len(notes) == 300 and all(isinstance(t, str) and len(t) >= MIN_CHARS for t in notes)
    assert notes == synth_unlabelled(300, seed=2)
    assert not set(notes) & set(synth_protocol(300, seed=2)["text"])


def test_mcqa_shape_and_determinism():
    df = synth_mcqa(600, seed=1)
    assert list(df.columns) == MCQA_COLUMNS
    pd.testing.assert_frame_equal(df, synth_mcqa(600, seed=1))
    assert df["cop"].dtype.kind == "i" and set(df["cop"]) <= {0, 1, 2, 3}
    assert df["subject_name"].nunique() >= 6
    assert set(df["choice_type"]) == {"single"}
    options = df[["opa", "opb", "opc", "opd"]].to_numpy()
    assert all(len(set(row)) == 4 for row in options)
    assert all(e.strip() for e in df["exp"])


def test_mcqa_answer_position_is_uniform_and_answers_consistent():
    df = synth_mcqa(4000, seed=0)
    share = df["cop"].value_counts(normalize=True)
    assert share.min() > 0.22 and share.max() < 0.28
    answers: dict[str, set] = defaultdict(set)
    rows = [(r.question, [r.opa, r.opb, r.opc, r.opd], r.cop) for r in df.itertuples()]
    for question, options, cop in rows:
        answers[question].add(options[cop])
    # learnable and unambiguous: an option that is right for a question anywhere in the data is
    # never offered as a wrong option for that question
    for question, options, cop in rows:
        wrong = [o for i, o in enumerate(options) if i != cop]
        assert not answers[question] & set(wrong), question
    assert sum(len(a) == 1 for a in answers.values()) / len(answers) > 0.8
    assert len(answers) > 300


@pytest.mark.parametrize("ext", ["csv", "jsonl", "parquet"])
def test_write_synth_formats(tmp_path, ext):
    out = write_synth("protocol", 80, tmp_path / f"notes.{ext}", seed=1)
    reader = {"csv": pd.read_csv, "parquet": pd.read_parquet,
              "jsonl": lambda p: pd.read_json(p, lines=True)}[ext]
    back = reader(out)
    expected = synth_protocol(80, seed=1)
    assert list(back["text"]) == list(expected["text"])
    assert list(back["label"]) == list(expected["label"])
    mc = write_synth("mcqa", 20, tmp_path / f"mcqa.{ext}", seed=1)
    assert list(reader(mc).columns) == MCQA_COLUMNS
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_write_synth_refuses_overwrite_and_bad_input(tmp_path):
    out = tmp_path / "notes.csv"
    write_synth("protocol", 30, out, seed=0)
    before = out.read_bytes()
    with pytest.raises(MedtuneError, match="exists"):
        write_synth("protocol", 30, out, seed=1)
    assert out.read_bytes() == before
    write_synth("protocol", 30, out, seed=1, overwrite=True)
    assert out.read_bytes() != before
    with pytest.raises(MedtuneError, match="task"):
        write_synth("ner", 10, tmp_path / "x.csv")
    with pytest.raises(MedtuneError, match="extension"):
        write_synth("protocol", 10, tmp_path / "x.xlsx")
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "x.xlsx").exists()


def test_a_steep_imbalance_still_draws_labels():
    from medtune.synth import synth_protocol

    df = synth_protocol(200, seed=0, imbalance=800)  # every weight underflowed to 0: ValueError
    counts = df["label"].value_counts()
    assert counts.iloc[0] >= 200 - 26 and len(counts) <= 26
