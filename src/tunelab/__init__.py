"""tunelab: fine-tune open causal language models with LoRA, QLoRA, QDyLoRA, SpIEL and full FT."""

__version__ = "0.1.0"

import logging as _logging
import os as _os

# bitsandbytes warns at import, on CPUs with avx512_bf16, that the optional `kernels` package is
# missing; its built-in fallback kernel works, so keep that line out of every command's output.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

# oneDNN (PyTorch's bf16 CPU matmuls) caches up to 1024 compiled kernels, each holding buffers sized
# for its shapes; a SmolLM2 step needs 28, and each new batch length adds more, so the default cache
# grew a gsm8k run's peak by GiBs (BENCHMARKS.md change 9). 128 keeps a few lengths. oneDNN reads it
# when it first compiles a kernel: it must be set before any matmul runs (a user's setting stays).
if not {"ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY"} & set(_os.environ):
    _os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "128"
