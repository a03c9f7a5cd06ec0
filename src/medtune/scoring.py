"""Label scoring: log-likelihood of every allowed label as a continuation of each prompt.

The labels' token sequences are merged into a prefix tree (trie): "CT Abdomen", "CT Chest" and
"CT Head" share their first tokens, stored once. Each row of a batch holds ``prompt + inner
trie nodes`` with a 4-D attention mask that lets every node see the prompt and its own ancestors only, and
position ids ``len(prompt) + depth``; a leaf (a label's last token, EOS) is scored from its
parent's distribution and never fed. One forward pass therefore scores all L labels at the cost
of P + (number of inner nodes) tokens instead of L * (P + len(label)) for naive per-(note, label)
passes. The LM head runs only where a next-token distribution is needed: the prompt's last
position and the trie's inner nodes. The prompts' common prefix within a batch (template markup and
instruction, about half of a short note's prompt) runs once per batch and is reused as a KV cache.

score(label) = sum of log p(token) over the label's tokens including EOS, exactly the sequence the
model was trained to produce.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from medtune.fsdp import is_sharded, unwrap


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _mask_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's LM head on selected hidden states, with the logit post-processing of the
    architectures that have one: Granite's ``logits_scaling``, Cohere's ``logit_scale``, Gemma-2/3's
    final soft-capping. ``check_head`` refuses a model whose forward does something else."""
    base = unwrap(model)
    logits = base.get_output_embeddings()(hidden).float()
    config = base.config
    if getattr(config, "logits_scaling", None):
        logits = logits / config.logits_scaling
    if getattr(config, "logit_scale", None):
        logits = logits * config.logit_scale
    cap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@torch.no_grad()
def check_head(model, tol: float = 1e-3) -> None:
    """Refuse an architecture whose forward turns hidden states into logits in a way
    ``head_logits`` does not reproduce (its scores and training loss would be wrong). One
    4-token forward, in the model's current mode; dropout sees the same seed in both passes."""
    from medtune.errors import MedtuneError

    if is_sharded(model):
        return
    base = unwrap(model)
    ids = torch.arange(1, 5, device=_model_device(model))[None] % base.config.vocab_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        full = model(input_ids=ids, use_cache=False).logits.float()
        torch.manual_seed(0)
        ours = head_logits(model, decoder(model)(input_ids=ids, use_cache=False).last_hidden_state)
    worst = float((full - ours).abs().max())
    if not worst <= tol * max(1.0, float(full.abs().max())):
        raise MedtuneError(f"{type(base).__name__}: its forward post-processes the logits in a way "
                           f"medtune's head-only scoring does not reproduce (differs by {worst:.3g}); "
                           "this architecture is not supported")


def decoder(model):
    """The transformer body (everything but the LM head); LoRA layers stay in place."""
    return unwrap(model).get_decoder()


@dataclass(frozen=True)
class LabelTrie:
    """Labels' token sequences merged by common prefix. Nodes are in creation order, so a
    parent always precedes its children."""

    tokens: list[int]            # token of each node
    parents: list[int]           # parent node, -1 for a first token (predicted from the prompt)
    depths: list[int]            # 0 for first tokens
    paths: list[list[int]]       # each label's nodes, root to leaf

    @classmethod
    def build(cls, labels: Sequence[Sequence[int]]) -> LabelTrie:
        index: dict[tuple[int, int], int] = {}
        tokens: list[int] = []
        parents: list[int] = []
        depths: list[int] = []
        paths = []
        for lab in labels:
            node, path = -1, []
            for depth, tok in enumerate(lab):
                key = (node, int(tok))
                if key not in index:
                    index[key] = len(tokens)
                    tokens.append(int(tok))
                    parents.append(node)
                    depths.append(depth)
                node = index[key]
                path.append(node)
            paths.append(path)
        return cls(tokens, parents, depths, paths)

    def ancestors(self) -> torch.Tensor:
        """[M, M] bool: node i may see node j (j is i or one of its ancestors)."""
        m = len(self.tokens)
        anc = torch.eye(m, dtype=torch.bool)
        for i, parent in enumerate(self.parents):
            if parent >= 0:
                anc[i] |= anc[parent]
        return anc


@dataclass(frozen=True)
class _Plan:
    """What every batch needs from a label set, built once per label set (``_plan``).

    Only inner nodes are fed: a leaf (a label's last token) is scored from its parent's
    distribution. Distributions come from the prompt's last position (source 0) and from each
    inner node (source k for the k-th inner node)."""

    node_tok: torch.Tensor       # [I] token of each inner node
    node_pos: torch.Tensor       # [I] its depth (position after the prompt)
    node_anc: torch.Tensor       # [I, I] inner node i may see inner node j
    source: torch.Tensor         # [M] source whose distribution scores node m (its parent's)
    token: torch.Tensor          # [M] token of node m
    member: torch.Tensor         # [L, M] label k uses node m


@functools.lru_cache(maxsize=8)
def _plan(labels: tuple[tuple[int, ...], ...]) -> _Plan:
    trie = LabelTrie.build(labels)
    inner = sorted({p for p in trie.parents if p >= 0})
    rank = {-1: 0, **{n: k + 1 for k, n in enumerate(inner)}}
    member = torch.zeros((len(labels), len(trie.tokens)))
    for k, path in enumerate(trie.paths):
        member[k, path] = 1.0
    return _Plan(node_tok=torch.tensor([trie.tokens[n] for n in inner], dtype=torch.long),
                 node_pos=torch.tensor([trie.depths[n] for n in inner], dtype=torch.long),
                 node_anc=trie.ancestors()[inner][:, inner],
                 source=torch.tensor([rank[p] for p in trie.parents], dtype=torch.long),
                 token=torch.tensor(trie.tokens, dtype=torch.long), member=member)


@torch.no_grad()
def score_tree(model, prompts: Sequence[Sequence[int]], labels: Sequence[Sequence[int]],
               pad_id: int, prefix_memo: dict[tuple[int, ...], Any] | None = None) -> torch.Tensor:
    """Sum log-probabilities [N, L] of each label (token ids incl. EOS) after each prompt.

    prefix_memo: a dict shared by the batches of one call (``score_labels``,
    ``Predictor.scores``): the KV cache of the prompts' common prefix is computed once for all of
    them. Never share it across a change of the weights (training)."""
    device = _model_device(model)
    plan = _plan(tuple(tuple(int(t) for t in lab) for lab in labels))
    batch = len(prompts)
    # the batch's common prompt prefix (template markup + instruction) runs once, as a KV cache
    shared, cache = _prefix_cache(model, prompts, device, prefix_memo)
    prompts = [p[shared:] for p in prompts]
    m = len(plan.node_tok)
    width = max(len(p) for p in prompts) + m
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    pos = torch.zeros((batch, width), dtype=torch.long)
    allowed = torch.zeros((batch, width, width), dtype=torch.bool)
    src_idx = torch.zeros((batch, m + 1), dtype=torch.long)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    for b, prompt in enumerate(prompts):
        p = len(prompt)
        ids[b, :p] = torch.as_tensor(list(prompt))
        ids[b, p:p + m] = plan.node_tok
        pos[b, :p] = shared + torch.arange(p)
        pos[b, p:p + m] = shared + p + plan.node_pos
        allowed[b, :p, :p] = causal[:p, :p]
        allowed[b, p:p + m, :p] = True
        allowed[b, p:p + m, p:p + m] = plan.node_anc
        allowed[b, p + m:, 0] = True          # padding rows: any non-empty row
        src_idx[b] = p - 1 + torch.arange(m + 1)  # the prompt's last token, then inner nodes
    if shared:  # every row sees the whole cached prefix
        allowed = torch.cat([torch.ones((batch, width, shared), dtype=torch.bool), allowed], dim=2)
    inputs = {"input_ids": ids.to(device), "attention_mask": _masks(model, allowed, pos, shared, device),
              "position_ids": pos.to(device), "use_cache": False}
    if cache is not None:
        cache.batch_repeat_interleave(batch)
        body: type = type(decoder(model))  # annotated: mypy takes an inferred type[Any] as unhashable
        inputs[_cache_keyword(body)] = cache
    src = src_idx.to(device)[..., None]
    if is_sharded(model):  # FSDP (validation): the root forward, whose hooks gather the head
        logits = unwrap(model)(**inputs).logits
        logp = torch.gather(logits, 1, src.expand(-1, -1, logits.shape[-1])).float().log_softmax(-1)
    else:
        hidden = decoder(model)(**inputs).last_hidden_state
        picked = torch.gather(hidden, 1, src.expand(-1, -1, hidden.shape[-1]))
        logp = head_logits(model, picked).log_softmax(-1)                   # [B, S, V]
    flat = (plan.source * logp.shape[-1] + plan.token).to(device)           # node m in [S * V]
    node_lp = logp.reshape(batch, -1).gather(1, flat.expand(batch, -1)).cpu()  # [B, M]
    return node_lp @ plan.member.T


def _masks(model, allowed: torch.Tensor, pos: torch.Tensor, shared: int, device):
    """Additive 4-D attention mask(s) from the boolean ``allowed`` [B, Q, K]. A custom 4-D mask
    replaces the model's own, so sliding-window attention is applied here: a query sees keys
    fewer than ``sliding_window`` positions back, on sliding layers (every layer without
    ``layer_types``; with them, one mask per layer type, as the model's forward takes them)."""
    dtype = _mask_dtype(model)

    def additive(ok: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros((ok.shape[0], 1, *ok.shape[1:]), dtype=dtype)
        return mask.masked_fill_(~ok[:, None], torch.finfo(dtype).min).to(device)

    config = unwrap(model).config
    window = getattr(config, "sliding_window", None)
    types = set(getattr(config, "layer_types", None) or [])
    if not window or (types and "sliding_attention" not in types):
        return additive(allowed)
    assert shared == 0, "no prefix cache for sliding-window models (_prefix_cache)"
    near = (pos[:, :, None] - pos[:, None, :]) < window
    sliding = additive(allowed & near)
    if not types:
        return sliding
    return {"full_attention": additive(allowed), "sliding_attention": sliding}


@functools.lru_cache(maxsize=16)
def _cache_keyword(cls: type[Any]) -> str:
    """The forward argument of decoder class ``cls`` that takes a KV cache: ``cache`` since
    transformers 5.24 (which deprecates ``past_key_values``), ``past_key_values`` before.
    Looked up once per class, not per batch."""
    import inspect

    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


MIN_SHARED = 8  # shorter common prefixes are not worth a second forward pass


MEMO_SIZE = 8  # prefixes kept per call (a batch of notes that start alike shares more than the template)


def _prefix_cache(model, prompts: Sequence[Sequence[int]], device,
                  memo: dict[tuple[int, ...], Any] | None = None) -> tuple[int, Any]:
    """(length, KV cache of one copy) of the prompts' common prefix, leaving every prompt at
    least one token of its own; (0, None) when it is short or the model is not a plain
    full-attention decoder with a DynamicCache (sliding windows, FSDP). With ``memo``, a prefix
    whose KV cache is known is not run again."""
    import copy

    from transformers import DynamicCache

    if len(prompts) < 2 or is_sharded(model) or getattr(unwrap(model).config, "sliding_window", None):
        return 0, None
    first, limit = prompts[0], min(len(p) for p in prompts) - 1
    shared = 0
    while shared < limit and all(p[shared] == first[shared] for p in prompts):
        shared += 1
    if shared < MIN_SHARED:
        return 0, None
    prefix = tuple(first[:shared])
    if memo is not None and prefix in memo:
        return shared, copy.deepcopy(memo[prefix])  # the batch's forward extends its own copy
    out = decoder(model)(input_ids=torch.tensor([list(prefix)], device=device), use_cache=True)
    cache = out.cache if "cache" in out else out.past_key_values
    if not isinstance(cache, DynamicCache):
        return 0, None
    if memo is not None and len(memo) < MEMO_SIZE:
        memo[prefix] = copy.deepcopy(cache)
    return shared, cache


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


Batches = Callable[[Callable[[list[list[int]]], list[Any]], list[list[int]]], list[Any]]


def in_batches(size: int) -> Batches:
    """The simplest ``run`` for ``label_rows``: ``fn`` over consecutive slices of ``size``."""
    def run(fn: Callable[[list[list[int]]], list[Any]], prompts: list[list[int]]) -> list[Any]:
        return [row for i in range(0, len(prompts), size) for row in fn(prompts[i:i + size])]
    return run


def label_rows(model, tokenizer, template, texts: Sequence[str], labels: Sequence[str],
               label_ids: list[list[int]], limit: int | None, run: Batches,
               memo: dict[tuple[int, ...], Any]) -> list[torch.Tensor]:
    """One [L] row of label log-likelihoods per text, exactly as training encodes the task.

    protocol: template prompt + ``label_ids`` (each label's tokens + EOS). mcqa: lm-eval's rule
    (``choice_ids``: context and letter encoded as one string); prompts whose choices tokenize
    alike share passes. Prompts longer than ``limit`` lose their middle so the longest label
    (MCQA: choice + EOS) still fits, as in training. ``run(fn, prompts)`` batches
    (``Predictor.batched``, ``in_batches``)."""
    pad = tokenizer.pad_token_id
    if template.task != "mcqa":
        cut = None if limit is None else max(8, limit - max(len(ids) for ids in label_ids))
        prompts = [truncate_prompt(ids, cut) for ids in template.prompts_ids(tokenizer, list(texts))]
        return run(lambda b: list(score_tree(model, b, label_ids, pad, memo)), prompts)
    from medtune.tasks.mcqa import choice_ids

    pairs = [choice_ids(tokenizer, template, t, labels) for t in texts]
    groups: dict[tuple[tuple[int, ...], ...], list[int]] = {}
    for i, (_, choices) in enumerate(pairs):
        groups.setdefault(tuple(map(tuple, choices)), []).append(i)
    rows: list[Any] = [None] * len(texts)
    for conts, idx in groups.items():
        # room for the longest choice + the EOS training appends (batching.encode_examples)
        cut = None if limit is None else max(8, limit - max(len(c) for c in conts) - 1)
        prompts = [truncate_prompt(pairs[i][0], cut) for i in idx]

        def score_group(b: list[list[int]], c: Sequence[Sequence[int]] = conts) -> list[Any]:
            return list(score_tree(model, b, c, pad, memo))

        scored = run(score_group, prompts)
        for i, row in zip(idx, scored, strict=True):
            rows[i] = row
    return rows


def score_labels(model, tokenizer, template, texts: Sequence[str], labels: Sequence[str],
                 batch_size: int = 8, max_length: int | None = None) -> torch.Tensor:
    """[N, L] log-likelihoods of each label for each text, scored as ``Predictor`` scores them
    (training's validation accuracy); ``max_length`` bounds prompt + label."""
    if not texts:
        return torch.zeros((0, len(labels)))
    label_ids = [template.answer_ids(tokenizer, lab) for lab in labels]
    rows = label_rows(model, tokenizer, template, texts, labels, label_ids, max_length,
                      in_batches(batch_size), {})
    return torch.stack(rows)


def truncate_prompt(ids: list[int], limit: int | None, keep_tail: int = 16) -> list[int]:
    """Cut the middle of an over-long prompt, keeping its head (the note's start) and its tail
    (the template's answer cue)."""
    if limit is None or len(ids) <= limit:
        return ids
    limit = max(1, limit)
    tail = min(keep_tail, limit // 2)  # a small limit keeps half head, half tail
    return ids[:limit - tail] + ids[len(ids) - tail:]
