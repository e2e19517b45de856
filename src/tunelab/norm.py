"""RMSNorm as one autograd function: the forward of transformers' Llama-family RMSNorm, bit for bit, and a
backward written out, so that autograd keeps the input and one number per row.

transformers' RMSNorm upcasts to fp32 and leaves autograd to differentiate its six elementwise ops: it
keeps the fp32 input and the normalized rows for the backward (benchmarks.profile: 270 MiB, 14% of the
saved activations of a SmolLM2 LoRA step at 8 x 256) and walks them in a dozen passes. `use_rms_norm`
switches each norm module whose class's forward gives exactly `rms_norm`'s output, dtype included, on
probes that tell the variants apart (random weights, inputs in another dtype than the weights); the others
(Gemma's 1 + weight, Olmo2's weight applied before the rounding...) keep their own forward.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn


class RMSNormFunction(torch.autograd.Function):
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
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_normed = (grad_out * weight).float()
            row_dot = (grad_normed * normed).mean(-1, keepdim=True)
            grad_x = grad_normed.sub_(normed.mul_(row_dot)).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return RMSNormFunction.apply(x, weight, eps)


def _forward(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, module.weight, module.variance_epsilon)


PROBE_DTYPES = [  # (weight, input): as loaded in bf16, as full fine-tuning's fp32 weights under autocast
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float32),
]


def _computes_rms_norm(module: nn.Module) -> bool:
    """Whether the module's class computes rms_norm, bit for bit and in the same dtype, on random inputs
    with random weights (with weights of 1, weight · round(x̂) and round(weight · x̂) agree)."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        return False
    if weight.is_meta:  # nothing to compute with (weights not loaded yet)
        return False
    probe = copy.deepcopy(module)
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(4, weight.shape[0], generator=generator).to(weight.device) * 3
    random_weight = torch.randn(weight.shape[0], generator=generator).to(weight.device)
    with torch.no_grad():
        for weight_dtype, input_dtype in PROBE_DTYPES:
            probe.weight = nn.Parameter(random_weight.to(weight_dtype), requires_grad=False)
            own = type(module).forward(probe, x.to(input_dtype))  # the class's code, without hooks
            ours = rms_norm(x.to(input_dtype), probe.weight, eps)
            if own.dtype != ours.dtype or not torch.equal(own, ours):
                return False
    return True


def use_rms_norm(model: nn.Module) -> int:
    """Switch every RMSNorm module whose class computes what `rms_norm` does to it; returns how many. The
    weights and saved models are unchanged: only the instance's forward is."""
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
