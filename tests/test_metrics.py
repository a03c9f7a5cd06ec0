"""Metric functions against small hand-computed cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from medtune.errors import DataError
from medtune.metrics import (
    classification_metrics,
    difficulty_terciles,
    latency_stats,
    mcqa_metrics,
)

LABELS = ["A", "B", "C"]
GOLD = ["A", "A", "B", "B", "C", "C"]
PRED = ["A", "B", "B", "B", "C", "X"]  # X is outside the label set


def test_accuracy_f1_confusion_by_hand():
    m = classification_metrics(GOLD, PRED, None, LABELS)
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    # A: P=1 R=1/2 F1=2/3; B: P=2/3 R=1 F1=0.8; C: P=1 R=1/2 F1=2/3
    assert m["per_class"]["A"] == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["per_class"]["B"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["B"]["f1"] == pytest.approx(0.8)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 2 / 3) / 3)
    assert m["weighted_f1"] == pytest.approx((2 / 3 + 0.8 + 2 / 3) / 3)  # equal supports
    assert m["labels"] == LABELS
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
    assert m["outside_label_set"] == 1
    assert "ece" not in m  # no confidence given
    json.dumps(m)


def test_label_absent_from_gold_and_predictions_does_not_lower_macro_f1():
    with_unused = classification_metrics(GOLD, PRED, None, [*LABELS, "D"])
    assert with_unused["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 2 / 3) / 3)
    assert with_unused["per_class"]["D"]["support"] == 0
    assert len(with_unused["confusion"]) == 4


def test_gold_outside_label_set_is_appended_and_counted():
    m = classification_metrics(["A", "Z"], ["A", "A"], None, ["A", "B"])
    assert m["labels"] == ["A", "B", "Z"]
    assert m["gold_outside_label_set"] == 1
    assert m["confusion"][2] == [1, 0, 0]


def test_missing_predictions_count_as_wrong_and_outside():
    m = classification_metrics(["A", "B"], ["A", float("nan")], None, ["A", "B"])
    assert m["accuracy"] == 0.5
    assert m["outside_label_set"] == 1


def test_ece_constructed_case():
    # 4 rows at confidence 0.95 with 3 correct: |0.75 - 0.95| = 0.20
    # 4 rows at confidence 0.55 with 2 correct: |0.50 - 0.55| = 0.05
    # ECE = 4/8 * 0.20 + 4/8 * 0.05 = 0.125
    gold = ["A"] * 8
    pred = ["A", "A", "A", "B", "A", "A", "B", "B"]
    conf = [0.95] * 4 + [0.55] * 4
    m = classification_metrics(gold, pred, conf, ["A", "B"])
    assert m["ece"] == pytest.approx(0.125)
    counts = [b["count"] for b in m["reliability"]]
    assert len(counts) == 15 and sum(counts) == 8
    assert counts[14] == 4 and counts[8] == 4  # 14/15 < 0.95 <= 1 ; 8/15 < 0.55 <= 9/15
    assert m["reliability"][14]["accuracy"] == pytest.approx(0.75)
    assert m["reliability"][14]["mean_confidence"] == pytest.approx(0.95)
    assert m["reliability"][0]["accuracy"] is None  # empty bin
    json.dumps(m)


def test_perfectly_calibrated_gives_zero_ece():
    m = classification_metrics(["A"] * 5, ["A"] * 5, [1.0] * 5, ["A", "B"])
    assert m["ece"] == pytest.approx(0.0)


def test_coverage_curve_keeps_most_confident_first():
    n = 20
    conf = [1.0 - i / 40 for i in range(n)]  # descending
    gold = ["A"] * n
    pred = ["A"] * 10 + ["B"] * 10  # the 10 most confident are right
    m = classification_metrics(gold, pred, conf, ["A", "B"])
    curve = m["coverage_curve"]
    assert [p["coverage"] for p in curve] == pytest.approx([i / 20 for i in range(1, 21)])
    assert all(p["accuracy"] == 1.0 for p in curve[:10])
    accs = [p["accuracy"] for p in curve]
    assert accs == sorted(accs, reverse=True)  # informative confidence: monotone
    thresholds = [p["threshold"] for p in curve]
    assert thresholds == sorted(thresholds, reverse=True)
    assert m["accuracy_at_coverage"]["1.0"] == pytest.approx(m["accuracy"]) == 0.5
    assert m["accuracy_at_coverage"]["0.9"] == pytest.approx(10 / 18)
    assert m["accuracy_at_coverage"]["0.8"] == pytest.approx(10 / 16)


def test_coverage_with_few_rows_keeps_at_least_one():
    m = classification_metrics(["A", "B", "A"], ["A", "A", "B"], [0.9, 0.2, 0.6], ["A", "B"])
    assert m["coverage_curve"][0]["kept"] == 1
    assert m["coverage_curve"][0]["accuracy"] == 1.0
    assert m["coverage_curve"][-1]["kept"] == 3


@pytest.mark.parametrize("conf", [[0.5, 1.5], [0.5, float("nan")], [0.5, -0.1]])
def test_bad_confidence_names_the_row(conf):
    with pytest.raises(DataError, match="confidence: row 1"):
        classification_metrics(["A", "B"], ["A", "B"], conf, ["A", "B"])


def test_length_mismatch_and_empty_input_raise():
    with pytest.raises(DataError, match="length mismatch"):
        classification_metrics(["A"], ["A", "B"], None, ["A"])
    with pytest.raises(DataError, match="no rows"):
        classification_metrics([], [], None, ["A"])


def test_mcqa_metrics_by_subject_and_difficulty():
    gold = ["A", "B", "C", "D"]
    pred = ["A", "C", "C", "D"]
    m = mcqa_metrics(gold, pred, ["Anatomy", "Anatomy", "Surgery", "Surgery"],
                     ["easy", "hard", "hard", "easy"])
    assert m["accuracy"] == 0.75 and m["n"] == 4
    assert m["by_subject"] == {"Anatomy": {"accuracy": 0.5, "n": 2},
                               "Surgery": {"accuracy": 1.0, "n": 2}}
    assert m["by_difficulty"]["hard"] == {"accuracy": 0.5, "n": 2}
    assert "by_difficulty" not in mcqa_metrics(gold, pred, ["x"] * 4, None)


def test_difficulty_terciles_lowest_confidence_is_hard():
    assert difficulty_terciles([0.9, 0.1, 0.5, 0.3, 0.7, 0.2]) == [
        "easy", "hard", "medium", "medium", "easy", "hard"]
    seven = difficulty_terciles([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    assert seven == ["hard"] * 3 + ["medium"] * 2 + ["easy"] * 2


def test_latency_stats():
    s = latency_stats([0.1, 0.2, 0.3, 0.4])
    assert s["p50_ms"] == pytest.approx(250.0)
    assert s["mean_ms"] == pytest.approx(250.0)
    assert s["p95_ms"] == pytest.approx(385.0)  # linear interpolation at rank 2.85
    assert s["throughput"] == pytest.approx(4.0)
    assert s["n"] == 4
    with pytest.raises(DataError, match="row 1 is negative"):
        latency_stats([0.1, -0.2])
    assert not math.isnan(latency_stats([0.0])["p50_ms"])


def test_missing_labels_of_every_kind_become_empty_strings():
    import pandas as pd

    from medtune.metrics import as_label_strings

    values = [None, float("nan"), np.float32("nan"), pd.NA, pd.NaT, "CT Head", 3]
    assert as_label_strings(values) == ["", "", "", "", "", "CT Head", "3"]
    # a pd.NA gold label used to become the class '<NA>' and lower macro-F1
    gold = pd.Series(["A", "B", None, "A"], dtype="string")
    m = classification_metrics(list(gold), ["A", "B", "A", "A"], None, ["A", "B"])
    assert "<NA>" not in m["per_class"]


def test_missing_gold_or_prediction_is_never_correct_nor_a_class():
    m = classification_metrics(["A", None, "B"], ["A", float("nan"), "A"], None, ["A", "B"])
    assert m["accuracy"] == pytest.approx(1 / 3)  # the missing pair was counted as right
    assert m["labels"] == ["A", "B"] and "" not in m["per_class"]


def test_weighted_f1_weights_each_label_by_its_gold_support():
    m = classification_metrics(["A", "A", "A", "B"], ["A", "A", "B", "B"], None, ["A", "B"])
    # A: P=1 R=2/3 F1=0.8 (support 3); B: P=1/2 R=1 F1=2/3 (support 1)
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert m["weighted_f1"] == pytest.approx((3 * 0.8 + 2 / 3) / 4)


def test_coverage_rounds_the_kept_rows_up():
    conf = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    m = classification_metrics(["A"] * 7, ["A"] * 7, conf, ["A"])
    kept = {round(p["coverage"], 2): p["kept"] for p in m["coverage_curve"]}
    assert kept[0.1] == 1 and kept[0.5] == 4 and kept[0.9] == 7  # ceil(0.7), ceil(3.5), ceil(6.3)


def test_a_confidence_on_a_bin_edge_goes_to_the_lower_bin():
    edge = float(np.linspace(0.0, 1.0, 16)[5])  # 5/15: the top of bin 4 (edges[b] < c <= edges[b+1])
    m = classification_metrics(["A"], ["A"], [edge], ["A"])
    assert [b["count"] for b in m["reliability"]].index(1) == 4
