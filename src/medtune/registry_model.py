"""The file MLflow runs to build medtune's pyfunc model when it loads a registered version
("models from code": the model is this code plus its artifacts; nothing is pickled)."""

from mlflow.models import set_model

from medtune.registry import MedtuneModel

set_model(MedtuneModel())
