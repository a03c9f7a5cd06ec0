"""Pure metric functions over gold and predicted labels: no I/O, JSON-serializable results.

Conventions shared by every function here:
- labels are compared as strings; a missing value (None / NaN, e.g. an empty cell read back by
  pandas) becomes the empty string, which is never a valid label;
- every float in a result is a plain Python ``float`` (or ``None`` where undefined) so the dict can
  go straight into ``json.dumps``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from medtune.errors import DataError

ECE_BINS = 15
COVERAGE_STEP = 20  # coverage curve points at 1/20 = every 5 %
COVERAGE_KEYS = {"0.8": 16, "0.9": 18, "1.0": 20}  # accuracy_at_coverage key -> curve point


def as_label_strings(values: Sequence[Any]) -> list[str]:
    """Labels as strings; a missing value (an empty CSV cell: None, NaN of any float type,
    pandas' NA or NaT) becomes "" (never a valid label)."""
    return ["" if _missing(v) else str(v) for v in values]


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float | np.floating):
        return math.isnan(value)
    return type(value).__name__ in ("NAType", "NaTType")  # pandas' missing markers


def _as_floats(values: Sequence[Any], field: str) -> np.ndarray:
    try:
        arr = np.asarray(list(values), dtype=float)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{field}: values must be numbers ({exc})") from None
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise DataError(f"{field}: row {int(bad[0])} is not a finite number")
    return arr


def _check_lengths(**columns: Sequence[Any]) -> int:
    lengths = {name: len(col) for name, col in columns.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(f"length mismatch between columns: {lengths}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise DataError(f"{', '.join(lengths)}: no rows to score")
    return n


# ---------------------------------------------------------------- classification


def classification_metrics(gold: Sequence[str], pred: Sequence[str],
                           confidence: Sequence[float] | None,
                           labels: Sequence[str]) -> dict:
    """Accuracy, F1, per-class scores, confusion matrix and (with ``confidence``) calibration.

    - ``accuracy``: exact string match of prediction and gold.
    - ``macro_f1``: unweighted mean F1 over the *active* labels, i.e. those in ``labels`` that
      occur in gold or in the predictions (a label absent from both has no defined F1 and is
      left out rather than counted as 0). ``weighted_f1`` weights by gold support.
    - ``confusion``: rows = gold, columns = prediction, both in the order of ``labels`` (also
      returned as ``labels``). Predictions outside the label set do not appear in the matrix;
      they are counted in ``outside_label_set`` (wrong unless equal to a gold value that is itself
      outside the label set). Gold values missing from ``labels`` are appended to it (sorted)
      and counted in ``gold_outside_label_set``.
    - ``ece``: expected calibration error of the top-1 confidence over 15 equal-width bins,
      ECE = sum_b n_b/n * |accuracy_b - mean_confidence_b|; bin b holds b/15 < c <= (b+1)/15
      (c = 0 goes to the first bin).
    - ``coverage_curve``: rows sorted by confidence, most confident first (ties keep input
      order); at every 5 % of coverage keep the top k = ceil(coverage * n) rows and report their
      accuracy and the lowest kept confidence (``threshold``).
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    n = _check_lengths(gold=gold, pred=pred)
    gold_s, pred_s = as_label_strings(gold), as_label_strings(pred)
    label_list = [lab for lab in dict.fromkeys(as_label_strings(labels)) if lab]
    if not label_list:
        raise DataError("labels: the label set is empty")
    known = set(label_list)
    extra_gold = sorted({g for g in gold_s if g not in known and g})
    label_list += extra_gold
    known.update(extra_gold)

    # a missing gold or prediction ("") is never a class and never a correct answer
    correct = np.array([g == p and g != "" for g, p in zip(gold_s, pred_s, strict=True)])
    precision, recall, f1, support = precision_recall_fscore_support(
        gold_s, pred_s, labels=label_list, zero_division=0)
    pred_counts = {lab: 0 for lab in label_list}
    for p in pred_s:
        if p in pred_counts:
            pred_counts[p] += 1
    active = [i for i, lab in enumerate(label_list) if support[i] > 0 or pred_counts[lab] > 0]
    macro_f1 = float(np.mean(f1[active])) if active else 0.0
    weighted_f1 = float(np.average(f1, weights=support)) if support.sum() > 0 else 0.0
    matrix = confusion_matrix(gold_s, pred_s, labels=label_list)

    result: dict[str, Any] = {
        "n": n,
        "accuracy": float(correct.mean()),
        "macro_f1": macro_f1,
        "weighted_f1": weighted_f1,
        "per_class": {
            lab: {"precision": float(precision[i]), "recall": float(recall[i]),
                  "f1": float(f1[i]), "support": int(support[i])}
            for i, lab in enumerate(label_list)
        },
        "labels": label_list,
        "confusion": [[int(x) for x in row] for row in matrix],
        "outside_label_set": sum(1 for p in pred_s if p not in known),
        "gold_outside_label_set": sum(1 for g in gold_s if g in extra_gold),
    }
    if confidence is not None:
        _check_lengths(gold=gold, confidence=confidence)
        conf = _as_floats(confidence, "confidence")
        bad = np.flatnonzero((conf < 0) | (conf > 1 + 1e-6))
        if bad.size:
            raise DataError(f"confidence: row {int(bad[0])} is outside [0, 1]")
        conf = np.clip(conf, 0.0, 1.0)
        result.update(calibration(correct, conf))
    return result


def calibration(correct: np.ndarray, conf: np.ndarray) -> dict:
    """ECE, reliability bins, coverage curve and accuracy at 80/90/100 % coverage."""
    n = len(correct)
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    # bin b holds edges[b] < c <= edges[b+1]; c == 0 goes to bin 0
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, ECE_BINS - 1)
    ece = 0.0
    reliability = []
    for b in range(ECE_BINS):
        mask = idx == b
        count = int(mask.sum())
        acc = float(correct[mask].mean()) if count else None
        mean_conf = float(conf[mask].mean()) if count else None
        if acc is not None and mean_conf is not None:  # (count > 0)
            ece += count / n * abs(acc - mean_conf)
        reliability.append({"lower": float(edges[b]), "upper": float(edges[b + 1]),
                            "count": count, "accuracy": acc, "mean_confidence": mean_conf})

    order = np.argsort(-conf, kind="stable")
    hits = np.cumsum(correct[order])
    curve = []
    for i in range(1, COVERAGE_STEP + 1):
        k = max(1, -(-i * n // COVERAGE_STEP))  # ceil(i/20 * n) in integers
        curve.append({"coverage": i / COVERAGE_STEP, "kept": int(k),
                      "accuracy": float(hits[k - 1] / k), "threshold": float(conf[order[k - 1]])})
    return {
        "ece": float(ece),
        "reliability": reliability,
        "coverage_curve": curve,
        "accuracy_at_coverage": {key: curve[i - 1]["accuracy"] for key, i in COVERAGE_KEYS.items()},
        "mean_confidence": float(conf.mean()),
    }


# ---------------------------------------------------------------- multiple choice


def _group_accuracy(correct: np.ndarray, groups: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for g in sorted(set(groups)):
        mask = np.array([x == g for x in groups])
        out[g] = {"accuracy": float(correct[mask].mean()), "n": int(mask.sum())}
    return out


def mcqa_metrics(gold: Sequence[str], pred: Sequence[str], subjects: Sequence[str],
                 difficulty: Sequence[str] | None) -> dict:
    """Accuracy overall, by subject and (if given) by difficulty (see ``difficulty_terciles``)."""
    n = _check_lengths(gold=gold, pred=pred, subjects=subjects)
    gold_s, pred_s = as_label_strings(gold), as_label_strings(pred)
    correct = np.array([g == p and g != "" for g, p in zip(gold_s, pred_s, strict=True)])
    result: dict[str, Any] = {
        "n": n,
        "accuracy": float(correct.mean()),
        "by_subject": _group_accuracy(correct, as_label_strings(subjects)),
    }
    if difficulty is not None:
        _check_lengths(gold=gold, difficulty=difficulty)
        result["by_difficulty"] = _group_accuracy(correct, as_label_strings(difficulty))
    return result


def difficulty_terciles(base_confidence: Sequence[float]) -> list[str]:
    """Label each item "easy" / "medium" / "hard" by the BASE model's confidence in the gold answer.

    Definition: sort items by the base (not fine-tuned) model's probability of the gold answer,
    ascending, ties in input order; the item at rank r (0-based) of n falls in tercile
    floor(3r / n): 0 = "hard" (lowest third), 1 = "medium", 2 = "easy". Groups differ in size by
    at most one. Using the base model keeps the split independent of the model being judged.
    """
    conf = _as_floats(base_confidence, "base_confidence")
    n = len(conf)
    names = ("hard", "medium", "easy")
    out = [""] * n
    for rank, i in enumerate(np.argsort(conf, kind="stable")):
        out[int(i)] = names[3 * rank // n]
    return out


# ---------------------------------------------------------------- speed


def latency_stats(seconds_per_item: Sequence[float]) -> dict:
    """p50 / p95 / mean latency in milliseconds and throughput in items per second.

    Throughput = n / total seconds, i.e. sequential throughput of the measured items.
    """
    secs = _as_floats(seconds_per_item, "seconds_per_item")
    if secs.size == 0:
        raise DataError("seconds_per_item: no timings")
    if (secs < 0).any():
        raise DataError(f"seconds_per_item: row {int(np.flatnonzero(secs < 0)[0])} is negative")
    total = float(secs.sum())
    return {
        "n": int(secs.size),
        "p50_ms": float(np.percentile(secs, 50) * 1000),
        "p95_ms": float(np.percentile(secs, 95) * 1000),
        "mean_ms": float(secs.mean() * 1000),
        "throughput": float(secs.size / total) if total > 0 else None,
    }
