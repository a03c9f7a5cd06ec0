"""TF-IDF + logistic regression baseline on a trivially separable toy set."""

from __future__ import annotations

import numpy as np
import pytest

from medtune.baseline import TfidfResult, tfidf_baseline
from medtune.errors import DataError

CUES = {
    "CT Head": ["head trauma", "fall with headache", "confusion after fall", "skull injury"],
    "CT Urography": ["hematuria", "blood in urine", "flank pain with hematuria", "urothelial"],
    "L-Spine": ["low back pain", "sciatica", "lumbar radiculopathy", "back pain into leg"],
}
FILLER = ["patient", "elderly", "young adult", "history of smoking", "on anticoagulation"]


def _toy(split: int) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for label, cues in CUES.items():
        for i, cue in enumerate(cues):
            for j, fill in enumerate(FILLER):
                if (i + j) % 2 == split:
                    texts.append(f"{fill}, {cue}, please evaluate")
                    labels.append(label)
    return texts, labels


def test_learns_separable_toy_set():
    train_x, train_y = _toy(0)
    test_x, test_y = _toy(1)
    result = tfidf_baseline(train_x, train_y, test_x)
    assert isinstance(result, TfidfResult)
    assert result.predictions == test_y
    assert result.classes == sorted(CUES)
    assert result.probabilities.shape == (len(test_x), 3)
    assert np.allclose(result.probabilities.sum(axis=1), 1.0)
    assert np.allclose(result.confidence, result.probabilities.max(axis=1))
    assert result.confidence.min() > 1 / 3
    assert result.fit_seconds > 0 and result.predict_seconds > 0
    assert result.size_bytes > 1000
    assert result.latency_s == []  # no per-note timing unless asked
    assert result.peak_traced_mb is not None and result.peak_traced_mb > 0
    top = result.top_k(2)
    assert top[0][0][0] == test_y[0] and top[0][0][1] >= top[0][1][1]
    preds, probs = result  # also unpacks as (predictions, probability matrix)
    assert preds == test_y and probs is result.probabilities


def test_per_note_latency_sample_and_caller_trace_left_alone():
    import tracemalloc

    train_x, train_y = _toy(0)
    test_x, _ = _toy(1)
    tracemalloc.start()
    try:
        result = tfidf_baseline(train_x, train_y, test_x, latency_sample=5)
        assert tracemalloc.is_tracing()  # the caller's trace survives
    finally:
        tracemalloc.stop()
    assert len(result.latency_s) == 5 and all(t > 0 for t in result.latency_s)
    assert result.peak_traced_mb is None  # not measured inside someone else's trace


def test_rejects_bad_input():
    with pytest.raises(DataError, match="two distinct labels"):
        tfidf_baseline(["a", "b"], ["X", "X"], ["c"])
    with pytest.raises(DataError, match="length mismatch"):
        tfidf_baseline(["a", "b"], ["X"], ["c"])
    with pytest.raises(DataError, match="train_texts: row 1"):
        tfidf_baseline(["a", 3], ["X", "Y"], ["c"])
    with pytest.raises(DataError, match="no notes"):
        tfidf_baseline(["a", "b"], ["X", "Y"], [])
