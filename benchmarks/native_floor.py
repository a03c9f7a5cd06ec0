"""How low could medtune's CPU training peak go without Hugging Face model code? (issue 8)

`make bench` puts medtune's peak RSS on the embedded model at ~0.85x TRL's, because ~545 MB is
resident before the first step: torch, transformers' model code (which imports
torch.distributed.tensor -> torch.fx symbolic shapes -> sympy), bitsandbytes (torch.compile at
import), peft, pandas. This script measures the alternative: the same step on the embedded
model's shapes (4 layers, hidden 192, MLP 512, 3 heads, vocabulary 2,048 tied, batch 16 x 59
tokens, LoRA r=64 on every linear layer, frozen 4-bit NF4 weights dequantized in forward and
backward, head only at the 3 answer positions) in plain torch, importing only what medtune's
data and tokenizer need. It is a measurement, not a model medtune uses: the weights are random
and NF4 here is single-level (no double quantization).

    python benchmarks/native_floor.py               # own 12-line AdamW
    python benchmarks/native_floor.py --torch-adamw  # torch.optim.AdamW (imports torch._dynamo)

Compare its peak with TRL's in `medtune bench train --vocab embedded --sides medtune,trl`.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pandas  # noqa: F401  (what medtune's data reading imports)
import safetensors.torch  # noqa: F401  (weights)
import tokenizers  # noqa: F401  (the tokenizer)
import torch
import torch.nn.functional as F
from torch import nn

VOCAB, HIDDEN, MLP, HEADS, LAYERS, BATCH, SEQ, ANSWER, RANK = 2048, 192, 512, 3, 4, 16, 59, 3, 64
NF4 = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                    0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0])


def rss_mb(key: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class _Frozen4bit(torch.autograd.Function):
    """x @ W.T with W dequantized in forward and again in backward: never saved."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x @ layer.weight().t()

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.weight(), None


class LoraNF4(nn.Module):
    def __init__(self, fan_in: int, fan_out: int, alpha: float = 16.0):
        super().__init__()
        blocks = (torch.randn(fan_out, fan_in) * 0.02).reshape(-1, 64)  # 64 weights per absmax
        absmax = blocks.abs().amax(1, keepdim=True)
        codes = (blocks / absmax).unsqueeze(-1).sub(NF4).abs().argmin(-1).to(torch.uint8)
        self.register_buffer("packed", codes[:, 0::2] << 4 | codes[:, 1::2])  # 2 per byte
        self.register_buffer("absmax", absmax.squeeze(1))
        self.shape = (fan_out, fan_in)
        self.lora_a = nn.Parameter(torch.randn(RANK, fan_in) / math.sqrt(fan_in))
        self.lora_b = nn.Parameter(torch.zeros(fan_out, RANK))
        self.scale = alpha / RANK

    def weight(self) -> torch.Tensor:
        codes = torch.stack([self.packed >> 4, self.packed & 15], -1).flatten(1).long()
        return (NF4[codes] * self.absmax[:, None]).reshape(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Frozen4bit.apply(x, self) + (x @ self.lora_a.t()) @ self.lora_b.t() * self.scale


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, -1)
    return x * cos + torch.cat([-b, a], -1) * sin


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (LoraNF4(HIDDEN, HIDDEN) for _ in range(4))
        self.gate, self.up, self.down = LoraNF4(HIDDEN, MLP), LoraNF4(HIDDEN, MLP), LoraNF4(MLP, HIDDEN)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        y = rms_norm(x)
        q, k, v = (m(y).view(b, t, HEADS, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(rotate(q, cos, sin), rotate(k, cos, sin), v,
                                           is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        y = rms_norm(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class AdamW:
    """Adam with decoupled weight decay on foreach ops; torch.optim's Optimizer imports
    torch._dynamo (~70 MB) the first time a parameter group is added."""

    def __init__(self, params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.params, self.lr, self.betas, self.eps, self.wd, self.t = params, lr, betas, eps, \
            weight_decay, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        grads = [p.grad for p in self.params]
        if self.wd:
            torch._foreach_mul_(self.params, 1 - self.lr * self.wd)
        torch._foreach_lerp_(self.m, grads, 1 - b1)
        torch._foreach_mul_(self.v, b2)
        torch._foreach_addcmul_(self.v, grads, grads, 1 - b2)
        denom = torch._foreach_sqrt(self.v)
        torch._foreach_div_(denom, math.sqrt(1 - b2 ** self.t))
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(self.params, self.m, denom, -self.lr / (1 - b1 ** self.t))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


def main(torch_adamw: bool, steps: int = 12) -> None:
    torch.set_num_threads(1)  # as `medtune bench train`
    torch.manual_seed(0)
    imports = rss_mb()
    embed = torch.randn(VOCAB, HIDDEN) * 0.02  # frozen, tied with the head
    blocks = nn.ModuleList(Block() for _ in range(LAYERS))
    params = [p for p in blocks.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4) if torch_adamw else AdamW(params)
    angles = torch.outer(torch.arange(SEQ).float(),
                         1.0 / 10000 ** (torch.arange(0, HIDDEN // HEADS, 2).float() / (HIDDEN // HEADS)))
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    start = rss_mb()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS, as bench_baseline does
    t0 = time.perf_counter()
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ))
        x = embed[ids]
        for block in blocks:
            x = block(x, cos, sin)
        logits = rms_norm(x[:, -ANSWER:]) @ embed.t()  # the head at the answer positions only
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, -ANSWER:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    seconds = time.perf_counter() - t0
    peak = rss_mb("VmHWM")
    print(f"{'torch.optim.AdamW' if torch_adamw else 'own AdamW'}: imports {imports:.0f} MB, "
          f"before the first step {start:.0f} MB, peak {peak:.0f} MB (+{peak - start:.0f} MB), "
          f"{steps * BATCH * SEQ / seconds:,.0f} tokens/s, torch._dynamo imported: "
          f"{'torch._dynamo' in sys.modules}")


if __name__ == "__main__":
    main("--torch-adamw" in sys.argv[1:])
