"""`medtune ablate`: quantization x adaptation grid under one training budget.

Every cell starts from the same base model and is trained with the same steps, batch size and
learning rate as the other cells of its adaptation kind (LoRA cells share ``train.lr``; full
fine-tuning cells share ``full_lr``, default train.lr / 10 because every weight moves), then
measured by ``measure.measure_isolated`` on the same test file in a fresh process (own peak
memory). Cells that cannot run are recorded, not hidden:

- full fine-tuning of a quantized model: 4-/8-bit weights receive no gradients;
- a quantization whose bitsandbytes kernels fail on this device (probed on one small layer).

Output directory: ``ablation.json`` (settings + one row per cell), ``ablation.md`` (the table),
``report.html`` / ``report.md`` / ``metrics.json`` / ``comparison.json`` (``report.write_report``)
and ``ablation_accuracy.png``; each trained cell's run directory under ``cells/``. A line per
finished cell goes to stderr; Ctrl-C writes the cells measured so far (the rest "not run:
interrupted") before stopping.
"""

from __future__ import annotations

import copy
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medtune.config import Config, PredictConfig
from medtune.errors import ConfigError, MedtuneError, describe, first_line
from medtune.fsutil import atomic_dir, check_output_dir, write_json, write_text

QUANTIZATIONS = ("none", "8bit", "nf4")
ADAPTATIONS = ("zero-shot", "lora", "full")
FULL_LR_FACTOR = 0.1  # full fine-tuning default lr = train.lr x this
TABLE_COLUMNS = ["cell", "status", "accuracy", "macro_f1", "size_mb", "bits_per_param",
                 "quantized_bits_per_param", "peak_memory_mb", "model_memory_mb",
                 "latency_p50_ms", "train_seconds"]


def quantization_unavailable(quantization: str, device: str) -> str | None:
    """Why ``quantization`` cannot run on ``device`` (None when it can): one small bitsandbytes
    layer is quantized, run forward and backward, as LoRA training would."""
    if quantization == "none":
        return None
    try:
        import bitsandbytes as bnb
        import torch
    except ImportError as exc:
        return f"bitsandbytes is not installed ({exc})"
    try:
        if quantization == "8bit":
            layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32,
                                      quant_type="nf4")
        layer = layer.to(device)
        x = torch.randn(2, 64, device=device, requires_grad=True)
        layer(x).sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            return f"{quantization} kernels gave no usable gradient on {device}"
    except Exception as exc:  # any kernel failure means: this cell cannot run here
        return f"bitsandbytes {quantization} fails on {device}: {describe(exc)}"
    return None


def _check_grid(quantizations: Sequence[str], adaptations: Sequence[str], steps: int) -> None:
    bad_q = [q for q in quantizations if q not in QUANTIZATIONS]
    bad_a = [a for a in adaptations if a not in ADAPTATIONS]
    if bad_q:
        raise ConfigError(f"quantizations: unknown {bad_q} "
                          f"(choose from {', '.join(QUANTIZATIONS)})")
    if bad_a:
        raise ConfigError(f"adaptations: unknown {bad_a} (choose from {', '.join(ADAPTATIONS)})")
    if not quantizations or not adaptations:
        raise ConfigError("ablation grid is empty: give at least one quantization and adaptation")
    if steps < 1:
        raise ConfigError(f"steps: must be >= 1, got {steps}")


def _test_file(data: str, test: str | None) -> str:
    if test:
        return test
    sibling = Path(data).with_name("test.csv")
    if sibling.is_file() and sibling.resolve() != Path(data).resolve():
        return str(sibling)
    raise MedtuneError(f"{data}: no --test file given and no test.csv next to it")


def _resolve_base(cfg: Config, data: str, labels: list[str], progress: bool) -> str:
    """The one base every cell starts from ('embedded' is built once from the training notes)."""
    if cfg.model.base != "embedded":
        return cfg.model.base
    from medtune.base import build_base
    from medtune.data import load_labeled

    texts = list(load_labeled(data, task=cfg.data.task, drop_empty=True,
                              text_column=cfg.data.text_column, cop_base=cfg.data.cop_base)["text"])
    return str(build_base(texts, extra_vocab_texts=labels, progress=progress))


def _cell_config(cfg: Config, base: str, quantization: str, adaptation: str, steps: int,
                 full_lr: float) -> Config:
    c = copy.deepcopy(cfg)
    c.model.base = base
    c.model.quantization = quantization
    c.lora.enabled = adaptation == "lora"
    c.train.max_steps = steps
    c.train.save_every = 0  # one checkpoint at the end; the budget is the same for every cell
    if adaptation == "full":
        c.train.lr = full_lr
    return c


def _measured_row(m: dict[str, Any], gold: list[str], train_seconds: float) -> dict[str, Any]:
    from medtune.measure import summary_row
    from medtune.metrics import classification_metrics

    preds = [r["prediction"] for r in m["rows"]]
    conf = [r["confidence"] for r in m["rows"]]
    metrics = classification_metrics(gold, preds, conf, m["labels"])
    row = summary_row("", m, metrics)
    row.pop("model")
    row.update(status="ok", ece=round(metrics["ece"], 4), train_seconds=round(train_seconds, 2))
    return row


def _run_cell(cfg: Config, data: str, val: str | None, cell_dir: Path, base: str,
              labels_file: Path, texts: list[str], gold: list[str], quantization: str,
              adaptation: str, progress: bool) -> dict[str, Any]:
    from medtune.measure import measure_isolated
    from medtune.train import train

    task = cfg.data.task
    # each cell is measured in the precision it was trained in: no in-memory merge
    pcfg = PredictConfig(batch_size=cfg.predict.batch_size, merge="no")
    if adaptation == "zero-shot":
        m = measure_isolated(model=base, texts=texts, labels=str(labels_file), task=task,
                             cfg=pcfg, quantization=quantization)
        return _measured_row(m, gold, 0.0)
    t0 = time.perf_counter()
    run_dir = train(cfg, data, cell_dir, val=val, overwrite=True, progress=progress)
    train_seconds = time.perf_counter() - t0
    shutil.rmtree(Path(run_dir) / "checkpoints", ignore_errors=True)  # resume state, not model
    m = measure_isolated(model=str(run_dir), texts=texts, labels=None, task=task, cfg=pcfg)
    return _measured_row(m, gold, train_seconds)


def ablate(data: str, output: str, *, val: str | None = None, test: str | None = None,
           base: str = "embedded", steps: int = 100,
           quantizations: Sequence[str] = ("none", "8bit", "nf4"),
           adaptations: Sequence[str] = ("zero-shot", "lora", "full"),
           overwrite: bool = False, cfg: Config | None = None, full_lr: float | None = None,
           progress: bool = True) -> list[dict[str, Any]]:
    """Train and measure every (quantization, adaptation) cell; returns one row per cell.

    ``data``: training file (``val``: validation file, else held out of ``data``; ``test``:
    test file, else test.csv next to ``data``). ``cfg``: base configuration (task, batch size,
    lr, LoRA rank, ...); ``steps`` optimizer steps per trained cell; ``full_lr``: learning rate
    of full fine-tuning (default cfg.train.lr x 0.1). A row's ``status`` is "ok",
    "skipped: <reason>" or "failed: <error>"."""
    from medtune.data import load_labeled
    from medtune.model import resolve_device

    cfg = copy.deepcopy(cfg) if cfg is not None else Config()
    if base != "embedded":
        cfg.model.base = base
    quantizations, adaptations = list(quantizations), list(adaptations)
    _check_grid(quantizations, adaptations, steps)
    test_path = _test_file(data, test)
    task = cfg.data.task
    text_column, label_column = cfg.data.text_column, cfg.data.label_column
    test_df = load_labeled(test_path, task=task, text_column=text_column, label_column=label_column,
                           cop_base=cfg.data.cop_base)
    texts, gold = list(test_df["text"]), list(test_df["label"])
    train_df = load_labeled(data, task=task, drop_empty=True, text_column=text_column,
                            label_column=label_column, cop_base=cfg.data.cop_base)
    train_labels = sorted(set(train_df["label"]))
    labels = ["A", "B", "C", "D"] if task == "mcqa" else train_labels
    check_output_dir(output, overwrite, inputs=[data, val, test_path, cfg.model.base])  # before training
    device = resolve_device(cfg.model.device)
    full_lr = full_lr if full_lr is not None else cfg.train.lr * FULL_LR_FACTOR
    base_dir = _resolve_base(cfg, data, labels, progress)
    unavailable = {q: quantization_unavailable(q, device) for q in quantizations}
    settings = {"data": str(data), "val": val, "test": test_path, "test_rows": len(texts),
                "task": task, "base": base_dir, "device": device, "steps": steps,
                "batch_size": cfg.train.batch_size, "lora_lr": cfg.train.lr, "full_lr": full_lr,
                "lora_r": cfg.lora.r, "lora_alpha": cfg.lora.alpha, "seed": cfg.train.seed}
    rows: list[dict[str, Any]] = []
    grid = [(q, a) for q in quantizations for a in adaptations]
    interrupted = False
    # the output directory appears complete or not at all (cells train inside the temp dir);
    # Ctrl-C writes the cells measured so far, the others marked "not run: interrupted"
    with atomic_dir(output) as out:
        labels_file = out / "labels.json"
        write_json(labels_file, {"task": task, "labels": labels})
        for i, (q, a) in enumerate(grid, 1):
            row: dict[str, Any] = {"cell": f"{q} / {a}", "quantization": q, "adaptation": a}
            rows.append(row)
            if interrupted:
                row["status"] = "not run: interrupted"
                continue
            if a == "full" and q != "none":
                row["status"] = ("skipped: full fine-tuning needs unquantized weights "
                                 f"({q} weights receive no gradients)")
            elif unavailable[q]:
                row["status"] = f"skipped: {unavailable[q]}"
            else:
                c = _cell_config(cfg, base_dir, q, a, steps, full_lr)
                try:
                    row.update(_run_cell(c, data, val, out / "cells" / f"{q}-{a}",
                                         base_dir, labels_file, texts, gold, q, a, progress))
                except (MedtuneError, RuntimeError, ValueError, OSError) as exc:
                    row["status"] = f"failed: {first_line(exc)}"
                    shutil.rmtree(out / "cells" / f"{q}-{a}", ignore_errors=True)
                except KeyboardInterrupt:
                    interrupted = True
                    row["status"] = "not run: interrupted"
                    shutil.rmtree(out / "cells" / f"{q}-{a}", ignore_errors=True)
            if progress:
                print(f"ablate: cell {i}/{len(grid)} {row['cell']}: {_cell_summary(row)}",
                      file=sys.stderr, flush=True)
        _write(out, settings, rows)
    if interrupted:
        done = sum(r["status"] == "ok" for r in rows)
        print(f"ablate: interrupted; {done} measured cell(s) written to {output}",
              file=sys.stderr, flush=True)
        raise KeyboardInterrupt
    return rows


def _cell_summary(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return str(row["status"])
    return f"accuracy {row.get('accuracy', float('nan')):.4g}, trained in " \
           f"{row.get('train_seconds', 0):.1f} s"


def _cell_text(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def table_markdown(rows: list[dict[str, Any]]) -> str:
    """The ablation table as Markdown (one line per cell, skipped cells with their reason)."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(_cell_text(r.get(c)) for c in TABLE_COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _write(out: Path, settings: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    from medtune import report

    ok = [r for r in rows if r.get("status") == "ok"]
    write_json(out / "ablation.json", {"settings": settings, "cells": rows})
    budget = (f"Same budget per adaptation kind: {settings['steps']} steps, batch "
              f"{settings['batch_size']}, LoRA lr {settings['lora_lr']:g} (r={settings['lora_r']}),"
              f" full fine-tuning lr {settings['full_lr']:g}; device {settings['device']}; "
              f"test rows {settings['test_rows']}.")
    memory = ("Peak memory: each cell measured in its own process (CUDA max allocated, or the "
              "process's peak RSS on CPU, Python + torch runtime included); model memory = peak "
              "minus the resident set before loading. Train seconds: wall time of train() "
              "(load + steps + final validation + save).")
    write_text(out / "ablation.md", "# medtune ablation\n\n" + budget + "\n\n" + memory
               + "\n\n" + table_markdown(rows))
    comparison = [{"model": r["cell"], **{k: v for k, v in r.items() if k != "cell"}}
                  for r in rows]
    images = {}
    if ok:
        images["ablation_accuracy"] = report.comparison_png(
            [{"model": r["cell"], "accuracy": r["accuracy"]} for r in ok], "accuracy")
    notes = [budget, memory] + [f"{r['cell']}: {r['status']}" for r in rows
                                if r.get("status") != "ok"]
    report.write_report(out, title="medtune ablation: quantization x adaptation",
                        metrics={"settings": settings}, comparison=comparison,
                        images=images, notes=notes)
