"""NF4 (bitsandbytes, double quantization) base weights, and the guards they need."""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch
from torch import nn

from tunelab.errors import TunelabError
from tunelab.memory import release_free_memory

try:  # bitsandbytes is a dependency, but keep plain-LoRA use working where it fails to import
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    LINEAR_4BIT: tuple[type, ...] = (bnb.nn.Linear4bit,)
except Exception:  # pragma: no cover - depends on the platform's bitsandbytes build
    bnb = None
    LINEAR_4BIT = ()


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, *LINEAR_4BIT))


def is_4bit(module: nn.Module) -> bool:
    return bool(LINEAR_4BIT) and isinstance(module, LINEAR_4BIT)


# QLoRA's storage: what a 4-bit base is stored as, here and wherever an adapter trained on it is loaded
NF4_STORAGE = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}


def nf4_config(compute_dtype: torch.dtype):
    """QLoRA's storage: NF4 with double quantization; embeddings, norms and LM head stay full."""
    from transformers import BitsAndBytesConfig

    if bnb is None:
        raise TunelabError(
            "quantization: nf4 needs a working bitsandbytes install (pip install bitsandbytes)"
        )
    return BitsAndBytesConfig(**NF4_STORAGE, bnb_4bit_compute_dtype=compute_dtype)


def release_loading_memory(model: nn.Module) -> int:
    """Give back the memory an NF4 load leaves behind: checkpoint pages no tensor uses, and freed heap.

    Quantizing at load reads every page of the checkpoint, and the unquantized tensors (embeddings,
    norms) are views into the same mapping, which keeps it alive: the pages the 4-bit weights were
    read from stay resident (measured 0.40 GiB of SmolLM2's 0.54 GiB file). madvise(MADV_DONTNEED)
    on the ranges outside the live tensors lets the kernel drop them; the mapping is a clean private
    file mapping, so a later read of a dropped page would reload it from the file. Copying the
    unquantized tensors out instead would release the mapping too, but holds both copies at once:
    1.8x the peak on a Llama-3-8B-shaped model, whose embeddings are most of what stays unquantized.
    Then malloc_trim: glibc keeps the freed fp32 transients of quantization in its heap (0 to 0.4 GiB
    resident after a SmolLM2 load, varying run to run). Linux only (elsewhere a no-op). Returns the
    checkpoint bytes advised away.
    """
    if not sys.platform.startswith("linux"):
        return 0
    live = sorted(
        (storage.data_ptr(), storage.data_ptr() + storage.nbytes())
        for tensor in [*model.parameters(), *model.buffers()]
        if tensor.device.type == "cpu" and (storage := tensor.untyped_storage()).nbytes()
    )
    page = mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    released = 0
    for start, end in checkpoint_mappings():
        # only a mapping this model was loaded from: another model's mapping may hold pages it
        # changed in place (copy-on-write), which MADV_DONTNEED would revert to the file's contents
        if not any(start <= live_start < end for live_start, _ in live):
            continue
        cursor = start
        for live_start, live_end in [*live, (end, end)]:
            if live_end <= cursor or live_start > end:
                continue
            gap_start = -(-cursor // page) * page  # round in: never touch a page a tensor uses
            gap_end = min(live_start, end) // page * page
            if gap_end > gap_start and libc.madvise(gap_start, gap_end - gap_start, mmap.MADV_DONTNEED) == 0:
                released += gap_end - gap_start
            cursor = max(cursor, live_end)
            if cursor >= end:
                break
    release_free_memory()
    return released


def checkpoint_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's memory mappings of .safetensors files."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].endswith(".safetensors"):
                start, end = (int(part, 16) for part in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def guard_cpu_repack(model: nn.Module) -> int:
    """Stop Linear4bit from repacking its weights for CPU inference.

    On CPUs with avx512_bf16 an eval-mode no-grad forward repacks the weights into a layout whose
    matmul has no autograd kernel; later training then gets wrong gradients with only a warning
    (measured relative error 1.17). Returns the number of layers guarded.
    """
    guarded = 0
    for module in model.modules():
        if is_4bit(module):
            module.support_avx512bf16_for_cpu = False
            guarded += 1
    return guarded


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The full-precision weight of a linear layer, plain or 4-bit."""
    if is_4bit(module):
        weight = module.weight
        return dequantize_4bit(weight.data, weight.quant_state).to(weight.quant_state.dtype)
    return module.weight.data


def dequantized_linear(module: nn.Module) -> nn.Linear:
    """A plain nn.Linear equal to `module` (itself when it already is one)."""
    if not is_4bit(module):
        return module
    weight = dequantize_weight(module)
    linear = nn.Linear(
        module.in_features,
        module.out_features,
        bias=module.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every remaining 4-bit linear with its full-precision equivalent and drop the
    quantization markers, so save_pretrained writes a plain model."""
    for name, module in list(model.named_modules()):
        if is_4bit(module):
            parent_name, _, child = name.rpartition(".")
            setattr(
                model.get_submodule(parent_name) if parent_name else model, child, dequantized_linear(module)
            )
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for marker in ("hf_quantizer", "quantization_method", "is_loaded_in_4bit", "_hf_peft_config_loaded"):
        if marker in model.__dict__:
            delattr(model, marker)
    return model


def parameter_count(model: nn.Module) -> int:
    """All parameters of `model`, 4-bit weights counted at their full (unpacked) size."""
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if is_4bit(module):
            total += module.in_features * module.out_features - module.weight.numel()
    return total
