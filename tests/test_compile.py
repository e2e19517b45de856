"""`train.compile`: the decoder layers run compiled for training, as one graph each, with the eager
model's numbers (dropout masks and DyLoRA's ranks included), and are eager again after it. SpIEL
declares it cannot be compiled (tests/test_config.py)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import tiny_config
from tunelab.assemble import build
from tunelab.data import build_dataset
from tunelab.train import make_trainer

# LoRA's layer with a rank that changes every step (that must not compile again for each rank)
METHOD = {"name": "dylora", "r": 8, "alpha": 8, "dropout": 0.2}


def _losses(tmp_path, tiny_model_dir, qa_jsonl, compile: bool):
    config = tiny_config(
        tiny_model_dir,
        qa_jsonl,
        tmp_path / f"run-{compile}",
        method=METHOD,
        **{"train.precision": "fp32", "train.max_steps": 8, "train.compile": compile},
    )
    built = build(config)
    dataset = build_dataset(str(qa_jsonl), built.tokenizer, config.data)
    trainer = make_trainer(config, built, tmp_path / f"run-{compile}", dataset)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], built.model


def test_compiled_layers_train_as_the_eager_ones(tmp_path, tiny_model_dir, qa_jsonl):
    eager, _ = _losses(tmp_path, tiny_model_dir, qa_jsonl, compile=False)
    torch._dynamo.reset()  # no graphs another test compiled: count this run's
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    compiled, model = _losses(tmp_path, tiny_model_dir, qa_jsonl, compile=True)
    graphs = counters["stats"]["unique_graphs"] - graphs
    # the first layer's input needs no grad, the others' do; a batch with padding has a mask, one without
    # none: 2 x 2 graphs, whatever the lengths (dynamic) and the rank (8, dynamo's limit, without both)
    assert 1 <= graphs <= 4
    assert sum(counters["graph_break"].values()) == breaks  # one graph each: the masks are drawn ahead
    assert len(compiled) == len(eager) == 8
    assert compiled == pytest.approx(eager, rel=1e-4)  # the same dropout masks, the same numbers
    assert all("forward" not in vars(layer) for layer in model.model.layers)  # eager again
