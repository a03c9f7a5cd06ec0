"""Command-line options shared by the verbs of ``medtune.cli`` and ``medtune.cli_data``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

Overrides = Annotated[list[str] | None, typer.Argument(help="Dotted overrides, e.g. train.lr=1e-4")]
PredictOverrides = Annotated[list[str] | None, typer.Argument(
    help="Dotted overrides, e.g. predict.top_k=5 model.device=cpu (train.* keys have no effect "
         "here)")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")]
TextCol = Annotated[str | None, typer.Option("--text-column", help="Text column (auto-detected).")]
LabelCol = Annotated[str | None, typer.Option("--label-column", help="Label column (auto-detected).")]
Task = Annotated[str, typer.Option("--task", help="protocol or mcqa.")]
TaskOrConfig = Annotated[str | None, typer.Option(
    "--task", help="protocol or mcqa (default: data.task of the config, protocol).")]
CopBase = Annotated[int | None, typer.Option(
    "--cop-base", help="MCQA: 1 if the answer column counts options 1-4 (default: data.cop_base, "
                       "0: MedMCQA's 0-3).", min=0, max=1)]


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))
