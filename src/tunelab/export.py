"""Export a finished run: a PEFT adapter, a method's own format, or a merged HF model directory."""

from __future__ import annotations

from pathlib import Path

from tunelab.assemble import load_run
from tunelab.errors import TunelabError
from tunelab.quant import dequantize_model
from tunelab.rundir import atomic_directory, check_writable


def export_run(run_dir: Path, fmt: str, out: Path, rank: int | None = None) -> Path:
    """Write `fmt` for the run in `run_dir` into `out` (atomically; an existing `out` is refused)."""
    if out.exists() and not out.is_dir():
        raise TunelabError(f"export target {out} is a file; --out names a directory to create")
    if out.exists() and any(out.iterdir()):
        raise TunelabError(f"export target {out} exists and is not empty; choose another --out or remove it")
    check_writable(out.parent)
    config, built = load_run(run_dir, precision="fp32")  # merged into fp32 weights, whatever trained
    formats = built.method.export_formats()
    if fmt not in formats:
        raise TunelabError(f"method '{config.method.name}' exports as {' or '.join(formats)}, not '{fmt}'")
    built.method.set_rank(built.model, rank)
    with atomic_directory(out) as tmp:
        if fmt == "merged":
            # from a 4-bit base this merges into the dequantized weights: a full-precision model
            merged = dequantize_model(built.method.merge(built.model, rank))
            merged.save_pretrained(tmp)
        else:
            built.method.export(built.model, fmt, tmp, base_model=built.model_path, rank=rank)
        # every export carries the tokenizer and its chat template: what loads or serves it needs them
        built.tokenizer.save_pretrained(tmp)
    return out
