"""Merge: adapter folded into an unquantized base; logits checked against base + adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import TINY_NOTES
from medtune.config import load_config
from medtune.errors import MedtuneError
from medtune.merge import merge
from medtune.tasks import Template
from medtune.train import train


@pytest.fixture(scope="module")
def qlora_run(tiny_base, tmp_path_factory) -> Path:
    """A few NF4 QLoRA steps at a high learning rate, so the adapter is far from zero."""
    d = tmp_path_factory.mktemp("merge")
    labels = ["head" if i in (0, 1, 4, 5) else "body" for i in range(8)]
    pd.DataFrame({"text": TINY_NOTES[:16], "label": labels * 2}).to_csv(d / "t.csv", index=False)
    cfg = load_config(None, [f"model.base={tiny_base}", "model.device=cpu",
                             "model.quantization=nf4", "lora.r=4", "train.batch_size=4",
                             "train.lr=2e-2", "train.warmup_steps=0", "train.max_steps=4",
                             "train.eval_every=0", "train.save_every=0", "train.eval_samples=2"])
    return train(cfg, str(d / "t.csv"), d / "run", val=str(d / "t.csv"), progress=False)


def _probe(tok, template: Template) -> dict[str, torch.Tensor]:
    ids = template.prompt_ids(tok, "pt with headache after fall, evaluate lesion")
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids),
                                                                           dtype=torch.long)}


def test_merged_model_matches_base_plus_adapter(qlora_run, tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    report = merge(qlora_run, out, source="original")
    assert report["tolerance"] <= 1e-3
    assert report["max_abs_logit_diff_vs_adapter"] < report["tolerance"]
    q_diff = report["max_abs_logit_diff_vs_quantized_training_model"]
    assert isinstance(q_diff, float) and math.isfinite(q_diff) and q_diff > 0  # NF4 rounding

    # a plain HF directory: transformers alone loads it, no medtune, no peft
    tok = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert tok.pad_token_id != tok.eos_token_id
    meta = json.loads((out / "medtune.json").read_text())
    assert meta["kind"] == "merged" and meta["merge"]["dtype"] == "float32"
    assert json.loads((out / "labels.json").read_text())["labels"] == ["body", "head"]
    template = Template.load(out)

    # independent check of the claim: fp32 base + adapter vs the merged weights
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, str(qlora_run / "adapter")).eval()
    batch = _probe(tok, template)
    with torch.no_grad():
        want = with_adapter(**batch).logits
        got = merged(**batch).logits
        with with_adapter.disable_adapter():
            plain = with_adapter(**batch).logits
    assert float((want - got).abs().max()) < 1e-3
    assert float((plain - got).abs().max()) > 1e-2  # the adapter really was merged


def test_merge_refuses_a_directory_that_is_not_a_run(tiny_base, tmp_path):
    with pytest.raises(MedtuneError, match="not a finished LoRA run"):
        merge(tiny_base, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(MedtuneError, match="not a finished LoRA run"):
        merge(tmp_path, tmp_path / "out")


def test_merge_refuses_to_overwrite_and_rejects_unknown_dtype(qlora_run, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(MedtuneError, match="not empty"):
        merge(qlora_run, out)
    assert (out / "keep.txt").read_text() == "x"
    with pytest.raises(MedtuneError, match="dtype"):
        merge(qlora_run, tmp_path / "other", dtype="float8")


def test_default_merge_uses_the_dequantized_weights_the_adapter_was_trained_on(qlora_run, tmp_path):
    """Merging into the dequantized NF4 weights reproduces the 4-bit training model more closely
    than merging into the original full-precision checkpoint."""
    deq = merge(qlora_run, tmp_path / "deq")
    orig = merge(qlora_run, tmp_path / "orig", source="original")
    assert deq["source"] == "dequantized" and orig["source"] == "original"
    assert deq["max_abs_logit_diff_vs_adapter"] < deq["tolerance"]
    assert (deq["max_abs_logit_diff_vs_quantized_training_model"]
            < orig["max_abs_logit_diff_vs_quantized_training_model"])
