"""bf16 vs float32 merged weights on this CPU: constrained scoring and per-note generation.

    .venv/bin/python benchmarks/merge_dtype.py RUN_DIR [--n 300] [--threads 1]

Loads the run twice, merged in memory with ``predict.merge_dtype=bfloat16`` and ``float32``,
and times both on the same synthetic notes (the run's labels), the two taking turns on chunks.
Prints notes/s for each and the ratio bf16 / float32, for scoring (``predict_texts``) and for
sampled generation one note at a time (``per_row_generate_baseline``, n/5 notes), plus how far
apart the two scorings are. This is the measurement behind ``predict.merge_dtype=auto``
(bf16 for scoring, float32 for generation).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from medtune.bench_predict import _notes_for
from medtune.config import PredictConfig
from medtune.generate import per_row_generate_baseline
from medtune.predict import Predictor


def _alternate(fns: dict, texts: list[str], chunk: int) -> dict[str, float]:
    seconds = dict.fromkeys(fns, 0.0)
    names = list(fns)
    for k, start in enumerate(range(0, len(texts), chunk)):
        part = texts[start:start + chunk]
        for name in names[k % 2:] + names[:k % 2]:
            t = time.perf_counter()
            fns[name](part, k)
            seconds[name] += time.perf_counter() - t
    return {name: len(texts) / s for name, s in seconds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a run directory (LoRA adapter on a 4-bit base)")
    ap.add_argument("--n", type=int, default=300, help="notes scored (generation: n/5)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    labels = json.loads((Path(args.run) / "labels.json").read_text())["labels"]
    texts = list(_notes_for(labels, args.n, seed=7)["text"])
    models = {d: Predictor.from_path(args.run, cfg=PredictConfig(merge="yes", merge_dtype=d))
              for d in ("bfloat16", "float32")}
    for p in models.values():
        p.predict_texts(texts[:20])  # warm-up: kernels for the common shapes
    scoring = _alternate({d: (lambda part, k, p=p: p.predict_texts(part))
                          for d, p in models.items()}, texts, 50)
    generation = _alternate({d: (lambda part, k, p=p: per_row_generate_baseline(
        p, part, temperature=0.7, top_p=0.9, max_new_tokens=16, seed=k))
        for d, p in models.items()}, texts[:max(2, args.n // 5)], 10)
    a, b = (models[d].scores(texts[:100]) for d in ("bfloat16", "float32"))
    print(f"{args.threads} thread(s), {len(texts)} notes, {len(labels)} labels")
    for name, r in (("scoring", scoring), ("generation", generation)):
        print(f"{name:10s} bf16 {r['bfloat16']:7.1f} notes/s  float32 {r['float32']:7.1f}  "
              f"ratio x{r['bfloat16'] / r['float32']:.2f}")
    print(f"label log-probabilities, first 100 notes: max |bf16 - float32| "
          f"{float((a - b).abs().max()):.3g}; same prediction "
          f"{float((a.argmax(1) == b.argmax(1)).float().mean()):.0%}")


if __name__ == "__main__":
    main()
