"""CPU attention kernels side by side: forward + backward time of SDPA's fused (flash) kernel, SDPA's math
path and tunelab's `grouped_attention`, at SmolLM2-135M's attention shapes (batch 8, 9 query heads sharing
3 key/value heads, 64 dims, causal), by sequence length. Every kernel takes the key/value heads as they
are (SDPA with enable_gqa, as transformers calls it for a batch without padding; a padded batch gets them
repeated, which costs SDPA more).

    python -m benchmarks.attention [--lengths 40,64,128,256,384,512] [--repeats 10]

Prints a markdown table of medians (ms) and each kernel's time over the fused kernel's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tunelab.attention import grouped_attention

HEADS, GROUPS, DIM = 9, 3, 64


def _sdpa(backend: SDPBackend) -> Callable:
    def attend(query, key, value):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)

    return attend


def _tunelab(query, key, value):
    length = query.shape[2]
    keep = torch.ones(length, length, dtype=torch.bool).tril().view(1, 1, length, length)
    return grouped_attention(query, key, value, keep, DIM**-0.5)


KERNELS = {"fused": _sdpa(SDPBackend.FLASH_ATTENTION), "math": _sdpa(SDPBackend.MATH), "tunelab": _tunelab}


def forward_backward_ms(attend: Callable, length: int, dtype: torch.dtype, repeats: int) -> float:
    torch.manual_seed(0)
    query = torch.randn(8, HEADS, length, DIM, dtype=dtype, requires_grad=True)
    key, value = (torch.randn(8, GROUPS, length, DIM, dtype=dtype, requires_grad=True) for _ in range(2))
    grad = torch.randn(8, HEADS, length, DIM, dtype=dtype)
    times = []
    for _ in range(repeats + 1):  # the first warms up
        start = time.perf_counter()
        attend(query, key, value).backward(grad)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="40,64,128,256,384,512")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| dtype | tokens | fused ms | math ms | tunelab ms | math / fused | tunelab / fused |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        for length in map(int, args.lengths.split(",")):
            ms = {name: forward_backward_ms(k, length, dtype, args.repeats) for name, k in KERNELS.items()}
            name = str(dtype).removeprefix("torch.")
            print(
                f"| {name} | {length} | {ms['fused']:.1f} | {ms['math']:.1f} | {ms['tunelab']:.1f} | "
                f"{ms['math'] / ms['fused']:.2f} | {ms['tunelab'] / ms['fused']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
