"""`medtune evaluate`: metrics, semantic similarity, before/after table and an HTML report.

Each model is measured in its own fresh Python process (``measure_isolated``), so its
"peak memory" is its own: on CUDA the peak allocated after loading, on CPU the child's VmHWM
(peak resident set of the process's own address space). ``ru_maxrss`` is NOT used on Linux: a
child inherits the parent's high-water mark through fork+exec, so under pytest it reads as the
test runner's RSS. ``model_memory_mb`` = peak - resident set just before loading, i.e.
what the model and its inference added on top of the Python/torch runtime.

Bits per parameter come from the weights as loaded, before the first forward (bitsandbytes'
CPU kernels repack 4-bit weights on first use). "quantized layers" counts the bnb layers only:
NF4 + double quant = 4 (packed weight) + 8/64 (uint8 absmax per 64-block) + 32/(64*256) (fp32
absmax of the absmax per 256 blocks) ~= 4.127 bits; 8-bit = 8 + 32/in_features (fp32 scale per
output row). The constant-size lookup tables (``code``: 16 or 256 floats per layer) are left out.
"whole model" adds the unquantized embeddings, norms and head.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from medtune.config import PredictConfig
from medtune.errors import MedtuneError, describe
from medtune.fsutil import atomic_dir, atomic_file, check_output_dir

LATENCY_SAMPLE = 50  # notes predicted one at a time for p50/p95 latency


def _dir_bytes(path: Path) -> int:
    """Bytes of the files a model needs: hidden files and training checkpoints left out."""
    skip = path / "checkpoints"
    return sum(f.stat().st_size for f in path.rglob("*")
               if f.is_file() and not f.name.startswith(".") and skip not in f.parents)


def _rss_mb(field: str = "VmHWM") -> float:
    """This process's own peak (VmHWM) or current (VmRSS) resident set in MiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # fallback: KiB on Linux
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS


def _quant_state_bytes(state) -> int:
    """absmax (+ nested absmax and offset) of a bnb 4-bit QuantState; lookup tables left out."""
    total = 0
    for attr in ("absmax", "offset"):
        t = getattr(state, attr, None)
        if t is not None and hasattr(t, "numel"):
            total += t.numel() * t.element_size()
    nested = getattr(state, "state2", None) if getattr(state, "nested", False) else None
    if nested is not None:
        total += _quant_state_bytes(nested)
    return total


def weight_stats(model) -> dict[str, Any]:
    """Logical parameter count, bytes held by weights and bits/parameter, for the whole model
    and for the quantized (bitsandbytes) layers alone (``None`` when there are none)."""
    logical = nbytes = q_logical = q_bytes = 0
    seen: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            size = p.numel() * p.element_size()
            count = p.numel()
            quant = getattr(p, "quant_state", None)
            if quant is not None and hasattr(module, "in_features"):  # 4-bit: packed storage
                count = module.in_features * module.out_features
                size += _quant_state_bytes(quant)
            scale = getattr(p, "SCB", None)
            if type(p).__name__ == "Int8Params" and scale is not None:  # 8-bit: row scales
                size += scale.numel() * scale.element_size()
            if quant is not None or type(p).__name__ == "Int8Params":
                q_logical += count
                q_bytes += size
            logical += count
            nbytes += size
    return {"params": logical, "weight_mb": nbytes / 2**20,
            "bits_per_param": 8 * nbytes / max(1, logical),
            "quantized_params": q_logical,
            "quantized_bits_per_param": 8 * q_bytes / q_logical if q_logical else None}


def _model_disk_bytes(path: str, meta: dict[str, Any]) -> int:
    size = _dir_bytes(Path(path))
    if meta.get("kind") == "run" and Path(meta.get("base", "")).is_dir():
        size += _dir_bytes(Path(meta["base"]))  # a run needs its base to be usable
    return size


def _import_runtime() -> None:
    import contextlib
    import importlib

    for name in ("transformers", "transformers.models.auto.modeling_auto", "peft",
                 "bitsandbytes"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def measure(model: str, texts: list[str], *, labels: str | None, task: str,
            cfg: PredictConfig, quantization: str | None = None,
            probabilities: bool = False) -> dict[str, Any]:
    """Load ``model``, predict ``texts``, time it and size it (in the calling process).

    ``probabilities``: also return the [N, L] label probabilities (constrained mode only)."""
    import torch

    from medtune.predict import Predictor

    cuda = torch.cuda.is_available()
    _import_runtime()  # so the "before" resident set already holds the libraries
    rss_before = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    pred = Predictor.from_path(model, labels=labels, task=task, cfg=cfg, quantization=quantization)
    load_s = time.perf_counter() - t0
    stats = weight_stats(pred.model)  # before the first forward: kernels may repack weights
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rows = pred.predict_texts(texts)
    batch_s = time.perf_counter() - t0
    lat = []
    for t in texts[:LATENCY_SAMPLE]:
        t1 = time.perf_counter()
        pred.predict_texts([t])
        lat.append(time.perf_counter() - t1)
    probs = (pred.probabilities(texts).tolist()
             if probabilities and cfg.mode == "constrained" else None)
    if cuda:
        peak, kind = torch.cuda.max_memory_allocated() / 2**20, "CUDA max allocated"
        model_mem = peak
    else:
        peak, kind = _rss_mb("VmHWM"), "peak RSS of the measuring process (VmHWM)"
        model_mem = max(0.0, peak - rss_before)
    return {"rows": rows, "labels": pred.labels, "probabilities": probs,
            "latency_s": lat, "batch_seconds": batch_s, "load_seconds": load_s,
            "peak_memory_mb": peak, "model_memory_mb": model_mem, "memory_kind": kind,
            "disk_mb": _model_disk_bytes(model, pred.loaded.meta) / 2**20,
            "quantization": quantization or pred.loaded.meta.get("quantization", "none"),
            # the merged weights' dtype, 'cast to <dtype>' for a model cast at load, None if neither
            "merged_in_memory": pred.merged_dtype or (
                f"cast to {pred.weights_dtype}" if pred.weights_dtype else None),
            **stats}


_CHILD = ("import pickle, sys\n"
          "with open(sys.argv[1], 'rb') as f:\n"
          "    sys.path[:] = pickle.load(f)\n"
          "    from medtune.evaluate import _child_main\n"
          "    _child_main(f, sys.argv[2])\n")


def _child_main(job, result_path: str) -> None:
    """Entry point of the measuring process: read the job, measure, pickle the answer."""
    import pickle

    try:
        threads, kwargs = pickle.load(job)
        import torch

        torch.set_num_threads(threads)  # a fresh interpreter starts with torch's default
        answer: tuple[str, Any] = ("ok", measure(**kwargs))
    except BaseException as exc:  # report to the parent, one line
        answer = ("error", describe(exc))
    with atomic_file(result_path) as tmp:
        tmp.write_bytes(pickle.dumps(answer))


def measure_isolated(**kwargs: Any) -> dict[str, Any]:
    """``measure`` in a fresh Python process so its peak memory is its own.

    The child is a new interpreter (``python -c``), not a multiprocessing child: it never
    re-imports the caller's main module, so an unguarded script or a notebook works too.
    A child that dies without answering raises MedtuneError with its exit code and the last
    line of its stderr."""
    import pickle
    import subprocess
    import tempfile

    import torch

    with tempfile.TemporaryDirectory(prefix="medtune-measure-") as tmp:
        job, result = Path(tmp) / "job.pkl", Path(tmp) / "result.pkl"
        with open(job, "wb") as fh:
            pickle.dump(list(sys.path), fh)
            pickle.dump((torch.get_num_threads(), kwargs), fh)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(job), str(result)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=env, check=False)
        if not result.is_file():
            lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            raise MedtuneError(f"measuring {kwargs.get('model')}: worker process died (exit code "
                               f"{proc.returncode}{': ' + lines[-1] if lines else ''})")
        status, value = pickle.loads(result.read_bytes())
    if status != "ok":
        raise MedtuneError(f"measuring {kwargs.get('model')}: {value}")
    return value


def summary_row(name: str, m: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """One line of the comparison table from a ``measure`` result and its metrics."""
    from medtune.metrics import latency_stats

    lat = latency_stats(m["latency_s"]) if m["latency_s"] else {"p50_ms": None, "p95_ms": None}
    qbits = m.get("quantized_bits_per_param")
    return {"model": name, "accuracy": round(metrics["accuracy"], 4),
            "macro_f1": round(metrics.get("macro_f1", float("nan")), 4),
            "size_mb": round(m["disk_mb"], 2), "weight_mb": round(m["weight_mb"], 3),
            "params": int(m["params"]), "bits_per_param": round(m["bits_per_param"], 3),
            "quantized_bits_per_param": None if qbits is None else round(qbits, 3),
            "merged_in_memory": m.get("merged_in_memory") or "no",
            "peak_memory_mb": round(m["peak_memory_mb"], 1),
            "model_memory_mb": round(m["model_memory_mb"], 1),
            "latency_p50_ms": _r(lat["p50_ms"], 2), "latency_p95_ms": _r(lat["p95_ms"], 2),
            "throughput": round(len(m["rows"]) / max(m["batch_seconds"], 1e-9), 2)}


def _r(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _sibling_train(data: str) -> str | None:
    cand = Path(data).with_name("train.csv")
    return str(cand) if cand.is_file() and cand.resolve() != Path(data).resolve() else None


def _option_texts(df, letters: list[str]) -> list[str]:
    """MCQA: the option text each letter stands for, row by row ("" for a non-letter)."""
    from medtune.tasks.mcqa import LETTERS, OPTION_COLUMNS

    col = dict(zip(LETTERS, OPTION_COLUMNS, strict=True))
    return [str(row[col[x]]) if x in col else "" for x, (_, row) in
            zip(letters, df.iterrows(), strict=True)]


def _leakage(train_path: str | None, texts: list[str], task: str,
             columns: dict[str, str | None]) -> dict[str, Any] | None:
    """How many test texts also occur (normalized) in the training file."""
    if not train_path or not Path(train_path).is_file():
        return None
    from medtune.data import load_labeled, normalize_text

    train_df = load_labeled(train_path, task=task, **columns)
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
             label_column: str | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on labelled ``data`` into the directory ``output`` (metrics.json,
    comparison.json, report.md, report.html, plots), written atomically.

    ``baseline`` entries: model directories (scored zero-shot with the fine-tuned model's
    labels) and/or "tfidf" (needs ``train_data`` or a train.csv next to ``data``).
    ``isolate``: measure each model in its own process (its own peak memory).
    ``text_column`` / ``label_column``: of ``data`` and the training file (default: detected)."""
    from medtune.data import check_unseen_labels, load_labeled
    from medtune.metrics import classification_metrics, difficulty_terciles, mcqa_metrics
    from medtune.model import load_labels
    from medtune.predict import resolve_task

    cfg = cfg or PredictConfig(merge="no")  # measure a run as trained unless asked
    task = resolve_task(model, task)
    baseline = list(baseline or [])
    train_path = train_data or _sibling_train(data)
    _check_baselines(baseline, train_path, task)
    columns = {"text_column": text_column, "label_column": label_column}
    df = load_labeled(data, task=task, **columns)
    texts, gold = list(df["text"]), list(df["label"])
    known = Path(labels or Path(model) / "labels.json")
    if task == "protocol" and known.exists():  # gold the model cannot predict: warn, or refuse
        check_unseen_labels(load_labels(known), gold, data, "gold label")
    # fail before any model is loaded; never replace what this command reads
    check_output_dir(output, overwrite, inputs=[model, data, train_path, labels, *baseline])
    run = measure_isolated if isolate else measure
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
    base_conf_gold = None
    for entry in baseline:
        if entry == "tfidf":
            if task == "mcqa":
                notes.append("TF-IDF baseline skipped: it does not apply to multiple choice "
                             "(the answer letter's position is random).")
                continue
            row, tf_preds = _tfidf_row(train_path, texts, gold, main["labels"], task, columns)
            comparison.append(row)
            predictions.append(tf_preds)
            continue
        # zero-shot base: the fine-tuned model's label set, same prompts and scoring
        lab_file = labels or str(Path(model) / "labels.json")
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

        # MCQA: compare the chosen option's text with the gold option's, not the letters
        ref = _option_texts(df, gold) if task == "mcqa" else gold
        for row, row_preds in zip(comparison, predictions, strict=True):
            guess = _option_texts(df, row_preds) if task == "mcqa" else row_preds
            sim = semantic_similarity(guess, ref)
            row["semantic_similarity"] = round(sim["mean"], 4)
            if row is comparison[0]:
                metrics["semantic_similarity"] = sim["mean"]
                metrics["semantic_similarity_model"] = sim["model"]
    leak = _leakage(train_path, texts, task, columns)
    if leak is not None:
        metrics["leakage"] = leak
        if leak["test_rows_also_in_train"]:
            notes.append(f"LEAKAGE: {leak['test_rows_also_in_train']} of {leak['test_rows']} "
                         f"test texts also occur in {leak['train_file']} (normalized): the "
                         "figures above are optimistic.")
    tfidf = next((r for r in comparison if r["model"].startswith("TF-IDF")), None)
    if tfidf is not None:
        verdict = "beats" if metrics["accuracy"] > tfidf["accuracy"] else "does NOT beat"
        notes.append(f"The fine-tuned model {verdict} the TF-IDF + logistic regression baseline "
                     f"({metrics['accuracy']:.4f} vs {tfidf['accuracy']:.4f} accuracy).")
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


def _tfidf_row(train_path: str | None, texts, gold, labels, task: str,
               columns: dict[str, str | None]) -> tuple[dict[str, Any], list[str]]:
    from medtune.baseline import tfidf_baseline
    from medtune.data import load_labeled
    from medtune.metrics import classification_metrics, latency_stats

    assert train_path is not None  # _check_baselines
    tr = load_labeled(train_path, task=task, **columns)
    res = tfidf_baseline(list(tr["text"]), list(tr["label"]), texts, latency_sample=LATENCY_SAMPLE)
    m = classification_metrics(gold, list(res.predictions), None, labels)
    lat = latency_stats(res.latency_s)  # one note at a time, as the models' rows
    row = {"model": "TF-IDF + logistic regression", "accuracy": round(m["accuracy"], 4),
           "macro_f1": round(m["macro_f1"], 4), "size_mb": round(res.size_bytes / 2**20, 2),
           "weight_mb": None, "params": None, "bits_per_param": None,
           "quantized_bits_per_param": None, "peak_memory_mb": None,
           "model_memory_mb": _r(res.peak_traced_mb, 1),
           "latency_p50_ms": _r(lat["p50_ms"], 3), "latency_p95_ms": _r(lat["p95_ms"], 3),
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
    elif card:
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
