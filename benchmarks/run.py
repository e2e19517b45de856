"""`make bench`: tunelab vs the reference a user would pick instead, side by side, written to
BENCHMARKS.md.

    python -m benchmarks.run [--models tiny,smollm2] [--cases lora-r8,...] [--rounds 3] [--out BENCHMARKS.md]

Each (case, side, round) runs in its own process; sides alternate within a round so that machine
noise hits all alike. Sides: tunelab at its default precision, the reference at its default (fp32)
and, for PEFT/Trainer references, with bf16=True (benchmarks.worker.SIDE_PRECISION). Reported: the
median over rounds of each run's median step time (warm-up steps excluded), tokens/s, peak memory,
the ratios ours / reference, and the model FLOP/s of our step against the machine's own GEMM rate
at the model's layer shapes, measured in the same run (benchmarks.flops).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

from rich.console import Console

from benchmarks.flops import gemm_rates
from benchmarks.worker import CASES

console = Console(stderr=True)
ROOT = Path(__file__).resolve().parent.parent
REFERENCE_NAMES = {"peft": "PEFT LoRA + Trainer", "full": "Trainer full FT", "tunelab-lora": "tunelab LoRA"}


def reference_name(reference: tuple) -> str:
    kind, rank, quantized = reference
    if quantized:
        return f"PEFT QLoRA r{rank} (bnb nf4) + Trainer"
    return f"{REFERENCE_NAMES[kind]}" + (f" r{rank}" if rank else "")


# The random Llama of realistic proportions for quick runs (SmolLM2-like, fewer layers).
TINY_LLAMA = dict(
    hidden_size=384,
    intermediate_size=1024,
    num_hidden_layers=8,
    num_attention_heads=6,
    num_key_value_heads=2,
    vocab_size=49152,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
# Llama-3-8B layer shapes (hidden 4096, MLP 14336, 32/8 heads, 128k vocabulary) with fewer layers,
# random weights: GPU runs need no hub.
LLAMA3_8B_SHAPES = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
MODEL_CASES = {
    "tiny": list(CASES),
    "smollm2": ["lora-r8", "full", "qlora-r64", "qdylora-r64", "spiel-ag"],
    "llama3-8b-shapes": ["lora-r8", "lora-r64", "qlora-r64", "qdylora-r64", "spiel-ag", "spiel-ma"],
}
# bf16 dense peak of the GPU, for MFU (H100/H200 SXM datasheet figure)
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def random_llama_dir(cache: Path, name: str, shapes: dict) -> str:
    """A random Llama with SmolLM2's tokenizer (its vocabulary fits any larger one), saved once."""
    path = cache / name
    if not (path / "config.json").is_file():
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from tunelab.models import resolve_model

        torch.manual_seed(0)
        AutoTokenizer.from_pretrained(resolve_model("smollm2-135m")).save_pretrained(path)
        # built on the GPU where there is one and saved in bf16: a Llama-3-8B-shaped model is
        # billions of parameters, and every benchmark run loads it again (fp32 runs upcast it)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(LlamaConfig(**shapes))
        model.to(torch.bfloat16).save_pretrained(path)
    return str(path)


def model_dirs(names: list[str], cache: Path, layers: int) -> dict[str, str]:
    from tunelab.models import resolve_model

    builders = {
        "tiny": lambda: random_llama_dir(cache, "random-llama-h384-l8", TINY_LLAMA),
        "smollm2": lambda: resolve_model("smollm2-135m"),
        "llama3-8b-shapes": lambda: random_llama_dir(
            cache, f"random-llama3-8b-shapes-l{layers}", {**LLAMA3_8B_SHAPES, "num_hidden_layers": layers}
        ),
    }
    return {name: builders[name]() for name in names}


def run_worker(case: str, side: str, model_dir: str, args: argparse.Namespace) -> dict:
    options = {
        "--case": case,
        "--side": side,
        "--model-dir": model_dir,
        "--steps": args.steps,
        "--warmup": args.warmup,
        "--batch": args.batch,
        "--length": args.length,
    }
    command = [sys.executable, "-m", "benchmarks.worker", *(str(x) for pair in options.items() for x in pair)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"{case}/{side} failed:\n{tail}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def mfu(run: dict) -> float | None:
    """Model FLOPs utilization on a GPU: the step's counted model FLOPs (benchmarks.flops.step_flops:
    linear layers 4·N·T, 6·N·T when the base trains, attention and the LM head) per second over the
    GPU's datasheet bf16 peak. Counted, not 4·N per token over all parameters: with few layers the
    input embedding is a large share of N and does no multiplications."""
    import torch

    if not torch.cuda.is_available():
        return None
    peak = next(
        (flops for key, flops in PEAK_BF16_FLOPS.items() if key in torch.cuda.get_device_name()), None
    )
    if peak is None:
        return None
    return run["flops_per_step"] / run["median_step_s"] / peak


def summarize(runs: list[dict]) -> dict:
    return {
        "median_step_s": statistics.median(r["median_step_s"] for r in runs),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
        "peak_memory_bytes": statistics.median(r["peak_memory_bytes"] for r in runs),
        "trainable": runs[0]["trainable"],
        "parameters": runs[0]["parameters"],
        "flops_per_step": runs[0]["flops_per_step"],
        "flops_by_part": runs[0]["flops_by_part"],
        "rounds": len(runs),
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.get_num_threads()} threads"


def versions() -> str:
    return ", ".join(
        f"{name} {version(name)}" for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
    )


def markdown(results: list[dict], rates: dict[str, dict[str, float]], command: str) -> str:
    lines = [
        "| model | case | ours: s/step | ref | ref: s/step | ours/ref | ref bf16: s/step | ours/ref bf16 | "
        "tokens/s ours | TFLOP/s ours | of bf16 GEMM rate | peak mem ours / ref / ref bf16 (GiB) | "
        "trainable |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    gpu = any(r["ours"].get("mfu") is not None for r in results)
    if gpu:
        lines[0] += " MFU ours / ref / ref bf16 |"
        lines[1] += "---|"
    for r in results:
        ours, ref, ref_bf16 = r["ours"], r["ref"], r.get("ref-bf16")
        achieved = ours["flops_per_step"] / ours["median_step_s"]
        ratio = ours["median_step_s"] / ref["median_step_s"]
        share = achieved / rates[r["model"]]["bf16"]
        bf16 = (
            f"{ref_bf16['median_step_s']:.3f} | **{ours['median_step_s'] / ref_bf16['median_step_s']:.2f}×**"
            if ref_bf16
            else "– | –"
        )
        sides = [ours, ref] + ([ref_bf16] if ref_bf16 else [])
        peaks = " / ".join(f"{side['peak_memory_bytes'] / 2**30:.2f}" for side in sides)
        mfus = " / ".join(f"{side['mfu']:.1%}" for side in sides) if gpu else ""
        lines.append(
            f"| {r['model']} | {r['case']} | {ours['median_step_s']:.3f} | {r['ref_name']} | "
            f"{ref['median_step_s']:.3f} | **{ratio:.2f}×** | {bf16} | "
            f"{ours['tokens_per_s']:.0f} | {achieved / 1e12:.3f} | {share:.0%} | {peaks} | "
            f"{ours['trainable']:,} |" + (f" {mfus} |" if gpu else "")
        )
    lines += ["", "| model | GEMM rate at its layer shapes | fp32 | bf16 | LM head fp32 | LM head bf16 |"]
    lines.append("|---|---|---|---|---|---|")
    for name, rate in rates.items():
        lines.append(
            f"| {name} | GFLOP/s | {rate['fp32'] / 1e9:.0f} | {rate['bf16'] / 1e9:.0f} | "
            f"{rate['fp32_head'] / 1e9:.0f} | {rate['bf16_head'] / 1e9:.0f} |"
        )
    return "\n".join(lines) + f"\n\nMachine: {machine()}. Versions: {versions()}.\nCommand: `{command}`\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--cases", default="", help="comma-separated subset of: " + ", ".join(CASES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence (half a masked prompt)")
    parser.add_argument("--layers", type=int, default=4, help="layers of the llama3-8b-shapes model")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "results.md")
    parser.add_argument("--cache", type=Path, default=ROOT / "bench-out")
    args = parser.parse_args()
    names = args.models.split(",")
    dirs = model_dirs(names, args.cache, args.layers)
    wanted = set(args.cases.split(",")) if args.cases else None
    results = []
    started = time.perf_counter()
    rates = {}
    for name in names:
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(dirs[name])
        rates[name] = gemm_rates(model_config, args.batch * args.length)
        for case in MODEL_CASES[name]:
            if wanted and case not in wanted:
                continue
            sides = ["ours", "ref"] + (["ref-bf16"] if CASES[case]["ref"][0] != "tunelab-lora" else [])
            runs: dict[str, list[dict]] = {side: [] for side in sides}
            for round_index in range(args.rounds):
                shift = round_index % len(sides)  # rotate who goes first: noise hits every side alike
                for side in sides[shift:] + sides[:shift]:
                    runs[side].append(run_worker(case, side, dirs[name], args))
                console.print(
                    f"{name} {case} round {round_index + 1}/{args.rounds}: "
                    + ", ".join(f"{side} {runs[side][-1]['median_step_s']:.3f} s/step" for side in sides)
                    + f" ({time.perf_counter() - started:.0f} s elapsed)"
                )
            results.append(
                {"model": name, "case": case, "ref_name": reference_name(CASES[case]["ref"])}
                | {side: summarize(runs[side]) for side in sides}
            )
            for side in sides:
                results[-1][side]["mfu"] = mfu(results[-1][side])
        # measured before and after the model's cases: the better of the two is what the machine can do
        # (a noisy neighbour only ever makes it look slower)
        again = gemm_rates(model_config, args.batch * args.length)
        rates[name] = {key: max(rate, again[key]) for key, rate in rates[name].items()}
        console.print(
            f"{name}: GEMM rate at its layer shapes fp32 {rates[name]['fp32'] / 1e9:.0f}, "
            f"bf16 {rates[name]['bf16'] / 1e9:.0f} GFLOP/s"
        )
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:])
    table = markdown(results, rates, command.strip())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    (args.out.with_suffix(".json")).write_text(json.dumps(results, indent=2))
    print(table)
    console.print(f"wrote {args.out} (paste into BENCHMARKS.md with the notes)")


if __name__ == "__main__":
    main()
