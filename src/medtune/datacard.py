"""`data inspect` and `data split`: duplicates, conflicting labels, leakage, rare-label filtering,
a stratified split, and the data card that records every step.

Order of a split (each step counted in the card):
    load (empty rows dropped) -> scrub PHI (if data.scrub_phi) -> collapse whitespace
    -> dedup by normalized text (conflicting labels: majority wins, ties dropped)
    -> drop labels under min_count -> stratified split.
Dedup happens before the split, so no normalized text can sit in two splits.
"""

from __future__ import annotations

import difflib
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtune import __version__
from medtune.config import DataConfig
from medtune.data import MCQA_COLUMNS, load_labeled, normalize_text
from medtune.errors import ConfigError, DataError, MedtuneError
from medtune.fsutil import atomic_dir, check_output_dir, write_json, write_text
from medtune.tasks.mcqa import OPTION_COLUMNS, format_question

SPLITS = ("train", "val", "test")
EXAMPLE_CHARS = 200


# ---------------------------------------------------------------------------------- the checks


def near_duplicate_labels(labels: list[str]) -> list[dict[str, Any]]:
    """Pairs of labels that look like one label spelled two ways, compared case-folded:
    difflib ratio >= 0.9, or edit distance <= 2 when both have at least 6 characters (shorter
    labels such as 'A'/'B' or 'CT'/'MR' differ by design)."""
    items = sorted(set(labels) - {""})
    if len(items) > 2000:  # pairwise comparison would be too slow; say nothing rather than hang
        return []
    folded = [item.casefold() for item in items]
    pairs = []
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            a, b = folded[i], folded[j]
            ratio = difflib.SequenceMatcher(None, a, b).ratio()
            close = min(len(a), len(b)) >= 6 and abs(len(a) - len(b)) <= 2
            distance = _edit_distance(a, b) if close else None
            if ratio >= 0.9 or (distance is not None and distance <= 2):
                pairs.append({"a": items[i], "b": items[j], "ratio": round(ratio, 3),
                              "edit_distance": distance})
    return pairs


def _edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def duplicate_stats(df: pd.DataFrame, keys: pd.Series) -> dict[str, int]:
    """Exact and normalized duplicate rows, and normalized texts carrying different labels."""
    labelled = df["label"] != ""
    labels_per_key = df[labelled].groupby(keys[labelled])["label"].nunique()
    conflict_keys = labels_per_key.index[labels_per_key > 1]
    return {"exact_duplicate_rows": int(len(df) - df["text"].nunique()),
            "normalized_duplicate_rows": int(len(df) - keys.nunique()),
            "distinct_texts": int(keys.nunique()),
            "conflict_groups": len(conflict_keys),
            "conflict_rows": int(keys.isin(conflict_keys).sum())}


def _dedup(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """One row per normalized text; conflicting labels resolved by majority, ties dropped."""
    counts = df.groupby(["_key", "label"], sort=False).size().rename("n").reset_index()
    counts["top"] = counts.groupby("_key", sort=False)["n"].transform("max")
    top = counts[counts["n"] == counts["top"]]
    n_top = top.groupby("_key", sort=False)["label"].transform("size")
    winners = pd.MultiIndex.from_frame(top.loc[n_top == 1, ["_key", "label"]])
    n_labels = counts.groupby("_key", sort=False)["label"].size()
    conflict_keys = set(n_labels.index[n_labels > 1])
    tied_keys = set(top.loc[n_top > 1, "_key"])
    is_winner = pd.MultiIndex.from_frame(df[["_key", "label"]]).isin(winners)
    in_conflict = df["_key"].isin(conflict_keys).to_numpy()
    kept = df[is_winner].drop_duplicates("_key", keep="first").reset_index(drop=True)
    return kept, {"groups": len(conflict_keys),
                  "rows": int(in_conflict.sum()),
                  "resolved_by_majority": len(conflict_keys - tied_keys),
                  "dropped_ties": len(tied_keys),
                  "rows_dropped_in_ties": int(df["_key"].isin(tied_keys).sum()),
                  "minority_rows_removed": int((in_conflict & ~is_winner
                                                & ~df["_key"].isin(tied_keys).to_numpy()).sum())}


# --------------------------------------------------------------------------------------- split


def _share(quota: dict[str, float], room: dict[str, int], take: dict[str, int], left: int,
           order: list[str]) -> int:
    """Hand out ``left`` rows one at a time to the label furthest below its quota."""
    while left > 0:
        candidates = [label for label in order if take[label] < room[label]]
        if not candidates:
            break
        best = max(candidates, key=lambda label: quota[label] - take[label])
        take[best] += 1
        left -= 1
    return left


def _allocate(counts: dict[str, int], used: dict[str, int], total: int, n: int,
              order: list[str]) -> dict[str, int]:
    """Rows per label for one split of ``total`` rows, proportional to ``counts`` (largest
    remainder). Each label keeps one row for train when it can."""
    quota = {label: total * counts[label] / n for label in order}
    free = {label: counts[label] - used[label] for label in order}
    soft = {label: max(free[label] - 1, 0) for label in order}
    take = {label: min(int(quota[label]), soft[label]) for label in order}
    left = _share(quota, soft, take, total - sum(take.values()), order)
    _share(quota, free, take, left, order)
    return take


def _stratified(df: pd.DataFrame, n_val: int, n_test: int, seed: int
                ) -> tuple[dict[str, pd.DataFrame], dict[str, dict[str, int]]]:
    rng = np.random.default_rng(seed)
    groups = df.groupby("label", sort=True).indices
    labels = sorted(groups)
    counts = {label: len(groups[label]) for label in labels}
    order = [labels[i] for i in rng.permutation(len(labels))]  # seeded tie-break
    zero = dict.fromkeys(labels, 0)
    test = _allocate(counts, zero, n_test, len(df), order)
    val = _allocate(counts, test, n_val, len(df), order)
    assign = np.full(len(df), "train", dtype=object)
    for label in labels:
        rows = rng.permutation(groups[label])
        assign[rows[: test[label]]] = "test"
        assign[rows[test[label]: test[label] + val[label]]] = "val"
    frames = {}
    for split in SPLITS:
        part = df[assign == split]
        frames[split] = part.iloc[rng.permutation(len(part))].reset_index(drop=True)
    per_label = {label: {"train": counts[label] - test[label] - val[label], "val": val[label],
                         "test": test[label]} for label in labels}
    return frames, per_label


def _split_sizes(n: int, cfg: DataConfig, path: Path) -> tuple[int, int]:
    for name in ("val_fraction", "test_fraction"):
        if not 0 <= getattr(cfg, name) < 1:
            raise ConfigError(f"data.{name} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.val_fraction + cfg.test_fraction >= 1:
        raise ConfigError("data.val_fraction + data.test_fraction must be below 1")
    n_val = max(round(n * cfg.val_fraction), 1 if cfg.val_fraction > 0 else 0)
    n_test = max(round(n * cfg.test_fraction), 1 if cfg.test_fraction > 0 else 0)
    if n - n_val - n_test < 1:
        raise DataError(f"{path}: {n} rows left after cleaning, too few for train/val/test")
    return n_val, n_test


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_data(path: str | Path, output: str | Path, cfg: DataConfig, *,
               overwrite: bool = False) -> dict[str, Any]:
    """Clean, dedup, filter and split ``path`` into ``output``; returns the data card."""
    path, output = Path(path), Path(output)
    check_output_dir(output, overwrite, inputs=[path])  # an output holding the input: refused
    card, frames = _build(path, cfg)
    columns = ["id", "text", "label"]
    if cfg.task == "mcqa":
        columns = [*MCQA_COLUMNS, "text", "label"]
    labels = {"task": cfg.task, "labels": sorted(card["labels_kept"]),
              "counts": card["labels_kept"]}
    with atomic_dir(output) as tmp:  # nothing exists at ``output`` until all of it does
        for split in SPLITS:  # a split set to 0 (data.val_fraction=0) gets no file
            if len(frames[split]):
                frames[split][columns].to_csv(tmp / f"{split}.csv", index=False)
        write_json(tmp / "labels.json", labels)
        write_json(tmp / "data_card.json", card)
        write_text(tmp / "data_card.md", card_markdown(card))
    return card


def _build(path: Path, cfg: DataConfig) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    df = load_labeled(path, task=cfg.task, text_column=cfg.text_column,
                      label_column=cfg.label_column, max_field_bytes=cfg.max_field_bytes,
                      drop_empty=True, cop_base=cfg.cop_base)
    attrs = dict(df.attrs)
    fields = ["question", *OPTION_COLUMNS, "exp"] if cfg.task == "mcqa" else ["text"]
    scrubbed = 0
    if cfg.scrub_phi:  # before dedup: notes differing only in identifiers are duplicates
        from medtune.phi import scrub_text

        before = df[fields].copy()
        for column in fields:
            df[column] = df[column].map(scrub_text)
        scrubbed = int((df[fields] != before).any(axis=1).sum())
        if cfg.task == "mcqa":
            df["text"] = [format_question(r) for r in df[fields].to_dict("records")]
    raw_keys = df["text"].map(normalize_text)
    stats = duplicate_stats(df, raw_keys)
    if cfg.task == "mcqa":
        for column in fields[:-1]:
            df[column] = df[column].map(_collapse)
        records = df[["question", *OPTION_COLUMNS]].to_dict("records")
        df["text"] = [format_question(r) for r in records]
    else:
        df["text"] = df["text"].map(_collapse)
    df["_key"] = raw_keys
    df, conflicts = _dedup(df)
    if df.empty:
        raise DataError(f"{path}: no rows left: every text's copies carry tied conflicting labels")
    counts = df["label"].value_counts()
    filtered: dict[str, int] = {}
    if cfg.task == "protocol" and cfg.min_count > 1:
        filtered = {str(k): int(v) for k, v in counts[counts < cfg.min_count].items()}
        if len(filtered) == len(counts):
            raise DataError(f"{path}: all labels filtered out by min_count={cfg.min_count} "
                            f"(largest label has {int(counts.max())} rows)")
        if filtered and len(counts) - len(filtered) < 2:  # a one-label "classifier" is none
            raise DataError(f"{path}: min_count={cfg.min_count} keeps 1 of {len(counts)} labels; "
                            f"a classifier needs 2 or more (the second largest has "
                            f"{int(counts.iloc[1])} rows): lower min_count")
        df = df[~df["label"].isin(filtered)].reset_index(drop=True)
    n_val, n_test = _split_sizes(len(df), cfg, path)
    frames, per_label = _stratified(df, n_val, n_test, cfg.seed)
    keys = [set(frames[s]["_key"]) for s in SPLITS]
    leaked = len(keys[0] & keys[1]) + len(keys[0] & keys[2]) + len(keys[1] & keys[2])
    if leaked:  # impossible after dedup; checked because a silent leak would void every metric
        raise MedtuneError(f"{path}: internal error: {leaked} normalized texts in two splits")
    kept = {str(k): int(v) for k, v in df["label"].value_counts().items()}
    card = {
        "medtune_version": __version__, "task": cfg.task, "source": str(path),
        "source_sha256": _sha256(path),
        "columns": {"text": attrs.get("text_column"), "label": attrs.get("label_column")},
        "rows_read": attrs["rows_read"], "empty_dropped": attrs["dropped_empty"],
        "empty_dropped_by_column": attrs["dropped_empty_by_column"],
        "whitespace": "runs collapsed to one space, case kept"
                      + (" (question and options)" if cfg.task == "mcqa" else ""),
        "exact_duplicate_rows": stats["exact_duplicate_rows"],
        "normalized_duplicate_rows": stats["normalized_duplicate_rows"],
        "distinct_texts": stats["distinct_texts"],
        "conflicts": {**conflicts, "resolution": "majority label kept; ties dropped"},
        "rows_after_dedup": int(sum(counts)),
        "min_count": cfg.min_count if cfg.task == "protocol" else None,
        "min_count_note": None if cfg.task == "protocol" else "not applied to answer letters",
        "labels_filtered": filtered, "rows_filtered": int(sum(filtered.values())),
        "labels_kept": kept,
        "near_duplicate_labels": near_duplicate_labels(list(counts.index)),
        "split": {"seed": cfg.seed, "val_fraction": cfg.val_fraction,
                  "test_fraction": cfg.test_fraction,
                  "method": "stratified by label (largest remainder per label, seeded shuffle)",
                  "labels_not_in_val": [k for k, v in per_label.items() if not v["val"]],
                  "labels_not_in_test": [k for k, v in per_label.items() if not v["test"]]},
        "split_sizes": {s: len(frames[s]) for s in SPLITS},
        "per_label": per_label,
        "leakage_across_splits": leaked,
        "phi_scrubbed": bool(cfg.scrub_phi), "rows_changed_by_phi_scrub": scrubbed,
    }
    return card, frames


def _md(value: Any) -> str:
    return str(value).replace("|", "\\|")


def card_markdown(card: dict[str, Any]) -> str:
    c = card["conflicts"]
    lines = [
        f"# Data card: {Path(card['source']).name}", "",
        f"- source: `{card['source']}` (sha256 `{card['source_sha256'][:16]}`)",
        f"- task: {card['task']}; text column `{card['columns']['text']}`, "
        f"label column `{card['columns']['label']}`",
        f"- rows read: {card['rows_read']}",
        f"- empty rows dropped: {card['empty_dropped']}" + (" (" + ", ".join(
            f"{n} with an empty `{col}`" for col, n in card["empty_dropped_by_column"].items()
            if n) + ")" if card["empty_dropped"] else ""),
        f"- whitespace: {card['whitespace']}",
        f"- exact duplicate rows: {card['exact_duplicate_rows']}",
        f"- duplicate rows after whitespace/case normalization: "
        f"{card['normalized_duplicate_rows']} ({card['distinct_texts']} distinct texts)",
        f"- texts with conflicting labels: {c['groups']} groups ({c['rows']} rows); "
        f"{c['resolved_by_majority']} resolved by majority label ({c['minority_rows_removed']} "
        f"minority rows removed), {c['dropped_ties']} ties dropped ({c['rows_dropped_in_ties']} "
        "rows)",
        f"- rows after dedup: {card['rows_after_dedup']}",
    ]
    if card["min_count"] is None:
        lines.append(f"- min_count: {card['min_count_note']}")
    else:
        lines.append(f"- labels filtered by min_count={card['min_count']}: "
                     f"{len(card['labels_filtered'])} ({card['rows_filtered']} rows)")
        lines += [f"  - {_md(k)}: {v}" for k, v in card["labels_filtered"].items()]
    if card["near_duplicate_labels"]:
        lines.append("- possible near-duplicate labels (not merged; review): "
                     + "; ".join(f"{_md(p['a'])} / {_md(p['b'])}"
                                 for p in card["near_duplicate_labels"]))
    sizes, split = card["split_sizes"], card["split"]
    lines += [
        f"- labels kept: {len(card['labels_kept'])}",
        f"- split ({split['method']}, seed {split['seed']}): train {sizes['train']}, "
        f"val {sizes['val']}, test {sizes['test']}",
        f"- labels absent from val: {split['labels_not_in_val'] or 'none'}; "
        f"from test: {split['labels_not_in_test'] or 'none'}",
        f"- normalized texts shared between splits: {card['leakage_across_splits']}",
        f"- PHI scrubbed (medtune.phi, before dedup): "
        f"{'yes' if card['phi_scrubbed'] else 'no'} ({card['rows_changed_by_phi_scrub']} rows "
        "changed)",
        "", "| label | train | val | test | total |", "|---|---:|---:|---:|---:|",
    ]
    for label, row in sorted(card["per_label"].items()):
        lines.append(f"| {_md(label)} | {row['train']} | {row['val']} | {row['test']} | "
                     f"{sum(row.values())} |")
    return "\n".join(lines) + "\n"
