"""The LoRA layer with a sliceable rank.

At rank b the layer computes h = W x + (alpha / b) * B[:, :b] (A[:b] x), which is exactly a LoRA of
rank b: that is why one DyLoRA run can be evaluated and exported at any rank 1..r.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def dropout_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """True where an entry is dropped, each independently with probability p (to within 1/65536).

    Drawn as 16-bit integers, four per 64-bit random word: on CPU that is 2.5x faster than comparing
    torch.rand with p, itself 1.5x faster than bernoulli_ (the masks were 26% of a bf16 LoRA step:
    benchmarks.profile).
    """
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    return (words.view(torch.int16)[:numel] < round(p * 65536) - 32768).view(shape)


def token_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (tokens, n): every leading dimension is a token."""
    return t.reshape(-1, t.shape[-1])


class LoRAUpdate(torch.autograd.Function):
    """scale · B A x', where x' is x with the dropped entries zeroed: the adapter's contribution.

    Autograd through nn.Dropout + two linears keeps, per adapter, a float dropout mask and a float
    dropped copy of x; the profile (benchmarks/profile.py) showed those two were over half of all
    saved activations. This keeps x itself (one tensor shared by sibling adapters such as q/k/v),
    the mask as bytes and the small A x', and zeroes x again in the backward pass. Dropout's
    1 / keep_prob is folded into `scale` (the update is linear in x). Under autocast it computes in
    the autocast dtype, as the plain ops would.
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, scale: float, drop: torch.Tensor | None):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            dropped = x.to(dtype) if drop is None else x.to(dtype).masked_fill(drop, 0)
            down = F.linear(dropped, lora_A.to(dtype))
            update = F.linear(down, lora_B.to(dtype)) * scale
        ctx.save_for_backward(x, drop, lora_A, lora_B, down)
        ctx.scale, ctx.dtype = scale, dtype
        return update

    @staticmethod
    def backward(ctx, grad_update):
        x, drop, lora_A, lora_B, down = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            grad_update = grad_update.to(ctx.dtype) * ctx.scale
            grad_down = grad_update @ lora_B.to(ctx.dtype)
            grad_B = token_rows(grad_update).T @ token_rows(down)
            dropped = x.to(ctx.dtype) if drop is None else x.to(ctx.dtype).masked_fill(drop, 0)
            grad_A = token_rows(grad_down).T @ token_rows(dropped)
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = grad_down @ lora_A.to(ctx.dtype)
                if drop is not None:
                    grad_x.masked_fill_(drop, 0)
                grad_x = grad_x.to(x.dtype)
        return grad_x, grad_A.to(lora_A.dtype), grad_B.to(lora_B.dtype), None, None


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
        return self.base_layer(x) + LoRAUpdate.apply(x, lora_A, lora_B, scale, drop)

    def delta_weight(self, rank: int | None = None) -> torch.Tensor:
        b = rank or self.rank
        return (self.lora_B[:, :b] @ self.lora_A[:b]) * (self.alpha / b)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def set_rank(model: nn.Module, rank: int) -> None:
    """Make every LoRA layer of `model` compute with its first `rank` ranks."""
    for layer in lora_layers(model).values():
        layer.rank = rank
