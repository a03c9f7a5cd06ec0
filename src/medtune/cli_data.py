"""`medtune data inspect|split|synth|scrub`: the data verbs' command line (registered by
``medtune.cli``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from medtune.cli_options import (
    ConfigOpt,
    CopBase,
    LabelCol,
    Overrides,
    Overwrite,
    Task,
    TextCol,
    print_json,
)
from medtune.errors import ConfigError

data_app = typer.Typer(no_args_is_help=True, help="Inspect, split, scrub and synthesize data.")


@data_app.command("inspect")
def data_inspect(
    file: Path,
    against: Annotated[Path | None, typer.Option(help="Check leakage against this file.")] = None,
    task: Task = "protocol",
    text_column: TextCol = None,
    label_column: LabelCol = None,
    cop_base: CopBase = None,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer dir for token lengths.")] = None,
    show_examples: Annotated[bool, typer.Option("--show-examples", help="Print example notes (may hold PHI).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Label counts, lengths, duplicates, near-duplicate labels and leakage (counts only)."""
    from medtune.data import inspect_data, render_inspect

    tok = None
    if tokenizer:
        from medtune.model import load_tokenizer

        tok = load_tokenizer(tokenizer)
    summary = inspect_data(file, against=against, task=task, text_column=text_column,
                           label_column=label_column, tokenizer=tok, show_examples=show_examples,
                           cop_base=cop_base or 0)
    print_json(summary) if as_json else render_inspect(summary)


@data_app.command("split")
def data_split(
    file: Path,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output directory.")],
    config: ConfigOpt = None,
    overrides: Overrides = None,
    task: Task = "protocol",
    text_column: TextCol = None,
    label_column: LabelCol = None,
    min_count: Annotated[int | None, typer.Option(
        help="Protocol task: drop labels rarer than this (default: data.min_count, 50).")] = None,
    seed: Annotated[int | None, typer.Option(help="Split seed.")] = None,
    cop_base: CopBase = None,
    overwrite: Overwrite = False,
) -> None:
    """Clean, dedup, filter rare labels and split into train/val/test (leakage-free)."""
    from medtune.config import load_config, set_key
    from medtune.data import split_data

    cfg = load_config(config, overrides)
    cfg.data.task = task if task != "protocol" else cfg.data.task
    for key, value in (
        ("text_column", text_column),
        ("label_column", label_column),
        ("min_count", min_count),
        ("seed", seed),
        ("cop_base", cop_base),
    ):
        if value is not None:
            set_key(cfg, f"data.{key}", value, "--" + key.replace("_", "-"))  # checked like data.{key}
    card = split_data(file, output, cfg.data, overwrite=overwrite)
    sizes = card.get("splits", card.get("split_sizes", {}))
    shown = ", ".join(f"{name} {rows}" for name, rows in sizes.items()) \
        if isinstance(sizes, dict) else sizes
    print(f"wrote {output}: {shown} rows; labels kept: {len(card.get('labels_kept', card.get('labels', [])))}")
    if card.get("labels_filtered"):
        print(f"warning: min_count={card['min_count']} dropped {len(card['labels_filtered'])} rare "
              f"labels ({card['rows_filtered']} rows); listed in {output / 'data_card.md'}",
              file=sys.stderr)
    if card.get("near_duplicate_labels"):  # "CT Head" and "ct head": two classes unless merged
        print(f"warning: {len(card['near_duplicate_labels'])} label pair(s) look like one label "
              f"spelled two ways (case, a typo) and are kept as separate classes; listed in "
              f"{output / 'data_card.md'}", file=sys.stderr)


@data_app.command("synth")
def data_synth(
    task: Task = "protocol",
    n: Annotated[int, typer.Option(help="Rows.")] = 2000,
    output: Annotated[Path, typer.Option("--output", "-o", help="CSV/JSONL/Parquet file.")] = Path("synth.csv"),
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same rows).")] = 0,
    imbalance: Annotated[float | None, typer.Option(
        help="Protocol notes: Zipf exponent of class sizes (default 1.0).")] = None,
    label_noise: Annotated[float | None, typer.Option(
        help="Protocol notes: fraction of flipped labels (default 0).")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Generate synthetic protocol notes or MedMCQA-style questions (deterministic per seed)."""
    from medtune.synth import write_synth

    if task == "mcqa" and (imbalance is not None or label_noise is not None):
        raise ConfigError("--imbalance and --label-noise shape protocol notes; MCQA questions "
                          "take neither (their answers are spread evenly over A-D)")
    imbalance = 1.0 if imbalance is None else imbalance
    label_noise = 0.0 if label_noise is None else label_noise

    for flag, value, ok, rule in (("--n", n, n >= 1, ">= 1"), ("--imbalance", imbalance, imbalance >= 0, ">= 0"),
                                  ("--label-noise", label_noise, 0 <= label_noise <= 1, "in [0, 1]")):
        if not ok:  # named as typed (the library's own checks name its arguments)
            raise ConfigError(f"{flag}: must be {rule}, got {value}")
    path = write_synth(task, n, output, seed=seed, imbalance=imbalance, label_noise=label_noise, overwrite=overwrite)
    print(f"wrote {n} {task} rows to {path}")


@data_app.command("scrub")
def data_scrub(
    file: Path,
    output: Annotated[Path, typer.Option("--output", "-o")],
    text_column: TextCol = None,
    also: Annotated[str, typer.Option(help="Comma list of more columns to scrub.")] = "",
    task: Task = "protocol",
    overwrite: Overwrite = False,
) -> None:
    """Replace PHI (names, dates, phone, MRN, ...) with typed placeholders like [DATE].

    Scrubs the text column (--task mcqa: the question, options and exp) and --also columns;
    warns, with counts only, about other columns
    in which PHI-like spans remain."""
    from medtune.scrub import scrub_file
    from medtune.tables import shown

    extra = [c.strip() for c in also.split(",") if c.strip()]
    counts = scrub_file(file, output, text_column=text_column, also=extra, overwrite=overwrite,
                        task=task)
    print_json(counts)
    left = counts.get("not_scrubbed", {})
    if left:
        listed = ", ".join(f"'{shown(c)}' ({n})" for c, n in left.items())
        print(f"warning: {file}: PHI-like spans remain in columns not scrubbed: {listed}; "
              f"scrub them too with --also "
              f"{','.join(shown(c) for c in left)}", file=sys.stderr)
