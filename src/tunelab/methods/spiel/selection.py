"""SpIEL's selection as pure functions over tensors: the schedule, pruning and regrowth.

An index is a flat row-major position in a weight matrix of shape (m, n): position = row * n + col.
Each matrix holds k unique positions, kept sorted (int32 when m * n < 2**31, else int64); sorted
indices are a CSR layout, which the layer's sparse gradient and the lookups here rely on.

Schedule (t = completed optimizer steps, R = reselection_steps, A = accumulation_steps, T = total
steps): a selection phase begins at the start and whenever (t + 1) % R == 0; selection runs when
t % R == A, so at t = A, R + A, 2R + A, ... and never at or after T.
"""

from __future__ import annotations

import math

import torch

# MA regrowth scores the inactive positions one block of rows at a time; a block holds about this many
# scores, so selection never materializes the full m x n score matrix.
MA_BLOCK_ELEMENTS = 1 << 22


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


# -- budget and schedule ------------------------------------------------------------------------------


def split_budget(total: int, numels: list[int]) -> list[int]:
    """k_m = floor(total * numel_m / sum(numels)), in exact integer arithmetic."""
    all_numel = sum(numels)
    return [total * numel // all_numel for numel in numels]


def is_phase_start(t: int, reselection_steps: int, accumulation_steps: int, total_steps: int) -> bool:
    """Does a selection phase begin before optimizer step t? A phase whose selection would fall at or
    after the end of training is skipped (its gradient statistics would never be used)."""
    if t == 0:
        return accumulation_steps < total_steps
    return (t + 1) % reselection_steps == 0 and t + 1 + accumulation_steps < total_steps


def is_selection_step(t: int, reselection_steps: int, accumulation_steps: int, total_steps: int) -> bool:
    """Does selection run once t optimizer steps are complete?"""
    return t % reselection_steps == accumulation_steps and t < total_steps


def replace_fraction(t: int, total_steps: int, initial_rate: float, policy: str, first: bool) -> float:
    """The fraction p of each matrix's k entries to replace at the selection after t steps.

    linear: 1 at the first selection (the initial indices are random placeholders), then
    r0 * (1 - t / T); cosine: r0 * (1 + cos(pi * t / T)) / 2 (as the reference, no special first).
    """
    if policy == "linear":
        return 1.0 if first else initial_rate * (1 - t / total_steps)
    if policy == "cosine":
        return initial_rate * (1 + math.cos(math.pi * t / total_steps)) / 2
    raise ValueError(f"unknown reselection policy {policy!r}")


# -- prune and regrow -----------------------------------------------------------------------------------


def prune(values: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask over the k slots, True = kept: the n entries of smallest |value| are dropped
    (ties: the lower slot is dropped first, so every process drops the same slots)."""
    kept = torch.ones(len(values), dtype=torch.bool, device=values.device)
    kept[torch.sort(values.abs(), stable=True).indices[:n]] = False
    return kept


def ag_candidates(dense_grad: torch.Tensor, k: int) -> torch.Tensor:
    """The k positions of largest |gradient|, sorted (SpIEL-AG's candidates for one phase)."""
    positions = torch.topk(dense_grad.abs().flatten(), k, sorted=False).indices
    return positions.sort().values.to(index_dtype(dense_grad.numel()))


def ag_regrow(
    active_indices: torch.Tensor,
    kept_mask: torch.Tensor,
    candidate_indices: torch.Tensor,
    candidate_grad_sum: torch.Tensor,
    n: int,
) -> torch.Tensor:
    """SpIEL-AG: the n candidates of largest |accumulated gradient|, sorted, excluding the active
    positions that are kept. A dropped position may come back (it then keeps its value and state).

    With k unique candidates and k - n kept positions at least n candidates are eligible.
    """
    eligible = ~torch.isin(candidate_indices, active_indices[kept_mask])
    positions, scores = candidate_indices[eligible], candidate_grad_sum[eligible].abs()
    if len(positions) < n:
        raise ValueError(f"only {len(positions)} eligible candidates to regrow {n} entries")
    best = torch.sort(scores, descending=True, stable=True).indices[:n]
    return positions[best].sort().values


def ma_scores(row_acc: torch.Tensor, col_acc: torch.Tensor) -> torch.Tensor:
    """SpIEL-MA's regrowth score of position (r, c): row_acc[r] * col_acc[c] (SM3's accumulators)."""
    return torch.outer(row_acc, col_acc)


def ma_regrow(
    active_indices: torch.Tensor, row_acc: torch.Tensor, col_acc: torch.Tensor, n: int
) -> torch.Tensor:
    """SpIEL-MA: the n inactive positions of largest ma_scores, sorted. Positions active before
    pruning are excluded (as the reference), so dropped entries are replaced by new ones.

    The scores are computed one block of rows at a time (about MA_BLOCK_ELEMENTS each) while a
    running top-n is kept: memory O(block + n), never the whole m x n matrix. Needs n <= m*n - k.
    """
    num_rows, num_cols = len(row_acc), len(col_acc)
    rows_per_block = max(1, MA_BLOCK_ELEMENTS // num_cols)
    best_scores = row_acc.new_empty(0)
    best_positions = torch.empty(0, dtype=torch.int64, device=row_acc.device)
    for first_row in range(0, num_rows, rows_per_block):
        last_row = min(num_rows, first_row + rows_per_block)
        offset = first_row * num_cols
        scores = ma_scores(row_acc[first_row:last_row], col_acc).flatten()
        # the active positions inside this block are a contiguous run of the sorted indices
        lo, hi = torch.searchsorted(
            active_indices,
            torch.tensor(
                [offset, last_row * num_cols], dtype=active_indices.dtype, device=active_indices.device
            ),
        ).tolist()
        scores[(active_indices[lo:hi] - offset).long()] = -math.inf
        top = torch.topk(scores, min(n, len(scores)))
        best_scores = torch.cat([best_scores, top.values])
        best_positions = torch.cat([best_positions, top.indices + offset])
        keep = torch.topk(best_scores, min(n, len(best_scores))).indices
        best_scores, best_positions = best_scores[keep], best_positions[keep]
    if n and best_scores.min() == -math.inf:
        raise ValueError(f"fewer than {n} inactive positions to regrow")
    return best_positions.sort().values.to(active_indices.dtype)


def merge_selection(
    active_indices: torch.Tensor, kept_mask: torch.Tensor, grown_indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The new sorted indices (kept + grown) and, for each new slot, the old slot it comes from
    (-1 for a position that was not active). Needs `active_indices` sorted and `grown_indices`
    disjoint from the kept positions (as both regrowth rules ensure)."""
    new_indices = torch.cat([active_indices[kept_mask], grown_indices]).sort().values
    slot = torch.searchsorted(active_indices, new_indices).clamp_(max=len(active_indices) - 1)
    source_slot = torch.where(active_indices[slot] == new_indices, slot, -1)
    return new_indices, source_slot
