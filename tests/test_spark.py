"""Spark prediction equals local prediction row for row (local[2] session, tiny model)."""

from __future__ import annotations

import json
import shutil
import sys

import pandas as pd
import pytest

from conftest import TINY_LABELS, TINY_NOTES
from medtune.config import PredictConfig
from medtune.errors import MedtuneError
from medtune.predict import Predictor, predict_file

N_ROWS = 20


@pytest.fixture(scope="module")
def spark():
    pytest.importorskip("pyspark")
    if shutil.which("java") is None:
        pytest.skip("Spark needs Java")
    from medtune.spark import get_session

    session = get_session()
    yield session
    session.stop()


@pytest.fixture(scope="module")
def model_dir(tiny_base, tmp_path_factory):
    labels = tmp_path_factory.mktemp("spark_labels") / "labels.json"
    labels.write_text(json.dumps({"labels": TINY_LABELS}))
    return str(tiny_base), str(labels)


def test_spark_df_equals_local(spark, model_dir):
    base, labels = model_dir
    cfg = PredictConfig(top_k=3, min_confidence=0.5)
    texts = [f"{note} #{i}" for i, note in enumerate((TINY_NOTES * 2)[:N_ROWS])]
    pdf = pd.DataFrame({"id": [f"r{i}" for i in range(N_ROWS)], "text": texts})
    from medtune.spark import predict_spark_df

    sdf = spark.createDataFrame(pdf)
    assert sdf.rdd.getNumPartitions() >= 2  # both workers take part
    got = predict_spark_df(sdf, base, cfg=cfg, labels=labels).toPandas()
    got = got.set_index("id").loc[pdf["id"]]
    local = Predictor.from_path(base, labels=labels, cfg=cfg).predict_texts(texts)
    assert list(got["text"]) == texts  # input columns pass through
    assert list(got["prediction"]) == [r["prediction"] for r in local]
    assert got["confidence"].tolist() == pytest.approx([r["confidence"] for r in local],
                                                       abs=1e-5)
    assert list(got["abstained"]) == [r["abstained"] for r in local]
    for spark_top, row in zip(got["top_k"], local, strict=True):
        assert [lab for lab, _ in json.loads(spark_top)] == [lab for lab, _ in row["top_k"]]


def test_predict_file_spark_equals_local(spark, model_dir, tmp_path):
    base, labels = model_dir
    src = tmp_path / "notes.csv"
    pd.DataFrame({"text": (TINY_NOTES * 2)[:N_ROWS],
                  "label": (TINY_LABELS * 5)[:N_ROWS]}).to_csv(src, index=False)
    cfg = PredictConfig(chunk_rows=8)
    local = predict_file(base, str(src), str(tmp_path / "local.csv"), cfg, labels=labels,
                         progress=False)
    remote = predict_file(base, str(src), str(tmp_path / "spark.csv"), cfg, labels=labels,
                          engine="spark", progress=False)
    a = pd.read_csv(tmp_path / "local.csv")
    b = pd.read_csv(tmp_path / "spark.csv")
    pd.testing.assert_frame_equal(a.drop(columns="top_k"), b.drop(columns="top_k"),
                                  check_exact=False, atol=1e-5)
    assert remote["engine"] == "spark" and remote["rows"] == local["rows"] == N_ROWS
    assert remote["accuracy"] == local["accuracy"]


def test_missing_pyspark_is_a_clear_error(monkeypatch):
    from medtune import spark as spark_mod

    monkeypatch.setitem(sys.modules, "pyspark", None)
    with pytest.raises(MedtuneError, match="pip install 'medtune\\[spark\\]'"):
        spark_mod.get_session()


def test_spark_that_cannot_start_is_one_error_line(monkeypatch):
    pyspark_sql = pytest.importorskip("pyspark.sql")
    from medtune.errors import MedtuneError
    from medtune.spark import get_session

    class Builder:
        def __getattr__(self, name):  # master(), appName(), config() chain to itself
            return lambda *a, **k: self

        def getOrCreate(self):
            raise RuntimeError("[JAVA_GATEWAY_EXITED] Java gateway process exited before "
                               "sending its port number.\nmore lines")

    monkeypatch.setattr(pyspark_sql.SparkSession, "getActiveSession", staticmethod(lambda: None))
    monkeypatch.setattr(pyspark_sql.SparkSession, "builder", Builder())
    with pytest.raises(MedtuneError, match=r"^Spark could not start \(RuntimeError: "
                                           r"\[JAVA_GATEWAY_EXITED\].*\); it needs Java") as info:
        get_session()
    assert "\n" not in str(info.value)
