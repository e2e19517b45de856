"""tunelab: fine-tune open causal language models with LoRA, QLoRA, QDyLoRA, SpIEL and full FT."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes warns at import, on CPUs with avx512_bf16, that the optional `kernels` package is
# missing; its built-in fallback kernel works, so keep that line out of every command's output.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
