"""Command line: verb -> function. Heavy modules are imported inside each command so that
``medtune --help`` is instant. Errors from bad input print one line and exit 2 (``--debug`` shows
the traceback)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from medtune.cli_bench import bench_app
from medtune.cli_data import data_app
from medtune.cli_options import (
    ConfigOpt,
    CopBase,
    LabelCol,
    Overrides,
    Overwrite,
    PredictOverrides,
    Task,
    TaskOrConfig,
    TextCol,
    print_json,
)
from medtune.errors import ConfigError, MedtuneError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune causal LMs into medical classifiers with QLoRA. Errors print one line; "
    "add --debug anywhere for the traceback. MEDTUNE_CACHE sets the cache directory (embedded "
    "bases, registry downloads; default ~/.cache/medtune).",
)
base_app = typer.Typer(no_args_is_help=True, help="The embedded tiny base model.")
config_app = typer.Typer(no_args_is_help=True, help="Show resolved configuration.")
app.add_typer(data_app, name="data")
app.add_typer(base_app, name="base")
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")

# the exceptions of the click typer runs on (its vendored copy since typer 0.22, click before)
_CLICK = sys.modules[typer.BadParameter.__module__]


# ----------------------------------------------------------------------------- config
@config_app.command("show")
def config_show(
    file: Annotated[Path | None, typer.Argument(help="YAML config.")] = None,
    overrides: Overrides = None,
    fields: Annotated[bool, typer.Option("--fields", help="List every key with its help.")] = False,
) -> None:
    """Print the resolved configuration (defaults <- FILE <- overrides)."""
    import yaml

    from medtune.config import field_help, load_config

    if file is not None and "=" in str(file) and not file.exists():  # only overrides given
        overrides, file = [str(file), *(overrides or [])], None
    cfg = load_config(file, overrides)
    if fields:
        for key, value, help_text in field_help(cfg):
            print(f"{key} = {value!r}\n    {help_text}")
        return
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")


# ----------------------------------------------------------------------------- base / train / merge
@base_app.command("build")
def base_build(
    data: Annotated[Path, typer.Option(help="Notes to train tokenizer and model on.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Directory (default: cache).")] = None,
    text_column: TextCol = None,
    task: Task = "protocol",
    steps: Annotated[int, typer.Option(help="Pretraining steps.")] = 600,
    seed: Annotated[int, typer.Option(help="Seed for initialisation and data order.")] = 0,
    overwrite: Overwrite = False,
    scrub: Annotated[bool, typer.Option(
        "--scrub/--no-scrub", help="Replace PHI-like spans in the notes before the tokenizer and "
        "the model learn from them.")] = True,
) -> None:
    """Build the embedded tiny base (BPE tokenizer + small Llama, pretrained on the notes)."""
    from medtune.base import BaseSpec, build_base
    from medtune.data import load_labeled

    df = load_labeled(data, task=task, text_column=text_column, require_labels=False,
                      drop_empty=True)
    # label names join the pretraining corpus as phrases, as `medtune train` does for its cached base
    labels = sorted(set(df["label"].dropna())) if "label" in df.columns else None
    path = build_base(list(df["text"]), output, BaseSpec(steps=steps, seed=seed), overwrite=overwrite,
                      extra_vocab_texts=labels, scrub=scrub)
    print(path)


def _set_data(cfg, text_column: str | None, label_column: str | None, task: str | None = None,
              cop_base: int | None = None) -> None:
    """--text-column, --label-column, --task, --cop-base onto the config's data.* keys."""
    from medtune.config import set_key

    for key, value in (("text_column", text_column), ("label_column", label_column),
                       ("task", task), ("cop_base", cop_base)):
        if value is not None:
            set_key(cfg, f"data.{key}", value, "--" + key.replace("_", "-"))


@app.command("train")
def train_cmd(
    data: Annotated[Path, typer.Option(help="Training file (CSV/JSONL/Parquet).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory.")],
    val: Annotated[Path | None, typer.Option(help="Validation file (default: hold out data.val_fraction).")] = None,
    base: Annotated[str | None, typer.Option(help="'embedded', HF model dir, or hub id.")] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint.")] = False,
    track: Annotated[bool, typer.Option("--track", help="Log to MLflow.")] = False,
    text_column: TextCol = None,
    label_column: LabelCol = None,
    task: TaskOrConfig = None,
    cop_base: CopBase = None,
    overwrite: Overwrite = False,
) -> None:
    """QLoRA (or LoRA / full) fine-tuning with answer-only loss, checkpoints and resume."""
    from medtune.config import load_config
    from medtune.train import train

    if resume and overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces it: choose one")
    cfg = load_config(config, overrides)
    if base:
        cfg.model.base = base
    _set_data(cfg, text_column, label_column, task, cop_base)
    callbacks = []
    rank = int(os.environ.get("RANK", 0))
    if track and rank == 0:  # one MLflow run per job: only rank 0 logs (and ends it)
        from medtune.registry import mlflow_callback

        callbacks.append(mlflow_callback(cfg, output))
    run = train(
        cfg, str(data), output, val=str(val) if val else None, resume=resume, overwrite=overwrite, callbacks=callbacks
    )
    for cb in callbacks:
        if hasattr(cb, "finish"):
            cb.finish(run)
    from medtune.train import read_summary

    summ = read_summary(run)
    acc = summ.get("val_accuracy")
    if rank == 0:
        print(f"run saved to {run}" + (f" (val accuracy {acc:.3f})" if acc is not None else ""))


@app.command("merge")
def merge_cmd(
    run_dir: Path,
    output: Annotated[Path, typer.Option("--output", "-o")],
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    source: Annotated[
        str, typer.Option(help="Merge into the 'dequantized' 4-bit weights trained on (default) or the 'original'.")
    ] = "dequantized",
    overwrite: Overwrite = False,
) -> None:
    """Merge a LoRA adapter into an unquantized base and verify the logits match."""
    from medtune.merge import merge

    print_json(merge(run_dir, output, dtype=dtype, overwrite=overwrite, source=source))


# ----------------------------------------------------------------------------- predict / evaluate
def _local_model(model: str) -> str:
    """models:/NAME@alias (MLflow registry) -> a local directory; paths pass through."""
    if model.startswith("models:/"):
        from medtune.registry import resolve_model_uri

        return resolve_model_uri(model)
    return model


@app.command("predict")
def predict_cmd(
    model: Annotated[str, typer.Option(help="Run dir, merged model dir, base dir (+--labels) or models:/NAME@alias.")],
    data: Annotated[Path, typer.Option(help="Input file (CSV/TSV/JSONL/Parquet).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Predictions file (.csv or .parquet).")],
    config: ConfigOpt = None,
    overrides: PredictOverrides = None,
    labels: Annotated[Path | None, typer.Option(help="labels.json for a plain base (zero-shot).")] = None,
    task: Annotated[str | None, typer.Option(
        help="protocol or mcqa (default: the model's task; a plain base: protocol).")] = None,
    text_column: TextCol = None,
    label_column: LabelCol = None,
    mode: Annotated[str | None, typer.Option(help="constrained (default) or generate.")] = None,
    min_confidence: Annotated[float | None, typer.Option(help="Abstain below this probability.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Notes per batch (0 = automatic).")] = None,
    merge: Annotated[str | None, typer.Option(
        help="Merge a run's adapter in memory first: auto (on CPU), yes, no.")] = None,
    merge_dtype: Annotated[str | None, typer.Option(
        help="Merged weights, or a merged directory's linear layers: auto (bfloat16 for "
             "constrained mode on a CPU with native bf16 matmul, else the model's dtype), "
             "float32, bfloat16.")] = None,
    snap: Annotated[bool, typer.Option("--snap", help="Generate mode: map outputs to the nearest label.")] = False,
    keep_text: Annotated[bool, typer.Option("--keep-text", help="Copy note text into the output.")] = False,
    engine: Annotated[str, typer.Option(help="local or spark.")] = "local",
    cop_base: CopBase = None,
    overwrite: Overwrite = False,
) -> None:
    """Label-constrained prediction with confidence and abstention (or free generation)."""
    from medtune.config import load_config, set_key
    from medtune.predict import predict_file

    cfg = load_config(config, overrides)
    for key, value in (("mode", mode), ("min_confidence", min_confidence), ("batch_size", batch_size),
                       ("merge", merge), ("merge_dtype", merge_dtype)):
        if value is not None:  # checked as the config's own keys, named as typed
            set_key(cfg, f"predict.{key}", value, "--" + key.replace("_", "-"))
    generate = cfg.predict.mode == "generate"
    if generate and cfg.predict.min_confidence > 0:
        raise ConfigError("--min-confidence needs constrained mode: generated answers have no "
                          "confidence to abstain on")
    if snap and not generate:
        raise ConfigError("--snap maps generated answers to labels: it needs --mode generate "
                          "(constrained answers are always labels)")
    summary = predict_file(
        _local_model(model),
        str(data),
        str(output),
        cfg.predict,
        labels=str(labels) if labels else None,
        task=task,
        text_column=text_column,
        label_column=label_column,
        keep_text=keep_text,
        engine=engine,
        overwrite=overwrite,
        snap=snap,
        cop_base=cfg.data.cop_base if cop_base is None else cop_base,
        model_cfg=cfg.model,
    )
    print_json(summary)


@app.command("evaluate")
def evaluate_cmd(
    model: Annotated[str, typer.Option(help="Run dir, merged dir, or models:/NAME@alias.")],
    data: Annotated[Path, typer.Option(help="Labelled test file.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Report directory.")],
    baseline: Annotated[
        list[str] | None, typer.Option(help="Base model dir (zero-shot) and/or 'tfidf'; repeatable.")
    ] = None,
    train_data: Annotated[Path | None, typer.Option(
        help="Training file for --baseline tfidf and the leakage check (default: train.csv "
             "next to --data, as `data split` writes it).")] = None,
    labels: Annotated[Path | None, typer.Option(help="labels.json (plain base models).")] = None,
    task: Annotated[str | None, typer.Option(
        help="protocol or mcqa (default: the model's task; a plain base: protocol).")] = None,
    text_column: TextCol = None,
    label_column: LabelCol = None,
    mode: Annotated[str, typer.Option(help="constrained or generate.")] = "constrained",
    min_confidence: Annotated[float, typer.Option(help="Abstention threshold.")] = 0.0,
    merge: Annotated[str, typer.Option(
        help="no: measure a run as trained (4-bit base + adapter); auto (on CPU) or yes: merged "
             "in memory, as predict does by default.")] = "no",
    merge_dtype: Annotated[str, typer.Option(
        help="With --merge auto or yes, the merged weights (or a merged directory's linear "
             "layers): auto (bfloat16 for constrained mode on a CPU with native bf16 matmul), "
             "float32, bfloat16.")] = "auto",
    no_similarity: Annotated[bool, typer.Option("--no-similarity", help="Skip semantic similarity.")] = False,
    cop_base: CopBase = None,
    overwrite: Overwrite = False,
) -> None:
    """Metrics, calibration, before/after table and a self-contained HTML report."""
    from medtune.config import PredictConfig
    from medtune.evaluate import evaluate

    metrics = evaluate(
        _local_model(model),
        str(data),
        str(output),
        baseline=baseline,
        train_data=str(train_data) if train_data else None,
        task=task,
        labels=str(labels) if labels else None,
        cfg=PredictConfig(mode=mode, min_confidence=min_confidence, merge=merge,
                          merge_dtype=merge_dtype),
        overwrite=overwrite,
        similarity=not no_similarity,
        text_column=text_column,
        label_column=label_column,
        cop_base=cop_base or 0,
    )
    keys = ["accuracy", "macro_f1", "weighted_f1", "ece", "semantic_similarity", "outside_label_set"]
    keys += ["abstained"] * (min_confidence > 0)  # rows below the threshold (still scored)
    keys += ["gold_outside_label_set"] * bool(metrics.get("gold_outside_label_set"))
    print_json({k: metrics[k] for k in keys if k in metrics} | {"report": str(output / "report.html")})


@app.command("demo")
def demo_cmd(
    output: Annotated[Path, typer.Option("--output", "-o")] = Path("runs/demo"),
    n: Annotated[int, typer.Option(help="Synthetic notes to generate.")] = 10000,
    config: ConfigOpt = None,
    overrides: Overrides = None,
    overwrite: Overwrite = False,
) -> None:
    """The whole job on the embedded default: synth -> split -> base -> train -> merge -> predict -> report."""
    from medtune.demo import run_demo

    run_demo(output, n=n, config=config, overrides=overrides, overwrite=overwrite)


@app.command("ablate")
def ablate_cmd(
    data: Annotated[Path, typer.Option(help="Training file (train.csv of a split).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output directory.")],
    val: Annotated[Path | None, typer.Option(help="Validation file.")] = None,
    test: Annotated[Path | None, typer.Option(help="Test file (default: test.csv next to --data).")] = None,
    base: Annotated[str, typer.Option(help="'embedded' or an HF model directory.")] = "embedded",
    steps: Annotated[int, typer.Option(help="Training steps per cell (same budget for every cell).")] = 100,
    quantizations: Annotated[str, typer.Option(help="Comma list of none, 8bit, nf4.")] = "none,8bit,nf4",
    adaptations: Annotated[str, typer.Option(help="Comma list of zero-shot, lora, full.")] = "zero-shot,lora,full",
    text_column: TextCol = None, label_column: LabelCol = None,
    task: TaskOrConfig = None, cop_base: CopBase = None,
    config: ConfigOpt = None, overrides: Overrides = None, overwrite: Overwrite = False,
) -> None:
    """Quantization x adaptation grid with one budget: accuracy, F1, size, memory, latency, train time."""
    from medtune.ablate import ablate
    from medtune.config import load_config

    cfg = load_config(config, overrides)
    _set_data(cfg, text_column, label_column, task, cop_base)
    rows = ablate(str(data), str(output), val=str(val) if val else None, test=str(test) if test else None,
                  base=base, steps=steps, quantizations=[q for q in quantizations.split(",") if q],
                  adaptations=[a for a in adaptations.split(",") if a], overwrite=overwrite,
                  cfg=cfg)
    print_json([{k: r.get(k) for k in ("quantization", "adaptation", "status", "accuracy")} for r in rows])


# ----------------------------------------------------------------------------- registry / serve
@app.command("register")
def register_cmd(
    run_dir: Path,
    name: Annotated[str, typer.Option(help="Registered model name.")],
    alias: Annotated[str, typer.Option(help="Alias to point at this version.")] = "champion",
) -> None:
    """Log a run or merged model to MLflow as a pyfunc model, register it and set an alias."""
    from medtune.registry import register

    print_json(register(run_dir, name, alias))


@app.command("serve")
def serve_cmd(
    model: Annotated[str, typer.Option(help="Run/merged dir or models:/NAME@alias.")],
    host: Annotated[str, typer.Option(help="Bind address (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 8000,
    api_key: Annotated[
        str | None, typer.Option(envvar="MEDTUNE_API_KEY", help="Bearer token required on API "
                                 "routes. Prefer setting MEDTUNE_API_KEY: a value on the command "
                                 "line shows in `ps` to every user of the machine.")
    ] = None,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body; larger: 413.", min=1)] = 1_000_000,
    max_note_chars: Annotated[int, typer.Option(help="Longest note; longer: 422.", min=1)] = 20_000,
    max_batch: Annotated[int, typer.Option(help="Most notes in one request; more: 422.", min=1)] = 64,
    max_concurrency: Annotated[int, typer.Option(
        help="Requests in flight at once; more get 429 with Retry-After (open connections "
             "beyond 4x this + 16 get 503 before their body is read).", min=1)] = 8,
    min_confidence: Annotated[float | None, typer.Option(
        help="Abstain (flag for human review) below this probability unless a request sends "
             "its own min_confidence; unset: only blank notes abstain.", min=0, max=1)] = None,
    timeout: Annotated[float, typer.Option(
        help="Seconds a request may wait for its prediction; longer: 504.", min=0.001)] = 300,
) -> None:
    """HTTP API (POST /v1/predict, /healthz, /readyz, /v1/labels, /docs) and a web page at /."""
    from medtune.serve import serve

    serve(
        model,
        host=host,
        port=port,
        api_key=api_key,
        max_body_bytes=max_body_bytes,
        max_note_chars=max_note_chars,
        max_batch=max_batch,
        max_concurrency=max_concurrency,
        min_confidence=min_confidence,
        timeout_s=timeout,
    )


def _rank_prefix() -> str:
    """"[rank N] " for the other processes of a torchrun/accelerate job (each prints its own
    error; rank 0's reads as in a single process), "" otherwise."""
    rank = os.environ.get("RANK", "0")
    return "" if rank == "0" or os.environ.get("WORLD_SIZE", "1") == "1" else f"[rank {rank}] "


def main() -> None:
    # medtune draws its own progress; the libraries' per-load bars ("Loading weights", "Writing
    # model shards", MLflow's "Downloading artifacts") only clutter it, as do MLflow's INFO lines
    # ("Creating initial MLflow database tables..."). Set a variable to bring them back.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    # SIGTERM (timeout, docker stop, Slurm) unwinds like Ctrl-C: temporary outputs are removed
    # (by default it killed the process where it stood, leaving .NAME.*.tmp files of note text)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        code = app(standalone_mode=False)  # click's usage errors come here, printed below
    except _CLICK.ClickException as exc:  # a bad command line: one line, like every other error
        no_args_help: Any = getattr(_CLICK, "NoArgsIsHelpError", ())  # () (older click): matches nothing
        if isinstance(exc, no_args_help):
            exc.show()  # `medtune data` alone: the group's help, as before
            sys.exit(exc.exit_code)
        if debug:
            raise
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        print(f"error: {exc.format_message()}{hint}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Abort:  # e.g. end of input at a prompt
        print("aborted", file=sys.stderr)
        sys.exit(1)
    except MedtuneError as exc:
        if debug:
            raise
        print(f"{_rank_prefix()}error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except OSError as exc:  # an unwritable or invalid path: one line naming it
        if debug or exc.strerror is None:
            raise
        where = exc.filename if exc.filename is not None else "?"
        print(f"{_rank_prefix()}error: {where}: {exc.strerror}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # outside typer's reach (e.g. while importing)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    if code == 130:  # typer turns Ctrl-C into a silent exit 130
        print("interrupted (outputs are written whole or not at all: nothing half-written "
              "was left)", file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
