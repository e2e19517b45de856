"""LoRA as a method: attach LoRA layers to the targeted linears, save, merge, export to PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods.base import Method
from tunelab.methods.lora.config import DyLoraConfig, LoraConfig
from tunelab.methods.lora.layer import LoRALinear, lora_layers, set_rank
from tunelab.methods.surgery import replace_module, target_linear_names
from tunelab.quant import dequantized_linear


class LoraMethod(Method):
    config: LoraConfig | DyLoraConfig

    def attach(self, model: nn.Module) -> None:
        model.requires_grad_(False)
        for name in target_linear_names(model, self.config.target_modules):
            base = model.get_submodule(name)
            layer = LoRALinear(base, self.config.r, self.config.alpha, self.config.dropout)
            device = next(base.parameters()).device
            replace_module(model, name, layer.to(device))

    # -- ranks: a plain LoRA has one ---------------------------------------------------------
    def resolve_rank(self, rank: int | None) -> int:
        """The rank to evaluate or export at: the run's r when none is asked for, else a rank it has."""
        if rank is None:
            return self.config.r
        if rank != self.config.r:
            raise TunelabError(f"this lora run has rank {self.config.r}; --rank {rank} needs a dylora run")
        return rank

    def set_rank(self, model: nn.Module, rank: int | None) -> None:
        set_rank(model, self.resolve_rank(rank))

    # -- merge and export --------------------------------------------------------------------------
    def merge(self, model: nn.Module, rank: int | None = None) -> nn.Module:
        rank = self.resolve_rank(rank)
        with torch.no_grad():
            for name, layer in lora_layers(model).items():
                merged = dequantized_linear(layer.base_layer)
                merged.weight += layer.delta_weight(rank).to(merged.weight.dtype)
                replace_module(model, name, merged)
        return model

    def export(self, model: nn.Module, fmt: str, out: Path, base_model: str, rank: int | None = None) -> None:
        if fmt != "peft":
            super().export(model, fmt, out, base_model)
        rank = self.resolve_rank(rank)
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
