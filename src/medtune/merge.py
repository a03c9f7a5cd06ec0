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
from medtune.model import (
    DTYPES,
    as_trained,
    check_model_path,
    load_adapter,
    load_base_model,
    load_tokenizer,
    model_dir,
    read_meta,
)
from medtune.progress import library_bars
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


def dequantized_weight(module) -> torch.Tensor | None:
    """The float32 weight of a bitsandbytes 4-bit / 8-bit linear layer; None for any other."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    if isinstance(module, bnb.nn.Linear4bit):
        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked by an eval-mode forward
            raise MedtuneError("4-bit weights were repacked for bitsandbytes' CPU kernel by a "
                               "forward pass: dequantize them before the first forward pass")
        weight = bnbf.dequantize_4bit(module.weight.data, state).float()
    elif isinstance(module, bnb.nn.Linear8bitLt):
        w, st = module.weight, module.state
        cb, scb = (w.CB, w.SCB) if w.CB is not None else (st.CB, st.SCB)  # moved by a forward
        weight = cb.float() * scb.float()[:, None] / 127.0 if cb is not None else w.data.float()
    else:
        return None
    return weight.reshape(module.out_features, module.in_features)


@torch.no_grad()
def dequantize_into(full_model, quantized_model) -> int:
    """Copy the dequantized weights of every 4-bit / 8-bit layer of ``quantized_model`` into the
    same layer of ``full_model``. Returns the number of layers copied.

    The adapter was trained against these rounded weights, so merging into them (rather than into
    the original full-precision weights) reproduces the training model's outputs.
    """
    copied = 0
    for name, module in quantized_model.named_modules():
        weight = dequantized_weight(module)
        if weight is None:
            continue
        target = full_model.get_submodule(name)
        target.weight.copy_(weight.to(target.weight.dtype))
        copied += 1
    return copied


def merge(run_dir: str | Path, output: str | Path, *, dtype: str = "float32",
          overwrite: bool = False, probe_texts: list[str] | None = None,
          source: str = "dequantized", progress: bool = True) -> dict[str, Any]:
    """``source='dequantized'`` (default) merges into the dequantized 4-/8-bit weights the adapter
    was trained on; ``'original'`` merges into the original full-precision checkpoint.
    ``progress=False``: no loading or writing bars."""
    with library_bars(progress):
        return _merge(run_dir, output, dtype=dtype, overwrite=overwrite, probe_texts=probe_texts,
                      source=source)


def _merge(run_dir: str | Path, output: str | Path, *, dtype: str, overwrite: bool,
           probe_texts: list[str] | None, source: str) -> dict[str, Any]:
    run_dir = model_dir(run_dir, "run directory")
    meta = read_meta(run_dir)
    if meta.get("kind") == "merged":
        raise MedtuneError(f"{run_dir}: already a merged model (no adapter to merge)")
    if meta.get("kind") != "run" or not (run_dir / "adapter").is_dir():
        raise MedtuneError(f"{run_dir}: not a finished LoRA run directory (no adapter/ or medtune.json)")
    check_model_path(run_dir)  # an unfinished run, a damaged adapter: before the loads
    if dtype not in DTYPES:
        raise MedtuneError(f"--dtype: unknown '{dtype}' (float32, bfloat16, float16)")
    torch_dtype = DTYPES[dtype]
    check_output_dir(output, overwrite, inputs=[run_dir, meta.get("base")])  # atomic_dir creates it
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
    qcfg = as_trained(meta, ModelConfig(device="cpu"))  # the 4-bit base exactly as trained
    copied = 0
    if quantized and source == "dequantized":
        qbase = load_base_model(meta["base"], qcfg, tokenizer)
        copied = dequantize_into(base, qbase)
        del qbase
        if not copied:  # the merge would silently use the original weights
            raise MedtuneError(f"{run_dir}: its {meta['quantization']} base has no quantized layer "
                               "medtune can read back; merge with --source original")
    peft_model = load_adapter(base, run_dir / "adapter").eval()
    ref = _logits(peft_model, batch)
    merged = peft_model.merge_and_unload().eval()
    got = _logits(merged, batch)
    diff = float((ref - got).abs().max())
    tol = TOLERANCE[torch_dtype]
    if diff > tol:
        raise MedtuneError(f"merged model differs from base+adapter by {diff:.3g} > tolerance {tol}")
    diff_4bit = None
    if quantized:
        qbase = load_base_model(meta["base"], qcfg, tokenizer)
        qmodel = load_adapter(qbase, run_dir / "adapter").eval()
        diff_4bit = float((_logits(qmodel, batch) - got).abs().max())
        del qmodel, qbase
    report = {"max_abs_logit_diff_vs_adapter": diff, "tolerance": tol,
              "max_abs_logit_diff_vs_quantized_training_model": diff_4bit,
              "source": source if quantized else "original", "layers_dequantized": copied,
              "dtype": dtype,
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


# ----------------------------------------------------------------------------- in memory
def _lora_layers(model) -> list[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _quantized_layers(model) -> list[tuple[str, Any]]:
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def fold_blocker(model) -> str | None:
    """Why ``fold_in_memory`` cannot fold this model's adapters; None when it can."""
    for name, module in _quantized_layers(model):
        state = getattr(module.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            return f"{name}: 4-bit weights already repacked by a forward pass"
    for name, layer in _lora_layers(model):
        base = layer.get_base_layer()
        if layer.merged or layer.disable_adapters:
            return f"{name}: an adapter is already merged or adapters are disabled"
        if not isinstance(base, torch.nn.Linear) or getattr(layer, "fan_in_fan_out", False):
            return f"{name}: LoRA on a {type(base).__name__} layer (only linear layers fold)"
        for adapter in layer.active_adapters:
            if adapter in layer.lora_variant:
                return f"{name}: a {type(layer.lora_variant[adapter]).__name__} adapter (only plain LoRA folds)"
            if layer.lora_bias.get(adapter):
                return f"{name}: LoRA bias (lora_bias=True)"
    return None


def float_dtype(model) -> torch.dtype:
    """The model's compute dtype: that of its input embeddings (never quantized)."""
    return model.get_input_embeddings().weight.dtype


def native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX). On an
    AVX512-BF16 CPU a bf16 matmul of prediction's shapes ran 1.6-2.4x as fast as float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu, private
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def fold_bytes(model, dtype: torch.dtype | None = None) -> int:
    """Bytes of the plain weights ``fold_in_memory`` would create (in ``dtype``, default the
    model's compute dtype)."""
    size = torch.finfo(dtype or float_dtype(model)).bits // 8
    layers = {id(m): m for m in [layer.get_base_layer() for _, layer in _lora_layers(model)]
              + [m for _, m in _quantized_layers(model)]}  # a wrapped 4-bit layer counts once
    return sum(m.in_features * m.out_features * size for m in layers.values())


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None  # cgroup "max" = no limit


def available_memory() -> int | None:
    """Bytes this process may still allocate: the host's MemAvailable, lowered to what is left
    under a cgroup v2 memory limit (containers, Kubernetes); None where neither is known."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        pass
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        free = min(free, limit - used) if free is not None else limit - used
    return free


class CastLinear(torch.nn.Linear):
    """A linear layer whose weight is stored and multiplied in another dtype than the
    activations around it (bf16 weights in a float32 model): the input is cast to the weight's
    dtype and the product back, then the bias (kept in the activations' dtype) is added, so
    residual sums, norms, attention and the LM head keep the model's precision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias


@torch.no_grad()
def _plain_linear(base, weight: torch.Tensor, compute: torch.dtype) -> torch.nn.Linear:
    kind = torch.nn.Linear if weight.dtype == compute else CastLinear
    layer = kind(base.in_features, base.out_features, bias=False, device=weight.device,
                 dtype=weight.dtype)
    layer.weight.copy_(weight)
    if base.bias is not None:
        bias = base.bias.detach().to(weight.dtype if kind is torch.nn.Linear else compute)
        layer.bias = torch.nn.Parameter(bias.clone())
    return layer.requires_grad_(False)


def _replace(model, name: str, module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def fold_in_memory(model, dtype: torch.dtype | None = None) -> int:
    """Replace every LoRA-wrapped and every bitsandbytes 4-/8-bit linear layer of a loaded model
    by a plain ``nn.Linear`` holding the dequantized base weight plus the active adapters' update
    (summed in float32), stored in ``dtype`` (default: the model's compute dtype; another dtype
    gives ``CastLinear`` layers). Outputs stay the same up to that dtype's rounding; each layer
    becomes one matmul instead of a 4-bit kernel plus two LoRA matmuls. Nothing is written to
    disk. Returns the number of layers replaced."""
    reason = fold_blocker(model)
    if reason:
        raise MedtuneError(f"cannot merge the adapter in memory: {reason}")
    compute = float_dtype(model)
    dtype = dtype or compute
    replaced = 0
    for name in [n for n, _ in _lora_layers(model)]:  # names only: each old layer can go at once
        layer = model.get_submodule(name)
        base = layer.get_base_layer()
        weight = dequantized_weight(base)
        weight = (base.weight.float() if weight is None else weight).clone()
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                weight += layer.get_delta_weight(adapter).float()
        _replace(model, name, _plain_linear(base, weight.to(dtype), compute))
        replaced += 1
    for name in [n for n, _ in _quantized_layers(model)]:  # 4-/8-bit layers without an adapter
        module = model.get_submodule(name)
        dense = dequantized_weight(module)
        assert dense is not None  # _quantized_layers yields only the layer kinds it dequantizes
        _replace(model, name, _plain_linear(module, dense.to(dtype), compute))
        replaced += 1
    return replaced


@torch.no_grad()
def cast_linears(model, dtype: torch.dtype) -> int:
    """Store the transformer body's plain linear layers (a merged model directory, a float
    base) in ``dtype`` as ``CastLinear`` layers; embeddings, norms and the LM head keep their
    dtype. Returns the number of layers replaced (0 when they are already in ``dtype``)."""
    compute = float_dtype(model)
    body = model.get_decoder() if hasattr(model, "get_decoder") else model
    names = [n for n, m in body.named_modules()
             if type(m) is torch.nn.Linear and m.weight.dtype != dtype]
    for name in names:
        module = body.get_submodule(name)
        _replace(body, name, _plain_linear(module, module.weight.detach().to(dtype), compute))
    return len(names)
