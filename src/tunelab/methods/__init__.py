"""Fine-tuning methods; each plugs into the engine through `base.Method`."""

from __future__ import annotations

import importlib

from tunelab.methods.base import Method


def create_method(config, seed: int = 0) -> Method:
    """The Method object for a validated method config (its class is named by the config)."""
    module, name = config.implementation.split(":")
    return getattr(importlib.import_module(module), name)(config, seed=seed)
