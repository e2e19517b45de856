"""LoRA with a sliceable rank, and DyLoRA = the same layer + a per-step rank sampler.

At rank b the layer computes h = W x + (alpha / b) * B[:, :b] (A[:b] x), which is exactly a LoRA of
rank b: that is why one DyLoRA run can be evaluated and exported at any rank 1..r.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from tunelab.config import DyLoraConfig, LoraConfig
from tunelab.errors import TunelabError
from tunelab.methods.base import Method
from tunelab.quant import dequantized_linear, is_linear


def rows(t: torch.Tensor) -> torch.Tensor:
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
            grad_B = rows(grad_update).T @ rows(down)
            dropped = x.to(ctx.dtype) if drop is None else x.to(ctx.dtype).masked_fill(drop, 0)
            grad_A = rows(grad_down).T @ rows(dropped)
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
            drop = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(self.dropout)
            scale /= 1 - self.dropout
        return self.base_layer(x) + LoRAUpdate.apply(x, lora_A, lora_B, scale, drop)

    def delta_weight(self, rank: int | None = None) -> torch.Tensor:
        b = rank or self.rank
        return (self.lora_B[:, :b] @ self.lora_A[:b]) * (self.alpha / b)


def target_linear_names(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Qualified names of the linear layers to adapt: all of them but the LM head, or those whose
    last name component is listed."""
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not is_linear(module) or module is output_head:
            continue
        if target_modules == "all-linear" or name.rsplit(".", 1)[-1] in target_modules:
            names.append(name)
    if not names:
        available = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear(m)})
        raise TunelabError(
            f"method.target_modules {target_modules!r} matches no linear layer; "
            f"available: {', '.join(available)}"
        )
    return names


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def set_rank(model: nn.Module, rank: int) -> None:
    """Make every LoRA layer of `model` compute with its first `rank` ranks."""
    for layer in lora_layers(model).values():
        layer.rank = rank


class LoraMethod(Method):
    config: LoraConfig | DyLoraConfig

    def attach(self, model: nn.Module) -> None:
        model.requires_grad_(False)
        for name in target_linear_names(model, self.config.target_modules):
            base = model.get_submodule(name)
            layer = LoRALinear(base, self.config.r, self.config.alpha, self.config.dropout)
            device = next(base.parameters()).device
            replace_module(model, name, layer.to(device))

    # -- variants: a plain LoRA has one rank ---------------------------------------------------------
    def check_rank(self, rank: int | None) -> int:
        if rank is None:
            return self.config.r
        if rank != self.config.r:
            raise TunelabError(f"this lora run has rank {self.config.r}; --rank {rank} needs a dylora run")
        return rank

    def set_variant(self, model: nn.Module, rank: int | None = None, **_: Any) -> None:
        set_rank(model, self.check_rank(rank))

    # -- merge and export --------------------------------------------------------------------------
    def merge(self, model: nn.Module, rank: int | None = None, **_: Any) -> nn.Module:
        rank = self.check_rank(rank)
        with torch.no_grad():
            for name, layer in lora_layers(model).items():
                merged = dequantized_linear(layer.base_layer)
                merged.weight += layer.delta_weight(rank).to(merged.weight.dtype)
                replace_module(model, name, merged)
        return model

    def export_formats(self) -> tuple[str, ...]:
        return ("peft", "merged")

    def export(
        self, model: nn.Module, fmt: str, out: Path, base_model: str, rank: int | None = None, **_: Any
    ) -> None:
        if fmt != "peft":
            super().export(model, fmt, out, base_model)
        rank = self.check_rank(rank)
        layers = lora_layers(model)
        tensors = {}
        for name, layer in layers.items():
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = layer.lora_A[:rank].detach().float().contiguous().cpu()
            tensors[f"{prefix}.lora_B.weight"] = layer.lora_B[:, :rank].detach().float().contiguous().cpu()
        adapter_config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": rank,
            "lora_alpha": self.config.alpha,  # PEFT's scale alpha / r equals ours at rank r
            "lora_dropout": self.config.dropout,
            "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}),
            "bias": "none",
            "use_rslora": False,
            "fan_in_fan_out": False,
            "inference_mode": True,
        }
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
        (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))


# ---------------------------------------------------------------------------------------------
# DyLoRA


def rank_probabilities(r_min: int, r_max: int, distribution: str, geometric_p: float = 0.15) -> np.ndarray:
    """p_B over ranks r_min..r_max: uniform, or geometric P(r_min + j) ∝ (1 - p)^j."""
    count = r_max - r_min + 1
    if distribution == "uniform":
        return np.full(count, 1.0 / count)
    weights = (1.0 - geometric_p) ** np.arange(count)
    return weights / weights.sum()


def sample_rank(step: int, seed: int, probabilities: np.ndarray, r_min: int) -> int:
    """The rank for optimizer step `step`: a pure function of (seed, step), so every process of a
    distributed run and a resumed run draw the same sequence without sharing state."""
    rng = np.random.default_rng([seed, step])
    return r_min + int(rng.choice(len(probabilities), p=probabilities))


def parse_ranks(spec: str, r_max: int) -> list[int]:
    """'all' | '1,2,4,8' | '1-64' | '1-8,16' -> sorted ranks, each within 1..r_max."""
    ranks: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        try:
            if part == "all":
                ranks.update(range(1, r_max + 1))
            elif "-" in part:
                low, high = (int(x) for x in part.split("-", 1))
                ranks.update(range(low, high + 1))
            else:
                ranks.add(int(part))
        except ValueError:
            raise TunelabError(
                f"--ranks '{spec}': '{part}' is not a rank; write all, 1,2,4,8 or 1-{r_max}"
            ) from None
    if not ranks:
        raise TunelabError(f"--ranks '{spec}' names no rank")
    bad = [b for b in ranks if not 1 <= b <= r_max]
    if bad:
        raise TunelabError(f"--ranks '{spec}': rank {bad[0]} is outside 1..{r_max} (this run's r)")
    return sorted(ranks)


class DyLoraMethod(LoraMethod):
    config: DyLoraConfig

    def __init__(self, config: DyLoraConfig, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.probabilities = rank_probabilities(
            config.r_min, config.r, config.rank_distribution, config.geometric_p
        )
        self.current_rank = config.r  # the rank drawn for the current (or last) optimizer step
        self._frozen_snapshot: list[tuple[torch.Tensor, torch.Tensor, int]] = []

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        for layer in lora_layers(model).values():
            layer.train_last_rank_only = self.config.update == "frozen"

    def on_step_begin(self, model: nn.Module, step: int) -> None:
        self.current_rank = sample_rank(step, self.seed, self.probabilities, self.config.r_min)
        set_rank(model, self.current_rank)

    def step_metrics(self) -> dict[str, Any]:
        return {"rank": self.current_rank}

    def _rank_tensors(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        """(tensor, rank dim) for every factor and its same-shaped optimizer state (moments)."""
        for layer in lora_layers(model).values():
            for param, dim in ((layer.lora_A, 0), (layer.lora_B, 1)):
                yield param, dim
                for value in optimizer.state.get(param, {}).values():
                    if torch.is_tensor(value) and value.shape == param.shape:
                        yield value, dim

    def on_before_optimizer_step(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> None:
        if self.config.update == "frozen":
            # AdamW's momentum and weight decay would still move rows that got no gradient:
            # remember them, with their optimizer state, to put back after the step.
            self._frozen_snapshot = [
                (t, t.detach().clone(), dim) for t, dim in self._rank_tensors(model, optimizer)
            ]

    def on_after_optimizer_step(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> None:
        b = self.current_rank
        with torch.no_grad():
            for live, saved, dim in self._frozen_snapshot:
                trained = live.narrow(dim, b - 1, 1).clone()
                live.copy_(saved)
                live.narrow(dim, b - 1, 1).copy_(trained)
        self._frozen_snapshot = []
        # between steps (evaluation, checkpoints) the adapter is at its full rank
        self.set_variant(model, rank=self.config.r)

    def check_rank(self, rank: int | None) -> int:
        if rank is None:
            return self.config.r
        if not 1 <= rank <= self.config.r:
            raise TunelabError(f"--rank {rank} is outside 1..{self.config.r} (this run's max rank r)")
        return rank

    def eval_variants(self, requested: str | None) -> list[dict[str, Any]]:
        if not requested:
            return [{"rank": self.config.r}]
        return [{"rank": b} for b in parse_ranks(requested, self.config.r)]
