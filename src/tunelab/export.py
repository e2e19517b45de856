"""Export a finished run: a PEFT adapter, a method's own format, a merged HF model directory, or a
GGUF file for llama.cpp and Ollama."""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.assemble import load_run
from tunelab.data import TRAINED_CHAT_TEMPLATES, resolve_template
from tunelab.errors import TunelabError
from tunelab.quant import dequantize_model
from tunelab.rundir import atomic_directory, check_writable

MERGED_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_run(
    run_dir: Path,
    fmt: str,
    out: Path,
    rank: int | None = None,
    dtype: str = "fp32",
    gguf_type: str = "f16",
) -> Path:
    """Write `fmt` for the run in `run_dir` into `out` (atomically; an existing `out` is refused).
    `dtype` is a merged model's weight type; `gguf_type` a GGUF's (f16 or q8_0)."""
    from tunelab.gguf_export import GGUF_TYPES

    if out.exists() and not out.is_dir():
        raise TunelabError(f"export target {out} is a file; --out names a directory to create")
    if out.exists() and any(out.iterdir()):
        raise TunelabError(f"export target {out} exists and is not empty; choose another --out or remove it")
    if dtype not in MERGED_DTYPES:
        raise TunelabError(f"--dtype {dtype}: use one of {', '.join(MERGED_DTYPES)}")
    if gguf_type not in GGUF_TYPES:
        raise TunelabError(f"--gguf-type {gguf_type}: use one of {', '.join(GGUF_TYPES)}")
    check_writable(out, "--out", folder=True)
    config, built = load_run(run_dir, precision="fp32")  # merged into fp32 weights, whatever trained
    formats = built.method.export_formats()
    if "merged" in formats:
        formats = [*formats, "gguf"]  # written from the merged model
    if fmt not in formats:
        choices = f"{', '.join(formats[:-1])} or {formats[-1]}" if len(formats) > 1 else formats[0]
        raise TunelabError(f"method '{config.method.name}' exports as {choices}, not '{fmt}'")
    built.method.set_rank(built.model, rank)
    template = resolve_template(config.data.template, built.tokenizer)
    if template != "chat":  # what serves the export must prompt the model as the run trained it
        built.tokenizer.chat_template = TRAINED_CHAT_TEMPLATES[template]
    with atomic_directory(out) as tmp:
        # every export carries the tokenizer and its chat template: what loads or serves it needs them
        built.tokenizer.save_pretrained(tmp)
        if fmt in ("merged", "gguf"):
            # from a 4-bit base this merges into the dequantized weights: a full-precision model
            merged = dequantize_model(built.method.merge(built.model, rank))
            if fmt == "gguf":
                _write_gguf(merged, built.tokenizer, tmp, out.name, gguf_type, template)
            else:
                merged.to(MERGED_DTYPES[dtype]).save_pretrained(tmp)
        else:
            built.method.export(built.model, fmt, tmp, base_model=built.model_path, rank=rank)
    return out


def _write_gguf(merged, tokenizer, folder: Path, name: str, gguf_type: str, template: str) -> None:
    """`name`.gguf and an Ollama Modelfile in `folder` (which holds the saved tokenizer); `template`:
    the prompt format the run trained with."""
    from tunelab.gguf_export import known_pre_tokenizer, modelfile, ollama_name, write_gguf

    gguf_name = f"{ollama_name(name)}.{gguf_type}.gguf"  # the Modelfile's FROM line takes no spaces
    write_gguf(merged, tokenizer, folder, folder / gguf_name, gguf_type, known_pre_tokenizer(tokenizer))
    (folder / "Modelfile").write_text(modelfile(gguf_name, tokenizer, template))
