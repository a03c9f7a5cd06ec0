"""`medtune demo` end to end at toy scale: every stage runs and the report is written."""

from __future__ import annotations

import json

import pytest

from medtune.base import BaseSpec
from medtune.demo import run_demo


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path / "cache"))
    spec = BaseSpec(vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                    seq_len=64, batch_size=8, steps=10)
    out = tmp_path / "demo"
    result = run_demo(out, n=400, base_spec=spec,
                      overrides=["data.min_count=5", "train.max_steps=6", "train.eval_every=3",
                                 "train.save_every=3", "train.eval_samples=16", "lora.r=8", "lora.alpha=16"])
    for name in ("notes.csv", "data/train.csv", "run/adapter", "merged/model.safetensors",
                 "predictions.csv", "report/report.html", "report/metrics.json"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["outside_label_set"] == 0
    assert metrics["min_confidence"] == 0.5  # the report abstains as step 6's predictions did
    names = [row["model"] for row in result["metrics"]["comparison"]]
    assert len(names) == 3 and any("TF-IDF" in n for n in names)
    assert set(result["timings"]) >= {"base", "train", "merge", "predict", "evaluate", "total"}
    # every column of the printed before/after table exists in the comparison rows
    from medtune.demo import COLUMNS
    for row in result["metrics"]["comparison"][:2]:
        missing = [k for k, _ in COLUMNS if row.get(k) is None]
        assert not missing, (row["model"], missing)


def test_demo_refuses_a_non_empty_output_without_overwrite(tmp_path):
    from medtune.errors import MedtuneError

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.csv").write_text("text,label\nkeep me,CT Head\n")
    with pytest.raises(MedtuneError, match="not empty"):
        run_demo(out, n=10)
    assert (out / "notes.csv").read_text() == "text,label\nkeep me,CT Head\n"
