"""Plots and the self-contained report: files, embedded images, escaping, no external assets."""

from __future__ import annotations

import base64
import json
import re

import pytest

from medtune import report
from medtune.errors import DataError, MedtuneError
from medtune.metrics import classification_metrics

EVIL = "<script>alert(1)</script>"
LABELS = ["CT Head", "MRI Brain", EVIL]
PNG = b"\x89PNG\r\n\x1a\n"


def _metrics() -> dict:
    gold = ["CT Head", "MRI Brain", EVIL, "CT Head", "MRI Brain", EVIL] * 3
    pred = ["CT Head", "CT Head", EVIL, "CT Head", "MRI Brain", "MRI Brain"] * 3
    conf = [0.9, 0.6, 0.8, 0.95, 0.7, 0.4] * 3
    return classification_metrics(gold, pred, conf, LABELS)


def _loss_file(tmp_path):
    rows = [{"step": s, "loss": 2.0 / s} for s in range(1, 11)]
    rows += [{"step": 5, "val_loss": 0.5, "val_accuracy": 0.6},
             {"step": 10, "val_loss": 0.3, "val_accuracy": 0.8}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


COMPARISON = [
    {"model": "base (zero-shot)", "size_mb": 400.0, "params": 100_000_000, "accuracy": 0.40,
     "macro_f1": 0.30, "latency_p50_ms": 20.0},
    {"model": f"fine-tuned 4-bit {EVIL}", "size_mb": 100.0, "params": 100_000_000,
     "accuracy": 0.90, "macro_f1": 0.85, "latency_p50_ms": 25.0},
]


def sample_images(tmp_path) -> dict[str, bytes]:
    m = _metrics()
    return {
        "confusion": report.confusion_png(m["confusion"], m["labels"]),
        "reliability": report.reliability_png(m["reliability"]),
        "coverage": report.coverage_png(m["coverage_curve"]),
        "loss": report.loss_curve_png(_loss_file(tmp_path)),
        "accuracy comparison": report.comparison_png(COMPARISON, "accuracy"),
    }


def test_every_plot_is_png(tmp_path):
    for name, data in sample_images(tmp_path).items():
        assert data is not None and data.startswith(PNG), name
        assert len(data) > 2000, name


def test_write_report_self_contained_and_escaped(tmp_path):
    images = sample_images(tmp_path)
    out = tmp_path / "report"
    card = {"data": "synthetic notes", "labels": LABELS, "intended_use": "research only",
            "limits": ["small model", EVIL], "leakage": {"test notes also in train": 0}}
    written = report.write_report(out, title=f"Eval {EVIL}", metrics=_metrics(),
                                  comparison=COMPARISON, model_card=card, images=images,
                                  notes=[f"note with {EVIL}"])
    for name in ("metrics.json", "report.md", "report.html", "comparison.json",
                 "confusion.png", "accuracy_comparison.png"):
        assert written[name].is_file(), name
    assert sorted(p.name for p in out.iterdir()) == sorted(written)  # no temp files left

    page = (out / "report.html").read_text(encoding="utf-8")
    embedded = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(images)
    assert all(base64.b64decode(b).startswith(PNG) for b in embedded)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Model card" in page and "research only" in page

    md = (out / "report.md").read_text(encoding="utf-8")
    assert "<script>" not in md and "![confusion](confusion.png)" in md
    assert "ratio" in md and "×0.25" in md  # size 100 / 400
    assert "+0.5000" in md  # accuracy 0.90 - 0.40

    saved = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert saved["accuracy"] == pytest.approx(_metrics()["accuracy"])
    assert saved["labels"][2] == EVIL  # data kept verbatim in JSON, escaped only in HTML


def test_bad_image_writes_nothing(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(MedtuneError, match="not PNG"):
        report.write_report(out, title="t", metrics={"accuracy": 1.0},
                            images={"bad": b"GIF89a"})
    assert not out.exists()


def test_numpy_and_nan_values_become_plain_json(tmp_path):
    np = pytest.importorskip("numpy")
    report.write_report(tmp_path, title="t",
                        metrics={"accuracy": np.float32(0.5), "ece": float("nan"),
                                 "counts": np.array([1, 2])})
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert saved == {"accuracy": 0.5, "ece": None, "counts": [1, 2]}


def test_loss_curve_inputs(tmp_path):
    assert report.loss_curve_png(tmp_path / "absent.jsonl") is None
    only_eval = tmp_path / "e.jsonl"
    only_eval.write_text('{"step": 1, "lr": 0.1}\n', encoding="utf-8")
    assert report.loss_curve_png(only_eval) is None
    partial = tmp_path / "p.jsonl"
    partial.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo',
                       encoding="utf-8")
    assert report.loss_curve_png(partial).startswith(PNG)  # crash-truncated last line tolerated
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"step": 1, "loss": 1.0}\nnot json\n{"step": 2, "loss": 0.5}\n',
                      encoding="utf-8")
    with pytest.raises(DataError, match="line 2"):
        report.loss_curve_png(broken)


def test_plot_input_errors():
    with pytest.raises(DataError, match="does not match"):
        report.confusion_png([[1, 0], [0, 1]], ["a", "b", "c"])
    with pytest.raises(MedtuneError, match="no row has a numeric 'throughput'"):
        report.comparison_png(COMPARISON, "throughput")


def test_dollar_signs_in_labels_and_model_names_are_plain_text():
    # matplotlib reads "$...$" as a formula: "CT $x^$ head" raised and failed the whole report
    labels = ["CT $x^$ head", "Cost $5 or $10"]
    assert report.confusion_png([[1, 0], [0, 1]], labels).startswith(PNG)
    assert report.comparison_png([{"model": "base: dir_$a^$", "accuracy": 0.5}],
                                 "accuracy").startswith(PNG)
    assert report._short("Cost $5 or $10") == r"Cost \$5 or \$10"


def test_reliability_legend_names_the_accuracy_bars_when_the_first_bin_is_empty(monkeypatch):
    import matplotlib.figure

    seen: list[list[str]] = []
    original = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        seen.append([t.get_text() for ax in fig.axes if ax.get_legend()
                     for t in ax.get_legend().get_texts()])
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    m = classification_metrics(["A", "B"], ["A", "A"], [0.9, 0.6], ["A", "B"])
    report.reliability_png(m["reliability"])
    assert "accuracy" in seen[0]


def test_per_class_of_many_labels_is_one_table_and_keeps_labels_named_like_sections(tmp_path):
    labels = [f"label {i}" for i in range(61)] + ["confusion"]
    m = classification_metrics(labels, labels, None, labels)
    report.write_report(tmp_path, title="t", metrics=m)
    md = (tmp_path / "report.md").read_text()
    assert len(re.findall(r"^#+ ", md, re.M)) == 3  # title, Metrics, per_class: no heading per label
    assert "| confusion | 1 | 1 | 1 | 1 |" in md and "| label 60 |" in md


def test_numbers_are_not_rounded_up_to_a_whole_number():
    assert report._fmt(0.99996) == "0.99996" and report._fmt(0.123456) == "0.1235"
    assert report._fmt(1.0) == "1" and report._fmt(12345.6) == "12,346"


def test_image_names_that_collide_get_distinct_files(tmp_path):
    png = report.comparison_png(COMPARISON, "accuracy")
    written = report.write_report(tmp_path, title="t", metrics={"accuracy": 1.0},
                                  images={"a": png, "a_2": png, "a!": png})
    names = [p.name for k, p in written.items() if k.endswith(".png")]
    assert len(names) == len(set(names)) == 3
