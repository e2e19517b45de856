"""`make bench`: tunelab vs the reference a user would pick instead, side by side, written to
BENCHMARKS.md.

    python -m benchmarks.run [--models tiny,smollm2] [--cases lora-r8,...] [--rounds 3] [--out BENCHMARKS.md]

Each (case, side, round) runs in its own process; sides alternate within a round so that machine
noise hits both alike. Reported: the median over rounds of each run's median step time (warm-up
steps excluded), tokens/s, peak memory, and the ratio ours / reference.
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

from benchmarks.worker import CASES

console = Console(stderr=True)
ROOT = Path(__file__).resolve().parent.parent
REFERENCE_NAMES = {"peft": "PEFT LoRA + Trainer", "full": "Trainer full FT", "tunelab-lora": "tunelab LoRA"}
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
MODEL_CASES = {
    "tiny": list(CASES),
    "smollm2": ["lora-r8", "full", "qlora-r64", "qdylora-r64", "spiel-ag"],
}


def tiny_model_dir(cache: Path) -> str:
    path = cache / "random-llama-h384-l8"
    if not (path / "config.json").is_file():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(path)
    return str(path)


def model_dirs(names: list[str], cache: Path) -> dict[str, str]:
    from tunelab.models import resolve_model

    dirs = {}
    for name in names:
        dirs[name] = tiny_model_dir(cache) if name == "tiny" else resolve_model("smollm2-135m")
    return dirs


def run_worker(case: str, side: str, model_dir: str, steps: int, warmup: int) -> dict:
    command = [
        sys.executable,
        "-m",
        "benchmarks.worker",
        "--case",
        case,
        "--side",
        side,
        "--model-dir",
        model_dir,
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"{case}/{side} failed:\n{tail}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    return {
        "median_step_s": statistics.median(r["median_step_s"] for r in runs),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
        "peak_memory_bytes": statistics.median(r["peak_memory_bytes"] for r in runs),
        "trainable": runs[0]["trainable"],
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


def markdown(results: list[dict], command: str) -> str:
    lines = [
        "| model | case | ours: s/step | ref | ref: s/step | step time ours/ref | tokens/s ours | "
        "peak mem ours (GiB) | peak mem ref (GiB) | mem ours/ref | trainable ours / ref |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ours, ref = r["ours"], r["ref"]
        lines.append(
            f"| {r['model']} | {r['case']} | {ours['median_step_s']:.3f} | {r['ref_name']} | "
            f"{ref['median_step_s']:.3f} | **{ours['median_step_s'] / ref['median_step_s']:.2f}×** | "
            f"{ours['tokens_per_s']:.0f} | {ours['peak_memory_bytes'] / 2**30:.2f} | "
            f"{ref['peak_memory_bytes'] / 2**30:.2f} | "
            f"**{ours['peak_memory_bytes'] / ref['peak_memory_bytes']:.2f}×** | "
            f"{ours['trainable']:,} / {ref['trainable']:,} |"
        )
    return "\n".join(lines) + f"\n\nMachine: {machine()}. Versions: {versions()}.\nCommand: `{command}`\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--cases", default="", help="comma-separated subset of: " + ", ".join(CASES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "results.md")
    parser.add_argument("--cache", type=Path, default=ROOT / "bench-out")
    args = parser.parse_args()
    names = args.models.split(",")
    dirs = model_dirs(names, args.cache)
    wanted = set(args.cases.split(",")) if args.cases else None
    results = []
    started = time.perf_counter()
    for name in names:
        for case in MODEL_CASES[name]:
            if wanted and case not in wanted:
                continue
            runs: dict[str, list[dict]] = {"ours": [], "ref": []}
            for round_index in range(args.rounds):
                order = ("ours", "ref") if round_index % 2 == 0 else ("ref", "ours")
                for side in order:
                    runs[side].append(run_worker(case, side, dirs[name], args.steps, args.warmup))
                console.print(
                    f"{name} {case} round {round_index + 1}/{args.rounds}: "
                    f"ours {runs['ours'][-1]['median_step_s']:.3f} s/step, "
                    f"ref {runs['ref'][-1]['median_step_s']:.3f} s/step "
                    f"({time.perf_counter() - started:.0f} s elapsed)"
                )
            results.append(
                {
                    "model": name,
                    "case": case,
                    "ref_name": REFERENCE_NAMES[CASES[case]["ref"][0]],
                    "ours": summarize(runs["ours"]),
                    "ref": summarize(runs["ref"]),
                }
            )
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:])
    table = markdown(results, command.strip())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    (args.out.with_suffix(".json")).write_text(json.dumps(results, indent=2))
    print(table)
    console.print(f"wrote {args.out} (paste into BENCHMARKS.md with the notes)")


if __name__ == "__main__":
    main()
