"""`medtune demo`: the whole job on the embedded default, on a fresh CPU-only machine.

synthetic notes -> split -> embedded base -> QLoRA training -> merge -> predict -> evaluate
(against the zero-shot base and TF-IDF) -> report.html. Every step is an ordinary medtune
command; this file only chains them and prints the before/after table.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from medtune.config import load_config
from medtune.fsutil import prepare_output_dir

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "protocol" / "demo.yaml"
console = Console()


def _step(name: str) -> None:
    console.rule(f"[bold]{name}")


COLUMNS = [("model", "model"), ("size_mb", "disk MB"), ("weight_mb", "weights MB"),
           ("bits_per_param", "bits/param"), ("peak_memory_mb", "peak MB"), ("latency_p50_ms", "p50 ms"),
           ("latency_p95_ms", "p95 ms"), ("throughput", "notes/s"), ("accuracy", "accuracy"),
           ("macro_f1", "macro-F1")]


def _table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="before / after")
    for key, head in COLUMNS:
        table.add_column(head, justify="left" if key == "model" else "right", no_wrap=True)
    for r in rows:
        table.add_row(*["-" if r.get(k) is None else str(r.get(k)) for k, _ in COLUMNS])
    return table


def run_demo(output: str | Path = "runs/demo", *, n: int = 10000, seed: int = 0,
             config: str | Path | None = None, overrides: list[str] | None = None,
             base_spec: Any = None, overwrite: bool = False) -> dict[str, Any]:
    from medtune.base import build_base
    from medtune.data import load_labeled, split_data
    from medtune.evaluate import evaluate
    from medtune.merge import merge
    from medtune.predict import predict_file
    from medtune.synth import write_synth
    from medtune.train import read_summary, train

    out = Path(output)
    cfg = load_config(config or CONFIG, overrides)
    prepare_output_dir(out, overwrite)  # a previous demo's (or anyone's) files need --overwrite
    timings: dict[str, float] = {}
    t_all = time.time()

    _step("1/7 synthetic notes")
    t = time.time()
    notes = write_synth("protocol", n, out / "notes.csv", seed=seed, overwrite=True)
    timings["synth"] = time.time() - t

    _step("2/7 clean, dedup and split")
    t = time.time()
    card = split_data(notes, out / "data", cfg.data, overwrite=True)
    timings["split"] = time.time() - t
    console.print({k: card[k] for k in ("splits", "labels_kept") if k in card} or card.get("split_sizes"))

    _step("3/7 embedded base (cached after the first build)")
    t = time.time()
    train_df = load_labeled(out / "data" / "train.csv")
    labels = sorted(set(train_df["label"]))
    base = build_base(list(train_df["text"]), spec=base_spec, extra_vocab_texts=labels)
    cfg.model.base = str(base)
    timings["base"] = time.time() - t
    console.print(f"base: {base}")

    _step("4/7 QLoRA fine-tuning (4-bit NF4 base + LoRA)")
    t = time.time()
    run = train(cfg, str(out / "data" / "train.csv"), out / "run", val=str(out / "data" / "val.csv"),
                overwrite=True)
    timings["train"] = time.time() - t
    console.print(read_summary(run))

    _step("5/7 merge adapter into the full-precision base")
    t = time.time()
    merged = out / "merged"
    console.print(merge(run, merged, overwrite=True))
    timings["merge"] = time.time() - t

    _step("6/7 predict the held-out test split")
    t = time.time()
    # the config's predict.* keys; abstain below 0.5 unless a threshold was set
    pcfg = replace(cfg.predict, min_confidence=cfg.predict.min_confidence or 0.5)
    summ = predict_file(str(merged), str(out / "data" / "test.csv"), str(out / "predictions.csv"),
                        pcfg, overwrite=True)
    timings["predict"] = time.time() - t
    console.print({k: summ[k] for k in ("rows", "notes_per_s", "accuracy", "abstained") if k in summ})

    _step("7/7 evaluate: QLoRA model vs zero-shot base vs TF-IDF")
    t = time.time()
    # "after" = the QLoRA model as trained (4-bit NF4 base + adapter, not merged in memory);
    # "before" = the base zero-shot
    metrics = evaluate(str(run), str(out / "data" / "test.csv"), str(out / "report"),
                       baseline=[str(base), "tfidf"], train_data=str(out / "data" / "train.csv"),
                       cfg=replace(pcfg, merge="no"), overwrite=True)  # step 6's threshold
    timings["evaluate"] = time.time() - t
    timings["total"] = time.time() - t_all
    Console(width=max(console.width, 140)).print(_table(metrics["comparison"]))
    console.print(f"accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  "
                  f"ECE {metrics.get('ece', float('nan')):.4f}  "
                  f"semantic similarity {metrics.get('semantic_similarity', float('nan')):.4f}")
    console.print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    console.print(f"report: {(out / 'report' / 'report.html').resolve()}")
    return {"metrics": metrics, "timings": timings}
