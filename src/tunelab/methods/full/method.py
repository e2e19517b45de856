"""Full fine-tuning: every weight trains."""

from __future__ import annotations

from torch import nn

from tunelab.methods.base import Method


class FullMethod(Method):
    def attach(self, model: nn.Module) -> None:
        model.requires_grad_(True)

    def merge(self, model: nn.Module, rank: int | None = None) -> nn.Module:
        return model
