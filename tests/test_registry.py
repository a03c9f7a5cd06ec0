"""MLflow: the training callback logs metrics and artifacts; a registered pyfunc model loads in a
fresh process by alias and predicts exactly what the local Predictor predicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY_LABELS, TINY_NOTES

pytest.importorskip("mlflow")

from medtune.config import Config
from medtune.errors import MedtuneError
from medtune.predict import Predictor
from medtune.registry import (
    flatten,
    mlflow_callback,
    register,
    resolve_model_uri,
    tracking_uri,
)
from medtune.tasks import Template

SECRET_NOTE = "patient Zyxwv Qwerty, MRN 99887766, crushing chest pain"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One private SQLite tracking/registry store (creating its tables takes seconds) and
    artifact root per module."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MEDTUNE_CACHE", str(root / "cache"))
        mp.setenv("MLFLOW_EXPERIMENT_NAME", "medtune-test")
        yield uri


def test_tracking_uri_default_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri() == "http://127.0.0.1:5000"


def test_flatten_config():
    flat = flatten(Config().to_dict())
    assert flat["train.lr"] == "0.0002"
    assert flat["lora.target_modules"] == "all-linear"
    assert all("." in key for key in flat)


def test_callback_logs_metrics_params_and_artifacts(store, tmp_path):
    import mlflow

    data_dir = tmp_path / "splits"
    data_dir.mkdir()
    (data_dir / "data_card.md").write_text("# Data card\n- rows: 10\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [{"step": 5, "epoch": 0.5, "loss": 2.0, "lr": 1e-4},
            {"step": 10, "epoch": 1.0, "loss": 1.25, "lr": 5e-5},
            {"step": 10, "val_loss": 1.5, "val_accuracy": 0.75}]
    cfg = Config()
    cfg.train.lr = 3e-4
    cb = mlflow_callback(cfg, run_dir)
    for row in rows:
        cb(row)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "labels.json").write_text(json.dumps({"labels": TINY_LABELS}))
    (run_dir / "medtune.json").write_text(json.dumps({
        "kind": "run", "data": str(data_dir / "train.csv"), "summary": {"loss": 1.25}}))
    run_id = cb.finish(run_dir)

    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.0003"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] \
        == [(5, 2.0), (10, 1.25)]
    assert client.get_metric_history(run_id, "val_accuracy")[0].value == 0.75
    assert run.data.metrics["final_loss"] == 1.25
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.json", "metrics.jsonl", "labels.json", "medtune.json", "data"} <= names
    assert "loss.png" not in names  # only files that exist are logged
    assert [a.path for a in client.list_artifacts(run_id, "data")] == ["data/data_card.md"]


def test_register_and_load_by_alias_in_fresh_process(store, merged_dir, tmp_path):
    import mlflow

    info = register(merged_dir, "tiny-protocol")
    assert info["version"] == "1"
    assert info["alias"] == "champion"
    assert info["model_uri"] == "models:/tiny-protocol@champion"
    mv = mlflow.MlflowClient().get_model_version_by_alias("tiny-protocol", "champion")
    assert str(mv.version) == "1"

    notes = [*TINY_NOTES[:5], "", SECRET_NOTE]
    expected = Predictor.from_path(str(merged_dir)).predict_texts(notes)
    (tmp_path / "in.json").write_text(json.dumps(notes))
    code = (
        "import json, sys, mlflow.pyfunc, pandas as pd\n"
        "notes = json.load(open('in.json'))\n"
        "m = mlflow.pyfunc.load_model('models:/tiny-protocol@champion')\n"
        "out = m.predict(pd.DataFrame({'text': notes}))\n"
        "out.to_json('out.json', orient='records')\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = pd.read_json(tmp_path / "out.json", orient="records")
    assert list(got["prediction"]) == [r["prediction"] for r in expected]
    assert list(got["abstained"]) == [r["abstained"] for r in expected]
    assert got["confidence"].tolist() == pytest.approx([r["confidence"] for r in expected],
                                                       abs=1e-5)
    assert json.loads(got["top_k"][0])[0][0] == expected[0]["prediction"]

    # the same version resolves to a local directory a Predictor loads; cached by version
    local = resolve_model_uri("models:/tiny-protocol/1")
    assert resolve_model_uri("models:/tiny-protocol@champion") == local
    rows = Predictor.from_path(local).predict_texts(notes[:2])
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in expected[:2]]

    # the service accepts the registry URI as its model
    from fastapi.testclient import TestClient

    from medtune.serve import create_app

    with TestClient(create_app("models:/tiny-protocol@champion")) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.get("/v1/labels").json()["model"] == "models:/tiny-protocol@champion"
        pred = client.post("/v1/predict", json={"note": notes[0]}).json()["predictions"][0]
        assert pred["label"] == expected[0]["prediction"]


def test_register_run_dir_bundles_base(store, tiny_base, tmp_path):
    """A run directory's base is copied into the model, so loading never needs the old path."""
    from mlflow.artifacts import download_artifacts

    from medtune.registry import localize

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")  # register checks they are there
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(run / "adapter" / "adapter_model.safetensors"))
    (run / "tokenizer").mkdir()
    (run / "medtune.json").write_text(json.dumps({"kind": "run", "base": str(tiny_base),
                                                  "task": "protocol", "quantization": "none"}))
    (run / "labels.json").write_text(json.dumps({"labels": TINY_LABELS}))
    Template(task="protocol", kind="plain").save(run)
    register(run, "tiny-run", alias="staging")
    out = download_artifacts(artifact_uri="models:/tiny-run@staging",
                             dst_path=str(tmp_path / "dl"))
    model = next((tmp_path / "dl").glob("**/artifacts/model"))
    assert out and (model / "base" / "config.json").is_file()
    assert json.loads((model / "medtune.json").read_text())["base"] == "base"
    mirror = localize(model)
    assert json.loads((mirror / "medtune.json").read_text())["base"] == str(model / "base")
    assert (mirror / "adapter").resolve() == (model / "adapter").resolve()
    assert json.loads((model / "medtune.json").read_text())["base"] == "base"  # untouched


def test_resolve_errors(store):
    assert resolve_model_uri("/some/local/dir") == "/some/local/dir"
    with pytest.raises(MedtuneError, match="expected models:/NAME@alias"):
        resolve_model_uri("models:/only-a-name")
    with pytest.raises(MedtuneError, match="not found in the registry"):
        resolve_model_uri("models:/missing@champion")
    with pytest.MonkeyPatch.context() as mp:  # serve: fails before the server starts
        import uvicorn

        from medtune.serve import serve

        mp.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("server started"))
        with pytest.raises(MedtuneError, match="not found in the registry"):
            serve("models:/missing@champion", port=0)


def test_model_cache_dirs_are_distinct_for_distinct_names():
    from medtune.registry import _safe

    a, b = _safe("ct protocol"), _safe("ct_protocol")  # used to be both 'ct_protocol'
    assert a != b and a.startswith("ct_protocol-") and b.startswith("ct_protocol-")
    assert _safe("a/b") == _safe("a/b") and "/" not in _safe("a/b")


@pytest.mark.parametrize("name, alias, message", [
    ("bad/name", "champion", "--name 'bad/name'"), ("", "champion", "--name ''"),
    ("protocol", "", "--alias ''"), ("protocol", "latest", "--alias 'latest'"),
    ("protocol", "v2", "--alias 'v2'"), ("protocol", "two words", "--alias 'two words'"),
])
def test_register_refuses_bad_names_before_logging_anything(tmp_path, name, alias, message):
    from medtune.registry import register

    with pytest.raises(MedtuneError) as info:  # no store touched: the check comes first
        register(tmp_path / "nowhere", name, alias)
    assert str(info.value).startswith(message)


def test_a_version_number_registered_anew_is_not_served_from_the_old_cache(store, merged_dir):
    # MLflow numbers versions from 1 again after a model is deleted: the cache must not hand
    # back the deleted model's files for the new version 1
    import mlflow

    register(merged_dir, "again")
    first = resolve_model_uri("models:/again/1")
    mlflow.MlflowClient().delete_registered_model("again")
    assert register(merged_dir, "again")["version"] == "1"
    second = resolve_model_uri("models:/again/1")
    assert second != first and os.path.isdir(second)
    assert resolve_model_uri("models:/again/1") == second  # and it is cached from then on


def test_pyfunc_blank_cells_of_any_kind_are_blank_notes():
    from medtune.registry import MedtuneModel

    seen: list[list[str]] = []

    class Echo:
        def predict_texts(self, texts):
            seen.append(texts)
            return [{"prediction": "A", "confidence": 1.0, "abstained": not t, "top_k": []}
                    for t in texts]

    model = MedtuneModel()
    model.predictor = Echo()
    frame = pd.DataFrame({"text": pd.array(["chest pain", pd.NA, None], dtype="string")})
    out = model.predict(None, frame)
    assert seen == [["chest pain", "", ""]]  # pd.NA was scored as the text '<NA>'
    assert out["abstained"].tolist() == [False, True, True]


def test_cli_shows_no_mlflow_info_lines_and_registers_no_pickle(tmp_path, merged_dir, store):
    # a fresh store: MLflow logs "Creating initial MLflow database tables..." at INFO
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'fresh.db'}",
           "MEDTUNE_CACHE": str(tmp_path / "cache")}
    env.pop("MLFLOW_LOGGING_LEVEL", None)
    proc = subprocess.run([sys.executable, "-m", "medtune", "serve", "--model",
                           "models:/absent@champion"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2  # medtune's exit code for a MedtuneError
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: models:/absent@champion: not found in the registry")

    # the registered model is code plus artifacts (MLflow's "models from code"), not a pickle
    import mlflow

    info = register(merged_dir, "tiny-code")
    local = Path(mlflow.artifacts.download_artifacts(f"models:/tiny-code/{info['version']}",
                                                     dst_path=str(tmp_path / "dl")))
    assert (local / "registry_model.py").is_file() and not (local / "python_model.pkl").exists()


def test_artifacts_go_next_to_the_sqlite_store_not_the_working_directory(tmp_path, merged_dir,
                                                                          monkeypatch):
    store_dir, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    store_dir.mkdir()
    elsewhere.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store_dir / 'm.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "medtune-artifacts-test")
    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(elsewhere)
    register(merged_dir, "tiny-where")
    assert (store_dir / "mlruns").is_dir() and not (elsewhere / "mlruns").exists()
    assert resolve_model_uri("models:/tiny-where@champion")  # and it loads back from there
