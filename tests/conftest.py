"""Shared fixtures: a tiny random Llama with the SmolLM2 tokenizer, saved as a HF model directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # as the CLI sets it: tests read its stderr
from hypothesis import settings

# CI must give the same verdict on the same code: property tests run a fixed (derandomized) sample by
# default; HYPOTHESIS_PROFILE=explore draws fresh random cases on each run to hunt for new failures.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def random_llama(**overrides):
    """A tiny random LlamaForCausalLM (2 layers, 4/2 heads), seeded; `overrides` go to LlamaConfig."""
    return random_causal_lm("Llama", **overrides)


def random_causal_lm(architecture: str, **overrides):
    """A tiny random transformers `{architecture}ForCausalLM` ("Llama", "Qwen2", ...; 2 layers, 4/2
    heads), seeded; `overrides` go to its config."""
    import transformers

    shape = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    config = getattr(transformers, f"{architecture}Config")(**(shape | overrides))
    return getattr(transformers, f"{architecture}ForCausalLM")(config)


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    from tunelab.models import resolve_model

    return resolve_model("smollm2-135m")  # converted once into the tunelab cache


# the tiny model's shape beside SmolLM2's vocabulary
TINY_MODEL = dict(
    hidden_size=64,
    intermediate_size=128,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    # logits of a random model with the default 0.02 init are nearly flat and a frozen,
    # tied head then caps what a LoRA can learn in a few steps
    initializer_range=0.2,
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> str:
    """A random Llama (2 layers, hidden 64) built from a LlamaConfig, with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = random_llama(
        vocab_size=len(tokenizer),
        **TINY_MODEL,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture()
def qa_jsonl(tmp_path) -> Path:
    """A small prompt/completion dataset the tiny model can learn quickly."""
    return write_qa_jsonl(tmp_path / "qa.jsonl")


def write_qa_jsonl(path: Path) -> Path:
    """64 rows of one-digit additions as prompt/completion JSONL."""
    rows = [{"prompt": f"Q: {a}+{b}=", "completion": f" {a + b}"} for a in range(8) for b in range(8)]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def tiny_config(model_dir: str, data: Path, out: Path, **overrides):
    """A RunConfig for a fast run on the tiny model."""
    from tunelab.config import deep_merge, nest, validate

    data_dict = {
        "model": model_dir,
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(data), "eval": str(data), "max_length": 64},
        "train": {"lr": 5e-3, "max_steps": 12, "batch_size": 8, "log_steps": 4, "warmup_ratio": 0.0},
        "output_dir": str(out),
    }
    # a whole section given (method={...}) replaces the default one; dotted keys set one value
    data_dict |= {key: value for key, value in overrides.items() if "." not in key}
    dotted = {key: value for key, value in overrides.items() if "." in key}
    return validate(deep_merge(data_dict, nest(dotted)))


@pytest.fixture(scope="session")
def tokenizer_dir(smollm2_dir) -> str:
    return smollm2_dir


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """Run `tunelab ARGS` in this process; returns (exit code, stderr)."""
    code, _, err = run_cli_output(capsys, *args)
    return code, err


def run_cli_output(capsys, *args: str) -> tuple[int, str, str]:
    """Run `tunelab ARGS` in this process; returns (exit code, stdout, stderr)."""
    import sys

    from tunelab.cli import main

    capsys.readouterr()
    argv, sys.argv = sys.argv, ["tunelab", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    """The README's promise for bad input: exit 2, one `error:` line, no traceback."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file below `folder` (relative path -> sha256): equal digests mean no byte changed."""
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
