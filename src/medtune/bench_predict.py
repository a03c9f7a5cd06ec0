"""`medtune bench predict`: label-constrained batch prediction (``Predictor``) vs the original
per-note sampled generation (``per_row_generate_baseline``), same trained model and notes, the
sides taking turns on chunks of notes.

On CPU medtune merges a run's adapter in memory (``predict.merge=auto``); the original pipeline
generated from the 4-bit base + adapter, so generation runs on that, and once more on the merged
copy. Where the merged weights are bf16 (``predict.merge_dtype=auto`` on a CPU with native bf16
matmul) the same scorer also runs with float32 weights, and generation on the merged copy uses
those, as generate mode would: the like-for-like ratio compares float32 with float32. A last
timing reads the prompts only (one distribution per note, no label tokens): no method that runs
every note through the network can beat it, so ceiling / baseline is the largest speed-up this
model and machine allow. With several thread counts every side runs at each;
each count gets its own table. Both sides' accuracy comes with a paired count of
the notes only one of them gets right and McNemar's exact p-value.

Writes ``<output>/bench_predict.json`` and ``.md`` and prints the table.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medtune.bench import _machine, _md_table, _outputs
from medtune.errors import MedtuneError
from medtune.fsutil import write_json, write_text
from medtune.progress import bench_progress


def _notes_for(labels: Sequence[str], n: int, seed: int):
    """``n`` fresh synthetic notes whose gold label is one of ``labels``."""
    import pandas as pd

    from medtune.synth import synth_protocol

    allowed, parts, got, k = set(labels), [], 0, 0
    while got < n and k < 50:
        df = synth_protocol(max(4 * n, 200), seed=seed + 1000 * k, imbalance=0.0)
        df = df[df["label"].isin(allowed)]
        parts.append(df)
        got += len(df)
        k += 1
    if got < n:
        raise MedtuneError(f"model labels {sorted(allowed)[:3]}...: no synthetic notes carry them "
                           "(pass data=FILE with text and label columns)")
    return pd.concat(parts).head(n).reset_index(drop=True)


ARCH_TRAIN_STEPS = 5  # an --arch model's QLoRA steps: its weights are random anyway


def _quick_model(work: Path, *, n_labels: int, n_train: int, base_steps: int, train_steps: int,
                 seed: int, progress: bool, arch: str | None = None, layers: int = 0) -> Path:
    """The embedded architecture, pretrained ``base_steps`` steps (cached), then QLoRA-trained
    ``train_steps`` steps on ``n_labels`` synthetic protocols. With ``arch``: that full-size
    preset, random weights, with the embedded tokenizer, QLoRA-trained ARCH_TRAIN_STEPS steps
    (it reads notes as a trained model would; it cannot classify them)."""
    from medtune.base import BaseSpec, build_base
    from medtune.config import load_config
    from medtune.synth import PROTOCOLS
    from medtune.train import train

    labels = PROTOCOLS[:n_labels]
    df = _notes_for(labels, n_train, seed)
    df.to_csv(work / "train.csv", index=False)
    base = build_base(list(df["text"]), spec=BaseSpec(steps=base_steps, seed=seed),
                      extra_vocab_texts=labels, progress=progress)  # cached
    if arch:
        from medtune.archs import arch_base

        base = arch_base(arch, work / f"base-{arch}", base, layers)
        train_steps = min(train_steps, ARCH_TRAIN_STEPS)
    cfg = load_config(None, [f"model.base={base}", "model.quantization=nf4", "lora.r=64",
                             "lora.alpha=128", "lora.dropout=0", "train.lr=2e-3",
                             "train.batch_size=16", f"train.max_steps={train_steps}",
                             "train.warmup_steps=10", "train.eval_every=0",
                             "train.eval_samples=100", "train.save_every=0", f"train.seed={seed}"])
    return train(cfg, str(work / "train.csv"), work / "run", progress=progress)


def bench_predict(output: str | Path, *, n: int = 500, model: str | None = None,
                  data: str | None = None, n_labels: int = 4, n_train: int = 2000,
                  base_steps: int = 400, train_steps: int = 250, batch_size: int = 0,
                  max_new_tokens: int = 16, temperature: float = 0.7, top_p: float = 0.9,
                  chunk: int = 100, arch: str | None = None, layers: int = 0,
                  threads: int | Sequence[int] = 1, seed: int = 0,
                  overwrite: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    """Notes/s and accuracy: constrained batch prediction vs per-note sampled generation.

    model: a run / merged directory; without one, the embedded architecture is pretrained
    ``base_steps`` steps (cached in MEDTUNE_CACHE) and QLoRA-trained ``train_steps`` steps on
    ``n_labels`` synthetic protocols (400 base steps: with 200 the 4-label model's accuracy
    ranged 0.52-0.79 over seeds, with 400 it was 0.90-0.94). data: a labelled file
    (default: ``n`` fresh synthetic notes with the model's labels). The two sides take turns on
    chunks of ``chunk`` notes.

    arch: instead of the quick model, a full-size preset (``medtune.archs``) with random weights,
    ``layers`` decoder layers if > 0: speed and memory only, its accuracy is chance. Its
    generation side stops after as many tokens as the longest label has (with EOS): a random
    model never emits EOS, and a trained one stops there at the latest.

    threads: torch's thread count, or several: the sides run once per count on the same model
    and notes (the quick model trains with the first)."""
    import torch

    from medtune.config import PredictConfig
    from medtune.generate import per_row_generate_baseline
    from medtune.predict import Predictor

    json_path, md_path = _outputs(output, "predict", overwrite)
    if n < 1 or chunk < 1:
        raise MedtuneError("n and chunk must be >= 1")
    if arch:
        from medtune.archs import arch_config

        if model:
            raise MedtuneError("give model or arch, not both")
        arch_config(arch, layers=layers)  # an unknown name fails before anything is built
    counts = [threads] if isinstance(threads, int) else list(threads)
    if not counts or min(counts) < 1:
        raise MedtuneError(f"threads must be >= 1 (got {counts})")
    before = torch.get_num_threads()
    torch.set_num_threads(counts[0])  # the quick model trains with the first count
    try:
        with tempfile.TemporaryDirectory(prefix="medtune-bench-") as tmp:
            t0 = time.time()
            path = model or str(_quick_model(Path(tmp), n_labels=n_labels, n_train=n_train,
                                             base_steps=base_steps, train_steps=train_steps,
                                             seed=seed, progress=progress, arch=arch,
                                             layers=layers))
            prep_s = time.time() - t0
            predictor = Predictor.from_path(path, cfg=PredictConfig(batch_size=batch_size))
            # the original pipeline: base (4-bit for a QLoRA run) + adapter, as trained
            original = (Predictor.from_path(path, cfg=PredictConfig(merge="no"))
                        if predictor.weights_dtype else predictor)
            if data:
                from medtune.data import load_labeled

                df = load_labeled(data, drop_empty=True).head(n)
            else:
                df = _notes_for(predictor.labels, n, seed + 1)
            texts, gold = list(df["text"]), list(df["label"])
            if arch:  # a random model never stops: at most the longest label, as trained
                max_new_tokens = max(map(len, predictor.label_ids))
            def generate(on: Predictor):
                return lambda part, k: per_row_generate_baseline(
                    on, part, temperature=temperature, top_p=top_p,
                    max_new_tokens=max_new_tokens, seed=seed + k)

            others = {"generate": generate(original)}
            exact = _float32_copy(predictor, path, batch_size)
            if exact is not None:  # what the bf16 weights buy
                others["constrained_float32"] = lambda part, k: [
                    r["prediction"] for r in exact.predict_texts(part)]
            merged_copy = exact or predictor  # generate mode's weights: float32 where it can
            if predictor.merged_dtype:  # generation on the same in-memory merge
                others["generate_merged"] = generate(merged_copy)
            runs = []
            for count in counts:  # the same model, notes and sides at each thread count
                torch.set_num_threads(count)
                sides = _predict_sides(predictor, texts, chunk, progress, others)
                runs.append(_summary(count, sides, gold, set(predictor.labels)))
            merge_check = _merge_check(predictor, original, texts[:100])
    finally:
        torch.set_num_threads(before)
    quick = "embedded base + QLoRA (quick)"
    if arch:
        shortened = f" ({layers} layer{'s' * (layers > 1)})" if layers else ""
        quick = f"{arch}{shortened}, random weights + QLoRA {ARCH_TRAIN_STEPS} steps"
    result: dict[str, Any] = {"kind": "predict", "machine": _machine(), "n": len(texts),
                              "model": model or quick, "arch": arch, "layers": layers,
                              "labels": len(predictor.labels), "threads": counts,
                              "merged_in_memory": predictor.merged_dtype is not None,
                              "merged_dtype": predictor.merged_dtype,
                              "weights_dtype": predictor.weights_dtype,
                              "generate_merged_dtype": merged_copy.merged_dtype,
                              "merge_check": merge_check,
                              "prepare_s": round(prep_s, 1), "runs": runs}
    result["settings"] = {"generate": {"temperature": temperature, "top_p": top_p,
                                       "max_new_tokens": max_new_tokens,
                                       "one note at a time": True},
                          "constrained": {"batch_size": predictor.batch_size}}
    md = _predict_markdown(result)
    write_json(json_path, result)
    write_text(md_path, md)
    print(md)
    return result


def _summary(threads: int, sides: dict[str, tuple[list[str], float]], gold: list[str],
             labels: set[str]) -> dict[str, Any]:
    """One thread count's sides: notes/s, accuracy, ratios, the ceiling, and the paired
    comparison of constrained and generated predictions."""
    n = len(gold)
    run: dict[str, Any] = {"threads": threads, "sides": {}}
    ceiling_s = sides.pop("prompt_only")[1]
    for side, (preds, seconds) in sides.items():
        run["sides"][side] = {
            "seconds": seconds, "notes_per_s": n / max(seconds, 1e-9),
            "accuracy": sum(p == g for p, g in zip(preds, gold, strict=True)) / n,
            "in_label_set": sum(p in labels for p in preds) / n}
    c, g = run["sides"]["constrained"], run["sides"]["generate"]
    run["speedup"] = c["notes_per_s"] / max(g["notes_per_s"], 1e-9)
    like = c  # the constrained side whose weights generate_merged shares
    if "constrained_float32" in run["sides"]:
        like = run["sides"]["constrained_float32"]
        run["speedup_merge_dtype"] = c["notes_per_s"] / max(like["notes_per_s"], 1e-9)
    if "generate_merged" in run["sides"]:
        gm = run["sides"]["generate_merged"]["notes_per_s"]
        run["speedup_vs_generate_merged"] = like["notes_per_s"] / max(gm, 1e-9)
        run["speedup_ceiling_vs_generate_merged"] = n / max(ceiling_s, 1e-9) / max(gm, 1e-9)
    run["accuracy_gain"] = c["accuracy"] - g["accuracy"]
    run["paired"] = paired_counts(sides["constrained"][0], sides["generate"][0], gold)
    run["prompt_only"] = {"seconds": ceiling_s, "notes_per_s": n / max(ceiling_s, 1e-9)}
    run["speedup_ceiling"] = run["prompt_only"]["notes_per_s"] / max(g["notes_per_s"], 1e-9)
    return run


def paired_counts(a: Sequence[str], b: Sequence[str], gold: Sequence[str]) -> dict[str, Any]:
    """Notes only ``a`` gets right, notes only ``b`` gets right, and the exact two-sided
    McNemar p-value (binomial, p = 1/2, on the discordant notes): how likely a gap at least
    this large is when the two are equally accurate."""
    only_a = sum(x == g != y for x, y, g in zip(a, b, gold, strict=True))
    only_b = sum(y == g != x for x, y, g in zip(a, b, gold, strict=True))
    k, m = min(only_a, only_b), only_a + only_b
    p = min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m) if m else 1.0
    return {"only_constrained": only_a, "only_generate": only_b, "mcnemar_p": p}


def _float32_copy(predictor, path: str, batch_size: int):
    """Where ``predictor``'s merged or cast weights are not float32, the same model with float32
    weights; None otherwise, or when that merged copy does not fit (``predict.merge=auto``
    declined)."""
    from medtune.config import PredictConfig
    from medtune.predict import Predictor

    if predictor.weights_dtype in (None, "float32"):
        return None
    exact = Predictor.from_path(path, cfg=PredictConfig(batch_size=batch_size,
                                                        merge_dtype="float32"))
    if predictor.merged_dtype is None:  # cast only: float32 leaves the float32 layers as loaded
        return exact
    return exact if exact.merged_dtype == "float32" else None


def _merge_check(merged, original, texts: list[str]) -> dict[str, Any] | None:
    """How far the in-memory merged model's label log-probabilities are from base + adapter's
    (bitsandbytes' eval kernel on CPU) on ``texts``; None when nothing was merged."""
    if merged is original:
        return None
    a, b = merged.scores(texts), original.scores(texts)
    return {"notes": len(texts), "max_abs_logprob_diff": float((a - b).abs().max()),
            "same_prediction": float((a.argmax(1) == b.argmax(1)).float().mean())}


def _predict_sides(predictor, texts: list[str], chunk: int, progress: bool,
                   others: dict[str, Any]) -> dict[str, tuple[list[str], float]]:
    """Each side on each chunk of notes, the sides' order rotating chunk by chunk."""
    from medtune.scoring import score_tree

    eos = [[predictor.tokenizer.eos_token_id]]

    def prompt_only(part: list[str], k: int) -> list[str]:
        """Every prompt through the model once (same batches, shared-prefix cache, LM head at
        the last position), scoring a single one-token label: the floor of any scorer."""
        memo: dict[tuple[int, ...], Any] = {}  # as Predictor.scores does
        predictor.batched(lambda b: list(score_tree(predictor.model, b, eos,
                                                    predictor.tokenizer.pad_token_id, memo)),
                          predictor.prompts(part, 1))
        return []

    run = {"constrained": lambda part, k: [r["prediction"] for r in predictor.predict_texts(part)],
           **others, "prompt_only": prompt_only}
    preds: dict[str, list[str]] = {s: [] for s in run}
    seconds = dict.fromkeys(run, 0.0)
    names = list(run)
    with bench_progress("bench predict notes", disable=not progress) as bar:
        task = bar.add_task("notes", total=len(texts))
        for k, start in enumerate(range(0, len(texts), chunk)):
            part = texts[start:start + chunk]
            for side in names[k % len(names):] + names[:k % len(names)]:
                t = time.perf_counter()
                out = run[side](part, k)
                seconds[side] += time.perf_counter() - t
                preds[side] += out
            bar.update(task, completed=min(len(texts), start + chunk))
    return {s: (preds[s], seconds[s]) for s in preds}


def _predict_markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    head = (f"## medtune bench predict\n\n{r['n']} notes, {r['labels']} labels, model: "
            f"{r['model']}; {m.get('cpus')} CPUs"
            f"{', ' + m['gpu'] if m.get('gpu') else ''}, load average {m.get('load_avg_1m')}. "
            "Sides alternate on chunks of notes.\n")
    merged, cast = r.get("merged_in_memory"), r.get("weights_dtype")
    names = {"constrained": "constrained batch scoring (medtune)"
                            + (f", adapter merged in memory ({r.get('merged_dtype')} weights)"
                               if merged else f", linear layers cast to {cast}" if cast else ""),
             "constrained_float32": "the same with float32 weights (predict.merge_dtype=float32)",
             "generate": "per-note sampled generation (original)"
                         + (", 4-bit base + adapter" if merged else ""),
             "generate_merged": "per-note sampled generation on the merged copy "
                                f"({r.get('generate_merged_dtype')} weights)"}
    text = head + "".join(_run_markdown(run, r, names) for run in r["runs"])
    check = r.get("merge_check")
    if check and not merged:
        text += (f"\nmedtune cast the model's linear layers to {cast} in memory. On the first "
                 f"{check['notes']} notes its label log-probabilities differ from the float32 "
                 f"model's by at most {check['max_abs_logprob_diff']:.3g}; same prediction for "
                 f"{check['same_prediction']:.0%} of them.\n")
    elif check:
        text += ("\nmedtune merged the run's adapter into a dequantized float copy of its base in "
                 "memory (predict.merge=auto, CPU). On the first "
                 f"{check['notes']} notes its label log-probabilities differ from base + adapter's "
                 f"by at most {check['max_abs_logprob_diff']:.3g}; same prediction for "
                 f"{check['same_prediction']:.0%} of them.\n")
    if r.get("arch"):
        gen = r["settings"]["generate"]["max_new_tokens"]
        text += (f"\n{r['arch']} with random weights: speed only, the accuracy is chance. "
                 f"Generation stops after {gen} new tokens (the longest label with EOS) on every "
                 "note; a trained model stops there at the latest and earlier on shorter labels, "
                 "so the speed-up is an upper bound.\n")
    return text + ("\nCeiling: reading the prompts alone, each once, no labels; no scorer that runs every "
                   "note through this model on this machine can go faster.\n")


def _run_markdown(run: dict[str, Any], r: dict[str, Any], names: dict[str, str]) -> str:
    """One thread count's table and ratios."""
    rows = [[names[s], v["notes_per_s"], v["accuracy"], v["in_label_set"], v["seconds"]]
            for s, v in run["sides"].items()]
    t = run["threads"]
    text = (f"\n### {t} thread{'s' * (t > 1)}\n\n"
            + _md_table(["side", "notes/s", "accuracy", "in label set", "seconds"], rows)
            + f"\nspeed-up x{run['speedup']:.1f}")
    if "speedup_vs_generate_merged" in run:
        text += (" against the original pipeline (4-bit base + adapter), "
                 f"x{run['speedup_vs_generate_merged']:.1f} against generation on the merged copy "
                 f"(like for like: both with {r.get('generate_merged_dtype')} weights)")
    pair = run["paired"]
    text += (f"; accuracy {run['accuracy_gain']:+.3f} (constrained minus generation: "
             f"{pair['only_constrained']} notes right only when constrained, "
             f"{pair['only_generate']} only when generated, McNemar p = {pair['mcnemar_p']:.2g})\n")
    if "speedup_merge_dtype" in run:
        text += (f"\n{r['weights_dtype']} weights (predict.merge_dtype=auto: this CPU multiplies "
                 f"bf16 natively): x{run['speedup_merge_dtype']:.2f} the notes/s of float32 "
                 "weights. " + ("Generation on the merged copy uses float32 weights, as generate "
                                "mode does.\n" if r.get("merged_in_memory") else
                                "Generation uses the float32 model as loaded.\n"))
    ceiling = run["prompt_only"]
    text += (f"\nCeiling (prompts alone): {ceiling['notes_per_s']:,.0f} notes/s, x{run['speedup_ceiling']:.1f} "
             "the generation side")
    if "speedup_ceiling_vs_generate_merged" in run:
        text += f" (x{run['speedup_ceiling_vs_generate_merged']:.1f} generation on the merged copy)"
    return text + ".\n"
