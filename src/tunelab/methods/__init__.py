"""Fine-tuning methods, one folder each: its config (config.py, torch-free, so configs validate
without loading torch) and its `base.Method` implementation, imported only when a run builds it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from tunelab.methods.full.config import FullConfig
from tunelab.methods.lora.config import DyLoraConfig, LoraConfig
from tunelab.methods.spiel.config import SpielConfig
from tunelab.schema import MethodSection

if TYPE_CHECKING:
    from tunelab.methods.base import Method

# the one registry of methods: a new method is its config class here (naming its implementation)
METHOD_CONFIGS: dict[str, type[MethodSection]] = {
    "lora": LoraConfig,
    "dylora": DyLoraConfig,
    "full": FullConfig,
    "spiel": SpielConfig,
}


def create_method(config: MethodSection, seed: int = 0) -> Method:
    """The Method object for a validated method config (its class is named by the config)."""
    module, name = config.implementation.split(":")
    return getattr(importlib.import_module(module), name)(config, seed=seed)
