"""Label scoring: log-likelihood of every allowed label as a continuation of each prompt.

The prompt is computed once per note. Each row of a batch holds ``prompt + label_1 + ... + label_L``
with a 4-D attention mask that lets every label's tokens see the prompt and their own earlier
tokens only (a one-level prefix tree), and position ids that restart at the prompt's end for each
label. One forward pass therefore scores all L labels at the cost of P + sum(len(label)) tokens
instead of L * (P + len(label)) for the naive per-(note, label) passes.

score(label) = sum of log p(token) over the label's tokens including EOS, exactly the sequence the
model was trained to produce.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _mask_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32


@torch.no_grad()
def score_tree(model, prompts: Sequence[Sequence[int]], labels: Sequence[Sequence[int]],
               pad_id: int) -> torch.Tensor:
    """Sum log-probabilities [N, L] of each label (token ids incl. EOS) after each prompt."""
    device = _model_device(model)
    n_labels, batch = len(labels), len(prompts)
    label_flat = [tok for lab in labels for tok in lab]
    label_seg = [k + 1 for k, lab in enumerate(labels) for _ in lab]     # 1..L per label token
    label_pos = [j for lab in labels for j in range(len(lab))]          # offset inside its label
    width = max(len(p) for p in prompts) + len(label_flat)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    pos = torch.zeros((batch, width), dtype=torch.long)
    seg = torch.full((batch, width), -1, dtype=torch.long)              # 0 prompt, -1 padding
    max_k = max(len(lab) for lab in labels)
    src = torch.zeros((batch, n_labels, max_k), dtype=torch.long)
    starts = torch.tensor([0] + [len(lab) for lab in labels]).cumsum(0)[:-1]
    for b, prompt in enumerate(prompts):
        p = len(prompt)
        ids[b, :p + len(label_flat)] = torch.tensor(list(prompt) + label_flat)
        pos[b, :p] = torch.arange(p)
        pos[b, p:p + len(label_flat)] = p + torch.tensor(label_pos)
        seg[b, :p] = 0
        seg[b, p:p + len(label_flat)] = torch.tensor(label_seg)
        # token j of label k is predicted at the prompt's last position (j=0) or at token j-1
        for k, lab in enumerate(labels):
            off = p + int(starts[k])
            src[b, k, : len(lab)] = torch.tensor([p - 1, *range(off, off + len(lab) - 1)])
    # i may attend j when j <= i and j is in the prompt or in i's own label (padding: same rule)
    idx = torch.arange(width)
    causal = idx[:, None] >= idx[None, :]
    allowed = causal[None] & ((seg[:, None, :] == 0) | (seg[:, :, None] == seg[:, None, :]))
    dtype = _mask_dtype(model)
    mask = torch.zeros((batch, 1, width, width), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                   position_ids=pos.to(device), use_cache=False).logits
    tgt = torch.zeros((n_labels, max_k), dtype=torch.long)
    valid = torch.zeros((n_labels, max_k), dtype=torch.bool)
    for k, lab in enumerate(labels):
        tgt[k, : len(lab)] = torch.tensor(list(lab))
        valid[k, : len(lab)] = True
    # gather only the needed positions, then log-softmax over the vocabulary there
    flat_src = src.view(batch, -1).to(device)
    picked = torch.gather(logits, 1, flat_src[..., None].expand(-1, -1, logits.shape[-1]))
    logp = picked.float().log_softmax(-1)
    tgt_b = tgt.view(1, -1, 1).expand(batch, -1, -1).to(device)
    tok_lp = torch.gather(logp, 2, tgt_b).view(batch, n_labels, max_k)
    return (tok_lp * valid.to(device)).sum(-1).cpu()


@torch.no_grad()
def score_naive(model, prompts: Sequence[Sequence[int]], labels: Sequence[Sequence[int]],
                pad_id: int) -> torch.Tensor:
    """Reference implementation: one forward pass per (prompt, label) pair. For tests only."""
    device = _model_device(model)
    out = torch.zeros((len(prompts), len(labels)))
    for i, prompt in enumerate(prompts):
        for j, lab in enumerate(labels):
            ids = torch.tensor([list(prompt) + list(lab)], device=device)
            logp = model(input_ids=ids, use_cache=False).logits[0].float().log_softmax(-1)
            p = len(prompt)
            out[i, j] = sum(float(logp[p - 1 + k, tok]) for k, tok in enumerate(lab))
    return out


def score_labels(model, tokenizer, template, texts: Sequence[str], labels: Sequence[str],
                 batch_size: int = 8, max_prompt_tokens: int | None = None) -> torch.Tensor:
    """[N, L] log-likelihoods of each label for each text, using the run's template."""
    label_ids = [template.answer_ids(tokenizer, lab) for lab in labels]
    prompts = [truncate_prompt(template.prompt_ids(tokenizer, t), max_prompt_tokens) for t in texts]
    parts = [score_tree(model, prompts[i:i + batch_size], label_ids, tokenizer.pad_token_id)
             for i in range(0, len(prompts), batch_size)]
    return torch.cat(parts) if parts else torch.zeros((0, len(labels)))


def truncate_prompt(ids: list[int], limit: int | None, keep_tail: int = 16) -> list[int]:
    """Cut the middle of an over-long prompt, keeping its head (the note's start) and its tail
    (the template's answer cue)."""
    if limit is None or len(ids) <= limit:
        return ids
    return ids[: limit - keep_tail] + ids[-keep_tail:]
