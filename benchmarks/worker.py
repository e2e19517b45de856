"""One benchmark measurement in a fresh process (so peak memory belongs to this run alone).

    python -m benchmarks.worker --case lora-r8 --side ours --model-dir DIR --steps 8 --warmup 3

Sides (SIDE_PRECISION): `ours` at tunelab's default precision (auto: bf16 on hardware that has it),
`ref` the reference at its own default (fp32, what a user gets), `ref-bf16` the reference with
`bf16=True` and its frozen base loaded in bf16 (the usual recipe). All sides train with a
transformers Trainer built from the same TrainingArguments but for precision, on the same fixed-shape
batches (first half of each sequence a masked prompt, second half the response); the
step time comes from the training loop's own per-step callback. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback

from benchmarks.flops import step_flops
from tunelab.assemble import build
from tunelab.config import validate
from tunelab.data import IGNORE_INDEX
from tunelab.quant import guard_cpu_repack, nf4_config, parameter_count
from tunelab.reporting import peak_memory_bytes
from tunelab.train import make_trainer, training_arguments

# case -> (our method config + quantization, the reference a user would pick instead)
CASES: dict[str, dict] = {
    "lora-r8": {"ours": {"method": {"name": "lora", "r": 8, "alpha": 16}}, "ref": ("peft", 8, False)},
    "lora-r64": {"ours": {"method": {"name": "lora", "r": 64, "alpha": 16}}, "ref": ("peft", 64, False)},
    "lora-r8-no-chunked-loss": {
        "ours": {"method": {"name": "lora", "r": 8, "alpha": 16}, "train": {"chunked_loss": False}},
        "ref": ("peft", 8, False),
    },
    "full": {"ours": {"method": {"name": "full"}}, "ref": ("full", None, False)},
    "qlora-r64": {
        "ours": {"method": {"name": "lora", "r": 64, "alpha": 16}, "quantization": "nf4"},
        "ref": ("peft", 64, True),
    },
    "qdylora-r64": {
        "ours": {"method": {"name": "dylora", "r": 64, "alpha": 16}, "quantization": "nf4"},
        "ref": ("peft", 64, True),
    },
    # SpIEL against tunelab's own LoRA r8 at the same number of trainable parameters
    "spiel-ag": {"ours": {"method": {"name": "spiel", "regrowth": "ag"}}, "ref": ("tunelab-lora", 8, False)},
    "spiel-ma": {"ours": {"method": {"name": "spiel", "regrowth": "ma"}}, "ref": ("tunelab-lora", 8, False)},
}


SIDE_PRECISION = {"ours": "auto", "ref": "fp32", "ref-bf16": "bf16"}


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self.started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.started)


def fixed_batches(count: int, length: int, vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        labels = [IGNORE_INDEX] * (length // 2) + ids[length // 2 :]
        examples.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * length})
    return examples


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.tensor([e[key] for e in examples]) for key in examples[0]}


def train_on_fixed_batches(config, built, length: int, callbacks: list[TrainerCallback]) -> None:
    """`config.train.max_steps` steps of the Trainer `make_trainer` assembles (hooks, loss, optimizer as
    in `tunelab train`) on fixed batches of `length` tokens, in a scratch folder."""
    count = config.train.batch_size * config.train.max_steps
    data = fixed_batches(count, length, built.model.config.vocab_size)
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(config, built, Path(out), data, callbacks=callbacks, data_collator=collate)
        trainer.args.logging_strategy = "no"
        trainer.train()


def lora_trainable_count(model_dir: str, r: int) -> int:
    """Trainable parameters of an all-linear LoRA of rank r on this model (SpIEL's matched budget)."""
    config = validate({"model": model_dir, "method": {"name": "lora", "r": r}})
    built = build(config)
    return sum(p.numel() for p in built.model.parameters() if p.requires_grad)


def run_config(model_dir: str, ours: dict, batch: int, steps: int, precision: str = "auto"):
    data = {
        "model": model_dir,
        "train": {
            "batch_size": batch,
            "max_steps": steps,
            "lr": 1e-4,
            "warmup_ratio": 0.0,
            "precision": precision,
        },
    }
    for key, value in ours.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return validate(data)


def measure(case: str, side: str, model_dir: str, steps: int, warmup: int, batch: int, length: int) -> dict:
    spec = CASES[case]
    total_steps = steps + warmup
    kind, rank, quantized = spec["ref"]
    # a tunelab reference (SpIEL's LoRA at the same trainable count) runs at tunelab's default too
    precision = "auto" if kind == "tunelab-lora" else SIDE_PRECISION[side]
    config = run_config(model_dir, spec["ours"], batch, total_steps, precision)
    if side != "ours" and kind == "tunelab-lora":
        config = run_config(
            model_dir, {"method": {"name": "lora", "r": rank, "alpha": 16}}, batch, total_steps, precision
        )
    if side == "ours" and config.method.name == "spiel":
        config.method.num_tunable = lora_trainable_count(model_dir, spec["ref"][1])
    timer = StepTimer()
    if side == "ours" or kind == "tunelab-lora":
        built = build(config)
        model = built.model
        train_on_fixed_batches(config, built, length, [timer])
    else:
        model = reference_model(model_dir, kind, rank, quantized, config)
        with tempfile.TemporaryDirectory() as out:
            trainer = Trainer(  # the reference: the same arguments, PEFT's model, the stock Trainer
                model=model,
                args=training_arguments(config, Path(out), has_eval=False),
                train_dataset=fixed_batches(batch * total_steps, length, model.config.vocab_size),
                data_collator=collate,
                callbacks=[timer],
            )
            trainer.args.logging_strategy = "no"
            trainer.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parameters = parameter_count(model)
    labelled = batch * (length - length // 2)  # the second half of each sequence is the response
    flops = step_flops(model.config, batch, length, labelled, trains_base=trainable >= parameters)
    timed = timer.times[warmup:]
    median = statistics.median(timed)
    return {
        "case": case,
        "side": side,
        "median_step_s": median,
        "tokens_per_s": batch * length / median,
        "peak_memory_bytes": peak_memory_bytes(),
        "trainable": trainable,
        "parameters": parameters,
        "flops_per_step": sum(flops.values()),
        "flops_by_part": flops,
        "steps": len(timed),
    }


def reference_model(model_dir: str, kind: str, rank: int | None, quantized: bool, config):
    """What a user would write with PEFT + transformers instead of tunelab."""
    from tunelab.models import base_dtype

    dtype = base_dtype(config.train.precision, trains_base_weights=kind == "full")
    if quantized:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, quantization_config=nf4_config(dtype), device_map=device
        )
        guard_cpu_repack(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if kind == "full":
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        model,
        LoraConfig(
            r=rank, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", required=True, choices=sorted(CASES))
    parser.add_argument("--side", required=True, choices=tuple(SIDE_PRECISION))
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()
    result = measure(args.case, args.side, args.model_dir, args.steps, args.warmup, args.batch, args.length)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
