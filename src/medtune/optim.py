"""Optimizer and learning-rate schedule for `medtune train`."""

from __future__ import annotations

import math
from typing import Any

import torch

from medtune.config import Config
from medtune.errors import MedtuneError


def param_groups(model, cfg: Config) -> list[dict[str, Any]]:
    """Trainable parameters; with lora.plus_ratio > 0 the LoRA B matrices get lr x ratio (LoRA+)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ratio = cfg.lora.plus_ratio
    if not ratio or not cfg.lora.enabled:
        return [{"params": [p for _, p in named], "lr": cfg.train.lr}]
    b = [p for n, p in named if "lora_B" in n]
    rest = [p for n, p in named if "lora_B" not in n]
    return [{"params": rest, "lr": cfg.train.lr}, {"params": b, "lr": cfg.train.lr * ratio}]


def make_optimizer(groups, cfg: Config, device: str):
    name = cfg.train.optimizer
    if name == "auto":
        name = "paged_adamw8bit" if device == "cuda" else "adamw"
    wd = cfg.train.weight_decay
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=wd)
    import bitsandbytes as bnb

    if name == "paged_adamw8bit":
        return bnb.optim.PagedAdamW8bit(groups, lr=cfg.train.lr, weight_decay=wd)
    if name == "adamw8bit":
        return bnb.optim.AdamW8bit(groups, lr=cfg.train.lr, weight_decay=wd)
    raise MedtuneError(f"train.optimizer: unknown '{name}' (auto, adamw, adamw8bit, paged_adamw8bit)")


def make_scheduler(optimizer, cfg: Config, total: int):
    warm = cfg.train.warmup_steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        if cfg.train.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if cfg.train.scheduler == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    if cfg.train.scheduler not in ("cosine", "linear", "constant"):
        raise MedtuneError(f"train.scheduler: unknown '{cfg.train.scheduler}' (cosine, linear, constant)")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or \
        "can't allocate memory" in text


