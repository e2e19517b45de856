"""The small protocol every fine-tuning method implements.

The engine (train.py) only calls these hooks; it never asks which method it is running.
A method owns: how it changes the model (attach), which tensors train, an optional optimizer,
per-step hooks (DyLoRA draws a rank, SpIEL prunes and regrows), its own state for checkpoints,
and how its trained weights are saved, loaded and exported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.errors import TunelabError
from tunelab.rundir import STATE_FILE, WEIGHTS_FILE, default_permissions


class Method:
    """Base class with no-op hooks; subclasses override what they need."""

    def __init__(self, config: Any, seed: int = 0) -> None:
        self.config = config
        self.seed = seed  # for what a method draws at random (DyLoRA's ranks, SpIEL's first indices)

    # -- building ------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Change `model` in place so that exactly the method's parameters require grad."""
        raise NotImplementedError

    def checkpoint_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold, by name in `model`: the tensors this method trains, and any
        other tensor that changes during training (SpIEL's indices)."""
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    def create_optimizer(
        self, model: nn.Module, lr: float, weight_decay: float
    ) -> torch.optim.Optimizer | None:
        """An optimizer of the method's own, or None for the engine's default AdamW."""
        return None

    # -- step hooks (optimizer-step granularity) ---------------------------------------------------
    # In every hook `step` is the 0-based index of the optimizer step in progress, i.e. the number of
    # optimizer steps completed before it: in on_after_optimizer_step, step + 1 steps are done.
    def on_train_begin(self, model: nn.Module, total_steps: int) -> None:
        """Training (or a resumed training) starts; `total_steps` optimizer steps in all."""

    def on_step_begin(self, model: nn.Module, step: int) -> None:
        """Before the first micro-batch of optimizer step `step`."""

    def on_before_optimizer_step(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Gradients of all micro-batches are accumulated (and clipped); the optimizer has not run."""

    def on_after_optimizer_step(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer has updated the parameters of step `step`."""

    def step_metrics(self) -> dict[str, Any]:
        """Extra fields for the metrics.jsonl line of the step that just ended (e.g. the rank)."""
        return {}

    def pop_events(self) -> list[dict[str, Any]]:
        """Events to append to metrics.jsonl as their own lines (e.g. a SpIEL selection)."""
        return []

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Method state beyond the trained tensors (sampler, selector schedule, ...)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def save(self, model: nn.Module, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.checkpoint_tensors(model).items()}
        save_file(tensors, directory / WEIGHTS_FILE)
        default_permissions(directory / WEIGHTS_FILE)
        torch.save(self.state_dict(), directory / STATE_FILE)

    def load(self, model: nn.Module, directory: Path) -> None:
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise TunelabError(f"{directory} holds no trained weights ({WEIGHTS_FILE}); is it a tunelab run?")
        try:
            tensors = load_file(weights)
        except Exception as exc:  # safetensors raises its own error type for a truncated or corrupt file
            raise TunelabError(
                f"cannot read {weights}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                "the file is damaged (a copy cut short?): copy the run again or use another checkpoint"
            ) from None
        expected = self.checkpoint_tensors(model)
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise TunelabError(
                f"{weights} does not fit this model/method: "
                f"{len(missing)} tensors missing (e.g. {missing[:1]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:1]})"
            )
        with torch.no_grad():
            for name, tensor in tensors.items():
                expected[name].copy_(tensor)
        state_file = directory / STATE_FILE
        if state_file.is_file():
            self.load_state_dict(torch.load(state_file, weights_only=False))

    # -- evaluation and export -------------------------------------------------------------------
    # `rank`: one of the ranks the config declares (`evaluable_ranks`), None for the model as trained
    def set_rank(self, model: nn.Module, rank: int | None) -> None:
        """Make the model compute at `rank` (DyLoRA: its first `rank` ranks)."""
        if rank is not None:
            raise TunelabError(
                f"--rank needs a run with several ranks; this run's method is '{self.config.name}'"
            )

    def merge(self, model: nn.Module, rank: int | None = None) -> nn.Module:
        """Return a plain HF model with the method's update (at `rank`) folded into its weights."""
        raise NotImplementedError

    def export(self, model: nn.Module, fmt: str, out: Path, base_model: str, rank: int | None = None) -> None:
        """Write `fmt` (other than 'merged', which export.py handles through merge())."""
        raise TunelabError(f"method '{self.config.name}' cannot export format '{fmt}'")
