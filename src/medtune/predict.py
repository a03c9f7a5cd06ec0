"""`medtune predict`: label-constrained scoring (or free generation) over texts and files.

Constrained mode scores every allowed label as a continuation of the prompt (``medtune.scoring``)
and takes a softmax over the L label scores, so the prediction is always one of the labels and
``confidence`` is its probability among them. Rows under ``min_confidence`` are flagged
``abstained`` (best guess still given) for human review.

MCQA is scored exactly as lm-eval-harness scores a ``multiple_choice`` task (``choice_ids``):
trailing whitespace of the prompt ("Answer: ") moves into each choice, prompt + " A" is encoded
as one string and split at the prompt's token count, and the choice's tokens (no EOS) are
scored. Tokens shared by all four choices are moved back into the prompt: each choice gets the
same log-probability for them, so the argmax and the softmax over choices are unchanged.

Files are streamed in chunks of ``chunk_rows`` rows (CSV/TSV via pandas chunks, Parquet via
record batches, JSONL by lines) and written chunk by chunk to a temporary file that is renamed
onto the output at the end: memory stays flat, and a failure leaves no partial output.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from medtune.config import ModelConfig, PredictConfig
from medtune.errors import ConfigError, MedtuneError
from medtune.fsutil import atomic_file, check_output_file, read_json
from medtune.generate import generate_batch, generation_rows, per_row_generate_baseline
from medtune.model import Loaded, load_for_inference, model_device
from medtune.predict_io import ChunkWriter, iter_records, output_format, progress_bar, rows_frame
from medtune.scoring import check_head, label_rows, truncate_prompt

__all__ = ["Predictor", "per_row_generate_baseline", "predict_file"]

AUTO_BATCH = {"cpu": 16, "cuda": 64}  # first batch size when predict.batch_size = 0; halved on OOM
MODES = ("constrained", "generate")
MERGE_MODES = ("auto", "yes", "no")
MERGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # + "auto"


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text \
        or "can't allocate memory" in text


class Predictor:
    """Loaded model + template + labels; the one object predict, serve, registry and spark use."""

    def __init__(self, loaded: Loaded, cfg: PredictConfig | None = None, *, snap: bool = False):
        self.loaded = loaded
        self.cfg = cfg = cfg or PredictConfig()
        self.snap = snap
        if cfg.mode not in MODES:
            raise ConfigError(f"predict.mode: unknown '{cfg.mode}' (constrained, generate)")
        if not 0.0 <= cfg.min_confidence <= 1.0:
            raise ConfigError(f"predict.min_confidence must be in [0, 1], got {cfg.min_confidence}")
        _check_merge(cfg)
        if cfg.top_k < 0 or cfg.batch_size < 0 or cfg.max_new_tokens < 1:
            raise ConfigError("predict.top_k and predict.batch_size must be >= 0, "
                              "predict.max_new_tokens >= 1")
        self.labels: list[str] = list(loaded.labels)
        tok, template = loaded.tokenizer, loaded.template
        if template.task == "mcqa":  # the letter's own tokens, no EOS (scoring: choice_ids)
            self.label_ids = [list(tok(lab, add_special_tokens=False)["input_ids"])
                              for lab in self.labels]
        else:  # the exact sequence the model was trained to emit: label tokens + EOS
            self.label_ids = [template.answer_ids(tok, lab) for lab in self.labels]
        self.device = model_device(loaded.model)
        self.batch_size = cfg.batch_size or AUTO_BATCH.get(self.device.type, 16)
        self.context_limit = _context_limit(loaded)
        self.merged_dtype: str | None = None  # weights merged in memory, e.g. 'bfloat16'; from_path
        self.weights_dtype: str | None = None  # linear weights merged or cast at load; from_path

    @classmethod
    def from_path(cls, path: str, *, labels: str | None = None, task: str = "protocol",
                  model_cfg: ModelConfig | None = None, cfg: PredictConfig | None = None,
                  snap: bool = False, quantization: str | None = None) -> Predictor:
        """A run directory, a merged model directory, or a plain base (+ ``labels``); a run's
        adapter is merged in memory as ``cfg.merge`` says (a model passed to ``Predictor(...)``
        directly is used as it is)."""
        _check_merge(cfg or PredictConfig())  # before the (slow) load
        loaded = load_for_inference(path, model_cfg, labels=labels, task=task,
                                    quantization=quantization)
        predictor = cls(loaded, cfg, snap=snap)
        cfg = predictor.cfg
        generate = cfg.mode == "generate"
        merged = merge_in_memory(loaded.model, cfg.merge, cfg.merge_dtype, generate=generate)
        cast = None if merged else cast_in_memory(loaded.model, cfg.merge, cfg.merge_dtype,
                                                  generate=generate)
        predictor.merged_dtype = _dtype_name(merged)
        predictor.weights_dtype = _dtype_name(merged or cast)
        if not generate:  # constrained scoring computes the head itself
            check_head(loaded.model)
        return predictor

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def template(self):
        return self.loaded.template

    @property
    def task(self) -> str:
        return self.loaded.template.task

    # ------------------------------------------------------------------------------ internals
    def prompts(self, texts: Sequence[str], reserve: int) -> list[list[int]]:
        """Prompt token ids, the middle of over-long notes cut so ``reserve`` tokens still fit.
        MCQA: the context training and scoring put before the letter (``choice_ids``: the answer
        cue's trailing space goes with the letter, " A" being one token in most tokenizers)."""
        limit = None if self.context_limit is None else max(8, self.context_limit - reserve)
        if self.task == "mcqa":
            from medtune.tasks.mcqa import choice_ids

            ids = [choice_ids(self.tokenizer, self.template, t, self.labels)[0] for t in texts]
        else:
            ids = self.template.prompts_ids(self.tokenizer, list(texts))
        return [truncate_prompt(x, limit) for x in ids]

    def batched(self, fn: Callable[[list[list[int]]], list[Any]],
                 prompts: list[list[int]]) -> list[Any]:
        """Apply ``fn`` to batches of prompts sorted by length (less padding), halving the batch
        size on out-of-memory; results come back in input order."""
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        results: list[Any] = [None] * len(prompts)
        start = 0
        while start < len(order):
            idx = order[start:start + self.batch_size]
            try:
                out = fn([prompts[i] for i in idx])
            except (RuntimeError, torch.OutOfMemoryError) as exc:
                if not _is_oom(exc) or self.batch_size == 1:
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.batch_size = max(1, self.batch_size // 2)
                continue
            for i, value in zip(idx, out, strict=True):
                results[i] = value
            start += len(idx)
        return results

    # ------------------------------------------------------------------------------ scoring
    def scores(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, L] log-likelihood of each label after each text's prompt."""
        if not texts:
            return torch.zeros((0, len(self.labels)))
        memo: dict[tuple[int, ...], Any] = {}  # the shared prompt prefix runs once per call
        rows = label_rows(self.model, self.tokenizer, self.template, texts, self.labels,
                          self.label_ids, self.context_limit, self.batched, memo)
        out = torch.stack(rows).float()
        if torch.isnan(out).any():
            raise MedtuneError("the model produced NaN label scores (fp16 overflow? set "
                               "model.compute_dtype=float32 or bfloat16)")
        return out

    def probabilities(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, L] softmax over the labels' log-likelihoods: each row sums to 1."""
        return self.scores(texts).softmax(-1)

    def generate(self, texts: Sequence[str]) -> list[str]:
        """Raw generated answers (greedy when temperature == 0), batched with left padding."""
        cfg = self.cfg
        prompts = self.prompts(texts, cfg.max_new_tokens)
        return self.batched(lambda b: generate_batch(
            self.model, self.tokenizer, b, max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, top_p=cfg.top_p), prompts)

    def predict_texts(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """One dict per text: prediction, confidence, abstained, top_k ([[label, prob], ...]);
        generate mode adds raw_output and in_label_set (and snapped when snapping).
        A blank text is always flagged abstained."""
        texts = [_valid_text(t) for t in texts]
        if self.cfg.mode == "generate":
            rows = generation_rows(self.generate(texts), self.labels, self.snap)
        else:
            rows = self._constrained_rows(self.probabilities(texts))
        for row, text in zip(rows, texts, strict=True):
            if not text.strip():
                row["abstained"] = True
        return rows

    def _constrained_rows(self, probs: torch.Tensor) -> list[dict[str, Any]]:
        k = min(self.cfg.top_k, len(self.labels))
        top_p, top_i = probs.sort(dim=-1, descending=True, stable=True)  # ties: label order
        rows = []
        for p_row, i_row in zip(top_p.tolist(), top_i.tolist(), strict=True):
            confidence = p_row[0]
            rows.append({"prediction": self.labels[i_row[0]], "confidence": confidence,
                         "abstained": confidence < self.cfg.min_confidence,
                         "top_k": [[self.labels[i], p] for i, p in zip(i_row[:k], p_row[:k],
                                                                        strict=True)]})
        return rows


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _check_merge(cfg: PredictConfig) -> None:
    if cfg.merge not in MERGE_MODES:
        raise ConfigError(f"predict.merge: unknown '{cfg.merge}' (auto, yes, no)")
    if cfg.merge_dtype != "auto" and cfg.merge_dtype not in MERGE_DTYPES:
        raise ConfigError(f"predict.merge_dtype: unknown '{cfg.merge_dtype}' (auto, float32, bfloat16)")


def merged_weight_dtype(model, name: str, *, generate: bool = False) -> torch.dtype:
    """``predict.merge_dtype`` for this model: 'auto' = bfloat16 for batched scoring with a
    float32 model on a CPU with native bf16 matmul, else the model's own dtype. Generation feeds
    one token at a time, where the casts cost more than bf16 saves (0.73-0.91x the notes/s of
    float32 weights on an AVX512-BF16 CPU, ``benchmarks/merge_dtype.py``)."""
    from medtune.merge import float_dtype, native_bf16_matmul

    if name != "auto":
        return MERGE_DTYPES[name]
    own = float_dtype(model)
    cpu_bf16 = model_device(model).type == "cpu" and own == torch.float32 and native_bf16_matmul()
    return torch.bfloat16 if cpu_bf16 and not generate else own


def merge_in_memory(model, mode: str, dtype: str = "auto", *,
                    generate: bool = False) -> torch.dtype | None:
    """``predict.merge``: fold a loaded run's LoRA adapter, and its 4-/8-bit base, into plain
    layers (``medtune.merge.fold_in_memory``) whose weights are in ``dtype``
    (``predict.merge_dtype``). 'auto' does it only on CPU, in a float32 model, with an adapter
    whose merged weights fit in a quarter of the free memory: on a GPU the 4-bit base saves
    memory and its kernels are fast. Returns the merged weights' dtype; None when nothing was
    merged."""
    if mode == "no" or (mode == "auto" and not hasattr(model, "peft_config")):
        return None
    from medtune.merge import available_memory, float_dtype, fold_blocker, fold_bytes, fold_in_memory

    weights = merged_weight_dtype(model, dtype, generate=generate)
    if mode == "auto":
        free = available_memory()
        if model_device(model).type != "cpu" or float_dtype(model) != torch.float32 \
                or fold_blocker(model) is not None \
                or fold_bytes(model, weights) > (free if free is not None else 2**33) // 4:
            return None
    return weights if fold_in_memory(model, weights) else None


def cast_in_memory(model, mode: str, dtype: str = "auto", *,
                   generate: bool = False) -> torch.dtype | None:
    """``predict.merge_dtype`` for a model without an adapter whose layers are plain float
    linears (a merged model directory, a float base): unless ``mode`` is 'no', store the
    transformer body's linear layers in that dtype when it differs from the model's (auto:
    bfloat16 for constrained scoring of a float32 model on a CPU with native bf16 matmul).
    Returns the new dtype; None when nothing changed."""
    if mode == "no" or hasattr(model, "peft_config"):
        return None
    from medtune.merge import cast_linears, float_dtype

    weights = merged_weight_dtype(model, dtype, generate=generate)
    if weights == float_dtype(model):
        return None
    return weights if cast_linears(model, weights) else None


def _valid_text(text: Any) -> str:
    """``str(text)`` that tokenizers accept: lone UTF-16 surrogates (a JSON "\\ud800" escape,
    e.g. in a request to ``serve``) become U+FFFD instead of crashing the tokenizer."""
    text = str(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text


def _context_limit(loaded: Loaded) -> int | None:
    """Tokens a prompt plus its answer may use: the training max_length of a run, else the
    model's position limit."""
    train = (loaded.meta.get("config") or {}).get("train") or {}
    if train.get("max_length"):
        return int(train["max_length"])
    limit = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


# ---------------------------------------------------------------------------------- files
ChunkFn = Callable[[list[str]], list[dict[str, Any]]]


def model_task(model: str | Path) -> str | None:
    """The task a run or merged directory was trained for (None for a plain base)."""
    for name in ("medtune.json", "labels.json"):
        p = Path(model) / name
        if p.is_file():
            meta = read_json(p)
            if isinstance(meta, dict) and meta.get("task"):
                return str(meta["task"])
    return None


def resolve_task(model: str | Predictor, task: str | None) -> str:
    """``task`` None: the model's own task (a plain base: 'protocol'). An explicit task the
    model was not trained for is an error, 'protocol' included."""
    own = model.task if isinstance(model, Predictor) else model_task(model)
    if task is None:
        return own or "protocol"
    if own is None or own == task:
        return task
    raise ConfigError(f"task '{task}' given, but {_model_name(model)} was trained for '{own}'")


def _model_name(model: str | Predictor) -> str:
    return model.loaded.path if isinstance(model, Predictor) else str(model)


def predict_file(model: str | Predictor, data: str, output: str, cfg: PredictConfig, *,
                 labels: str | None = None, task: str | None = None,
                 text_column: str | None = None, label_column: str | None = None,
                 keep_text: bool = False, engine: str = "local", overwrite: bool = False,
                 snap: bool = False, cop_base: int = 0, model_cfg: ModelConfig | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Predict every row of ``data`` into ``output`` (.csv or .parquet); returns a summary
    (rows, seconds, notes_per_s, abstained, outside_label_set, accuracy when gold is present).

    ``model``: a run / merged / plain-base directory, or a loaded ``Predictor`` (its own cfg).
    ``engine="spark"`` runs the model in a Spark session (``medtune.spark``)."""
    if engine == "spark":
        if isinstance(model, Predictor):
            raise MedtuneError("engine=spark needs a model path, not a loaded Predictor")
        from medtune.spark import predict_file_spark

        return predict_file_spark(model, data, output, cfg, labels=labels, task=task,
                                  text_column=text_column, label_column=label_column,
                                  keep_text=keep_text, overwrite=overwrite, snap=snap,
                                  cop_base=cop_base, model_cfg=model_cfg, progress=progress)
    if engine != "local":
        raise ConfigError(f"engine: unknown '{engine}' (local, spark)")
    task = resolve_task(model, task)

    used: list[Predictor] = []

    def make_fn() -> ChunkFn:
        predictor = model if isinstance(model, Predictor) else Predictor.from_path(
            model, labels=labels, task=task, model_cfg=model_cfg, cfg=cfg, snap=snap)
        used.append(predictor)
        return predictor.predict_texts

    if isinstance(model, Predictor):
        cfg, snap = model.cfg, model.snap
    summary = stream_predictions(make_fn, data, output, cfg, task=task, text_column=text_column,
                                 label_column=label_column, keep_text=keep_text,
                                 overwrite=overwrite, snap=snap, cop_base=cop_base,
                                 progress=progress, engine="local", model_name=_model_name(model))
    if used:
        summary["merged_in_memory"] = used[0].merged_dtype is not None
        summary["merged_dtype"] = used[0].merged_dtype
        summary["weights_dtype"] = used[0].weights_dtype
    return summary


def stream_predictions(make_fn: Callable[[], ChunkFn], data: str, output: str,
                       cfg: PredictConfig, *, task: str = "protocol",
                       text_column: str | None = None, label_column: str | None = None,
                       keep_text: bool = False, overwrite: bool = False, snap: bool = False,
                       cop_base: int = 0, progress: bool = True, engine: str = "local",
                       model_name: str = "") -> dict[str, Any]:
    """Read ``data`` chunk by chunk, predict each chunk with the function ``make_fn()`` returns
    (called once the input's columns are checked), and write ``output`` atomically."""
    if cfg.mode not in MODES:
        raise ConfigError(f"predict.mode: unknown '{cfg.mode}' (constrained, generate)")
    if cfg.chunk_rows < 1:
        raise ConfigError(f"predict.chunk_rows must be >= 1, got {cfg.chunk_rows}")
    fmt = output_format(output)
    if Path(output).resolve() == Path(data).resolve():
        raise MedtuneError(f"{output}: output would overwrite the input file")
    check_output_file(output, overwrite)
    chunks, total = iter_records(data, task=task, text_column=text_column,
                                 label_column=label_column, chunk_rows=cfg.chunk_rows,
                                 cop_base=cop_base)
    first = next(chunks)
    loading = time.perf_counter()
    predict_chunk = make_fn()
    load_seconds = time.perf_counter() - loading
    n = {"rows": 0, "abstained": 0, "outside_label_set": 0, "snapped": 0, "empty_text": 0,
         "gold_rows": 0, "correct": 0}
    start = time.perf_counter()
    with atomic_file(output) as tmp, progress_bar(progress, total) as advance:
        writer = ChunkWriter(tmp, fmt)
        try:
            for chunk in itertools.chain([first], chunks):
                rows = predict_chunk(chunk.texts)
                if len(rows) != len(chunk.texts):
                    raise MedtuneError(f"{data}: got {len(rows)} predictions for "
                                       f"{len(chunk.texts)} rows")
                writer.write(rows_frame(chunk, rows, mode=cfg.mode, snap=snap,
                                        keep_text=keep_text))
                n["rows"] += len(rows)
                n["empty_text"] += sum(1 for t in chunk.texts if not t.strip())
                for i, row in enumerate(rows):
                    n["abstained"] += bool(row["abstained"])
                    n["outside_label_set"] += not row.get("in_label_set", True)
                    n["snapped"] += bool(row.get("snapped", False))
                    if chunk.gold is not None and chunk.gold[i]:
                        n["gold_rows"] += 1
                        n["correct"] += row["prediction"] == chunk.gold[i]
                advance(len(rows), time.perf_counter() - start)
        finally:
            writer.close()
    seconds = time.perf_counter() - start
    summary: dict[str, Any] = {
        "rows": n["rows"], "seconds": round(seconds, 3), "load_seconds": round(load_seconds, 3),
        "notes_per_s": round(n["rows"] / max(seconds, 1e-9), 2), "mode": cfg.mode,
        "engine": engine, "task": task, "model": model_name, "output": str(output),
        "abstained": n["abstained"], "outside_label_set": n["outside_label_set"],
        "empty_text": n["empty_text"]}
    if snap and cfg.mode == "generate":
        summary["snapped"] = n["snapped"]
    if first.gold is not None:
        summary["gold_rows"] = n["gold_rows"]
        if n["gold_rows"]:
            summary["accuracy"] = round(n["correct"] / n["gold_rows"], 6)
    return summary
