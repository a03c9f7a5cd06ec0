"""Shared fixtures: tiny models built in-process once per session (no network, no ../shared)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch

# Tiny models on a shared 2-core box: one thread avoids oversubscription (~50x faster steps).
torch.set_num_threads(1)

TINY_LABELS = ["CT Head", "MRI Brain", "CT Urography", "L-Spine"]

TINY_NOTES = [
    "pt with headache after fall, r/o bleed",
    "new seizure, known mass, evaluate lesion",
    "painless hematuria, smoker, eval urothelial tract",
    "low back pain radiating to leg, r/o disc herniation",
    "syncope and head trauma on blood thinners",
    "worsening memory loss, evaluate for demyelination",
    "flank pain with blood in urine, hx stones",
    "lumbar radiculopathy, numbness in foot",
] * 4


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from medtune.base import train_tokenizer

    return train_tokenizer(TINY_NOTES + TINY_LABELS, vocab_size=384)


def _save_tiny(path: Path, tokenizer, arch: str = "llama") -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    vocab = ((len(tokenizer) + 63) // 64) * 64
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if arch == "gemma":
        common["head_dim"] = 16
    config = AutoConfig.for_model(arch, **common)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tiny_tokenizer) -> Path:
    """A random tiny Llama (2 layers, hidden 64) saved as an HF directory with its tokenizer."""
    return _save_tiny(tmp_path_factory.mktemp("tiny_llama"), tiny_tokenizer, "llama")


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory, tiny_base) -> Path:
    """A 'merged'-kind model directory (one per test module): the tiny base plus medtune.json,
    labels and a plain template."""
    import json
    import shutil

    from medtune.tasks import Template

    d = tmp_path_factory.mktemp("merged") / "model"
    shutil.copytree(tiny_base, d)
    (d / "medtune.json").write_text(json.dumps({"kind": "merged", "task": "protocol"}))
    (d / "labels.json").write_text(json.dumps({"task": "protocol", "labels": TINY_LABELS}))
    Template(task="protocol", kind="plain", labels=TINY_LABELS).save(d)
    return d


@pytest.fixture(scope="session")
def tiny_base_factory(tmp_path_factory, tiny_tokenizer):
    def make(arch: str) -> Path:
        return _save_tiny(tmp_path_factory.mktemp(f"tiny_{arch}"), tiny_tokenizer, arch)

    return make
