"""Cross-entropy through the LM head without materializing the logits of the whole batch.

For a 49k-token vocabulary the logits of one batch (tokens × vocab, fp32) dwarf everything else a
small model keeps for backward, and with response-only masking most positions have no label at all.
`linear_cross_entropy` computes the head only at labelled positions, a chunk at a time, and forms
the gradients of each chunk right away (softmax − one-hot), so no logits outlive their chunk.
"""

from __future__ import annotations

import torch
from torch import nn

from tunelab.data import IGNORE_INDEX

DEFAULT_CHUNK_TOKENS = 1024
SOFTMAX_BLOCK_ROWS = 16  # 3 MiB of fp32 logits at a 49k vocabulary


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int):
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # bf16/fp16 activations: softmax and sums in fp32; fp64 stays fp64 (for the tests)
        compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
        total = torch.zeros((), dtype=compute_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros_like(weight, dtype=compute_dtype) if need_weight_grad else None
        rows = torch.arange(SOFTMAX_BLOCK_ROWS, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            chunk = hidden[start : start + chunk_tokens]
            chunk_targets = targets[start : start + chunk_tokens]
            logits = chunk @ weight.T
            # softmax a few rows at a time in fp32, so each block's passes stay in cache; the
            # gradient softmax - one_hot is written back into the logits
            for row in range(0, len(logits), SOFTMAX_BLOCK_ROWS):
                block = logits[row : row + SOFTMAX_BLOCK_ROWS]
                block_targets = chunk_targets[row : row + SOFTMAX_BLOCK_ROWS, None]
                probs = block.to(compute_dtype)  # a copy for bf16; fp32 works in place
                target_logits = probs.gather(1, block_targets).squeeze(1)
                row_max = probs.amax(dim=-1, keepdim=True)
                row_sum = probs.sub_(row_max).exp_().sum(dim=-1, keepdim=True)
                total += (row_max + row_sum.log()).sum() - target_logits.sum()
                if need_hidden_grad or need_weight_grad:
                    probs.div_(row_sum)
                    probs[rows[: len(block)], block_targets.squeeze(1)] -= 1
                    block.copy_(probs)
            if need_hidden_grad:
                grad_hidden[start : start + chunk_tokens] = logits @ weight
            if need_weight_grad:
                # in the logits' dtype (bf16 under autocast, as autocast computes weight gradients: 4.6x
                # the fp32 GEMM rate on CPUs with native bf16), summed over chunks in fp32
                if logits.dtype == compute_dtype:  # accumulated inside the GEMM, no temporary
                    grad_weight.addmm_(logits.T, chunk.to(compute_dtype))
                else:
                    grad_weight += (logits.T @ chunk.to(logits.dtype)).to(compute_dtype)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Sum over rows of cross_entropy(hidden @ weight.T, targets), with gradients for hidden and
    weight, holding at most `chunk_tokens` rows of logits at a time."""
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens)


def supports_head_loss(model: nn.Module) -> bool:
    """Models whose logits are a plain bias-free linear head on the decoder's last hidden state
    (Llama, Mistral, Qwen2, SmolLM...); others (softcapping, logit scales) use their own loss."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    quirks = ("final_logit_softcapping", "logit_scale", "logits_scaling")
    return (
        isinstance(head, nn.Linear)
        and head.bias is None
        and hasattr(model, "get_decoder")
        and not any(getattr(config, name, None) for name in quirks)
    )


def causal_lm_loss(
    model: nn.Module, inputs: dict[str, torch.Tensor], num_items: int | torch.Tensor | None = None
) -> torch.Tensor:
    """The model's next-token loss (mean over labelled tokens, or sum / num_items when given, as
    transformers does under gradient accumulation), with the head only at labelled positions."""
    labels = inputs["labels"][:, 1:]
    hidden = model.get_decoder()(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
    hidden = hidden.last_hidden_state[:, :-1]
    labelled = labels != IGNORE_INDEX
    total = linear_cross_entropy(hidden[labelled], model.get_output_embeddings().weight, labels[labelled])
    denominator = num_items if num_items is not None else labelled.sum().clamp(min=1)
    return total / denominator
