"""Export a finished run: a PEFT adapter, a method's own format, a merged HF model directory, or a
GGUF file for llama.cpp and Ollama."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tunelab.assemble import load_run, read_run_config
from tunelab.data import TRAINED_CHAT_TEMPLATES, resolve_template
from tunelab.errors import TunelabError, closest, shell_word
from tunelab.quant import dequantize_model
from tunelab.rundir import atomic_directory, check_writable

MERGED_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# what torch, numpy and llama.cpp call the same weight types
DTYPE_NAMES = {
    **{name: "fp32" for name in ("float32", "float", "f32")},
    **{name: "fp16" for name in ("float16", "half", "f16")},
    "bfloat16": "bf16",
}
FILE_LIKE_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".json")
# written last into every export: the files it holds, so that --overwrite replaces only an export
EXPORT_MANIFEST = ".tunelab-export.json"


def export_run(
    run_dir: Path,
    fmt: str,
    out: Path,
    rank: int | None = None,
    dtype: str = "fp32",
    gguf_type: str = "f16",
    overwrite: bool = False,
) -> Path:
    """Write `fmt` for the run in `run_dir` into `out` (atomically). An existing `out` is refused, or with
    `overwrite` replaced when it holds an earlier export and nothing else. `dtype` is a merged model's
    weight type; `gguf_type` a GGUF's (f16 or q8_0)."""
    from tunelab.gguf_export import GGUF_TYPES

    # GGUF, Q8_0, float16: what other tools write means the same here (errors echo what was written)
    given_fmt, given_gguf_type, given_dtype = fmt, gguf_type, dtype
    fmt, gguf_type, dtype = fmt.lower(), gguf_type.lower(), DTYPE_NAMES.get(dtype.lower(), dtype.lower())
    if out.exists() and not out.is_dir():
        raise TunelabError(f"export target {out} is a file; --out names a directory to create")
    if not out.exists() and out.suffix.lower() in FILE_LIKE_SUFFIXES:
        raise TunelabError(
            f"--out {out} reads as a file name; --out names a directory to create (e.g. --out "
            f"{shell_word(out.with_suffix(''))})"
        )
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise TunelabError(
                f"export target {out} exists and is not empty; choose another --out, or --overwrite to "
                "replace an earlier export"
            )
        _check_replaceable(out)
    if dtype not in MERGED_DTYPES:
        raise TunelabError(f"--dtype {given_dtype}: use one of {', '.join(MERGED_DTYPES)}")
    if gguf_type not in GGUF_TYPES:
        raise TunelabError(f"--gguf-type {given_gguf_type}: use one of {', '.join(GGUF_TYPES)}")
    check_writable(out, "--out", folder=True)
    method = read_run_config(run_dir).method  # a mistyped --format or --rank is told before the model loads
    method.check_rank(rank)
    formats = list(method.export_formats)
    if "merged" in formats:
        formats = [*formats, "gguf"]  # written from the merged model
    if fmt not in formats:
        choices = f"{', '.join(formats[:-1])} or {formats[-1]}" if len(formats) > 1 else formats[0]
        near = closest(fmt, formats)
        hint = f"; did you mean {near}?" if near else ""
        raise TunelabError(f"method '{method.name}' exports as {choices}, not '{given_fmt}'{hint}")
    config, built = load_run(run_dir, precision="fp32")  # merged into fp32 weights, whatever trained
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
        _readable_by_transformers_4(tmp)
        written = sorted(str(path.relative_to(tmp)) for path in tmp.rglob("*") if path.is_file())
        manifest = {"run": str(run_dir.resolve()), "format": fmt, "rank": rank, "files": written}
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out


def _check_replaceable(out: Path) -> None:
    """--overwrite replaces a folder only when an export wrote it and nothing has been added since: a
    user's file there would be lost with the folder."""
    manifest = out / EXPORT_MANIFEST
    if not manifest.is_file():
        raise TunelabError(
            f"--overwrite: {out} was not written by tunelab export (no {EXPORT_MANIFEST}); choose another "
            "--out, or empty it yourself"
        )
    try:
        ours = set(json.loads(manifest.read_text(encoding="utf-8"))["files"]) | {EXPORT_MANIFEST}
    except (ValueError, KeyError, TypeError):
        raise TunelabError(f"--overwrite: {manifest} is damaged; choose another --out") from None
    others = sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file())
    others = [name for name in others if name not in ours]
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise TunelabError(
            f"--overwrite: {out} holds files tunelab export did not write ({shown}); move them out first"
        )


def _readable_by_transformers_4(folder: Path) -> None:
    """Add the keys transformers 4 reads beside transformers 5's, which serving stacks built on 4.x
    need: without `rope_theta` a 4.x loader silently takes 10000 (SmolLM2's is 100000), and it knows no
    'TokenizersBackend' class (5.x reads 'PreTrainedTokenizerFast' as the same class, and ignores
    `rope_theta`/`rope_scaling` when `rope_parameters` is there)."""
    config_file, tokenizer_file = folder / "config.json", folder / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        rope = config.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in config:
            config["rope_theta"] = rope["rope_theta"]
            if rope.get("rope_type", "default") != "default":
                config["rope_scaling"] = {key: value for key, value in rope.items() if key != "rope_theta"}
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if tokenizer_file.is_file():
        tokenizer = json.loads(tokenizer_file.read_text(encoding="utf-8"))
        if tokenizer.get("tokenizer_class") == "TokenizersBackend":
            tokenizer["tokenizer_class"] = "PreTrainedTokenizerFast"
            tokenizer_file.write_text(
                json.dumps(tokenizer, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
            )


def _write_gguf(merged, tokenizer, folder: Path, name: str, gguf_type: str, template: str) -> None:
    """`name`.gguf and an Ollama Modelfile in `folder` (which holds the saved tokenizer); `template`:
    the prompt format the run trained with."""
    from tunelab.gguf_export import known_pre_tokenizer, modelfile, ollama_name, write_gguf

    gguf_name = f"{ollama_name(name)}.{gguf_type}.gguf"  # the Modelfile's FROM line takes no spaces
    write_gguf(merged, tokenizer, folder, folder / gguf_name, gguf_type, known_pre_tokenizer(tokenizer))
    (folder / "Modelfile").write_text(modelfile(gguf_name, tokenizer, template))
