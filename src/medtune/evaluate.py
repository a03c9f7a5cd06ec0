"""`medtune evaluate`: metrics, semantic similarity, before/after table and an HTML report.

Each model is measured in its own fresh Python process (``medtune.measure``: peak memory, bits per
parameter, latency), so its figures are its own.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from medtune.config import PredictConfig
from medtune.errors import MedtuneError, first_line
from medtune.fsutil import atomic_dir, check_output_dir
from medtune.measure import LATENCY_SAMPLE, measure, measure_isolated, rounded, summary_row
from medtune.tables import shown


def _stages(progress: bool, n: int, noun: str = "notes"):
    """``stage(name)``: one stderr line per stage of an evaluation, numbered as they come."""
    count = [0]

    def stage(name: str) -> None:
        count[0] += 1
        if progress:
            print(f"evaluate [{count[0]}] {name} on {n} {noun}", file=sys.stderr, flush=True)
    return stage


def _sibling_train(data: str) -> str | None:
    cand = Path(data).with_name("train.csv")
    return str(cand) if cand.is_file() and cand.resolve() != Path(data).resolve() else None


def _collapsed(preds: list[str], gold: list[str]) -> str | None:
    """A model that gives (nearly) every row the same answer has not learned the task: say so,
    whatever its accuracy (on a skewed test set, the majority label scores well)."""
    if len(preds) < 20 or len(set(gold)) < 2:
        return None
    label, count = Counter(preds).most_common(1)[0]
    if count < 0.95 * len(preds):
        return None
    return (f"the model answered '{shown(label, 40)}' for {count} of {len(preds)} rows: it has "
            "not learned to tell them apart (too little training, or a base model too small "
            "for the task)")


def _run_train_file(model: str, data: str) -> str | None:
    """The training file a medtune run recorded (medtune.json), if it is still there."""
    meta_path = Path(model) / "medtune.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    cand = Path(str(meta.get("data_resolved") or meta.get("data") or ""))
    ok = cand.is_file() and cand.resolve() != Path(data).resolve()
    return str(cand) if ok else None


def _option_texts(df, letters: list[str]) -> list[str]:
    """MCQA: the option text each letter stands for, row by row ("" for a non-letter)."""
    from medtune.tasks.mcqa import LETTERS, OPTION_COLUMNS

    col = dict(zip(LETTERS, OPTION_COLUMNS, strict=True))
    return [str(row[col[x]]) if x in col else "" for x, (_, row) in
            zip(letters, df.iterrows(), strict=True)]


def _leakage(train_path: str | None, texts: list[str], task: str, *, text_column: str | None,
             label_column: str | None, cop_base: int) -> dict[str, Any] | None:
    """How many test texts also occur (normalized) in the training file."""
    if not train_path or not Path(train_path).is_file():
        return None
    from medtune.data import load_labeled, normalize_text

    train_df = load_labeled(train_path, task=task, text_column=text_column,
                            label_column=label_column, cop_base=cop_base)
    train = {normalize_text(t) for t in train_df["text"]}
    shared = sum(normalize_text(t) in train for t in texts)
    return {"train_file": str(train_path), "train_rows": len(train_df),
            "test_rows_also_in_train": shared, "test_rows": len(texts)}


def _check_baselines(baseline: list[str], train_path: str | None, task: str) -> None:
    """Fail before any model is loaded: unknown entries, tfidf without training data."""
    for entry in baseline:
        if entry == "tfidf":
            if task != "mcqa" and not train_path:
                raise MedtuneError("--baseline tfidf needs --train-data (no train.csv next to "
                                   "the test file)")
        elif not Path(entry).is_dir():
            raise MedtuneError(f"--baseline {entry}: not a model directory (or 'tfidf')")


def evaluate(model: str, data: str, output: str, *, baseline: list[str] | None = None,
             train_data: str | None = None, task: str | None = None, labels: str | None = None,
             cfg: PredictConfig | None = None, overwrite: bool = False,
             similarity: bool = True, isolate: bool = True, text_column: str | None = None,
             label_column: str | None = None, progress: bool = True,
             cop_base: int = 0) -> dict[str, Any]:
    """Evaluate ``model`` on labelled ``data`` into the directory ``output`` (metrics.json,
    comparison.json, report.md, report.html, plots), written atomically.

    ``baseline`` entries: model directories (scored zero-shot with the fine-tuned model's
    labels) and/or "tfidf" (needs ``train_data`` or a train.csv next to ``data``).
    ``isolate``: measure each model in its own process (its own peak memory).
    ``text_column`` / ``label_column``: of ``data`` and the training file (default: detected).
    ``progress``: a line on stderr as each stage starts (model names and counts only)."""
    from medtune.data import check_unseen_labels, load_labeled
    from medtune.metrics import classification_metrics, difficulty_terciles, mcqa_metrics
    from medtune.model import load_labels
    from medtune.predict import resolve_task

    cfg = cfg or PredictConfig(merge="no")  # measure a run as trained unless asked
    task = resolve_task(model, task)
    baseline = list(baseline or [])
    train_path = train_data or _sibling_train(data)
    _check_baselines(baseline, train_path, task)
    df = load_labeled(data, task=task, text_column=text_column, label_column=label_column,
                      cop_base=cop_base)
    texts, gold = list(df["text"]), list(df["label"])
    known = Path(labels or Path(model) / "labels.json")
    if task == "protocol" and known.exists():  # gold the model cannot predict: warn, or refuse
        check_unseen_labels(load_labels(known), gold, data, "gold label")
    # fail before any model is loaded; never replace what this command reads
    check_output_dir(output, overwrite, inputs=[model, data, train_path, labels, *baseline])
    run = measure_isolated if isolate else measure
    stage = _stages(progress, len(texts), "questions" if task == "mcqa" else "notes")
    stage(f"fine-tuned model {Path(model).name}")
    main = run(model=model, texts=texts, labels=labels, task=task, cfg=cfg)
    preds = [r["prediction"] for r in main["rows"]]
    conf = [r["confidence"] for r in main["rows"]] if cfg.mode == "constrained" else None
    metrics = classification_metrics(gold, preds, conf, main["labels"])
    metrics.update(task=task, mode=cfg.mode, n=len(df), model=str(model), data=str(data),
                   abstained=sum(bool(r["abstained"]) for r in main["rows"]),
                   min_confidence=cfg.min_confidence,
                   memory_kind=main["memory_kind"] + ("" if isolate else
                                                      " (not isolated: the whole run so far)"))
    comparison = [summary_row("fine-tuned", main, metrics)]
    predictions = [preds]  # per comparison row, for semantic similarity
    notes: list[str] = []
    if (collapse := _collapsed(preds, gold)) is not None:
        print(f"warning: {collapse}", file=sys.stderr)
        notes.append(f"WARNING: {collapse}.")
    base_conf_gold = None
    for entry in baseline:
        if entry == "tfidf":
            if task == "mcqa":
                notes.append("TF-IDF baseline skipped: it does not apply to multiple choice "
                             "(the answer letter's position is random).")
                print("warning: --baseline tfidf skipped: it does not apply to multiple choice",
                      file=sys.stderr)
                continue
            stage("TF-IDF + logistic regression baseline")
            row, tf_preds = _tfidf_row(train_path, texts, gold, main["labels"], task,
                                       text_column=text_column, label_column=label_column)
            comparison.append(row)
            predictions.append(tf_preds)
            continue
        # zero-shot base: the fine-tuned model's label set, same prompts and scoring
        lab_file = labels or str(Path(model) / "labels.json")
        stage(f"zero-shot base {Path(entry).name}")
        b = run(model=entry, texts=texts, labels=lab_file, task=task, cfg=cfg,
                probabilities=task == "mcqa")
        b_preds = [r["prediction"] for r in b["rows"]]
        b_conf = [r["confidence"] for r in b["rows"]] if cfg.mode == "constrained" else None
        b_metrics = classification_metrics(gold, b_preds, b_conf, b["labels"])
        comparison.append(summary_row(f"base (zero-shot): {Path(entry).name}", b, b_metrics))
        predictions.append(b_preds)
        if b["probabilities"] is not None and base_conf_gold is None:
            idx = {lab: i for i, lab in enumerate(b["labels"])}
            base_conf_gold = [row[idx[g]] if g in idx else 0.0
                              for row, g in zip(b["probabilities"], gold, strict=True)]
    if task == "mcqa":
        difficulty = difficulty_terciles(base_conf_gold) if base_conf_gold else None
        metrics["mcqa"] = mcqa_metrics(gold, preds, list(df["subject_name"]), difficulty)
        notes.append("Difficulty = tercile of the BASE model's probability of the gold answer "
                     "(hard = lowest third)." if difficulty else
                     "Accuracy by difficulty needs --baseline BASE_DIR (base model confidence "
                     "terciles).")
    if similarity:
        from medtune.similarity import semantic_similarity

        stage("semantic similarity")
        # MCQA: compare the chosen option's text with the gold option's, not the letters
        ref = _option_texts(df, gold) if task == "mcqa" else gold
        for row, row_preds in zip(comparison, predictions, strict=True):
            guess = _option_texts(df, row_preds) if task == "mcqa" else row_preds
            sim = semantic_similarity(guess, ref)
            row["semantic_similarity"] = round(sim["mean"], 4)
            if row is comparison[0]:
                metrics["semantic_similarity"] = sim["mean"]
                metrics["semantic_similarity_model"] = sim["model"]
    leak = _leakage(train_path, texts, task, text_column=text_column, label_column=label_column,
                    cop_base=cop_base)
    if leak is None and (recorded := _run_train_file(model, data)):
        try:  # the run's own training file, read as the test file is: best effort
            leak = _leakage(recorded, texts, task, text_column=text_column,
                            label_column=label_column, cop_base=cop_base)
        except MedtuneError as exc:
            notes.append(f"Leakage not checked: the run's training file {recorded} could not "
                         f"be read as the test file is ({first_line(exc)}).")
    if leak is not None:
        metrics["leakage"] = leak
        if leak["test_rows_also_in_train"]:
            print(f"warning: {leak['test_rows_also_in_train']} of {leak['test_rows']} test texts "
                  f"also occur in {leak['train_file']}: the figures are optimistic",
                  file=sys.stderr)
            notes.append(f"LEAKAGE: {leak['test_rows_also_in_train']} of {leak['test_rows']} "
                         f"test texts also occur in {leak['train_file']} (normalized): the "
                         "figures above are optimistic.")
    tfidf = next((i for i, r in enumerate(comparison) if r["model"].startswith("TF-IDF")), None)
    if tfidf is not None:  # compared by notes right, not by rounded accuracies
        ours, theirs = (sum(p == g for p, g in zip(predictions[i], gold, strict=True))
                        for i in (0, tfidf))
        verdict = "beats" if ours > theirs else "ties with" if ours == theirs else "does NOT beat"
        notes.append(f"The fine-tuned model {verdict} the TF-IDF + logistic regression baseline "
                     f"({ours} vs {theirs} of {len(gold)} notes right: "
                     f"{ours / len(gold):.4f} vs {theirs / len(gold):.4f} accuracy).")
    if cfg.mode == "constrained":
        notes.append("Constrained scoring: every prediction is one of the labels "
                     f"(outside the label set: {metrics['outside_label_set']}).")
    notes.append(f"Peak memory: {metrics['memory_kind']}"
                 + (", each model in its own process" if isolate else "")
                 + "; model memory = peak minus the resident set before loading"
                 + ("; TF-IDF: the peak of what Python, NumPy and SciPy allocated during fit and "
                    "predict (tracemalloc)" if tfidf is not None else "") + ".")
    metrics["comparison"] = comparison
    # the report directory appears complete or not at all; --overwrite replaces it whole
    with atomic_dir(output) as tmp:
        _write(tmp, model, data, metrics, comparison, notes, main, train_path)
    return metrics


def _tfidf_row(train_path: str | None, texts, gold, labels, task: str, *, text_column: str | None,
               label_column: str | None) -> tuple[dict[str, Any], list[str]]:
    from medtune.baseline import tfidf_baseline
    from medtune.data import load_labeled
    from medtune.metrics import classification_metrics, latency_stats

    assert train_path is not None  # _check_baselines
    tr = load_labeled(train_path, task=task, text_column=text_column, label_column=label_column)
    res = tfidf_baseline(list(tr["text"]), list(tr["label"]), texts, latency_sample=LATENCY_SAMPLE)
    m = classification_metrics(gold, list(res.predictions), None, labels)
    lat = latency_stats(res.latency_s)  # one note at a time, as the models' rows
    row = {"model": "TF-IDF + logistic regression", "accuracy": round(m["accuracy"], 4),
           "macro_f1": round(m["macro_f1"], 4), "size_mb": round(res.size_bytes / 2**20, 2),
           "weight_mb": None, "params": None, "bits_per_param": None,
           "quantized_bits_per_param": None, "peak_memory_mb": None,
           "model_memory_mb": rounded(res.peak_traced_mb, 1),
           "latency_p50_ms": rounded(lat["p50_ms"], 3), "latency_p95_ms": rounded(lat["p95_ms"], 3),
           "throughput": round(1 / max(res.predict_seconds, 1e-12), 1)}
    return row, list(res.predictions)


def model_card(model: str, data: str, metrics: dict[str, Any], labels: list[str],
               measured: dict[str, Any], train_path: str | None = None) -> dict[str, Any]:
    """Model card fields: what the model is, what it was trained and evaluated on, how well it
    does, what it is for and where it must not be trusted."""
    meta_path = Path(model) / "medtune.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    conf = meta.get("config") or {}
    lora, train = conf.get("lora") or {}, conf.get("train") or {}
    summary = meta.get("summary") or {}
    trained_on = meta.get("data") or train_path
    # the run's absolute path first: the card is found whatever directory evaluate runs in
    card_path = Path(meta.get("data_resolved") or trained_on or data).with_name("data_card.json")
    card = json.loads(card_path.read_text(encoding="utf-8")) if card_path.is_file() else {}
    leak = metrics.get("leakage")
    if leak is not None:
        leakage = (f"{leak['test_rows_also_in_train']} of {leak['test_rows']} test texts also "
                   f"in the training file (whitespace/case normalized)")
    elif card and card_path.parent.resolve() == Path(data).resolve().parent:
        # the card speaks for its own splits only: the evaluated file must be one of them
        leakage = (f"{card.get('leakage_across_splits', '?')} normalized texts shared between "
                   "splits (data card)")
    else:
        leakage = "not checked (no training file or data card found)"
    details = {"kind": meta.get("kind", "plain model directory"), "base": meta.get("base"),
               "task": metrics["task"], "quantization": measured.get("quantization"),
               "compute_dtype": meta.get("compute_dtype"),
               "adaptation": (f"LoRA r={lora.get('r')} alpha={lora.get('alpha')}"
                              if lora.get("enabled") else
                              "full fine-tuning" if lora else None),
               "steps": summary.get("step"), "train_seconds": summary.get("train_seconds"),
               "lr": train.get("lr"), "batch_size": train.get("batch_size"),
               "parameters": measured.get("params"),
               "bits_per_param (whole model)": round(measured["bits_per_param"], 3)}
    if measured.get("quantized_bits_per_param") is not None:
        qbits = measured["quantized_bits_per_param"]
        details["bits_per_param (quantized layers)"] = round(qbits, 3)
    return {
        "model_details": {k: v for k, v in details.items() if v is not None},
        "training_data": (f"{trained_on} ({meta.get('train_rows', '?')} rows)" if trained_on
                          else "unknown (not a medtune run)"),
        "evaluation_data": f"{data} ({metrics['n']} rows)",
        "labels": f"{len(labels)} labels: " + ", ".join(labels),
        "performance": {k: round(metrics[k], 4) for k in
                        ("accuracy", "macro_f1", "weighted_f1", "ece", "semantic_similarity")
                        if isinstance(metrics.get(k), float)},
        "intended_use": "Decision support: suggest an imaging protocol / answer for human review. "
                        "Low-confidence rows are flagged for review (abstention).",
        "out_of_scope": "Autonomous clinical decisions; notes, languages or label sets unlike the "
                        "training data; any use without a clinician checking the output.",
        "limitations": "Trained on the data above only; accuracy outside that distribution is "
                       "unknown. Not a medical device. Synthetic or small data gives optimistic "
                       "figures. Confidence is calibrated only as far as the ECE above shows.",
        "leakage": leakage,
    }


def _write(out: Path, model: str, data: str, metrics: dict[str, Any], comparison, notes,
           main: dict[str, Any], train_path: str | None) -> None:
    from medtune import report

    images = {"confusion.png": report.confusion_png(metrics["confusion"], metrics["labels"])}
    if metrics.get("reliability"):
        images["reliability.png"] = report.reliability_png(metrics["reliability"])
        images["coverage.png"] = report.coverage_png(metrics["coverage_curve"])
    loss = report.loss_curve_png(Path(model) / "metrics.jsonl")
    if loss:
        images["loss.png"] = loss
    if len(comparison) > 1:
        images["comparison.png"] = report.comparison_png(comparison, "accuracy")
    card = model_card(model, data, metrics, main["labels"], main, train_path)
    report.write_report(out, title=f"medtune evaluation: {Path(model).name}", metrics=metrics,
                        comparison=comparison, model_card=card, images=images, notes=notes)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
