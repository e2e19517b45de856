"""Integration on the embedded SmolLM2-135M (marked: `pytest -m "not integration"` skips them)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.integration


def test_embedded_model_loads_and_generates(smollm2_dir):
    from tunelab.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir)
    model = load_model(smollm2_dir).eval()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>" and tokenizer.model_max_length == 8192
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    batch = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(
            **batch, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    answer = tokenizer.decode(output[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_qdylora_on_the_embedded_model(tmp_path):
    """Two QDyLoRA steps on the real SmolLM2 with an NF4 base, then the adapter at two ranks."""
    from tunelab.config import validate
    from tunelab.data import build_dataset
    from tunelab.evaluate import loss_and_perplexity
    from tunelab.train import train

    config = validate(
        {
            "model": "smollm2-135m",
            "quantization": "nf4",
            "method": {"name": "dylora", "r": 4, "alpha": 8},
            "data": {"train": "gsm8k:train", "eval": "gsm8k:eval", "max_length": 128},
            "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3},
            "output_dir": str(tmp_path / "run"),
        }
    )
    built = train(config).tuned
    dataset = build_dataset("gsm8k:eval", built.tokenizer, config.data, limit=4)
    losses = []
    for rank in (1, 4):
        built.method.set_rank(built.model, rank)
        losses.append(loss_and_perplexity(built.model, dataset, built.tokenizer)["loss"])
    assert all(0 < loss < 5 for loss in losses) and losses[0] != losses[1]
