"""DyLoRA = the LoRA method + one rank b per optimizer step, drawn from p_B over {r_min..r}, the same b
for every layer and micro-batch (a pure function of seed and step)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods.lora.config import DyLoraConfig
from tunelab.methods.lora.layer import lora_layers, set_rank
from tunelab.methods.lora.method import LoraMethod


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
        self.set_rank(model, self.config.r)

    def resolve_rank(self, rank: int | None) -> int:
        if rank is None:
            return self.config.r
        if rank not in self.config.evaluable_ranks():
            raise TunelabError(f"--rank {rank} is outside 1..{self.config.r} (this run's max rank r)")
        return rank
