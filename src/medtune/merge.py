"""`medtune merge`: fold a LoRA adapter into an unquantized copy of its base.

Never merges into a 4-bit base (rounding the merged weights back to NF4 would undo part of the
update): the base is reloaded in 16/32-bit, the adapter applied and merged, and the merged
model's logits are compared with base+adapter (same precision) and with the 4-bit model used in
training. The first difference must stay below ``tolerance``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from medtune.config import ModelConfig
from medtune.errors import MedtuneError
from medtune.fsutil import atomic_dir, check_output_dir, write_json
from medtune.model import DTYPES, load_base_model, load_tokenizer, read_meta
from medtune.tasks import Template

TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.25, torch.float16: 0.1}


def _probe_batch(tokenizer, template: Template, texts: list[str]) -> dict[str, torch.Tensor]:
    seqs = [template.prompt_ids(tokenizer, t) for t in texts]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    dev = next(model.parameters()).device
    out = model(**{k: v.to(dev) for k, v in batch.items()}).logits.float().cpu()
    return out * batch["attention_mask"][..., None]


@torch.no_grad()
def dequantize_into(full_model, quantized_model) -> int:
    """Copy the dequantized weights of every 4-bit / 8-bit layer of ``quantized_model`` into the
    same layer of ``full_model``. Returns the number of layers copied.

    The adapter was trained against these rounded weights, so merging into them (rather than into
    the original full-precision weights) reproduces the training model's outputs.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    copied = 0
    for name, module in quantized_model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            w = module.weight
            weight = w.CB.float() * w.SCB.float()[:, None] / 127.0 if w.CB is not None else w.data.float()
        else:
            continue
        target = full_model.get_submodule(name)
        target.weight.copy_(weight.reshape(target.weight.shape).to(target.weight.dtype))
        copied += 1
    return copied


def merge(run_dir: str | Path, output: str | Path, *, dtype: str = "float32",
          overwrite: bool = False, probe_texts: list[str] | None = None,
          source: str = "dequantized") -> dict[str, Any]:
    """``source='dequantized'`` (default) merges into the dequantized 4-/8-bit weights the adapter
    was trained on; ``'original'`` merges into the original full-precision checkpoint."""
    from peft import PeftModel

    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    if meta.get("kind") != "run" or not (run_dir / "adapter").is_dir():
        raise MedtuneError(f"{run_dir}: not a finished LoRA run directory (no adapter/ or medtune.json)")
    if dtype not in DTYPES:
        raise MedtuneError(f"--dtype: unknown '{dtype}' (float32, bfloat16, float16)")
    torch_dtype = DTYPES[dtype]
    if Path(output).resolve() == run_dir.resolve():
        raise MedtuneError(f"{output}: output would replace the run directory being merged")
    check_output_dir(output, overwrite)  # atomic_dir creates it
    t0 = time.time()
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    template = Template.load(run_dir)
    texts = probe_texts or ["routine follow-up imaging requested", "pain after fall, rule out fracture",
                            "headache with vomiting", "shortness of breath and chest pain"]
    batch = _probe_batch(tokenizer, template, texts)
    if source not in ("dequantized", "original"):
        raise MedtuneError(f"--source: unknown '{source}' (dequantized, original)")
    full_cfg = ModelConfig(quantization="none", compute_dtype=dtype, device="cpu")
    base = load_base_model(meta["base"], full_cfg, tokenizer)
    quantized = meta.get("quantization", "none") != "none"
    if quantized and source == "dequantized":
        qbase = load_base_model(meta["base"], ModelConfig(quantization=meta["quantization"], device="cpu"),
                                tokenizer)
        dequantize_into(base, qbase)
        del qbase
    peft_model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    ref = _logits(peft_model, batch)
    merged = peft_model.merge_and_unload().eval()
    got = _logits(merged, batch)
    diff = float((ref - got).abs().max())
    tol = TOLERANCE[torch_dtype]
    if diff > tol:
        raise MedtuneError(f"merged model differs from base+adapter by {diff:.3g} > tolerance {tol}")
    diff_4bit = None
    if meta.get("quantization", "none") != "none":
        qcfg = ModelConfig(quantization=meta["quantization"], device="cpu")
        qbase = load_base_model(meta["base"], qcfg, tokenizer)
        qmodel = PeftModel.from_pretrained(qbase, str(run_dir / "adapter")).eval()
        diff_4bit = float((_logits(qmodel, batch) - got).abs().max())
        del qmodel, qbase
    report = {"max_abs_logit_diff_vs_adapter": diff, "tolerance": tol,
              "max_abs_logit_diff_vs_quantized_training_model": diff_4bit,
              "source": source if quantized else "original", "dtype": dtype,
              "probe_texts": len(texts), "seconds": round(time.time() - t0, 2)}
    with atomic_dir(output) as tmp:
        merged.to(torch_dtype).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        template.save(tmp)
        labels = (run_dir / "labels.json").read_text(encoding="utf-8")
        (tmp / "labels.json").write_text(labels, encoding="utf-8")
        write_json(tmp / "medtune.json", {**meta, "kind": "merged", "merged_from": str(run_dir),
                                          "merge": report})
    return report
