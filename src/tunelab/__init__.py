"""tunelab: fine-tune open causal language models with LoRA, QLoRA, QDyLoRA, SpIEL and full FT."""

__version__ = "0.1.0"

import logging as _logging
import os as _os

# bitsandbytes warns at import, on CPUs with avx512_bf16, that the optional `kernels` package is
# missing; its built-in fallback kernel works, so keep that line out of every command's output.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

# oneDNN (PyTorch's CPU matmuls) caches up to 1024 compiled kernels, each holding buffers sized for
# its batch shape; a step needs ~28 (SmolLM2), and batches of varying length add more each step, so
# the default cache alone grew a gsm8k run's peak by GiBs (BENCHMARKS.md change 9). 128 keeps a few
# lengths. Read when oneDNN first compiles a kernel, so it must be set before any CPU matmul runs.
_os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")
