"""`medtune evaluate`: report files, before/after table, isolated memory, bits/param, MCQA."""

from __future__ import annotations

import base64
import json
import re
import shutil

import pandas as pd
import pytest

from conftest import TINY_LABELS, TINY_NOTES
from medtune.config import PredictConfig
from medtune.errors import MedtuneError
from medtune.evaluate import evaluate
from medtune.measure import measure, measure_isolated, weight_stats
from medtune.tasks import default_template
from medtune.tasks.mcqa import LETTERS

GOLD = [TINY_LABELS[i % 4] for i in range(8)]  # TINY_NOTES' 8 distinct notes, one label each


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """test.csv: the 8 distinct notes; train.csv next to it: 2 of them again (leakage) + others."""
    d = tmp_path_factory.mktemp("splits")
    pd.DataFrame({"text": TINY_NOTES[:8], "label": GOLD}).to_csv(d / "test.csv", index=False)
    train = [f"{note} (follow-up {i})" for i, note in enumerate(TINY_NOTES[:8])] + TINY_NOTES[:2]
    pd.DataFrame({"text": train, "label": GOLD + GOLD[:2]}).to_csv(d / "train.csv", index=False)
    return d


def test_report_with_zero_shot_and_tfidf_baselines(merged_dir, tiny_base, splits, tmp_path):
    from medtune.measure import _rss_mb

    out = tmp_path / "report"
    # ballast: a child process must not inherit this process's high-water mark (ru_maxrss does)
    ballast = bytearray(1200 * 2**20)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # touch every page: resident
    try:
        parent = _rss_mb("VmRSS")
        m = evaluate(str(merged_dir), str(splits / "test.csv"), str(out),
                     baseline=[str(tiny_base), "tfidf"], isolate=True, similarity=True)
    finally:
        del ballast
    assert parent > 1200
    for name in ("metrics.json", "report.md", "report.html", "comparison.json",
                 "confusion.png", "reliability.png", "coverage.png", "comparison.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.png.png"))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n"] == 8 and saved["outside_label_set"] == 0  # constrained: always a label
    assert saved["accuracy"] == pytest.approx(m["accuracy"])
    assert saved["leakage"]["test_rows_also_in_train"] == 2

    rows = {r["model"]: r for r in m["comparison"]}
    assert list(rows) == ["fine-tuned", f"base (zero-shot): {tiny_base.name}",
                          "TF-IDF + logistic regression"]
    for name in list(rows)[:2]:  # both LLMs measured in their own process
        r = rows[name]
        assert r["bits_per_param"] == pytest.approx(32.0)  # fp32 weights
        assert r["quantized_bits_per_param"] is None
        assert r["params"] > 100_000 and r["size_mb"] > 0.3
        assert 50 < r["peak_memory_mb"] < parent - 600 and r["latency_p50_ms"] > 0
        assert 0 <= r["model_memory_mb"] <= r["peak_memory_mb"]
        assert 0 <= r["semantic_similarity"] <= 1
    tf = rows["TF-IDF + logistic regression"]
    assert tf["accuracy"] >= 0.25
    assert 0 < tf["latency_p50_ms"] <= tf["latency_p95_ms"] and tf["model_memory_mb"] > 0

    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert "## Model card" in md and "Intended use" in md and "Leakage" in md
    assert "LEAKAGE: 2 of 8" in md and "TF-IDF" in md
    # self-contained: every plot embedded as a data URI that decodes to the written PNG
    assert not re.search(r"(src|href)=\"(https?:|//|[^\"d#][^\"]*\.png)", page)
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(list(out.glob("*.png")))
    assert base64.b64decode(images[0]) == (out / "confusion.png").read_bytes()
    assert "<script" not in page and "Model card" in page


def test_isolated_worker_reports_errors(tmp_path):
    with pytest.raises(MedtuneError, match=f"measuring {re.escape(str(tmp_path))}: TypeError"):
        measure_isolated(model=str(tmp_path), texts=["x"], bogus=1)


def test_bits_per_param_nf4_and_8bit(merged_dir):
    fp = measure(str(merged_dir), TINY_NOTES[:2], labels=None, task="protocol",
                 cfg=PredictConfig())
    nf4 = measure(str(merged_dir), TINY_NOTES[:2], labels=None, task="protocol",
                  cfg=PredictConfig(), quantization="nf4")
    assert fp["bits_per_param"] == pytest.approx(32.0) and fp["quantized_params"] == 0
    assert nf4["params"] == fp["params"]  # logical count, not packed storage
    # tiny 64-wide layers: 4 + 8/64 + one fp32 nested absmax and offset per layer
    assert 4.12 < nf4["quantized_bits_per_param"] < 4.15
    assert 4.2 < nf4["bits_per_param"] < 32  # embeddings and norms stay fp32
    assert nf4["rows"][0]["prediction"] in TINY_LABELS


def test_nf4_double_quant_is_4_127_bits_on_a_wider_layer(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from medtune.model import ModelConfig, load_base_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=512, intermediate_size=1024,
                      num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    model = load_base_model(str(tmp_path), ModelConfig(device="cpu"), quantization="nf4")
    stats = weight_stats(model)
    # 4 + 8/64 + 32/(64*256) = 4.127 bits; plus one fp32 offset per layer
    assert stats["quantized_bits_per_param"] == pytest.approx(4.127, abs=0.001)
    eight = weight_stats(load_base_model(str(tmp_path), ModelConfig(device="cpu"),
                                         quantization="8bit"))
    # int8 + one fp32 scale per output row: 8 + 32/in_features (512 or 1024 here)
    assert 8.03 < eight["quantized_bits_per_param"] < 8.07


def test_mcqa_by_subject_and_difficulty(tiny_base, tmp_path, capsys):
    from medtune.model import load_tokenizer
    from medtune.synth import synth_mcqa

    model = tmp_path / "mcqa"
    shutil.copytree(tiny_base, model)
    default_template("mcqa", load_tokenizer(model), LETTERS, "plain").save(model)
    (model / "medtune.json").write_text(json.dumps({"kind": "merged", "task": "mcqa"}))
    (model / "labels.json").write_text(json.dumps({"task": "mcqa", "labels": LETTERS}))
    df = synth_mcqa(12, seed=5)
    data = tmp_path / "test.jsonl"
    df.to_json(data, orient="records", lines=True)
    m = evaluate(str(model), str(data), str(tmp_path / "report"), baseline=[str(tiny_base),
                 "tfidf"], isolate=False, similarity=False)
    assert m["task"] == "mcqa" and m["outside_label_set"] == 0
    by_subject = m["mcqa"]["by_subject"]
    assert set(by_subject) == set(df["subject_name"])
    assert sum(v["n"] for v in by_subject.values()) == 12
    by_diff = m["mcqa"]["by_difficulty"]
    assert {k: v["n"] for k, v in by_diff.items()} == {"easy": 4, "hard": 4, "medium": 4}
    md = (tmp_path / "report" / "report.md").read_text()
    assert "by_difficulty" in md and "TF-IDF baseline skipped" in md
    # the user asked for it: the console says it was skipped, not only report.md
    err = capsys.readouterr().err
    assert "warning: --baseline tfidf skipped" in err
    assert "evaluate [1] fine-tuned model mcqa on 12 questions" in err
    assert [r["model"] for r in m["comparison"]] == ["fine-tuned",
                                                     f"base (zero-shot): {tiny_base.name}"]


def test_generate_mode_counts_outside_label_set(merged_dir, splits, tmp_path):
    m = evaluate(str(merged_dir), str(splits / "test.csv"), str(tmp_path / "r"),
                 cfg=PredictConfig(mode="generate", max_new_tokens=3), isolate=False,
                 similarity=False)
    assert "ece" not in m  # no confidence without constrained scoring
    assert 0 <= m["outside_label_set"] <= 8
    assert m["accuracy"] <= 1 - m["outside_label_set"] / 8


def test_bad_inputs_fail_before_loading_models(merged_dir, splits, tmp_path):
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(splits / "test.csv", lone / "test.csv")
    with pytest.raises(MedtuneError, match="--baseline tfidf needs --train-data"):
        evaluate(str(merged_dir), str(lone / "test.csv"), str(tmp_path / "a"),
                 baseline=["tfidf"], isolate=False, similarity=False)
    with pytest.raises(MedtuneError, match="not a model directory"):
        evaluate(str(merged_dir), str(lone / "test.csv"), str(tmp_path / "b"),
                 baseline=[str(tmp_path / "missing")], isolate=False, similarity=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(MedtuneError, match="not empty"):
        evaluate(str(merged_dir), str(lone / "test.csv"), str(busy), isolate=False,
                 similarity=False)
    # gold labels the model cannot predict: every row would count as wrong (wrong label column)
    pd.read_csv(splits / "test.csv").assign(label="Xray Chest").to_csv(lone / "other.csv",
                                                                      index=False)
    with pytest.raises(MedtuneError, match="none of its gold labels is in the label set"):
        evaluate(str(merged_dir), str(lone / "other.csv"), str(tmp_path / "c"), isolate=False,
                 similarity=False)
    assert not (tmp_path / "c").exists()


def test_overwrite_replaces_the_report_and_failure_leaves_nothing(merged_dir, splits,
                                                                   tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "loss.png").write_bytes(b"old")  # a previous report's training curve
    evaluate(str(merged_dir), str(splits / "test.csv"), str(out), overwrite=True,
             isolate=False, similarity=False)
    assert not (out / "loss.png").exists() and (out / "report.html").is_file()
    broken = tmp_path / "broken"
    shutil.copytree(merged_dir, broken)
    (broken / "labels.json").unlink()
    with pytest.raises(MedtuneError, match="labels"):
        evaluate(str(broken), str(splits / "test.csv"), str(tmp_path / "new"), isolate=False,
                 similarity=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "r"]
    for target in (broken, splits):  # the model itself; a folder holding the test data
        kept = sorted(p.name for p in target.iterdir())
        with pytest.raises(MedtuneError, match="is or contains the input"):
            evaluate(str(broken), str(splits / "test.csv"), str(target), overwrite=True,
                     isolate=False, similarity=False)
        assert sorted(p.name for p in target.iterdir()) == kept


def test_model_card_finds_the_data_card_from_another_directory(tmp_path, monkeypatch):
    """A run records its data file as given (maybe relative) and resolved: evaluate run from
    another directory still finds the data card next to it."""
    from medtune.evaluate import model_card

    data_dir = tmp_path / "project" / "data"
    data_dir.mkdir(parents=True)
    (data_dir / "data_card.json").write_text(json.dumps({"leakage_across_splits": 0}))
    model = tmp_path / "run"
    model.mkdir()
    (model / "medtune.json").write_text(json.dumps({
        "kind": "run", "data": "data/train.csv", "train_rows": 10,
        "data_resolved": str(data_dir / "train.csv")}))
    monkeypatch.chdir(tmp_path)  # "data/train.csv" does not exist from here
    measured = {"quantization": "none", "params": 10, "bits_per_param": 32.0}
    card = model_card(str(model), str(data_dir / "test.csv"), {"task": "protocol", "n": 4},
                      ["A", "B"], measured)
    assert card["leakage"] == "0 normalized texts shared between splits (data card)"
    assert card["training_data"] == "data/train.csv (10 rows)"
    # a test file from elsewhere: the data card says nothing about it
    card = model_card(str(model), "other/test.csv", {"task": "protocol", "n": 4}, ["A", "B"],
                      measured)
    assert card["leakage"].startswith("not checked")


def test_leakage_is_checked_against_the_runs_recorded_training_file(merged_dir, splits,
                                                                     tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(merged_dir, model)
    test = pd.read_csv(splits / "test.csv")
    trained_on = tmp_path / "somewhere" / "raw.csv"
    trained_on.parent.mkdir()
    test.head(3).to_csv(trained_on, index=False)  # 3 test notes were training notes
    meta = json.loads((model / "medtune.json").read_text())
    (model / "medtune.json").write_text(json.dumps({**meta, "data_resolved": str(trained_on)}))
    elsewhere = tmp_path / "eval"
    elsewhere.mkdir()
    test.to_csv(elsewhere / "hand.csv", index=False)  # no train.csv next to it
    m = evaluate(str(model), str(elsewhere / "hand.csv"), str(tmp_path / "r"), isolate=False,
                 similarity=False, progress=False)
    assert m["leakage"]["test_rows_also_in_train"] == 3
    assert m["leakage"]["train_file"] == str(trained_on)
    assert f"warning: 3 of {len(test)} test texts also occur in {trained_on}" in \
        capsys.readouterr().err


def test_columns_named_by_the_user_are_read_from_the_test_and_training_files(merged_dir, splits,
                                                                            tmp_path, capsys):
    # a label column medtune does not guess ('dx'): its hint says --label-column, which
    # evaluate must accept, for the test file and for the TF-IDF baseline's training file
    for name in ("test", "train"):
        df = pd.read_csv(splits / f"{name}.csv").rename(columns={"text": "body", "label": "dx"})
        df.to_csv(tmp_path / f"{name}.csv", index=False)
    with pytest.raises(MedtuneError, match="set --text-column"):
        evaluate(str(merged_dir), str(tmp_path / "test.csv"), str(tmp_path / "r0"),
                 isolate=False, similarity=False)
    m = evaluate(str(merged_dir), str(tmp_path / "test.csv"), str(tmp_path / "r"), isolate=False,
                 similarity=False, baseline=["tfidf"], train_data=str(tmp_path / "train.csv"),
                 text_column="body", label_column="dx")
    n = len(pd.read_csv(splits / "test.csv"))
    assert m["n"] == n
    assert [r["model"] for r in m["comparison"]][-1].startswith("TF-IDF")
    # a line per stage (names and counts, never a note), none with progress=False
    err = capsys.readouterr().err
    assert f"evaluate [1] fine-tuned model {merged_dir.name} on {n} notes" in err
    assert f"evaluate [2] TF-IDF + logistic regression baseline on {n} notes" in err
    assert not any(note in err for note in pd.read_csv(splits / "test.csv")["text"])
    evaluate(str(merged_dir), str(tmp_path / "test.csv"), str(tmp_path / "r2"), isolate=False,
             similarity=False, text_column="body", label_column="dx", progress=False)
    assert "evaluate [" not in capsys.readouterr().err


def test_a_model_that_gives_every_row_the_same_answer_is_called_out():
    from medtune.evaluate import _collapsed

    gold = ["A", "B", "C", "D"] * 10
    msg = _collapsed(["C"] * 39 + ["A"], gold)
    assert msg is not None and msg.startswith("the model answered 'C' for 39 of 40 rows")
    assert _collapsed(["C"] * 37 + ["A", "B", "D"], gold) is None  # 92 %: spread enough
    assert _collapsed(["C"] * 12, ["A", "B"] * 6) is None  # too few rows to judge
    assert _collapsed(["A"] * 40, ["A"] * 40) is None  # one gold label: nothing to tell apart
