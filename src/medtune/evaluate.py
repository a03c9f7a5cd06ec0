"""`medtune evaluate`: metrics, semantic similarity, before/after table and an HTML report.

Each model is measured in its own child process, so "peak memory" is that model's own peak
(resident set size on CPU, max allocated on CUDA) rather than the evaluating process's history.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import time
from pathlib import Path
from typing import Any

from medtune.config import PredictConfig
from medtune.errors import MedtuneError
from medtune.fsutil import prepare_output_dir

LATENCY_SAMPLE = 50  # notes predicted one at a time for p50/p95 latency


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))


def weight_stats(model) -> dict[str, float]:
    """Logical parameter count, bytes actually held by weights, and bits per parameter."""
    logical, nbytes = 0, 0
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            nbytes += p.numel() * p.element_size()
            quant = getattr(p, "quant_state", None)
            if quant is not None and hasattr(module, "in_features"):
                logical += module.in_features * module.out_features
                nbytes += _quant_state_bytes(quant)
            elif name == "weight" and type(p).__name__ == "Int8Params":
                logical += p.numel()
            else:
                logical += p.numel()
    return {"params": logical, "weight_mb": nbytes / 2**20,
            "bits_per_param": 8 * nbytes / max(1, logical)}


def _quant_state_bytes(state) -> int:
    total = 0
    for attr in ("absmax", "code"):
        t = getattr(state, attr, None)
        if t is not None:
            total += t.numel() * t.element_size()
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += _quant_state_bytes(nested)
    return total


def _model_disk_bytes(path: str, meta: dict[str, Any]) -> int:
    p = Path(path)
    size = _dir_bytes(p)
    if meta.get("kind") == "run" and Path(meta.get("base", "")).is_dir():
        size += _dir_bytes(Path(meta["base"]))  # a run needs its base to be usable
    return size


def measure(model: str, texts: list[str], *, labels: str | None, task: str,
            cfg: PredictConfig, quantization: str | None = None) -> dict[str, Any]:
    """Load ``model``, predict ``texts`` and time it (runs in the calling process)."""
    import torch

    from medtune.predict import Predictor

    t0 = time.time()
    pred = Predictor.from_path(model, labels=labels, task=task, cfg=cfg, quantization=quantization)
    load_s = time.time() - t0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    rows = pred.predict_texts(texts)
    batch_s = time.time() - t0
    probs_gold = None
    lat = []
    for t in texts[:LATENCY_SAMPLE]:
        t1 = time.perf_counter()
        pred.predict_texts([t])
        lat.append(time.perf_counter() - t1)
    if cfg.mode == "constrained":
        probs_gold = pred.probabilities(texts).tolist()
    peak = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    stats = weight_stats(pred.model)
    return {"rows": rows, "labels": pred.labels, "probabilities": probs_gold,
            "latency_s": lat, "batch_seconds": batch_s, "load_seconds": load_s,
            "peak_memory_mb": peak, "memory_kind": "cuda max allocated" if torch.cuda.is_available()
            else "peak RSS (process)", "disk_mb": _model_disk_bytes(model, pred.loaded.meta) / 2**20,
            **stats}


def _worker(queue, kwargs: dict[str, Any]) -> None:
    try:
        queue.put(("ok", measure(**kwargs)))
    except BaseException as exc:  # report to the parent; never hang it
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def measure_isolated(**kwargs: Any) -> dict[str, Any]:
    """``measure`` in a fresh process so its peak memory is its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(queue, kwargs))
    proc.start()
    status, value = queue.get()
    proc.join()
    if status != "ok":
        raise MedtuneError(f"measuring {kwargs.get('model')}: {value}")
    return value


def _summary_row(name: str, m: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    from medtune.metrics import latency_stats

    lat = latency_stats(m["latency_s"])
    n = len(m["rows"])
    return {"model": name, "disk_mb": round(m["disk_mb"], 2), "weight_mb": round(m["weight_mb"], 2),
            "params": int(m["params"]), "bits_per_param": round(m["bits_per_param"], 3),
            "peak_memory_mb": round(m["peak_memory_mb"], 1), "latency_p50_ms": round(lat["p50_ms"], 2),
            "latency_p95_ms": round(lat["p95_ms"], 2),
            "throughput": round(n / max(m["batch_seconds"], 1e-9), 2),
            "accuracy": round(metrics["accuracy"], 4),
            "macro_f1": round(metrics.get("macro_f1", float("nan")), 4)}


def _sibling_train(data: str) -> str | None:
    cand = Path(data).with_name("train.csv")
    return str(cand) if cand.is_file() and cand != Path(data) else None


def evaluate(model: str, data: str, output: str, *, baseline: list[str] | None = None,
             train_data: str | None = None, task: str | None = None, labels: str | None = None,
             cfg: PredictConfig | None = None, overwrite: bool = False,
             similarity: bool = True, isolate: bool = True) -> dict[str, Any]:
    """Evaluate ``model`` on labelled ``data``; ``baseline`` entries are model dirs or 'tfidf'."""
    from medtune.data import load_labeled
    from medtune.metrics import classification_metrics, difficulty_terciles, mcqa_metrics
    from medtune.predict import resolve_task

    cfg = cfg or PredictConfig()
    task = resolve_task(model, task or "protocol")
    out = prepare_output_dir(output, overwrite)
    df = load_labeled(data, task=task)
    texts, gold = list(df["text"]), list(df["label"])
    run = measure_isolated if isolate else measure
    main = run(model=model, texts=texts, labels=labels, task=task, cfg=cfg)
    preds = [r["prediction"] for r in main["rows"]]
    conf = [r.get("confidence") for r in main["rows"]]
    conf_ok = cfg.mode == "constrained"
    metrics = classification_metrics(gold, preds, conf if conf_ok else None, main["labels"])
    metrics["task"], metrics["mode"], metrics["n"] = task, cfg.mode, len(df)
    metrics["abstained"] = sum(bool(r["abstained"]) for r in main["rows"])
    comparison = [_summary_row("fine-tuned", main, metrics)]
    notes: list[str] = []
    base_conf_gold = None
    for entry in baseline or []:
        if entry == "tfidf":
            comparison.append(_tfidf_row(train_data or _sibling_train(data), texts, gold, main["labels"]))
            continue
        # zero-shot base: same labels as the fine-tuned model
        lab_file = labels or str(Path(model) / "labels.json")
        b = run(model=entry, texts=texts, labels=lab_file, task=task, cfg=cfg)
        b_pred = [r["prediction"] for r in b["rows"]]
        b_metrics = classification_metrics(gold, b_pred, None, b["labels"])
        comparison.append(_summary_row(f"base (zero-shot): {Path(entry).name}", b, b_metrics))
        if b["probabilities"] is not None:
            idx = {lab: i for i, lab in enumerate(b["labels"])}
            base_conf_gold = [row[idx[g]] if g in idx else 0.0
                              for row, g in zip(b["probabilities"], gold, strict=True)]
    if task == "mcqa":
        difficulty = difficulty_terciles(base_conf_gold) if base_conf_gold else None
        metrics["mcqa"] = mcqa_metrics(gold, preds, list(df["subject_name"]), difficulty)
        notes.append("Difficulty = tercile of the BASE model's probability of the gold answer "
                     "(hard = lowest third)." if difficulty else
                     "Difficulty needs --baseline BASE_DIR (base model confidence terciles).")
    if similarity:
        from medtune.similarity import semantic_similarity

        sim = semantic_similarity(preds, gold)
        metrics["semantic_similarity"] = sim["mean"]
        metrics["semantic_similarity_model"] = sim["model"]
    tfidf = next((r for r in comparison if r["model"].startswith("TF-IDF")), None)
    if tfidf is not None:
        verdict = ("beats" if metrics["accuracy"] > tfidf["accuracy"] else "does NOT beat")
        notes.append(f"The fine-tuned model {verdict} the TF-IDF + logistic regression baseline "
                     f"({metrics['accuracy']:.4f} vs {tfidf['accuracy']:.4f} accuracy).")
    metrics["comparison"] = comparison
    _write(out, model, data, metrics, comparison, notes, main["labels"])
    return metrics


def _tfidf_row(train_path: str | None, texts, gold, labels) -> dict[str, Any]:
    from medtune.baseline import tfidf_baseline
    from medtune.data import load_labeled
    from medtune.metrics import classification_metrics

    if not train_path:
        raise MedtuneError("--baseline tfidf needs --train-data (no train.csv next to the test file)")
    tr = load_labeled(train_path)
    res = tfidf_baseline(list(tr["text"]), list(tr["label"]), texts)
    m = classification_metrics(gold, list(res.predictions), None, labels)
    return {"model": "TF-IDF + logistic regression", "disk_mb": round(res.size_bytes / 2**20, 2),
            "weight_mb": None, "params": None, "bits_per_param": None, "peak_memory_mb": None,
            "latency_p50_ms": round(res.predict_seconds * 1000, 3), "latency_p95_ms": None,
            "throughput": round(1 / max(res.predict_seconds, 1e-12), 1),
            "accuracy": round(m["accuracy"], 4), "macro_f1": round(m["macro_f1"], 4)}


def _write(out: Path, model: str, data: str, metrics: dict[str, Any], comparison, notes,
           labels: list[str]) -> None:
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
    meta_path = Path(model) / "medtune.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    card_path = Path(meta.get("data", data)).with_name("data_card.json")
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    model_card = {
        "data": f"trained on {meta.get('data', 'unknown')} ({meta.get('train_rows', '?')} rows); "
                f"evaluated on {data} ({metrics['n']} rows)",
        "labels": f"{len(labels)} labels: " + ", ".join(labels),
        "intended_use": "Decision support: suggest an imaging protocol / answer for human review. "
                        "Low-confidence rows are flagged for review (abstention).",
        "limits": "Trained on the data above only; accuracy outside that distribution is unknown. "
                  "Not a medical device. Synthetic or small data gives optimistic figures.",
        "leakage": card.get("leakage", "normalized-text overlap between splits: 0 by construction "
                            "(medtune data split)") if card else "not checked (no data card found)",
    }
    report.write_report(out, title=f"medtune evaluation: {Path(model).name}", metrics=metrics,
                        comparison=comparison, model_card=model_card, images=images, notes=notes)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
