"""RMSNorm as one autograd function: the forward of transformers' Llama-family RMSNorm, bit for bit, and a
backward written out, so that autograd keeps the input and one number per row.

transformers' RMSNorm upcasts to fp32 and leaves autograd to differentiate its six elementwise ops: it
keeps the fp32 input and the normalized rows for the backward (benchmarks.profile: 270 MiB, 14% of the
saved activations of a SmolLM2 LoRA step at 8 x 256) and walks them in a dozen passes. `use_rms_norm`
switches each norm module whose forward gives exactly `rms_norm`'s output on a probe input; the others
(Gemma's 1 + weight, norms with a bias...) keep their own forward.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


class RMSNorm(torch.autograd.Function):
    """weight * (x / sqrt(mean(x²) + eps)), normalized in fp32 and rounded to x's dtype before the weight
    multiplies it, as transformers' LlamaRMSNorm does; keeps x and 1 / rms per row."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * torch.mul(x, rstd).to(x.dtype)  # x·rstd in fp32 by type promotion

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = torch.mul(x, rstd)  # fp32
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * normed.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        # d/dx of x·rstd: rstd · (g − x̂ · mean(g · x̂)), with g the gradient of the normalized rows
        grad_normed = (grad_out * weight).float()
        row_dot = (grad_normed * normed).mean(-1, keepdim=True)
        grad_x = grad_normed.sub_(normed.mul_(row_dot)).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return RMSNorm.apply(x, weight, eps)


def _forward(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, module.weight, module.variance_epsilon)


def _computes_rms_norm(module: nn.Module) -> bool:
    """Whether the module's own forward gives rms_norm's output, bit for bit, on a probe input in the
    weight's dtype and in fp32."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        return False
    generator = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(4, weight.shape[0], generator=generator).to(weight.device)
    with torch.no_grad():
        for dtype in {weight.dtype, torch.float32}:
            x = probe.to(dtype)
            if not torch.equal(module(x), rms_norm(x, weight, eps)):
                return False
    return True


def use_rms_norm(model: nn.Module) -> int:
    """Switch every RMSNorm module that computes what `rms_norm` does to it; returns how many. The weights
    and saved models are unchanged: only the instance's forward is."""
    verdicts: dict[type, bool] = {}
    switched = 0
    for module in model.modules():
        if not type(module).__name__.endswith("RMSNorm") or "forward" in vars(module):
            continue
        if type(module) not in verdicts:
            verdicts[type(module)] = _computes_rms_norm(module)
        if verdicts[type(module)]:
            module.forward = functools.partial(_forward, module)
            switched += 1
    return switched
