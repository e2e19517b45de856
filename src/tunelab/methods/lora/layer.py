"""The LoRA layer with a sliceable rank.

At rank b the layer computes h = W x + (alpha / b) * B[:, :b] (A[:b] x), which is exactly a LoRA of
rank b: that is why one DyLoRA run can be evaluated and exported at any rank 1..r.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def dropout_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """True where an entry is dropped, each independently with probability p (to within 1/65536).

    Each entry compares 16 bits of a random 64-bit word with p: on CPU that is 2.5x faster than
    comparing torch.rand with p, itself 1.5x faster than bernoulli_ (the masks were 26% of a bf16 LoRA
    step: benchmarks.profile). On CPU the words and the comparison are numpy's (SFC64): 1.47 against
    2.61 ms for torch's mt19937 random_ and comparison (one 8 x 256 x 1536 mask, 2 threads, BENCHMARKS.md
    change 14). Each mask's generator is seeded from torch's CPU generator, so torch.manual_seed, a
    checkpoint's saved RNG state and gradient checkpointing's recompute all give the same mask.
    """
    numel, threshold = math.prod(shape), round(p * 65536) - 32768
    if device.type != "cpu":
        words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
        return (words.view(torch.int16)[:numel] < threshold).view(shape)
    seed = int(torch.randint(0, 2**63 - 1, (), device="cpu"))  # not a default device's generator
    words = np.random.SFC64(seed).random_raw((numel + 3) // 4)
    return torch.from_numpy(words.view(np.int16)[:numel] < threshold).view(shape)


_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def keep_bits(drop: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """All ones where kept, zero where dropped, as integers as wide as `dtype`: ANDing a float's bits
    with it zeroes the dropped entries. On CPU that is ~10x faster than masked_fill with a bool mask,
    which was 12% of a bf16 LoRA step (benchmarks.profile); the bool mask stays what is saved."""
    return drop.view(torch.int8).to(_INT_OF_WIDTH[dtype.itemsize]).sub_(1)


def zero_dropped(t: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """t with the dropped entries set to +0 (a new tensor), `bits` from keep_bits."""
    return (t.view(bits.dtype) & bits).view(t.dtype)


def token_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (tokens, n): every leading dimension is a token."""
    return t.reshape(-1, t.shape[-1])


class LoRAUpdate(torch.autograd.Function):
    """base + scale · B A x', where x' is x with the dropped entries zeroed: the adapter's output
    added to the frozen layer's.

    Autograd through nn.Dropout + two linears keeps, per adapter, a float dropout mask and a float
    dropped copy of x; the profile (benchmarks/profile.py) showed those two were over half of all
    saved activations. This keeps x itself (one tensor shared by sibling adapters such as q/k/v),
    the mask as bytes and the small scale · A x', and zeroes x again in the backward pass. Dropout's
    1 / keep_prob is folded into `scale` (the update is linear in x), the scale is applied on the
    rank side and the sum with `base` is the last GEMM's accumulation, so no full-width elementwise
    pass is left besides dropout. Under autocast it computes in the autocast dtype, as the plain ops
    would.
    """

    @staticmethod
    def forward(ctx, base, x, lora_A, lora_B, scale: float, drop: torch.Tensor | None):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            dropped = x.to(dtype) if drop is None else zero_dropped(x.to(dtype), keep_bits(drop, dtype))
            scaled_down = F.linear(dropped, lora_A.to(dtype)).mul_(scale)
            update_B = lora_B.to(dtype).T
            if base.dtype == dtype:
                out = torch.addmm(token_rows(base), token_rows(scaled_down), update_B)
            else:  # a base layer computing in another dtype: promote, as base + update would
                out = token_rows(base) + token_rows(scaled_down) @ update_B
        ctx.save_for_backward(x, drop, lora_A, lora_B, scaled_down)
        ctx.scale, ctx.dtype, ctx.base_dtype = scale, dtype, base.dtype
        return out.view(*base.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, drop, lora_A, lora_B, scaled_down = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            grad_update = grad_out.to(ctx.dtype)
            grad_down = (grad_update @ lora_B.to(ctx.dtype)).mul_(ctx.scale)
            grad_B = token_rows(grad_update).T @ token_rows(scaled_down)
            bits = None if drop is None else keep_bits(drop, ctx.dtype)
            dropped = x.to(ctx.dtype) if bits is None else zero_dropped(x.to(ctx.dtype), bits)
            grad_A = token_rows(grad_down).T @ token_rows(dropped)
            grad_x = None
            if ctx.needs_input_grad[1]:
                grad_x = grad_down @ lora_A.to(ctx.dtype)
                if bits is not None:
                    grad_x = zero_dropped(grad_x, bits)
                grad_x = grad_x.to(x.dtype)
        grad_base = grad_out.to(ctx.base_dtype) if ctx.needs_input_grad[0] else None
        return grad_base, grad_x, grad_A.to(lora_A.dtype), grad_B.to(lora_B.dtype), None, None


class LoRALinear(nn.Module):
    """A frozen linear layer (plain or 4-bit) plus a low-rank update whose active rank can change."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init
        self.rank = r  # active rank b
        self.train_last_rank_only = False  # DyLoRA "frozen" mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.rank
        lora_A, lora_B = self.lora_A[:b], self.lora_B[:, :b]  # views, no copies
        if self.train_last_rank_only and b > 1:
            # rows 1..b-1 take part in the forward pass but get no gradient
            lora_A = torch.cat([lora_A[:-1].detach(), lora_A[-1:]])
            lora_B = torch.cat([lora_B[:, :-1].detach(), lora_B[:, -1:]], dim=1)
        scale, drop = self.alpha / b, None
        if self.training and self.dropout > 0:
            drop = dropout_mask(x.shape, self.dropout, x.device)
            scale /= 1 - self.dropout
        return LoRAUpdate.apply(self.base_layer(x), x, lora_A, lora_B, scale, drop)

    def delta_weight(self, rank: int | None = None) -> torch.Tensor:
        b = rank or self.rank
        return (self.lora_B[:, :b] @ self.lora_A[:b]) * (self.alpha / b)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def set_rank(model: nn.Module, rank: int) -> None:
    """Make every LoRA layer of `model` compute with its first `rank` ranks."""
    for layer in lora_layers(model).values():
        layer.rank = rank
