"""Full-size architectures with random weights, for the benchmarks (``--arch``).

The shapes come from each model's published ``config.json``; the weights are random, since speed
and memory do not depend on them. ``layers`` keeps a preset's width and vocabulary with fewer
decoder layers (a CPU smoke run, or a shorter GPU run). The directory gets the tokenizer it is
given (the benchmarks use the embedded one): its ids are all below the preset's vocabulary size,
so every side of a benchmark sees the same token ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medtune.errors import MedtuneError

ARCHS: dict[str, dict[str, Any]] = {
    "gemma-2b": {"model_type": "gemma", "vocab_size": 256000, "hidden_size": 2048,
                 "intermediate_size": 16384, "num_hidden_layers": 18, "num_attention_heads": 8,
                 "num_key_value_heads": 1, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
                 "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192,
                 "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
    "llama-2-7b": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
                   "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32,
                   "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                   "tie_word_embeddings": False},
}


def arch_config(name: str, tokenizer=None, layers: int = 0):
    """The transformers config of preset ``name`` (optionally with ``layers`` decoder layers)."""
    from transformers import AutoConfig

    if name not in ARCHS:
        raise MedtuneError(f"arch: unknown '{name}' (choose from {', '.join(ARCHS)})")
    if layers < 0:
        raise MedtuneError("layers must be >= 0 (0: the preset's own)")
    spec = dict(ARCHS[name])
    if layers:
        spec["num_hidden_layers"] = layers
    if tokenizer is not None:
        if len(tokenizer) > spec["vocab_size"]:
            raise MedtuneError(f"arch {name}: tokenizer has {len(tokenizer)} tokens, more than the "
                               f"vocabulary ({spec['vocab_size']})")
        spec.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def arch_base(name: str, path: str | Path, tokenizer_dir: str | Path, layers: int = 0) -> Path:
    """Write a randomly initialised preset (bf16 weights) and ``tokenizer_dir``'s tokenizer to
    ``path``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = arch_config(name, tok, layers)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def param_count(config) -> int:
    """Parameters of ``config``'s model, counted on the meta device (nothing allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())
