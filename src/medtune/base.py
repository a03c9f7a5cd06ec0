"""Build the embedded default base model: a small Llama trained locally on unlabelled notes.

No model hub is reachable and no pretrained causal LM ships on PyPI, so medtune makes its own
tiny base: a byte-level BPE tokenizer trained on the notes (distinct <pad>, <s>, </s>), a small
Llama-architecture model, and a short causal-LM pretraining pass so LoRA starts from a model that
knows the domain. The result is an ordinary Hugging Face directory: ``AutoModelForCausalLM`` and
``AutoTokenizer`` load it without medtune.

Every linear dimension is a multiple of 64: bitsandbytes' CPU 4-bit kernels pack 32 output
features per block and assert on other sizes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from medtune.errors import MedtuneError
from medtune.fsutil import atomic_dir, file_lock, write_json

BASE_FORMAT_VERSION = 2
VOCAB_DOC_REPEATS = 20
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n"
    "{% elif m['role'] == 'system' %}<|system|>\n{{ m['content'] }}\n"
    "{% else %}<|assistant|>\n{{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass
class BaseSpec:
    """Sizes of the embedded base. Parameters ~ vocab*hidden + layers*(4*hidden^2 + 3*hidden*inter)."""

    vocab_size: int = 2048
    hidden_size: int = 192
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 3          # head_dim 64
    max_positions: int = 512
    seq_len: int = 128          # pretraining sequence length (notes packed, separated by </s>)
    batch_size: int = 16        # tokens/step = batch_size * seq_len = 2,048
    steps: int = 600
    lr: float = 3e-3
    seed: int = 0


def cache_root() -> Path:
    return Path(os.environ.get("MEDTUNE_CACHE", Path.home() / ".cache" / "medtune"))


def _digest(texts: list[str], spec: BaseSpec) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": BASE_FORMAT_VERSION, **asdict(spec)}, sort_keys=True).encode())
    for t in texts:
        h.update(t.encode("utf-8", "replace"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def train_tokenizer(texts: list[str], vocab_size: int):  # -> PreTrainedTokenizerFast
    """Byte-level BPE with distinct pad/bos/eos tokens and a small chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _pack(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    ids: list[int] = []
    for t in texts:
        ids.extend([tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"],
                    tokenizer.eos_token_id])
    n = max(1, len(ids) // seq_len)
    ids = (ids * (1 + (n * seq_len) // max(1, len(ids))))[: n * seq_len]
    return torch.tensor(ids, dtype=torch.long).view(n, seq_len)


def _marker_key(marker: Path) -> str | None:
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info.get("key") if isinstance(info, dict) else None


def build_base(texts: list[str], output: str | Path | None = None, spec: BaseSpec | None = None,
               *, extra_vocab_texts: list[str] | None = None, progress: bool = True,
               overwrite: bool = False, scrub: bool = True) -> Path:
    """Train tokenizer + tiny Llama on ``texts`` and save to ``output`` (default: the cache).

    Returns the directory. A build with the same inputs is reused. An explicit ``output`` that is
    not empty and holds no such build is refused unless ``overwrite``.

    scrub: replace PHI-like spans in the notes (``medtune.phi``) before anything learns from them.
    The tokenizer's vocabulary takes whole any string the notes repeat (an MRN, a doctor's name)
    and pretraining memorises text; the base is cached, copied into runs and merged models, and
    logged to MLflow with them.
    """
    spec = spec or BaseSpec()
    texts = [t for t in texts if t and t.strip()]
    if len(texts) < 20:
        raise MedtuneError(f"need at least 20 non-empty notes to build the embedded base, got {len(texts)}")
    if scrub:
        from medtune.phi import scrub_text

        texts = [scrub_text(t) for t in texts]
    key = _digest(texts + (extra_vocab_texts or []), spec)
    out = Path(output) if output else cache_root() / "bases" / key
    marker = out / "medtune_base.json"
    if marker.is_file() and (output is None or _marker_key(marker) == key):
        return out
    if output is None:  # parallel jobs on the same notes: one builds, the others then reuse it
        with file_lock(out.with_name(f".{key}.lock"),
                       waiting=f"waiting for another process building the base {key}"):
            if marker.is_file():
                return out
            return _build(texts, out, key, spec, extra_vocab_texts, progress)
    if not overwrite and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MedtuneError(f"{out}: output exists and is not this base build "
                           "(pass --overwrite to replace it)")

    return _build(texts, out, key, spec, extra_vocab_texts, progress)


def _build(texts: list[str], out: Path, key: str, spec: BaseSpec,
           extra_vocab_texts: list[str] | None, progress: bool) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    tokenizer = train_tokenizer(texts + (extra_vocab_texts or []), spec.vocab_size)
    vocab = math.ceil(len(tokenizer) / 64) * 64
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads, max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    # The label vocabulary (protocol names) joins the corpus as short documents: a real base
    # model knows "CT Urography" as a phrase. Only names, never note -> label pairs.
    vocab_docs = [t for t in (extra_vocab_texts or []) for _ in range(VOCAB_DOC_REPEATS)]
    corpus = texts + vocab_docs
    random.Random(spec.seed).shuffle(corpus)
    data = _pack(corpus, tokenizer, spec.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    warmup = max(1, spec.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, spec.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(spec.seed)
    model.train()
    start = time.time()
    from rich.progress import BarColumn, TextColumn, TimeRemainingColumn

    from medtune.progress import library_bars, make_progress

    losses: list[float] = []
    with make_progress("base pretraining", TextColumn("[bold]base pretraining"), BarColumn(),
                       TextColumn("{task.completed}/{task.total}"),
                       TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(),
                       disable=not progress) as bar:
        task = bar.add_task("pretrain", total=spec.steps, loss=float("nan"))
        for _ in range(spec.steps):
            idx = torch.randint(0, data.shape[0], (spec.batch_size,), generator=gen)
            batch = data[idx]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(task, advance=1, loss=sum(losses[-10:]) / len(losses[-10:]))

    model.eval()
    with atomic_dir(out) as tmp, library_bars(progress):
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "medtune_base.json", {
            "kind": "embedded-base", "format": BASE_FORMAT_VERSION, "key": key, "spec": asdict(spec),
            "notes": len(texts), "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
            "seconds": round(time.time() - start, 1),
        })
    return out
