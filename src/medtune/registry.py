"""MLflow: track a training run, log a model as an ``mlflow.pyfunc`` model, register it under an
alias (``champion``), and resolve ``models:/NAME@alias`` back to a local model directory.

Nothing here logs note text: params are the flattened config, metrics are the training rows
(loss, lr, validation accuracy...), artifacts are the run's files that hold no notes.

A run directory (base + LoRA adapter) names its base by path, which may not exist where the model
is loaded later, so the base directory is copied into the logged model as ``base/`` and its
``medtune.json`` points there relatively; loading rewrites it into an absolute path in a private
mirror of the directory (symlinks), never in the artifact store itself.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd  # MLflow resolves MedtuneModel.predict's type hints in this module

from medtune.config import Config
from medtune.errors import MedtuneError, first_line
from medtune.fsutil import atomic_dir, read_json, write_json
from medtune.metrics import as_label_strings

try:  # mlflow is an optional extra (medtune[mlflow])
    import mlflow
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - exercised only without the extra
    mlflow = None
    PythonModel = object

MODEL_ARTIFACT = "model"  # key of the model directory among the pyfunc artifacts
RUN_FILES = ("metrics.jsonl", "loss.png", "labels.json", "template.json", "medtune.json",
             "report.html")
MODEL_FILES = ("medtune.json", "labels.json", "template.json")
# Two invented notes, the input example stored with every logged model.
EXAMPLE_NOTES = ["68 yo with sudden severe headache, rule out hemorrhage",
                 "chronic low back pain with left leg numbness, evaluate disc"]


def _require_mlflow() -> None:
    if mlflow is None:
        raise MedtuneError("MLflow is not installed: pip install 'medtune[mlflow]'")


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else a SQLite store ``mlruns.db`` in the current directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlruns.db'}"


def _setup() -> None:
    """Point MLflow at ``tracking_uri()`` and its experiment. A new experiment in a SQLite store
    keeps its artifacts in ``mlruns/`` next to the database file (MLflow's default is
    ``./mlruns`` of whatever directory the first run happens in)."""
    _require_mlflow()
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "medtune")
    if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(name) is None:
        store = Path(uri.removeprefix("sqlite:///")).resolve()
        mlflow.create_experiment(name, artifact_location=(store.parent / "mlruns").as_uri())
    mlflow.set_experiment(name)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": "0.0001"}; lists become comma-joined strings."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list | tuple):
            out[name] = ",".join(str(v) for v in value)
        else:
            out[name] = str(value)
    return out


# ----------------------------------------------------------------------------- tracking
class MlflowCallback:
    """Training callback: each metric row (``{"step": 5, "loss": ...}``) goes to MLflow.

    The MLflow run starts on the first row (params = flattened config, config.json artifact);
    ``finish(run_dir)`` logs the run's artifacts and ends it. A process that exits before
    ``finish`` marks the run FAILED.
    """

    def __init__(self, cfg: Config, run_dir: str | Path):
        _require_mlflow()
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_id: str | None = None
        self._done = False

    def _start(self) -> None:
        _setup()
        name = self.run_dir.name or None
        run = mlflow.start_run(run_name=name)
        self.run_id = run.info.run_id
        mlflow.log_params(flatten(self.cfg.to_dict()), run_id=self.run_id)
        mlflow.set_tags({"medtune.task": self.cfg.data.task, "medtune.base": self.cfg.model.base,
                         "medtune.run_dir": str(self.run_dir.resolve())})
        mlflow.log_dict(self.cfg.to_dict(), "config.json", run_id=self.run_id)
        atexit.register(self._abort)

    def __call__(self, row: dict[str, Any]) -> None:
        if self.run_id is None:
            self._start()
        step = int(row.get("step", 0))
        metrics = {k: float(v) for k, v in row.items()
                   if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
                   and math.isfinite(float(v))}
        if metrics:
            mlflow.log_metrics(metrics, step=step, run_id=self.run_id)

    def finish(self, run_dir: str | Path | None = None) -> str | None:
        """Log the run directory's artifacts (those that exist) and end the MLflow run."""
        if self._done:
            return self.run_id
        if self.run_id is None:
            self._start()
        run_dir = Path(run_dir or self.run_dir)
        client = mlflow.MlflowClient()
        for name in RUN_FILES:
            if (run_dir / name).is_file():
                client.log_artifact(self.run_id, str(run_dir / name))
        card = _data_card(run_dir)
        if card is not None:
            client.log_artifact(self.run_id, str(card), artifact_path="data")
        summary = read_json(run_dir / "medtune.json").get("summary", {}) \
            if (run_dir / "medtune.json").is_file() else {}
        for key, value in summary.items():
            if isinstance(value, int | float) and not isinstance(value, bool) \
                    and math.isfinite(float(value)):
                client.log_metric(self.run_id, f"final_{key}", float(value))
        self._end("FINISHED")
        return self.run_id

    def _end(self, status: str) -> None:
        self._done = True
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            mlflow.end_run(status=status)
        else:
            mlflow.MlflowClient().set_terminated(self.run_id, status=status)

    def _abort(self) -> None:
        if not self._done and self.run_id is not None:
            with contextlib.suppress(Exception):  # best effort at interpreter exit
                self._end("FAILED")


def _data_card(run_dir: Path) -> Path | None:
    """data_card.md next to the training file the run was trained on, if there is one."""
    meta = read_json(run_dir / "medtune.json") if (run_dir / "medtune.json").is_file() else {}
    data = meta.get("data_resolved") or meta.get("data")  # resolved: from any directory
    if not data:
        return None
    card = Path(data).parent / "data_card.md"
    return card if card.is_file() else None


def mlflow_callback(cfg: Config, run_dir: str | Path) -> MlflowCallback:
    return MlflowCallback(cfg, run_dir)


# ----------------------------------------------------------------------------- pyfunc model
def localize(model_dir: str | Path) -> Path:
    """A directory ``Predictor.from_path`` can load: ``model_dir`` itself, or, when its
    ``medtune.json`` names a relative base (a logged run), a private symlink mirror whose
    ``medtune.json`` names the bundled base by absolute path."""
    model_dir = Path(model_dir).resolve()
    meta_path = model_dir / "medtune.json"
    meta = read_json(meta_path) if meta_path.is_file() else {}
    base = meta.get("base")
    if meta.get("kind") != "run" or not base or Path(base).is_absolute():
        return model_dir
    mirror = Path(tempfile.mkdtemp(prefix="medtune-model-"))
    atexit.register(shutil.rmtree, mirror, True)
    for entry in model_dir.iterdir():
        if entry.name != "medtune.json":
            (mirror / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    write_json(mirror / "medtune.json", {**meta, "base": str(model_dir / base)})
    return mirror


class MedtuneModel(PythonModel):
    """pyfunc wrapper: DataFrame with a ``text`` column (or the first column) in, a DataFrame
    with prediction, confidence, abstained, top_k (JSON list of [label, prob]) out."""

    def load_context(self, context) -> None:
        from medtune.predict import Predictor

        self.predictor = Predictor.from_path(str(localize(context.artifacts[MODEL_ARTIFACT])))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        # the DataFrame hints keep MLflow from warning at every log; the signature is explicit
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        column = "text" if "text" in frame.columns else frame.columns[0]
        texts = as_label_strings(frame[column].tolist())  # None, NaN, pd.NA: a blank note
        rows = self.predictor.predict_texts(texts)
        return pd.DataFrame({
            "prediction": [r["prediction"] for r in rows],
            "confidence": [float(r["confidence"]) for r in rows],
            "abstained": [bool(r["abstained"]) for r in rows],
            "top_k": [json.dumps(r["top_k"]) for r in rows]})


def _stage_model(model_dir: Path, out: Path) -> None:
    """Copy what loading needs into ``out``: a merged directory as is; a run's adapter,
    tokenizer, template, labels and medtune.json, plus its base model as ``base/``."""
    meta = read_json(model_dir / "medtune.json") if (model_dir / "medtune.json").is_file() else {}
    if meta.get("kind") != "run":
        skip = shutil.ignore_patterns("checkpoints", "*.tmp", ".*")
        shutil.copytree(model_dir, out, ignore=skip, dirs_exist_ok=True)
        return
    for name in ("adapter", "tokenizer"):
        if not (model_dir / name).is_dir():
            raise MedtuneError(f"{model_dir}: run has no {name}/ (training not finished?)")
        shutil.copytree(model_dir / name, out / name)
    for name in MODEL_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / name)
    base = Path(str(meta.get("base", "")))
    if not (base / "config.json").is_file():
        raise MedtuneError(f"{model_dir}/medtune.json: base '{base}' is not a local model "
                           "directory; merge the run (medtune merge) and register the merge")
    shutil.copytree(base, out / "base", ignore=shutil.ignore_patterns(".*"))
    write_json(out / "medtune.json", {**meta, "base": "base"})


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("medtune", "torch", "transformers", "peft", "tokenizers", "safetensors",
                 "bitsandbytes", "accelerate", "pandas", "mlflow"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs


def _check_name_and_alias(name: str, alias: str) -> None:
    """Names that work in a ``models:/NAME@alias`` URI, aliases MLflow accepts."""
    if not name or name != name.strip() or any(c in name for c in "/:@"):
        raise MedtuneError(f"--name '{name}': a model name must be non-empty, without surrounding "
                           "spaces and without '/', ':' or '@' (it goes into models:/NAME@alias)")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", alias or "") or alias == "latest" \
            or re.fullmatch(r"[vV]\d+", alias):
        raise MedtuneError(f"--alias '{alias}': use letters, digits, '_' or '-' (not 'latest' "
                           "or a version such as 'v2')")


def register(run_dir: str | Path, name: str, alias: str = "champion") -> dict[str, Any]:
    """Log ``run_dir`` (a run or merged model directory) as a pyfunc model, register it as
    ``name`` and point ``alias`` at the new version."""
    from mlflow.models import infer_signature

    _check_name_and_alias(name, alias)  # before anything is logged
    from medtune.model import check_model_path

    model_dir, _ = check_model_path(run_dir)  # missing, unfinished, damaged: before logging
    if not (model_dir / "labels.json").is_file() or not (model_dir / "template.json").is_file():
        raise MedtuneError(f"{model_dir}: not a medtune run or merged model directory "
                           "(labels.json / template.json missing)")
    labels = read_json(model_dir / "labels.json")
    labels = labels["labels"] if isinstance(labels, dict) else labels
    _setup()
    example = pd.DataFrame({"text": EXAMPLE_NOTES})
    output = pd.DataFrame({"prediction": [str(labels[0])] * 2, "confidence": [0.9, 0.6],
                           "abstained": [False, True],
                           "top_k": [json.dumps([[str(labels[0]), 0.9]])] * 2})
    signature = infer_signature(example, output)
    with tempfile.TemporaryDirectory(prefix="medtune-register-") as tmp:
        staged = Path(tmp) / MODEL_ARTIFACT
        _stage_model(model_dir, staged)
        nested = mlflow.active_run() is not None
        with mlflow.start_run(run_name=f"register-{name}", nested=nested) as run:
            mlflow.set_tags({"medtune.source": str(model_dir.resolve())})
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT, python_model=str(Path(__file__).with_name("registry_model.py")),
                artifacts={MODEL_ARTIFACT: str(staged)}, signature=signature,
                input_example=example, pip_requirements=_requirements(),
                registered_model_name=name)
    version = str(info.registered_model_version)
    mlflow.MlflowClient().set_registered_model_alias(name, alias, version)
    return {"name": name, "version": version, "alias": alias,
            "model_uri": f"models:/{name}@{alias}", "run_id": run.info.run_id}


# ----------------------------------------------------------------------------- resolve
def _cache_root() -> Path:
    return Path(os.environ.get("MEDTUNE_CACHE") or Path.home() / ".cache" / "medtune") / "models"


def _parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@alias -> (NAME, None, alias); models:/NAME/3 -> (NAME, "3", None)."""
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias:
            return name, None, alias
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return name, version, None
    raise MedtuneError(f"{uri}: expected models:/NAME@alias or models:/NAME/VERSION")


def resolve_model_uri(uri: str) -> str:
    """A local model directory for ``uri``: a path is returned as is; ``models:/NAME@alias`` or
    ``models:/NAME/3`` is downloaded once per version into the cache ($MEDTUNE_CACHE/models or
    ~/.cache/medtune/models) and the loadable model directory returned."""
    if not uri.startswith("models:/"):
        return uri
    name, version, alias = _parse_models_uri(uri)
    _require_mlflow()
    default_db = Path.cwd() / "mlruns.db"
    if not os.environ.get("MLFLOW_TRACKING_URI") and not default_db.is_file():
        # reading must not create an empty registry in whatever directory this runs from
        raise MedtuneError(f"{uri}: no registry here ({default_db} does not exist); run from the "
                           "directory you registered in or set MLFLOW_TRACKING_URI")
    from mlflow.exceptions import MlflowException

    _setup()
    client = mlflow.MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias \
            else client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise MedtuneError(f"{uri}: not found in the registry at {tracking_uri()} "
                           f"({first_line(exc)})") from None
    # one cache per registry, and per registered version's identity: MLflow numbers versions
    # again from 1 after a model is deleted and registered anew, and a relative sqlite URI names
    # a different registry in every directory
    store = hashlib.sha256(tracking_uri().encode()).hexdigest()[:12]
    identity = hashlib.sha256(f"{mv.source}|{mv.run_id}|{mv.creation_timestamp}".encode())
    target = _cache_root() / store / _safe(name) / f"{mv.version}-{identity.hexdigest()[:12]}"
    if not (target / "COMPLETE").is_file():
        with atomic_dir(target) as tmp:
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}",
                                                dst_path=str(tmp))
            (tmp / "COMPLETE").write_text(f"{name} {mv.version}\n", encoding="utf-8")
    found = sorted(p.parent for p in target.glob("**/artifacts/*/labels.json"))
    if not found:
        raise MedtuneError(f"{uri}: version {mv.version} is not a medtune model "
                           "(no artifacts/*/labels.json)")
    return str(localize(found[0]))


def _safe(name: str) -> str:
    """A directory name for a registered model's name: readable, and distinct for distinct names
    ('ct protocol' and 'ct_protocol' must not share a cache)."""
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
