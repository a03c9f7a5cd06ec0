"""Free generation for ``predict.mode=generate``, label snapping, and the per-note baseline.

Batched generation pads prompts on the LEFT so that every row's last prompt token sits at the same
position and the new tokens of all rows are produced in lockstep; right padding would make the
model continue after pad tokens. The tokenizer's padding side is switched for the call only.

An answer is the decoded new tokens up to the first EOS, stripped. Nothing forces it into the
label set: ``in_label_set`` says whether it is one, and ``snap`` maps it to the closest label.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from medtune.predict import Predictor


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _sampling_kwargs(temperature: float, top_p: float) -> dict[str, Any]:
    """Greedy when temperature == 0, else nucleus sampling (temperature, top_p)."""
    if temperature <= 0:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p),
            "top_k": None}


def decode_new_tokens(tokenizer, new_ids: Sequence[int]) -> str:
    """Decode generated ids up to (not including) the first EOS, without special tokens."""
    ids = list(new_ids)
    eos = tokenizer.eos_token_id
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return str(tokenizer.decode(ids, skip_special_tokens=True)).strip()


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   temperature: float = 0.0, top_p: float = 1.0) -> list[str]:
    """Generate one answer per prompt (token ids) in a single left-padded batch."""
    if not prompts:
        return []
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer.pad({"input_ids": [list(p) for p in prompts]}, padding=True,
                              return_tensors="pt")
    finally:
        tokenizer.padding_side = old_side
    device = _device(model)
    input_ids = batch["input_ids"].to(device)
    out = model.generate(
        input_ids=input_ids, attention_mask=batch["attention_mask"].to(device),
        max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, **_sampling_kwargs(temperature, top_p))
    width = input_ids.shape[1]
    return [decode_new_tokens(tokenizer, row[width:].tolist()) for row in out]


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def snap_to_label(text: str, labels: Sequence[str]) -> str:
    """The label equal to ``text`` up to case and spacing, else the most similar label
    (difflib ratio; ties go to the earlier label)."""
    key = _norm(text)
    for label in labels:
        if _norm(label) == key:
            return label
    matcher = difflib.SequenceMatcher(autojunk=False)
    matcher.set_seq2(key)
    best, best_ratio = labels[0], -1.0
    for label in labels:
        matcher.set_seq1(_norm(label))
        ratio = matcher.ratio()
        if ratio > best_ratio:
            best, best_ratio = label, ratio
    return best


def generation_rows(raw: Sequence[str], labels: Sequence[str], snap: bool) -> list[dict[str, Any]]:
    """Prediction rows for raw generated answers (confidence is undefined: NaN). An empty
    answer abstains (snapping it would pick a label the model never said)."""
    allowed = set(labels)
    rows = []
    for text in raw:
        inside = text in allowed
        row: dict[str, Any] = {"prediction": text, "confidence": float("nan"),
                               "abstained": not text.strip(),
                               "top_k": [], "raw_output": text, "in_label_set": inside}
        if snap:
            row["prediction"] = text if inside else snap_to_label(text, labels)
            row["snapped"] = not inside
        rows.append(row)
    return rows


@torch.no_grad()
def per_row_generate_baseline(predictor: Predictor, texts: Sequence[str], temperature: float = 0.7,
                              top_p: float = 0.9, max_new_tokens: int = 16,
                              seed: int = 0) -> list[str]:
    """The original project's style, for benchmarks: one note at a time, sampled generation,
    raw decoded text (no label constraint). Same prompt (and truncation) as ``Predictor``."""
    torch.manual_seed(seed)
    model, tokenizer = predictor.model, predictor.tokenizer
    device = _device(model)
    out = []
    for prompt in predictor.prompts(texts, max_new_tokens):
        ids = torch.tensor([prompt], device=device)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id,
                             **_sampling_kwargs(temperature, top_p))
        out.append(decode_new_tokens(tokenizer, gen[0, ids.shape[1]:].tolist()))
    return out
