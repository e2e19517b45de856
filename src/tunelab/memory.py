"""CPU memory that the C allocator keeps after it is freed, handed back to the system."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, musl, Windows)."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = (ctypes.c_size_t,)
    return trim


def release_free_memory() -> None:
    """Hand the pages of freed CPU memory back to the system (glibc; elsewhere nothing). glibc keeps
    them: after an NF4 load, the quantization's fp32 transients; in training, what shorter batches
    freed, where a longer batch does not fit all its tensors, so it took new memory beside them and each
    return to a long batch raised the peak (BENCHMARKS.md change 9)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
