"""Optimizers over SpIEL's `values` (one 1-D tensor of k deltas per weight matrix).

Both keep per-slot state that must follow the slots through a reselection: `remap_slots` moves the
state of every kept slot to its new place and fills new slots with seeds (AG) or zeros.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class SlotOptimizer(torch.optim.Optimizer):
    """An optimizer whose per-element state (`slot_keys`) is indexed like the parameter's slots."""

    slot_keys: tuple[str, ...] = ()

    def param_state(self, param: nn.Parameter) -> dict:
        """The state of `param`, created on first use."""
        raise NotImplementedError

    def update(self, param: nn.Parameter, group: dict) -> None:
        """Apply one step to `param` (which has a gradient) with its group's hyperparameters."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self.update(param, group)
        return loss

    @torch.no_grad()
    def remap_slots(
        self, param: nn.Parameter, source_slot: torch.Tensor, seeds: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Reorder the per-slot state after a reselection: new slot j takes old slot source_slot[j],
        or, where source_slot[j] == -1, seeds[key][j] (zero when no seed is given)."""
        state = self.param_state(param)
        moved = source_slot >= 0
        source = source_slot.clamp(min=0)
        for key in self.slot_keys:
            if key not in state:
                continue
            old = state[key]
            fill = seeds[key].to(old.dtype) if seeds and key in seeds else torch.zeros_like(old)
            state[key] = torch.where(moved, old[source], fill)


class SparseAdamW(SlotOptimizer):
    """AdamW in which every element has its own age (number of gradients its moments hold), so a
    regrown slot seeded with `age` steps of statistics is bias-corrected as an `age`-step-old moment.

    As the SpIEL reference (`SftAdamW`): eps is added to sqrt(v) before the bias correction,
    update = (m / bc1) / ((sqrt(v) + eps) / sqrt(bc2)) with bc_i = 1 - beta_i^age, and the decoupled
    weight decay comes after the update, p <- (p - lr * update) * (1 - lr * weight_decay), pulling the
    deltas toward 0, i.e. toward the pretrained weights.

    Deliberately unlike the reference: the age counts the current gradient, so a slot seeded with `a`
    steps of statistics is corrected with age a + 1 at its first step, when its moments hold a + 1
    gradients (the reference uses a, which over-weights that gradient: with a constant gradient and
    a = 1 its step is 1.34 lr instead of lr); and the age advances whatever the moments' dtype (the
    reference's advances only with fp32 moments).
    """

    slot_keys = ("age", "exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    def param_state(self, param: nn.Parameter) -> dict:
        state = self.state[param]
        if not state:
            state["age"] = torch.zeros_like(param, dtype=torch.float32)  # fp32 whatever the moments' dtype
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        return state

    def update(self, param: nn.Parameter, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        state = self.param_state(param)
        age, exp_avg, exp_avg_sq = state["age"], state["exp_avg"], state["exp_avg_sq"]
        grad = param.grad.to(exp_avg.dtype)
        age += 1
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - torch.pow(beta1, age)
        bias_correction2 = 1 - torch.pow(beta2, age)
        denom = (exp_avg_sq.sqrt() + eps) / bias_correction2.sqrt()
        param.sub_((lr * (exp_avg / bias_correction1) / denom).to(param.dtype))
        if weight_decay:
            param.mul_(1 - lr * weight_decay)


def adamw_seed_state(
    grad_sum: torch.Tensor, grad_sq_sum: torch.Tensor, samples: int, age: float, betas: tuple[float, float]
) -> dict[str, torch.Tensor]:
    """SparseAdamW state for regrown slots from SpIEL-AG's accumulated statistics.

    `samples` micro-batch gradients were summed; `age` = samples / grad_accum_steps is the number of
    optimizer steps they cover. The moments are counter-corrected for bias,
    m = mean_g * (1 - beta1^age), v = mean_g2 * (1 - beta2^age), so that the bias-corrected
    estimates m / (1 - beta1^age) and v / (1 - beta2^age) equal the means (mean_g2 = mean of g^2).
    """
    beta1, beta2 = betas
    mean_grad, mean_grad_sq = grad_sum / samples, grad_sq_sum / samples
    return {
        "age": torch.full_like(grad_sum, age, dtype=torch.float32),
        "exp_avg": mean_grad * (1 - beta1**age),
        "exp_avg_sq": mean_grad_sq * (1 - beta2**age),
    }


class SparseSM3(SlotOptimizer):
    """SM3 over sparse deltas (SpIEL-MA): one accumulator per row and per column of each matrix.

    For each active (r, c): nu = min(row[r], col[c]) + g^2; row[r] <- max(row[r], max of nu over the
    row's active entries), likewise col[c], so an accumulator never decreases, also across
    reselections (as the reference's scatter_reduce amax with include_self=True); update =
    g / sqrt(nu + eps). With beta > 0 the update is a momentum average, u <- beta * u + (1 - beta) *
    update (one value per slot; the reference ignores its beta). Decoupled weight decay after the
    update, p <- (p - lr * u) * (1 - lr * weight_decay), as the reference. Persistent state: O(m + n)
    per matrix, plus O(k) with momentum.

    `layers` are objects with `values` (the parameter), `indices` and `weight_shape`; the indices are
    read at every step, so they may change between steps.
    """

    slot_keys = ("momentum",)

    def __init__(
        self,
        layers: Iterable,
        lr: float = 1e-3,
        beta: float = 0.0,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        layers = list(layers)
        super().__init__(
            [layer.values for layer in layers],
            {"lr": lr, "beta": beta, "eps": eps, "weight_decay": weight_decay},
        )
        self.layer_of = {layer.values: layer for layer in layers}

    def param_state(self, param: nn.Parameter) -> dict:
        state = self.state[param]
        if not state:
            num_rows, num_cols = self.layer_of[param].weight_shape
            state["row"] = torch.zeros(num_rows, dtype=torch.float32, device=param.device)
            state["col"] = torch.zeros(num_cols, dtype=torch.float32, device=param.device)
        return state

    def update(self, param: nn.Parameter, group: dict) -> None:
        lr, beta, eps, weight_decay = group["lr"], group["beta"], group["eps"], group["weight_decay"]
        state = self.param_state(param)
        layer = self.layer_of[param]
        rows = (layer.indices // layer.weight_shape[1]).long()
        cols = (layer.indices % layer.weight_shape[1]).long()
        grad = param.grad.float()
        nu = torch.minimum(state["row"][rows], state["col"][cols]).addcmul_(grad, grad)
        state["row"].scatter_reduce_(0, rows, nu, "amax", include_self=True)
        state["col"].scatter_reduce_(0, cols, nu, "amax", include_self=True)
        direction = grad / (nu + eps).sqrt_()
        if beta > 0:
            momentum = state.setdefault("momentum", torch.zeros_like(direction))
            direction = momentum.mul_(beta).add_(direction, alpha=1 - beta)
        param.sub_((lr * direction).to(param.dtype))
        if weight_decay:
            param.mul_(1 - lr * weight_decay)
