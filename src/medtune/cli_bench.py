"""`medtune bench train|predict`: the side-by-side benchmarks' command line (registered by
``medtune.cli``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medtune.cli_options import Overwrite

bench_app = typer.Typer(no_args_is_help=True, help="Side-by-side benchmarks (one run, ratios printed).")


@bench_app.command("train")
def bench_train_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="Writes bench_train.json and .md here.")
                      ] = Path("runs/bench"),
    steps: Annotated[int, typer.Option(help="Training steps per side (the first 2 not timed).")] = 20,
    vocab: Annotated[str, typer.Option(
        help="Comma list: embedded, or vocabulary sizes (e.g. 32000, 256000) of random copies "
             "of the embedded model; none.")] = "embedded,32000",
    arch: Annotated[str, typer.Option(
        help="Comma list of full-size random models: gemma-2b, llama-2-7b (a GPU's job).")] = "",
    layers: Annotated[int, typer.Option(help="Decoder layers of the --arch models (0: all).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Global batch (notes per step).")] = 16,
    sides: Annotated[str, typer.Option(
        help="Comma list: medtune, trl (TRL SFTTrainer + peft QLoRA; TRL casts the LoRA weights "
             "to bf16), trl_fp32 (the same, LoRA in float32), baseline (plain loop, full "
             "logits).")] = "medtune,trl,trl_fp32,baseline",
    overwrite: Overwrite = False,
) -> None:
    """medtune's trainer vs TRL's SFTTrainer and a full-logits loop: tokens/s, memory, loss.

    Also step time and peak memory against its theoretical floor."""
    from medtune.bench import bench_train

    bench_train(output, steps=steps, vocab=vocab, arch=arch, layers=layers, batch_size=batch_size,
                sides=sides, overwrite=overwrite)


@bench_app.command("predict")
def bench_predict_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="Writes bench_predict.json and .md here.")
                      ] = Path("runs/bench"),
    n: Annotated[int, typer.Option(help="Notes to predict.")] = 500,
    model: Annotated[str | None, typer.Option(help="Existing run/merged dir (default: a quick model).")] = None,
    data: Annotated[Path | None, typer.Option(help="Labelled notes (default: synthetic).")] = None,
    labels: Annotated[int, typer.Option(help="Labels of the quick model.")] = 4,
    arch: Annotated[str | None, typer.Option(
        help="Instead of the quick model: a full-size random model, gemma-2b or llama-2-7b "
             "(speed only; a GPU's job).")] = None,
    layers: Annotated[int, typer.Option(help="Decoder layers of the --arch model (0: all).")] = 0,
    threads: Annotated[list[int] | None, typer.Option(
        help="Torch threads, the same for both sides; repeat for several counts (one table each).")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Constrained batch prediction vs per-note sampled generation: notes/s and accuracy."""
    from medtune.bench_predict import bench_predict

    bench_predict(output, n=n, model=model, data=str(data) if data else None, n_labels=labels,
                  arch=arch, layers=layers, threads=threads or [1], overwrite=overwrite)
