"""Spark batch prediction: ``mapInPandas`` with one ``Predictor`` per executor process.

Each Python worker loads the model the first time one of its partitions arrives and keeps it in a
module-level cache keyed by (model path, config, labels, task, snap), so a job pays the load once
per worker, not once per batch. pyspark is an optional extra (``pip install 'medtune[spark]'``)
and is imported only here, lazily.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from medtune.config import ModelConfig, PredictConfig
from medtune.errors import MedtuneError, describe
from medtune.model import model_dir

_PREDICTORS: dict[tuple, Any] = {}  # per worker process: key -> Predictor
RESULT_COLUMNS = ("prediction", "confidence", "abstained", "top_k", "raw_output", "in_label_set",
                  "snapped")


def _require_pyspark():
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise MedtuneError("Spark support needs pyspark: pip install 'medtune[spark]'") from None
    # pyspark 4.x warns on every pandas conversion under pandas 3; the paths used here work
    warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas",
                            category=FutureWarning)


def _predictor(model: str, cfg: dict[str, Any], labels: str | None, task: str, snap: bool,
               model_cfg: dict[str, Any] | None, threads: int):
    key = (model, json.dumps(cfg, sort_keys=True), labels, task, snap,
           json.dumps(model_cfg, sort_keys=True))
    if key not in _PREDICTORS:
        import torch
        from transformers.utils import logging as hf_logging

        from medtune.predict import Predictor

        hf_logging.disable_progress_bar()  # no weight-loading bars from every worker

        if threads > 0:  # workers share the machine's cores instead of each taking all
            torch.set_num_threads(threads)
        _PREDICTORS[key] = Predictor.from_path(
            model, labels=labels, task=task, cfg=PredictConfig(**cfg), snap=snap,
            model_cfg=ModelConfig(**model_cfg) if model_cfg else None)
    return _PREDICTORS[key]


def _predict_partition(batches: Iterator[Any], *, text_col: str, model: str, cfg: dict[str, Any],
                       labels: str | None, task: str, snap: bool,
                       model_cfg: dict[str, Any] | None, threads: int) -> Iterator[Any]:
    """mapInPandas body: pandas batches in, the same rows plus prediction columns out."""
    predictor = _predictor(model, cfg, labels, task, snap, model_cfg, threads)
    for pdf in batches:
        texts = ["" if v is None else str(v) for v in pdf[text_col].tolist()]
        rows = predictor.predict_texts(texts)
        out = pdf.copy()
        out["prediction"] = [r["prediction"] for r in rows]
        out["confidence"] = [float(r["confidence"]) for r in rows]
        out["abstained"] = [bool(r["abstained"]) for r in rows]
        out["top_k"] = [json.dumps([[lab, round(float(p), 6)] for lab, p in r["top_k"]])
                        for r in rows]
        if cfg["mode"] == "generate":
            out["raw_output"] = [r["raw_output"] for r in rows]
            out["in_label_set"] = [bool(r["in_label_set"]) for r in rows]
            if snap:
                out["snapped"] = [bool(r.get("snapped", False)) for r in rows]
        yield out


def predict_spark_df(df, model: str, *, text_col: str = "text", cfg: PredictConfig | None = None,
                     labels: str | None = None, task: str = "protocol", snap: bool = False,
                     model_cfg: ModelConfig | None = None):
    """``df`` with prediction, confidence, abstained and top_k (JSON) columns added (generate
    mode: also raw_output, in_label_set, and snapped when ``snap``). Lazy, like any Spark
    transformation; the model loads once per executor Python process."""
    _require_pyspark()
    from pyspark.sql.types import BooleanType, DoubleType, StringType, StructField, StructType

    cfg = cfg or PredictConfig()
    if text_col not in df.columns:
        raise MedtuneError(f"Spark DataFrame has no column '{text_col}' "
                           f"(columns: {', '.join(df.columns)})")
    clash = [c for c in RESULT_COLUMNS if c in df.columns]
    if clash:
        raise MedtuneError(f"Spark DataFrame already has column(s) {', '.join(clash)}")
    path = model_dir(model)
    fields = [StructField("prediction", StringType()), StructField("confidence", DoubleType()),
              StructField("abstained", BooleanType()), StructField("top_k", StringType())]
    if cfg.mode == "generate":
        fields += [StructField("raw_output", StringType()),
                   StructField("in_label_set", BooleanType())]
        if snap:
            fields.append(StructField("snapped", BooleanType()))
    schema = StructType(list(df.schema.fields) + fields)
    parallel = max(1, df.sparkSession.sparkContext.defaultParallelism)
    threads = max(1, (os.cpu_count() or 1) // parallel)
    fn = functools.partial(
        _predict_partition, text_col=text_col, model=str(path.resolve()), cfg=asdict(cfg),
        labels=str(Path(labels).resolve()) if labels else None, task=task, snap=snap,
        model_cfg=asdict(model_cfg) if model_cfg else None, threads=threads)
    return df.mapInPandas(fn, schema=schema)


def get_session():
    """The active SparkSession, else a quiet local[2] one (no UI, 2 shuffle partitions)."""
    _require_pyspark()
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    # executors must run this interpreter (the one with torch and medtune installed)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # local[*]: no hostname lookup warning
    try:
        spark = (SparkSession.builder.master("local[2]").appName("medtune-predict")
                 .config("spark.ui.enabled", "false")
                 .config("spark.sql.shuffle.partitions", "2")
                 .config("spark.sql.execution.arrow.pyspark.enabled", "true")
                 .config("spark.ui.showConsoleProgress", "false")
                 .getOrCreate())
    except Exception as exc:  # no Java, a bad JAVA_HOME or PYSPARK_SUBMIT_ARGS: one line
        raise MedtuneError(f"Spark could not start ({describe(exc, 200)}); it needs Java 17+ "
                           "(JAVA_HOME) — or use --engine local") from None
    spark.sparkContext.setLogLevel("WARN")
    return spark


def _worker_error(exc: Exception) -> MedtuneError | None:
    """The one-line medtune error raised inside a Spark worker, if that is what failed."""
    for line in reversed(str(exc).splitlines()):
        for name in ("DataError", "ConfigError", "MedtuneError"):
            marker = f"medtune.errors.{name}: "
            if marker in line:
                return MedtuneError(line.split(marker, 1)[1].strip())
    return None


def predict_file_spark(model: str, data: str, output: str, cfg: PredictConfig, *,
                       labels: str | None = None, task: str | None = None,
                       text_column: str | None = None, label_column: str | None = None,
                       keep_text: bool = False, overwrite: bool = False, snap: bool = False,
                       cop_base: int = 0, model_cfg: ModelConfig | None = None,
                       progress: bool = True) -> dict[str, Any]:
    """``predict_file`` with the model run by Spark: the file is streamed in chunks on the
    driver (same reader and writer as the local engine), each chunk predicted by
    ``predict_spark_df`` across the session's workers."""
    _require_pyspark()
    from medtune.predict import resolve_task, stream_predictions

    task = resolve_task(model, task)
    model_dir(model)
    created = [False]

    def make_fn():
        had = _active_session() is not None
        spark = get_session()
        created[0] = not had

        def predict_chunk(texts: list[str]) -> list[dict[str, Any]]:
            import pandas as pd

            pdf = pd.DataFrame({"_row": range(len(texts)), "text": texts})
            sdf = spark.createDataFrame(pdf)  # Arrow: split into defaultParallelism slices
            out = predict_spark_df(sdf, model, text_col="text", cfg=cfg, labels=labels,
                                   task=task, snap=snap, model_cfg=model_cfg)
            try:
                result = out.drop("text").toPandas().sort_values("_row")
            except Exception as exc:  # Py4J / PythonException: surface medtune's own message
                err = _worker_error(exc)
                if err is not None:
                    raise err from None
                raise
            return result.drop(columns="_row").to_dict("records")

        return predict_chunk

    try:
        return stream_predictions(make_fn, data, output, cfg, task=task, text_column=text_column,
                                  label_column=label_column, keep_text=keep_text,
                                  overwrite=overwrite, snap=snap, cop_base=cop_base,
                                  progress=progress, engine="spark", model_name=str(model))
    finally:
        if created[0]:
            get_session().stop()


def _active_session():
    from pyspark.sql import SparkSession

    return SparkSession.getActiveSession()
