"""Attention on CPU in bf16 as chunked matmuls, faster there than PyTorch's fused SDPA kernel.

On CPU, the fused (flash) SDPA kernel gains nothing from bf16 and its math path upcasts to fp32.
`grouped_attention` computes softmax(q·kᵀ·scale + mask)·v as batched matmuls in bf16 (whose GEMMs run
~4.6x faster than fp32 on CPUs with native bf16) with the softmax in fp32, as transformers' eager
attention does in its forward (the backward starts from the saved bf16 probabilities, where eager's keeps
them in fp32). It takes the query heads that share a key/value head as one matmul (no repeated key/value
heads), a few batch rows at a time so that a chunk's scores stay in cache. `python -m benchmarks.attention`
compares the kernels: on this machine's 2 cores, in bf16 it takes 0.12-0.62x the fused kernel's time from
40 to 512 tokens; in fp32 it is no faster, so fp32 keeps SDPA. It keeps the probabilities (B·H·L·L·2
bytes a layer) for its backward, where the fused kernel keeps O(L): it runs for keys up to 512 tokens
(TUNELAB_CPU_ATTENTION_MAX_LENGTH; 0: never), and SDPA runs the rest: longer keys, other dtypes, and what
this kernel does not do (dropout, queries and keys of different lengths as in decoding, float masks, value
heads of another size, position biases, paged caches). GPUs keep transformers' plain "sdpa" (some of
transformers' GPU features check for that name).
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

import torch

from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

NAME = "tunelab_cpu_attention"  # the attn_implementation a loaded model is switched to
ENV = "TUNELAB_CPU_ATTENTION_MAX_LENGTH"
MAX_LENGTH = 512  # benchmarks.attention: still 0.6x the fused kernel's time there; memory grows as L²
CHUNK_SCORES_BYTES = 5 << 20  # a chunk's fp32 scores: about what stays in this machine's caches
MASKED = torch.finfo(torch.float32).min  # finite, as in eager attention: a row with no key left stays finite


def _rows_per_chunk(query: torch.Tensor, keys: int) -> int:
    batch, heads, length, _ = query.shape
    return max(1, min(batch, CHUNK_SCORES_BYTES // (heads * length * keys * 4)))


class GroupedAttention(torch.autograd.Function):
    """softmax(q·kᵀ·scale, masked where `keep` is False)·v for q [B, H, L, D] and k, v [B, G, S, D]
    (G key/value heads, each shared by H/G query heads); `keep` [B or 1, 1, L, S] bool, or None."""

    @staticmethod
    def forward(ctx, query, key, value, keep, scale):
        batch, heads, length, dim = query.shape
        groups = key.shape[1]
        # the H/G query heads of one key/value head (repeat_kv's order) as one [H/G·L, D] matrix
        grouped = query.reshape(batch, groups, heads // groups * length, dim)
        # the mask as an additive fp32 bias (as eager attention adds its mask), one value per query and key:
        # adding it while the bf16 scores are scaled into fp32 is one pass, where masked_fill_ was the
        # forward's slowest operator on CPU
        bias = None
        if keep is not None:
            bias = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device)
            bias = bias.masked_fill_(~keep, MASKED).unsqueeze(2)  # [B or 1, 1, 1, L, S]
        outputs, probabilities = [], []
        rows = _rows_per_chunk(query, key.shape[2])
        for start in range(0, batch, rows):
            chunk = slice(start, start + rows)
            scores = torch.matmul(grouped[chunk], key[chunk].transpose(-1, -2))
            if bias is None:
                scores = scores.float().mul_(scale)
            else:
                by_head = scores.view(scores.shape[0], groups, heads // groups, length, -1)
                scores = torch.add(bias[chunk] if bias.shape[0] > 1 else bias, by_head, alpha=scale)
                scores = scores.view(-1, groups, heads // groups * length, scores.shape[-1])
            probability = torch.softmax(scores, dim=-1).to(query.dtype)
            probabilities.append(probability)
            outputs.append(torch.matmul(probability, value[chunk]))
        output = torch.cat(outputs).view(batch, heads, length, dim)
        ctx.save_for_backward(grouped, key, value, output, *probabilities)
        ctx.scale, ctx.rows = scale, rows
        return output

    @staticmethod
    def backward(ctx, grad_output):
        grouped, key, value, output, *probabilities = ctx.saved_tensors
        batch, heads, length, dim = output.shape
        grad = grad_output.reshape(grouped.shape)
        # softmax backward: dS = P ∘ (dP − rowsum(dP ∘ P)), and rowsum(dP ∘ P) = rowsum(dO ∘ O)
        row_dot = (grad.float() * output.reshape(grouped.shape).float()).sum(-1, keepdim=True)
        grad_query, grad_key, grad_value = [], [], []
        for index, start in enumerate(range(0, batch, ctx.rows)):
            chunk, probability = slice(start, start + ctx.rows), probabilities[index]
            grad_value.append(torch.matmul(probability.transpose(-1, -2), grad[chunk]))
            grad_probability = torch.matmul(grad[chunk], value[chunk].transpose(-1, -2))
            # fp32 from the subtraction's type promotion, scaled before rounding to bf16
            grad_scores = torch.sub(grad_probability, row_dot[chunk]).mul_(probability).mul_(ctx.scale)
            grad_scores = grad_scores.to(grouped.dtype)
            grad_query.append(torch.matmul(grad_scores, key[chunk]))
            grad_key.append(torch.matmul(grad_scores.transpose(-1, -2), grouped[chunk]))
        grad_query = torch.cat(grad_query).view(batch, heads, length, dim)
        return grad_query, torch.cat(grad_key), torch.cat(grad_value), None, None


def grouped_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor | None, scale: float
) -> torch.Tensor:
    return GroupedAttention.apply(query, key, value, keep, scale)


def cpu_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    max_length: int,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: `grouped_attention` on CPU in bf16 for keys up to `max_length`
    tokens, SDPA otherwise (and for what grouped_attention does not do)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length, device = query.shape[2], query.device.type
    # under autocast (full fine-tuning's fp32 weights) eager attention would multiply in the autocast dtype
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    supported = (
        device == "cpu"
        and dtype == torch.bfloat16
        and 1 < length == key.shape[2] <= max_length  # training and prefill, not decoding
        and dropout == 0.0
        and value.shape[-1] == query.shape[-1]  # not MLA's (DeepSeek-V2/V3) narrower value heads
        and (attention_mask is None or attention_mask.dtype == torch.bool)
        and all(kwargs.get(name) is None for name in ("position_bias", "cache", "softcap"))
    )
    if not supported:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    keep = attention_mask
    if keep is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        keep = (
            torch.ones(length, length, dtype=torch.bool, device=query.device)
            .tril()
            .view(1, 1, length, length)
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # the inputs cast to one dtype; autocast off, so that the kernel's matmuls keep it (its backward, run
    # by autograd outside autocast, then sees the same dtypes)
    with torch.autocast(device, enabled=False):
        output = grouped_attention(query.to(dtype), key.to(dtype), value.to(dtype), keep, scale)
    return output.transpose(1, 2).contiguous(), None


def _max_length() -> int:
    value = os.environ.get(ENV, str(MAX_LENGTH))
    if not value.isdigit():
        raise TunelabError(
            f"{ENV}={value!r} is not a number of tokens; set a whole number (0: never) or unset it"
        )
    return int(value)


def use_cpu_attention(model: PreTrainedModel) -> None:
    """On a machine without a GPU, switch a model that uses transformers' SDPA attention to
    `cpu_attention_forward` (other choices, e.g. eager, are kept). Saved configs are unchanged: the
    choice is not serialized."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if torch.cuda.is_available() or getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    # ENV is read (and a bad value refused) here, once, not in every layer's forward
    AttentionInterface.register(NAME, functools.partial(cpu_attention_forward, max_length=_max_length()))
    # transformers builds no padding mask for an attention it has no mask function for
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
