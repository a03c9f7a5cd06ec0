"""The classical rival: TF-IDF features + logistic regression.

On short clinical notes a bag of word and character n-grams is a strong classifier that trains in
seconds on a CPU; a fine-tuned LLM that does not beat it has not earned its cost. Features:

    word 1-2 grams  (sublinear tf, idf)        -> catches "hematuria", "low back"
    char_wb 2-5 grams (sublinear tf, idf)      -> catches abbreviations and misspellings
    FeatureUnion of both -> LogisticRegression(C=10, max_iter=2000), multinomial (lbfgs)

C is fixed at 10 (weak regularization suits high-dimensional sparse n-grams) rather than tuned
on the test notes, so the baseline never sees test labels.
"""

from __future__ import annotations

import math
import pickle
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medtune.errors import DataError
from medtune.metrics import as_label_strings


@dataclass
class TfidfResult:
    """Predictions of the TF-IDF baseline plus its cost.

    ``predict_seconds`` is seconds per test note when all are predicted in one call;
    ``latency_s`` holds the seconds of the first ``latency_sample`` notes predicted one at a time
    (what the models' p50/p95 latency measure); ``peak_traced_mb`` is the peak of the memory
    Python, NumPy and SciPy allocated during fit and predict (``tracemalloc``: the baseline's own
    memory, without the interpreter's); ``size_bytes`` is the pickled fitted pipeline.
    Unpacks like the tuple ``(predictions, probabilities)``:
    ``preds, probs = tfidf_baseline(...)``.
    """

    predictions: list[str]
    confidence: np.ndarray          # max probability per test note, shape (n_test,)
    classes: list[str]              # column order of ``probabilities``
    fit_seconds: float
    predict_seconds: float
    size_bytes: int
    latency_s: list[float] = field(default_factory=list)
    peak_traced_mb: float | None = None
    probabilities: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0)))

    def __iter__(self) -> Iterator[Any]:
        return iter((self.predictions, self.probabilities))

    def top_k(self, k: int = 3) -> list[list[tuple[str, float]]]:
        """The k most probable labels per note, as (label, probability), best first."""
        order = np.argsort(-self.probabilities, axis=1, kind="stable")[:, :k]
        return [[(self.classes[j], float(p[j])) for j in row]
                for row, p in zip(order, self.probabilities, strict=True)]

    def summary(self) -> dict:
        """JSON-ready cost figures for a comparison table."""
        return {"fit_seconds": self.fit_seconds,
                "latency_mean_ms": self.predict_seconds * 1000,
                "size_mb": self.size_bytes / 2**20}


def _texts(values: Sequence[Any], field_name: str) -> list[str]:
    out = []
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append("")
        elif isinstance(v, str):
            out.append(v)
        else:
            raise DataError(f"{field_name}: row {i} is {type(v).__name__}, expected text")
    return out


def build_pipeline(C: float = 10.0, seed: int = 0) -> Any:
    """The unfitted scikit-learn pipeline (word + char_wb TF-IDF union -> logistic regression)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, Pipeline

    features = FeatureUnion([
        ("word", TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True,
                                 lowercase=True, dtype=np.float32)),
        ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True,
                                 lowercase=True, dtype=np.float32)),
    ])
    clf = LogisticRegression(C=C, max_iter=2000, random_state=seed)
    return Pipeline([("tfidf", features), ("clf", clf)])


def tfidf_baseline(train_texts: Sequence[str], train_labels: Sequence[str],
                   test_texts: Sequence[str], *, C: float = 10.0, seed: int = 0,
                   latency_sample: int = 0) -> TfidfResult:
    """Fit TF-IDF + logistic regression on the training notes and predict the test notes.

    Returns a ``TfidfResult`` (predictions, max-probability confidence, classes, fit seconds,
    predict seconds per note, pickled size, probability matrix); it also unpacks as
    ``(predictions, probabilities)``.
    """
    x_train = _texts(train_texts, "train_texts")
    y_train = as_label_strings(train_labels)
    x_test = _texts(test_texts, "test_texts")
    if len(x_train) != len(y_train):
        raise DataError(f"length mismatch: {len(x_train)} train texts, {len(y_train)} labels")
    if not x_test:
        raise DataError("test_texts: no notes to predict")
    if len(set(y_train)) < 2:
        raise DataError("train_labels: need at least two distinct labels to fit a classifier")

    pipe = build_pipeline(C=C, seed=seed)
    tracing = not tracemalloc.is_tracing()  # a caller's own trace is left alone
    if tracing:
        tracemalloc.start()
    try:
        start = time.perf_counter()
        pipe.fit(x_train, y_train)
        fit_seconds = time.perf_counter() - start

        start = time.perf_counter()
        probs = pipe.predict_proba(x_test)
        predict_seconds = (time.perf_counter() - start) / len(x_test)
        peak = tracemalloc.get_traced_memory()[1] / 2**20 if tracing else None
    finally:
        if tracing:
            tracemalloc.stop()
    latency = []
    for text in x_test[:max(0, latency_sample)]:
        start = time.perf_counter()
        pipe.predict_proba([text])
        latency.append(time.perf_counter() - start)

    classes = [str(c) for c in pipe.classes_]
    best = probs.argmax(axis=1)
    return TfidfResult(
        predictions=[classes[i] for i in best],
        confidence=probs[np.arange(len(best)), best],
        classes=classes,
        fit_seconds=fit_seconds,
        predict_seconds=predict_seconds,
        size_bytes=len(pickle.dumps(pipe, protocol=pickle.HIGHEST_PROTOCOL)),
        latency_s=latency,
        peak_traced_mb=peak,
        probabilities=probs,
    )
