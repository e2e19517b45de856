"""A linear layer plus k trainable deltas at sparse positions of its weight (SpIEL's layer).

Effective weight: W + scatter(indices, values). On a plain (unquantized) base the deltas are kept
merged into W between optimizer steps, so the forward pass is one F.linear with no copy of W; on a
4-bit base (qSpIEL) W is dequantized for each pass and the deltas are added to that copy, never
merged into 4-bit storage. Either way the backward pass computes the gradient of the k values only,
never the dense m x n weight gradient, except for SpIEL-AG's first micro-batch of a selection phase.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tunelab.methods.spiel.selection import ag_candidates
from tunelab.quant import dequantize_weight, dequantized_linear, is_4bit

# torch warns once per process that sparse CSR tensors are "beta"; sampled_addmm is all we use of them
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def weight_grad_at(
    grad_out: torch.Tensor, inputs: torch.Tensor, shape: tuple[int, int], *index_sets: torch.Tensor
) -> list[torch.Tensor]:
    """(grad_out^T @ inputs) at each set of sorted flat positions, in fp32; grad_out: (tokens, m),
    inputs: (tokens, n).

    In fp32, torch.sparse.sampled_addmm (SDDMM) computes only the k dot products of each set, reading the
    sorted positions as a CSR pattern. Measured on 2 CPU cores, 2048 tokens, a 2048 x 2048 weight: 11 ms
    at 0.5% density, 37 ms at 2%, 84 ms at 5%, against ~170 ms for the dense fp32 product + gather;
    gathering rows/columns and reducing was 2-25x slower. In bf16 or fp16 the dense product is a 16-bit
    GEMM (~4.6x the fp32 rate on CPUs with native bf16), while the SDDMM's CPU kernel needs fp32 copies
    of both operands, transposed: there one GEMM and a gather take 0.3-0.5x its time at SmolLM2's shapes
    and 2.3% density (BENCHMARKS.md, change 12), and the gradient is rounded to bf16 as autocast's
    weight gradients are.
    """
    if _is_16_bit(grad_out, inputs):
        dense = (grad_out.T @ inputs).view(-1)
        return [dense[indices].float() for indices in index_sets]  # only the k entries widened
    return [_sampled_product(grad_out, inputs, indices, shape) for indices in index_sets]


def dense_weight_grad(grad_out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """grad_out^T @ inputs, all of it, in fp32 (a SpIEL-AG phase's first micro-batch picks its candidates
    from it): with 16-bit operands a 16-bit GEMM, as in weight_grad_at, else an fp32 one."""
    if _is_16_bit(grad_out, inputs):
        return (grad_out.T @ inputs).float()
    return grad_out.float().T @ inputs.float()


def _is_16_bit(grad_out: torch.Tensor, inputs: torch.Tensor) -> bool:
    return grad_out.dtype in (torch.bfloat16, torch.float16) and inputs.dtype == grad_out.dtype


def _sampled_product(
    grad_out: torch.Tensor, inputs: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    num_rows, num_cols = shape
    crow = torch.zeros(num_rows + 1, dtype=indices.dtype, device=indices.device)
    crow[1:] = torch.bincount(indices // num_cols, minlength=num_rows).cumsum(0)
    unused_values = torch.zeros(len(indices), device=indices.device)
    pattern = torch.sparse_csr_tensor(crow, indices % num_cols, unused_values, shape, check_invariants=False)
    return torch.sparse.sampled_addmm(pattern, grad_out.float().T, inputs.float(), beta=0.0).values()


def average_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Average `tensor` in place over the processes of a distributed run, as DDP does with gradients.
    SpIEL-AG's statistics come from each process's own micro-batches; averaging them makes every
    process select the same positions."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


@dataclass
class CandidateStats:
    """SpIEL-AG's statistics over one selection phase, for k candidate positions only."""

    indices: torch.Tensor  # sorted flat positions: the top-k |gradient| of the phase's first micro-batch
    grad_sum: torch.Tensor
    grad_sq_sum: torch.Tensor
    samples: int  # micro-batch gradients summed


class SparseDeltaLinear(nn.Module):
    """A frozen linear layer (plain or bitsandbytes 4-bit) plus trainable deltas `values` at the
    flat row-major positions `indices` (sorted, unique) of its weight."""

    def __init__(self, base_layer: nn.Module, indices: torch.Tensor) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.weight_shape = (self.out_features, self.in_features)
        self.quantized = is_4bit(base_layer)
        device = base_layer.weight.device
        self.register_buffer("indices", indices.to(device))
        self.values = nn.Parameter(torch.zeros(len(indices), device=device))  # fp32 whatever the base dtype
        # plain base: the pretrained weight at the active positions. Merging writes pretrained + values
        # there and unmerging restores it exactly (no rounding drift from repeated += / -= in bf16).
        self.register_buffer("pretrained", None, persistent=False)
        self.merged_version: int | None = None  # values._version last merged into the weight
        self.accumulating = False  # inside a SpIEL-AG selection phase
        self.candidates: CandidateStats | None = None
        self.capture_pretrained()

    # -- SpIEL-AG selection phases -----------------------------------------------------------------------
    def start_phase(self, candidates: CandidateStats | None = None) -> None:
        """A selection phase begins (or resumes with the `candidates` it had gathered): the next backward
        pass picks the candidates if there are none yet, every later one adds to their statistics."""
        self.accumulating, self.candidates = True, candidates

    def end_phase(self) -> None:
        self.accumulating, self.candidates = False, None

    # -- keeping the deltas merged (plain base) ----------------------------------------------------------
    @torch.no_grad()
    def capture_pretrained(self) -> None:
        """Read the pretrained weight at the active positions (the weight holds no deltas there)."""
        if not self.quantized:
            self.pretrained = self.base_layer.weight.view(-1)[self.indices]
        self.merged_version = None

    @torch.no_grad()
    def restore_pretrained(self) -> None:
        """Take the deltas out of the weight; the next forward pass merges them in again."""
        if not self.quantized and self.merged_version is not None:
            self.base_layer.weight.view(-1)[self.indices] = self.pretrained
        self.merged_version = None

    @torch.no_grad()
    def merge_if_stale(self) -> None:
        """Make weight[indices] == pretrained + values again after the values changed. Every in-place
        update (optimizer step, load, reselection) bumps the tensor's version counter."""
        if self.quantized or self.merged_version == self.values._version:
            return
        weight = self.base_layer.weight
        weight.view(-1)[self.indices] = (self.pretrained.float() + self.values).to(weight.dtype)
        self.merged_version = self.values._version

    @torch.no_grad()
    def set_indices(self, new_indices: torch.Tensor, source_slot: torch.Tensor) -> None:
        """Move to a new sorted index set; new slot j takes the value of old slot source_slot[j], or 0."""
        self.restore_pretrained()
        new_values = torch.where(source_slot >= 0, self.values[source_slot.clamp(min=0)], 0.0)
        self.indices.copy_(new_indices)
        self.values.copy_(new_values)
        self.values.grad = None  # belongs to the old layout
        self.capture_pretrained()

    # -- weights ---------------------------------------------------------------------------------------
    def effective_weight(self, values: torch.Tensor) -> torch.Tensor:
        """W + scatter(indices, values): the (merged) base weight itself, or a dequantized 4-bit copy."""
        if not self.quantized:
            return self.base_layer.weight
        weight = dequantize_weight(self.base_layer)
        return weight.view(-1).index_add_(0, self.indices, values.to(weight.dtype)).view_as(weight)

    def delta_weight(self) -> torch.Tensor:
        """The dense m x n update (for tests and inspection; training never builds it)."""
        delta = torch.zeros(self.weight_shape, dtype=self.values.dtype, device=self.values.device)
        delta.view(-1)[self.indices] = self.values.detach()
        return delta

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear with the deltas folded in (dequantized from a 4-bit base)."""
        if not self.quantized:
            self.merge_if_stale()
            return self.base_layer
        linear = dequantized_linear(self.base_layer)
        linear.weight.view(-1).index_add_(0, self.indices, self.values.to(linear.weight.dtype))
        return linear

    # -- passes ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.merge_if_stale()
        return SparseDeltaLinearFunction.apply(x, self.values, self)

    @torch.no_grad()
    def values_grad(self, grad_out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """d loss / d values for one micro-batch (grad_out: tokens x m, inputs: tokens x n); inside a
        SpIEL-AG phase also accumulates the candidates' statistics."""
        if not self.accumulating:
            return weight_grad_at(grad_out, inputs, self.weight_shape, self.indices)[0]
        if self.candidates is None:
            # the phase's first micro-batch: the one dense gradient, to pick the candidates
            dense = average_across_processes(dense_weight_grad(grad_out, inputs)).view(-1)
            candidates = ag_candidates(dense, len(self.indices))
            grad = dense[candidates]
            self.candidates = CandidateStats(candidates, grad, grad * grad, 1)
            return dense[self.indices]
        grad, values_grad = weight_grad_at(
            grad_out, inputs, self.weight_shape, self.candidates.indices, self.indices
        )
        self.candidates.grad_sum += grad
        self.candidates.grad_sq_sum.addcmul_(grad, grad)
        self.candidates.samples += 1
        return values_grad

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, k={len(self.indices)}"


class SparseDeltaLinearFunction(torch.autograd.Function):
    """y = x W_eff^T + b. Backward: grad_x = grad_y W_eff, and the gradient of the k values only.
    W_eff is not saved for backward: on a 4-bit base it is dequantized again (as bitsandbytes does)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor, layer: SparseDeltaLinear) -> torch.Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x, values)
        weight = layer.effective_weight(values)
        bias = layer.base_layer.bias
        if layer.quantized:  # as bitsandbytes' Linear4bit: compute in the dequantized dtype, return x's
            bias = None if bias is None else bias.to(weight.dtype)
            return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, values = ctx.saved_tensors
        layer: SparseDeltaLinear = ctx.layer
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            weight = layer.effective_weight(values)
            grad_x = (grad_out.to(weight.dtype) @ weight).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_values = layer.values_grad(
                grad_out.reshape(-1, layer.out_features), x.reshape(-1, layer.in_features)
            )
        return grad_x, grad_values, None
