"""`train.compile`: the decoder layers run compiled for training, as one graph each, with the eager
model's numbers (dropout masks and DyLoRA's ranks included), and are eager again after it."""

from __future__ import annotations

import pytest
from torch._dynamo.utils import counters

from conftest import tiny_config
from tunelab.assemble import build
from tunelab.data import build_dataset
from tunelab.train import make_trainer

METHODS = {
    "lora": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.2},
    # its rank changes every step: that must not compile again for each rank
    "dylora": {"name": "dylora", "r": 8, "alpha": 8, "dropout": 0.2},
}


def _losses(tmp_path, tiny_model_dir, qa_jsonl, method: str, compile: bool):
    config = tiny_config(
        tiny_model_dir,
        qa_jsonl,
        tmp_path / f"run-{compile}",
        method=METHODS[method],
        **{"train.precision": "fp32", "train.max_steps": 8, "train.compile": compile},
    )
    built = build(config)
    dataset = build_dataset(str(qa_jsonl), built.tokenizer, config.data)
    trainer = make_trainer(config, built, tmp_path / f"run-{compile}", dataset)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], built.model


@pytest.mark.parametrize("method", list(METHODS))
def test_compiled_layers_train_as_the_eager_ones(tmp_path, tiny_model_dir, qa_jsonl, method):
    eager, _ = _losses(tmp_path, tiny_model_dir, qa_jsonl, method, compile=False)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    compiled, model = _losses(tmp_path, tiny_model_dir, qa_jsonl, method, compile=True)
    graphs = counters["stats"]["unique_graphs"] - graphs
    # the first layer's input needs no grad, the others' do; the first batch's length, then any: 2 x 2
    # graphs. DyLoRA's rank, which changes every step, adds none (8 here if each rank compiled anew).
    assert 1 <= graphs <= 4
    assert sum(counters["graph_break"].values()) == breaks  # one graph each: the masks are drawn ahead
    assert len(compiled) == len(eager) == 8
    assert compiled == pytest.approx(eager, rel=1e-4)  # the same dropout masks, the same numbers
    assert all("forward" not in vars(layer) for layer in model.model.layers)  # eager again
