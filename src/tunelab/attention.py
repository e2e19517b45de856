"""Scaled dot-product attention with the faster CPU kernel for each sequence length.

On CPU, PyTorch's fused (flash) SDPA kernel is slower than its math path for short sequences: at
SmolLM2's shapes (batch 8, 9 heads of 64) forward + backward in bf16 take 5.0 ms against 1.8 ms at 40
tokens and 16 against 9 at 128; the two meet near 192 and the fused kernel wins above (58 against 79 ms
at 384). `python -m benchmarks.attention` measures it on this machine; TUNELAB_CPU_MATH_ATTENTION_BELOW
(tokens, 0: always the fused kernel) moves the switch. GPUs keep PyTorch's own choice, and there the
model keeps transformers' plain "sdpa" (some of transformers' GPU features check for that name).
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

NAME = "tunelab_sdpa"  # the attn_implementation a loaded model is switched to
ENV = "TUNELAB_CPU_MATH_ATTENTION_BELOW"


def _math_below() -> int:
    """The key length under which the math path is faster on CPU (benchmarks.attention): 192, or ENV."""
    value = os.environ.get(ENV, "192")
    if not value.isdigit():
        raise TunelabError(
            f"{ENV}={value!r} is not a number of tokens; set a whole number (0: never) or unset it"
        )
    return int(value)


def sdpa_by_length(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    *args: Any,
    math_below: int,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' SDPA attention, on CPU through the math path for keys shorter than `math_below`.
    The backward pass follows the forward's choice."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if key.device.type == "cpu" and key.shape[-2] < math_below:
        with sdpa_kernel(SDPBackend.MATH):
            return sdpa_attention_forward(module, query, key, *args, **kwargs)
    return sdpa_attention_forward(module, query, key, *args, **kwargs)


def use_sdpa_by_length(model: PreTrainedModel) -> None:
    """On a machine without a GPU, switch a model that uses transformers' SDPA attention to
    `sdpa_by_length` (other choices, e.g. eager, are kept). Saved configs are unchanged: the choice is
    not serialized."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if torch.cuda.is_available() or getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    # ENV is read (and a bad value refused) here, once, not in every layer's forward
    AttentionInterface.register(NAME, functools.partial(sdpa_by_length, math_below=_math_below()))
    # transformers builds no padding mask for an attention it has no mask function for
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
