"""LoRA with a sliceable rank (layer.py), the LoRA method (method.py), and DyLoRA = the same layer + a
per-step rank sampler (dylora.py); their configs in config.py."""
