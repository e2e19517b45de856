"""What the machine can do, and how much of it a training step uses.

`gemm_rates` times F.linear at a model's own layer shapes (the GEMMs a step is made of); `step_flops`
counts the model FLOPs of one training step. A step's achieved FLOP/s over the GEMM rate is the
fraction of the machine it uses (on a GPU, the same idea as MFU, with the measured rate as the peak).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_shapes(config) -> list[tuple[int, int]]:
    """(in, out) of the linear layers of one decoder layer of a Llama-like model."""
    hidden, mlp = config.hidden_size, config.intermediate_size
    q_dim = config.num_attention_heads * head_dim(config)
    kv_dim = config.num_key_value_heads * head_dim(config)
    return [(hidden, q_dim), (hidden, kv_dim), (hidden, kv_dim), (q_dim, hidden)] + [
        (hidden, mlp),
        (hidden, mlp),
        (mlp, hidden),
    ]


def step_flops(config, sequences: int, length: int, labelled: int, trains_base: bool) -> dict[str, float]:
    """Model FLOPs of one training step, by part (adapters and elementwise work not counted):
    - linear layers: forward 2·N·T, input gradients 2·N·T, and weight gradients 2·N·T only when the
      base trains (full FT): 4·N·T or 6·N·T;
    - attention (QKᵀ and AV, full square as in the PaLM MFU count): 12·layers·L·d per token, forward
      and backward;
    - LM head at the `labelled` positions only (tunelab's chunked loss; the others are not needed):
      4·labelled·h·V, 6 when the head trains."""
    tokens = sequences * length
    n_linear = config.num_hidden_layers * sum(i * o for i, o in layer_shapes(config))
    attention_width = config.num_attention_heads * head_dim(config)
    passes = 6 if trains_base else 4
    return {
        "linear": passes * n_linear * tokens,
        "attention": 12 * config.num_hidden_layers * length * attention_width * tokens,
        "head": passes * labelled * config.hidden_size * config.vocab_size,
    }


def gemm_rate(shapes: list[tuple[int, int]], tokens: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP/s of F.linear over `shapes` (one of each, as in a layer) on `tokens` rows: total FLOPs over
    the median time of a pass through all of them."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = {i: torch.randn(tokens, i, dtype=dtype, device=device) for i, _ in shapes}
    weights = [torch.randn(o, i, dtype=dtype, device=device) for i, o in shapes]
    flops = sum(2 * tokens * i * o for i, o in shapes)
    times = []
    for repeat in range(repeats + 1):
        started = time.perf_counter()
        for (i, _), weight in zip(shapes, weights, strict=True):
            F.linear(inputs[i], weight)
        if device == "cuda":
            torch.cuda.synchronize()
        if repeat:  # the first pass warms up
            times.append(time.perf_counter() - started)
    return flops / statistics.median(times)


def gemm_rates(config, tokens: int) -> dict[str, float]:
    """The machine's fp32 and bf16 GEMM rate at a model's decoder-layer shapes and at its LM head."""
    head = [(config.hidden_size, config.vocab_size)]
    return {
        "fp32": gemm_rate(layer_shapes(config), tokens, torch.float32),
        "bf16": gemm_rate(layer_shapes(config), tokens, torch.bfloat16),
        "fp32_head": gemm_rate(head, tokens, torch.float32, repeats=3),
        "bf16_head": gemm_rate(head, tokens, torch.bfloat16, repeats=3),
    }
