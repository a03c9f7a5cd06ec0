"""Training primitives: the answer-only loss and data-parallel helpers (torchrun / accelerate).

The LM head runs only at supervised positions: with a 32k-256k vocabulary the [batch, seq, vocab]
logits tensor is most of the head's cost and memory, while an answer is a handful of tokens.
Data parallelism: every process takes its share of each global batch, the loss is normalised by the
global supervised-token count and gradients are summed, so N processes equal one process with the
same global batch.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from medtune.batching import IGNORE
from medtune.errors import MedtuneError
from medtune.fsdp import is_sharded, root_supervised_logits
from medtune.scoring import decoder, head_logits


def supervised_loss(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropy over supervised positions, computing the head only there."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    if is_sharded(model):  # FSDP: through the root module, whose hooks gather the head
        logits = root_supervised_logits(model, input_ids, attention_mask, keep)
    else:
        hidden = decoder(model)(input_ids=input_ids, attention_mask=attention_mask,
                                use_cache=False).last_hidden_state
        logits = head_logits(model, hidden[:, :-1][keep])
    return F.cross_entropy(logits, targets[keep], reduction="sum"), int(keep.sum())


# ----------------------------------------------------------------------------- distributed
def dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


_OWN_GROUP = {"flag": False}  # True when this module created the process group (and ends it)


def init_distributed(device: str) -> tuple[int, int]:
    rank, world = dist_info()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):  # would be ignored
        raise MedtuneError("ACCELERATE_USE_DEEPSPEED is set: medtune's trainer shards with FSDP, not "
                           "DeepSpeed; launch with configs/accelerate/fsdp.yaml or ddp.yaml "
                           "(docs/DISTRIBUTED.md)")
    if world > 1 and not torch.distributed.is_initialized():
        if device == "cuda":  # before the group: NCCL binds each rank to its own GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group(backend="nccl" if device == "cuda" else "gloo")
        _OWN_GROUP["flag"] = True
    return rank, world


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        torch.distributed.all_reduce(t)
    return t


def barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


def rank_share(indices: list[int], rank: int, world: int) -> list[int]:
    """This rank's contiguous slice of a global batch. Slice sizes differ by at most one, so an
    uneven batch (7 examples on 2 ranks: 3 + 4) loses nothing; a rank may get none."""
    n = len(indices)
    return indices[rank * n // world:(rank + 1) * n // world]


def all_reduce_grads_(params: list[torch.Tensor]) -> None:
    """Sum gradients over ranks in one flat buffer (one collective per step, not per tensor). A
    rank whose share of the batch was empty contributes zeros: every rank joins the collective."""
    if not _distributed():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


def broadcast_trainable_(model) -> None:
    """Start every rank from rank 0's trainable weights (LoRA init), whatever each rank's RNG did."""
    if _distributed():
        for p in model.parameters():
            if p.requires_grad:
                torch.distributed.broadcast(p.data, src=0)




def end_distributed() -> None:
    """Destroy the process group if this module created it."""
    if _OWN_GROUP["flag"]:
        torch.distributed.destroy_process_group()
        _OWN_GROUP["flag"] = False
