"""LoRA with a sliceable rank (layer.py), the LoRA method (method.py), and DyLoRA = the same layer + a
per-step rank sampler (dylora.py)."""

from tunelab.methods.lora.dylora import DyLoraMethod, parse_ranks, rank_probabilities, sample_rank
from tunelab.methods.lora.layer import LoRALinear, lora_layers, set_rank
from tunelab.methods.lora.method import LoraMethod

__all__ = [
    "DyLoraMethod",
    "LoRALinear",
    "LoraMethod",
    "lora_layers",
    "parse_ranks",
    "rank_probabilities",
    "sample_rank",
    "set_rank",
]
