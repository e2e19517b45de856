"""Fine-tuning methods; each plugs into the engine through `base.Method`."""

from __future__ import annotations

from tunelab.methods.base import Method


def create_method(config, seed: int = 0) -> Method:
    """The Method object for a validated method config."""
    from tunelab.methods.full import FullMethod
    from tunelab.methods.lora import DyLoraMethod, LoraMethod
    from tunelab.methods.spiel import SpielMethod

    if config.name == "lora":
        return LoraMethod(config)
    if config.name == "dylora":
        return DyLoraMethod(config, seed=seed)
    if config.name == "full":
        return FullMethod(config)
    if config.name == "spiel":
        return SpielMethod(config, seed=seed)
    raise ValueError(f"no method named {config.name!r}")  # unreachable: the config schema validates it
