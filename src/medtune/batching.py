"""Turn (text, answer) records into token sequences and length-grouped batches.

Each example is ``prompt_ids + answer_ids + [eos]``; only the answer and EOS are supervised.
Batches group examples of similar length (less padding) but stay a deterministic function of
(seed, epoch), so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from medtune.scoring import truncate_prompt
from medtune.tasks.mcqa import LETTERS, choice_ids

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    n_prompt: int  # positions [0, n_prompt) are prompt: no loss


def encode_examples(template, tokenizer, texts: Sequence[str], answers: Sequence[str],
                    max_length: int, labels: Sequence[str] | None = None) -> list[Example]:
    """prompt + answer (+ EOS) per row, at most ``max_length`` tokens. An over-long prompt loses
    its middle exactly as prediction cuts it (``scoring.label_rows``): room is kept for the
    longest answer (of ``labels``, the whole label set, when given; MCQA: the longest choice +
    EOS), so the model trains on the very prompts it is later scored on."""
    out = []
    if template.task == "mcqa":  # lm-eval's tokenization: context + " A" encoded jointly
        for text, answer in zip(texts, answers, strict=True):
            ctx, conts = choice_ids(tokenizer, template, text, LETTERS)
            ans = [*conts[LETTERS.index(answer)], tokenizer.eos_token_id]
            ctx = truncate_prompt(ctx, max(8, max_length - max(map(len, conts)) - 1))
            out.append(Example(input_ids=ctx + ans, n_prompt=len(ctx)))
        return out
    longest = max((len(template.answer_ids(tokenizer, lab)) for lab in labels or ()), default=0)
    for text, answer in zip(texts, answers, strict=True):
        ans = template.answer_ids(tokenizer, answer)
        room = max(8, max_length - max(len(ans), longest))
        prompt = truncate_prompt(template.prompt_ids(tokenizer, text), room)
        out.append(Example(input_ids=prompt + ans, n_prompt=len(prompt)))
    return out


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = True, mega: int = 32) -> list[list[int]]:
    """Index batches for one epoch: shuffle, sort within mega-batches by length, shuffle batches."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    if group_by_length:
        span = batch_size * mega
        order = [i for s in range(0, len(order), span)
                 for i in sorted(order[s:s + span], key=lambda j: -lengths[j])]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length:
        perm = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[i] for i in perm]
    return batches


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; labels are IGNORE on prompt and padding."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, e.n_prompt:n] = ids[i, e.n_prompt:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def examples_digest(examples: Sequence[Example]) -> str:
    """Identity of encoded examples, order included (a checkpoint records it: a resume on other
    data is told so)."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(len(e.input_ids).to_bytes(4, "little"))
        digest.update(array("i", e.input_ids).tobytes())
    return digest.hexdigest()[:16]
