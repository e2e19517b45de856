"""SpIEL (Ansell et al. 2024): sparse fine-tuning by update -> prune -> regrow.

Each target linear layer gets k (index, delta) pairs; every R optimizer steps the selector drops the
smallest deltas and regrows positions by accumulated gradients (AG, with AdamW) or by SM3's row and
column accumulators (MA). The schedule depends only on the step count and the gradients, so every
process of a distributed run (and a resumed run) selects the same positions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods.base import Method
from tunelab.methods.spiel.config import SpielConfig
from tunelab.methods.spiel.layer import CandidateStats, SparseDeltaLinear, average_across_processes
from tunelab.methods.spiel.optim import SlotOptimizer, SparseAdamW, SparseSM3, adamw_seed_state
from tunelab.methods.spiel.selection import (
    ag_regrow,
    index_dtype,
    is_phase_start,
    is_selection_step,
    ma_regrow,
    merge_selection,
    prune,
    replace_fraction,
    split_budget,
)
from tunelab.methods.surgery import replace_module, target_linear_names
from tunelab.quant import parameter_count

EXPORT_WEIGHTS_FILE = "spiel_deltas.safetensors"
EXPORT_CONFIG_FILE = "spiel_config.json"


def slot_optimizer(optimizer: torch.optim.Optimizer) -> SlotOptimizer:
    """The SpIEL optimizer inside the engine's wrappers (e.g. accelerate's AcceleratedOptimizer)."""
    while not isinstance(optimizer, SlotOptimizer):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            raise TunelabError(
                f"SpIEL needs its own optimizer (from create_optimizer), got {type(optimizer).__name__}"
            )
        optimizer = inner
    return optimizer


class SpielMethod(Method):
    config: SpielConfig

    def __init__(self, config: SpielConfig, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.layers: dict[str, SparseDeltaLinear] = {}  # by module name in the model, set by attach
        self.total_steps: int | None = None
        self.phase_start: int | None = None  # step at which the running AG phase began
        self.events: list[dict[str, Any]] = []

    # -- building --------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        model.requires_grad_(False)
        names = target_linear_names(model, self.config.target_modules)
        bases = [model.get_submodule(name) for name in names]
        numels = [base.in_features * base.out_features for base in bases]
        total = self.config.num_tunable or int(self.config.density * parameter_count(model))
        budgets = split_budget(total, numels)
        if min(budgets) == 0:
            raise TunelabError(
                f"SpIEL budget {total} is too small to give each of the {len(names)} target "
                "matrices an entry; raise method.density / method.num_tunable"
            )
        if any(k > numel for k, numel in zip(budgets, numels, strict=True)):
            raise TunelabError(
                f"SpIEL budget {total} exceeds the {sum(numels)} weights of the target "
                "matrices; lower method.density / method.num_tunable or target more modules"
            )
        # random placeholder positions: the first selection replaces all of them (linear policy)
        generator = torch.Generator().manual_seed(self.seed)
        for name, base, k, numel in zip(names, bases, budgets, numels, strict=True):
            indices = torch.randperm(numel, generator=generator)[:k].sort().values.to(index_dtype(numel))
            layer = SparseDeltaLinear(base, indices)
            replace_module(model, name, layer)
            self.layers[name] = layer

    def checkpoint_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The values and, as they change during training, the indices (not trained, but a checkpoint
        without them is meaningless)."""
        indices = {f"{name}.indices": layer.indices for name, layer in self.layers.items()}
        return {**super().checkpoint_tensors(model), **indices}

    def create_optimizer(self, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        layers = list(self.layers.values())
        if self.config.regrowth == "ag":
            return SparseAdamW(
                [layer.values for layer in layers],
                lr=lr,
                eps=self.config.adam_epsilon,
                weight_decay=weight_decay,
            )
        return SparseSM3(
            layers, lr=lr, beta=self.config.sm3_beta, eps=self.config.sm3_eps, weight_decay=weight_decay
        )

    # -- schedule ----------------------------------------------------------------------------------------
    def on_train_begin(self, model: nn.Module, total_steps: int) -> None:
        self.total_steps = total_steps

    def _schedule(self) -> tuple[int, int, int]:
        if self.total_steps is None:
            raise TunelabError("SpIEL needs the total number of steps: call on_train_begin first")
        return self.config.reselection_steps, self.config.accumulation_steps, self.total_steps

    def on_step_begin(self, model: nn.Module, step: int) -> None:
        if self.config.regrowth == "ag" and is_phase_start(step, *self._schedule()):
            self.phase_start = step
            for layer in self.layers.values():
                layer.start_phase()

    def on_after_optimizer_step(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> None:
        completed = step + 1
        if is_selection_step(completed, *self._schedule()):
            self._select(completed, slot_optimizer(optimizer))

    @torch.no_grad()
    def _select(self, t: int, optimizer: SlotOptimizer) -> None:
        fraction = replace_fraction(
            t,
            self.total_steps,
            self.config.initial_reselection_rate,
            self.config.reselection_policy,
            first=t == self.config.accumulation_steps,
        )
        ag = self.config.regrowth == "ag"
        replaced = 0
        for layer in self.layers.values():
            stats = layer.candidates
            if ag and stats is None:  # the layer got no gradient during the phase
                continue
            k = len(layer.values)
            n = int(k * fraction)
            if not ag:  # MA regrows only positions that were inactive, of which there are m*n - k
                n = min(n, layer.in_features * layer.out_features - k)
            kept = prune(layer.values, n)
            if ag:
                average_across_processes(stats.grad_sum)
                average_across_processes(stats.grad_sq_sum)
                grown = ag_regrow(layer.indices, kept, stats.indices, stats.grad_sum, n)
            else:
                state = optimizer.param_state(layer.values)
                grown = ma_regrow(layer.indices, state["row"], state["col"], n)
            new_indices, source_slot = merge_selection(layer.indices, kept, grown)
            seeds = self._adamw_seeds(stats, new_indices, t - self.phase_start, optimizer) if ag else None
            layer.set_indices(new_indices, source_slot)
            optimizer.remap_slots(layer.values, source_slot, seeds)
            replaced += int((source_slot < 0).sum())
        for layer in self.layers.values():
            layer.end_phase()
        self.phase_start = None
        self.events.append(
            {"event": "spiel_selection", "step": t, "replaced": replaced, "fraction": round(fraction, 6)}
        )

    @staticmethod
    def _adamw_seeds(
        stats: CandidateStats, new_indices: torch.Tensor, age: int, optimizer: SlotOptimizer
    ) -> dict[str, torch.Tensor]:
        """Seed state for every new slot from its candidate statistics (slots that were active before
        get junk here; remap_slots keeps their own state)."""
        slot = torch.searchsorted(stats.indices, new_indices).clamp_(max=len(stats.indices) - 1)
        return adamw_seed_state(
            stats.grad_sum[slot], stats.grad_sq_sum[slot], stats.samples, age, optimizer.defaults["betas"]
        )

    def pop_events(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events

    # -- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        candidates = {
            name: {
                "indices": s.indices.cpu(),
                "grad_sum": s.grad_sum.cpu(),
                "grad_sq_sum": s.grad_sq_sum.cpu(),
                "samples": s.samples,
            }
            for name, layer in self.layers.items()
            if (s := layer.candidates) is not None
        }
        return {"total_steps": self.total_steps, "phase_start": self.phase_start, "candidates": candidates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total_steps = state["total_steps"]
        self.phase_start = state["phase_start"]
        for name, layer in self.layers.items():
            if self.phase_start is None:
                layer.end_phase()
                continue
            saved = state["candidates"].get(name)
            layer.start_phase(
                None
                if saved is None
                else CandidateStats(
                    saved["indices"].to(layer.indices.device),
                    saved["grad_sum"].to(layer.values.device),
                    saved["grad_sq_sum"].to(layer.values.device),
                    saved["samples"],
                )
            )

    def load(self, model: nn.Module, directory: Path) -> None:
        # the indices change: take the old deltas out of the weights first, merge the loaded ones after
        layers = self.layers.values()
        for layer in layers:
            layer.restore_pretrained()
        try:
            super().load(model, directory)
        finally:
            for layer in layers:
                layer.capture_pretrained()

    # -- merge and export --------------------------------------------------------------------------------
    def merge(self, model: nn.Module, rank: int | None = None) -> nn.Module:
        for name, layer in self.layers.items():
            replace_module(model, name, layer.merged_linear())
        return model

    def export(self, model: nn.Module, fmt: str, out: Path, base_model: str, rank: int | None = None) -> None:
        """`spiel`: one safetensors file with `<module>.indices` (flat row-major) and `<module>.values`
        per target module, named as in the base model, plus a JSON config with the matrix shapes."""
        if fmt != "spiel":
            super().export(model, fmt, out, base_model)
        layers = self.layers
        tensors = {}
        for name, layer in layers.items():
            tensors[f"{name}.indices"] = layer.indices.detach().contiguous().cpu()
            tensors[f"{name}.values"] = layer.values.detach().float().contiguous().cpu()
        config = {
            "format": "spiel",
            "base_model_name_or_path": base_model,
            "index_layout": "flat row-major: position = row * in_features + col; weight[out, in] += value",
            "num_tunable": sum(len(layer.values) for layer in layers.values()),
            "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}),
            "shapes": {name: list(layer.weight_shape) for name, layer in layers.items()},
        }
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, out / EXPORT_WEIGHTS_FILE, metadata={"format": "pt"})
        (out / EXPORT_CONFIG_FILE).write_text(json.dumps(config, indent=2))


def apply_deltas(model: nn.Module, folder: str | Path) -> nn.Module:
    """Add a `--format spiel` export's deltas to `model`, its base as transformers loads it: the model
    `--format merged` writes, from a file of k deltas per matrix instead of a full copy."""
    folder = Path(folder)
    deltas = load_file(folder / EXPORT_WEIGHTS_FILE)
    shapes = json.loads((folder / EXPORT_CONFIG_FILE).read_text(encoding="utf-8"))["shapes"]
    with torch.no_grad():
        for name, shape in shapes.items():
            weight = model.get_submodule(name).weight
            if list(weight.shape) != shape:
                raise TunelabError(
                    f"{folder}: {name} is {shape} in the export but {list(weight.shape)} in this model; "
                    f"load the base it was trained on ({EXPORT_CONFIG_FILE}: base_model_name_or_path)"
                )
            values = deltas[f"{name}.values"].to(weight.dtype)
            weight.view(-1).index_add_(0, deltas[f"{name}.indices"].long(), values)
    return model
