"""Assembling a model for a run: the base model (quantized when asked) with its method attached, and
loading a finished run back the same way."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import set_seed

from tunelab.config import RunConfig, check_saved_model
from tunelab.errors import TunelabError
from tunelab.methods import create_method
from tunelab.methods.base import Method
from tunelab.models import base_dtype, load_model, load_tokenizer, resolve_model
from tunelab.quant import guard_cpu_repack, nf4_config, release_loading_memory
from tunelab.rundir import RunDir, trained_weights


@dataclass
class TunedModel:
    """A base model with a method attached, ready to train or evaluate."""

    model: nn.Module
    tokenizer: Any
    method: Method
    model_path: str


def build(config: RunConfig, tokenizer: Any = None) -> TunedModel:
    """Resolve and load the base model (quantized when asked), attach the method; `tokenizer` is the
    model's, when the caller loaded it already."""
    model_path = resolve_model(config.model)
    tokenizer = tokenizer or load_tokenizer(model_path, config.data.chat_template)
    dtype = base_dtype(config.train.precision, config.method.trains_base_weights)
    if config.quantization == "nf4":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(model_path, dtype, quantization_config=nf4_config(dtype), device_map=device)
        guard_cpu_repack(model)
        release_loading_memory(model)
        # transformers refuses to train a quantized model unless adapters are attached; ours are.
        model._hf_peft_config_loaded = True
    else:
        model = load_model(model_path, dtype)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and config.data.max_length > positions:
        raise TunelabError(
            f"data.max_length={config.data.max_length} is beyond the model's {positions} positions "
            f"(max_position_embeddings); set data.max_length={positions} or less"
        )
    method = create_method(config.method, seed=config.train.seed)
    set_seed(config.train.seed)  # the method's initial weights (LoRA's A, SpIEL's indices) are seeded
    method.attach(model)
    return TunedModel(model, tokenizer, method, model_path)


def read_run_config(run_dir: Path) -> RunConfig:
    """The config of a finished run or of one of its checkpoints, without loading its model (to check
    a request against it first)."""
    return _saved_config(trained_weights(run_dir)[0])


def _saved_config(run: RunDir) -> RunConfig:
    from tunelab.config import read_yaml, validate

    data, text = read_yaml(run.config_file)
    config = validate(data, str(run.config_file), text)
    check_saved_model(config.model, run.config_file)
    return config


def load_run(run_dir: Path, precision: str | None = None) -> tuple[RunConfig, TunedModel]:
    """The config and trained model of a finished run (the folder it is in now, wherever it moved), or
    of one of its checkpoints; `precision` replaces the run's train.precision (export merges into fp32
    weights)."""
    run, weights = trained_weights(run_dir)
    config = _saved_config(run)
    if precision:
        config.train.precision = precision
    built = build(config)
    built.method.load(built.model, weights)
    built.model.eval()
    return config, built
