"""Sharded data parallelism (FSDP2, ``torch.distributed.fsdp.fully_shard``) for ``medtune train``.

With ``train.fsdp=true`` (or an accelerate FSDP config, which sets ``ACCELERATE_USE_FSDP``) under
``torchrun`` / ``accelerate launch`` with N > 1 processes, every decoder layer and the model root
become FSDP units: each rank keeps 1/N of every weight (4-bit NF4 ones included: they are stored
in the compute dtype, ``bnb_4bit_quant_storage``, so they shard like the others), of the LoRA
weights and of their optimizer state, and all-gathers a layer only while it runs.

The data-parallel contract of the trainer is unchanged: each rank takes its share of the global
batch, the loss is normalised by the global supervised-token count and gradients are summed
(gradient divide factor 1), so N sharded processes equal one process with the same global batch.

What changes under sharding:
- the loss goes through the root module's forward (its hooks gather the embedding, final norm
  and LM head), computing the head only at the sequence positions where some row is supervised
  (``logits_to_keep``) instead of exactly at the supervised tokens;
- checkpoints and the final adapter are gathered to full tensors by every rank (collectives),
  then written by rank 0.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch


def requested(cfg) -> bool:
    """``train.fsdp`` or an accelerate FSDP launch."""
    return bool(cfg.train.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_sharded(model) -> bool:
    """O(1): called on every forward pass of training and scoring."""
    return getattr(unwrap(model), "_medtune_sharded", False)


def shard(model, device: str, world: int) -> None:
    """One FSDP unit per decoder layer plus the root (embeddings, final norm, LM head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if device == "cuda" else "cpu", (world,))
    base = unwrap(model)
    layers = getattr(base.get_decoder(), "layers", None)
    if layers is None:
        from medtune.errors import MedtuneError

        raise MedtuneError(f"FSDP: {type(base).__name__} has no decoder .layers to shard")
    units = [*layers, base]
    for unit in units:
        fully_shard(unit, mesh=mesh)
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # sum over ranks: the loss is globally normalised
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    base._medtune_sharded = True


def reshard(model) -> None:
    """After forward passes with no backward (validation): the root unit keeps its gathered
    weights registered until a backward reshards it; put the shards back so that
    ``named_parameters`` (checkpoints, optimizer state) sees the parameters the optimizer holds."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def root_supervised_logits(model, input_ids, attention_mask, keep: torch.Tensor) -> torch.Tensor:
    """Logits [K, V] at the supervised positions (``keep`` over positions 0..S-2), through the
    root forward so FSDP's hooks run; the head covers the union of supervised positions."""
    cols = keep.any(0).nonzero().squeeze(1)
    out = unwrap(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                        logits_to_keep=cols)
    return out.logits[keep[:, cols]].float()


def max_over_ranks(value: int) -> int:
    t = torch.tensor(value, dtype=torch.int64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_trainable_state(model) -> dict[str, torch.Tensor]:
    """Trainable weights as full CPU tensors. Sharded: every rank must call this (all-gathers)."""
    return {n: full_tensor(p.detach()).cpu().clone().contiguous()
            for n, p in model.named_parameters() if p.requires_grad}


def full_optimizer_state(model, optimizer) -> dict[str, Any]:
    """Every rank must call this; the full (unsharded) optimizer state, keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_states(model, optimizer, weights: dict[str, torch.Tensor],
                     optim_state: dict[str, Any]) -> None:
    """Every rank: put full (checkpointed) trainable weights and optimizer state into the shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=opts)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_state, options=opts)


def note_single_process() -> None:
    print("note: train.fsdp needs several processes (torchrun / accelerate launch); one process "
          "trains unsharded", file=sys.stderr)
