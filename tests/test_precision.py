"""Mixed precision as `precision: bf16` (and `auto` on hardware with native bf16) promises it: frozen
base weights in bf16, everything that trains (adapters, SpIEL deltas, full fine-tuning's weights)
and its optimizer state in fp32, matrix multiplies in bf16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from tunelab.assemble import build
from tunelab.data import build_dataset
from tunelab.models import compute_dtype, has_native_bf16
from tunelab.quant import is_linear
from tunelab.train import make_trainer, training_arguments

METHODS = {
    "lora": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
    "dylora": {"name": "dylora", "r": 4, "alpha": 8},
    "spiel": {"name": "spiel", "num_tunable": 3000, "reselection_steps": 4, "accumulation_steps": 1},
    "full": {"name": "full"},
}


def _tensors(state) -> list[torch.Tensor]:
    """Every tensor in an optimizer's per-parameter state (nested dicts included)."""
    found = []
    for value in state.values() if isinstance(state, dict) else state:
        if torch.is_tensor(value):
            found.append(value)
        elif isinstance(value, dict | list | tuple):
            found += _tensors(value)
    return found


@pytest.mark.parametrize("method", list(METHODS))
def test_frozen_weights_bf16_trained_weights_and_optimizer_state_fp32(
    tmp_path, tiny_model_dir, qa_jsonl, method
):
    config = tiny_config(
        tiny_model_dir,
        qa_jsonl,
        tmp_path / "run",
        method=METHODS[method],
        **{"train.precision": "bf16", "train.max_steps": 5},
    )
    built = build(config)
    trained = [p for p in built.model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    frozen_linear = [m.weight for m in built.model.modules() if is_linear(m) and not m.weight.requires_grad]
    if method == "full":  # its weights are the base's own: they train, so they stay fp32
        assert not frozen_linear
    else:
        assert frozen_linear and all(w.dtype == torch.bfloat16 for w in frozen_linear)
    before = [p.detach().clone() for p in trained]

    dataset = build_dataset(str(qa_jsonl), built.tokenizer, config.data)
    trainer = make_trainer(config, built, tmp_path / "run", dataset)
    computed = set()  # the dtype the layers compute in during training, fp32 weights included
    for module in built.model.model.layers[0].mlp.modules():
        module.register_forward_hook(lambda _m, _i, out: computed.add(out.dtype))
    trainer.train()
    assert computed == {torch.bfloat16}, computed
    state = _tensors(trainer.optimizer.state_dict()["state"])
    assert state and all(t.dtype in (torch.float32, torch.int64, torch.int32) for t in state)
    assert any(t.dtype == torch.float32 for t in state)
    assert all(p.dtype == torch.float32 for p in trained)
    assert any(not torch.equal(b, p) for b, p in zip(before, trained, strict=True))
    if method != "spiel":  # the engine's AdamW runs its fused kernel, on CPU too (SpIEL has its own)
        assert all(group["fused"] for group in trainer.optimizer.param_groups)


def test_auto_is_bf16_exactly_where_the_hardware_has_it(tmp_path, tiny_model_dir, qa_jsonl):
    config = tiny_config(tiny_model_dir, qa_jsonl, tmp_path / "run")
    assert config.train.precision == "auto"
    native = has_native_bf16()
    if not torch.cuda.is_available() and Path("/proc/cpuinfo").is_file():  # the kernel's own word
        flags = set(Path("/proc/cpuinfo").read_text().split())
        assert native == bool({"avx512_bf16", "amx_bf16"} & flags)
    assert compute_dtype("auto") == (torch.bfloat16 if native else torch.float32)
    assert training_arguments(config, tmp_path / "run", has_eval=False).bf16 == native
    fp32 = tiny_config(tiny_model_dir, qa_jsonl, tmp_path / "run", **{"train.precision": "fp32"})
    assert not training_arguments(fp32, tmp_path / "run", has_eval=False).bf16
    assert all(p.dtype == torch.float32 for p in build(fp32).model.parameters())
