"""Evaluation: loss / perplexity on response tokens, exact match by generation, rank sweeps."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from tunelab.data import IGNORE_INDEX, TokenizedDataset, adds_special_tokens, collator
from tunelab.errors import TunelabError
from tunelab.loss import causal_lm_loss, supports_head_loss
from tunelab.tasks import first_line

if TYPE_CHECKING:  # assemble imports the methods; evaluation needs only the type
    from tunelab.assemble import TunedModel


@torch.no_grad()
def loss_and_perplexity(
    model: nn.Module,
    dataset: TokenizedDataset,
    tokenizer,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Token-weighted mean cross-entropy over the labelled (response) tokens, and exp of it."""
    model.eval()
    collate = collator(tokenizer)
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    task = progress.add_task("loss", total=len(dataset)) if progress else None
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch["labels"][:, 1:]
        if supports_head_loss(model):  # the head at labelled positions only, as in training
            losses = causal_lm_loss(model, batch, num_items=1)
        else:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits = logits[:, :-1].flatten(0, 1).float()
            losses = F.cross_entropy(logits, labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        total_loss += losses.item()
        total_tokens += int((labels != IGNORE_INDEX).sum())
        if progress:
            progress.advance(task, len(batch["input_ids"]))
    loss = total_loss / max(total_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def generation_options(tokenizer, max_new_tokens: int, temperature: float = 0.0) -> dict[str, Any]:
    """model.generate's arguments: greedy at temperature 0, else plain sampling at `temperature` (the
    model's own top_p/top_k defaults switched off, so a run's output does not depend on them)."""
    return {
        "max_new_tokens": max_new_tokens,
        "do_sample": temperature > 0,
        "temperature": temperature or None,
        "top_p": None,
        "top_k": None,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 16,
    progress: Progress | None = None,
    temperature: float = 0.0,
) -> list[str]:
    """Completions of `prompts` (left-padded batches): greedy at temperature 0, else sampled."""
    model.eval()
    device = next(model.parameters()).device
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    task = progress.add_task("generate", total=len(prompts)) if progress else None
    completions: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            batch = tokenizer(
                chunk,
                return_tensors="pt",
                padding=True,
                add_special_tokens=adds_special_tokens(tokenizer, chunk[0]),
            ).to(device)
            output = model.generate(**batch, **generation_options(tokenizer, max_new_tokens, temperature))
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            completions += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            if progress:
                progress.advance(task, len(new_tokens))
    finally:
        tokenizer.padding_side = padding_side
    return completions


def exact_match(
    model: nn.Module,
    tokenizer,
    dataset: TokenizedDataset,
    batch_size: int = 16,
    progress: Progress | None = None,
    generated: list[str] | None = None,
) -> float:
    """Share of examples whose generated answer equals the reference answer (by the task's rule;
    for user data: the first line of the completion). The texts scored are added to `generated`."""
    max_new_tokens = dataset.task.max_new_tokens if dataset.task else 64
    prompts = [example.prompt for example in dataset.examples]
    texts = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, progress)
    if generated is not None:
        generated += texts
    return score_exact_match(dataset, texts)


def score_exact_match(dataset: TokenizedDataset, generated: list[str]) -> float:
    """Share of `generated` texts (one per example) whose answer equals the example's reference."""
    extract = dataset.task.extract_answer if dataset.task else first_line
    hits = 0
    for example, text in zip(dataset.examples, generated, strict=True):
        expected = extract(example.reference)
        hits += expected is not None and extract(text) == expected
    return hits / len(dataset.examples)


def evaluate(
    model: nn.Module,
    tokenizer,
    dataset: TokenizedDataset,
    with_exact_match: bool,
    batch_size: int = 8,
    progress: Progress | None = None,
    generated: list[str] | None = None,
) -> dict[str, float]:
    metrics = loss_and_perplexity(model, dataset, tokenizer, batch_size, progress)
    if with_exact_match:
        metrics["exact_match"] = exact_match(
            model, tokenizer, dataset, max(batch_size, 16), progress, generated
        )
    return metrics


def parse_ranks(spec: str, evaluable: list[int]) -> list[int]:
    """'all' | '1,2,4,8' | '1-64' | '1-8,16' -> sorted ranks, each one of `evaluable` (the ranks the
    run's method declares)."""
    if not evaluable:
        raise TunelabError(
            f"--ranks '{spec}': this run's method trains one rank; evaluate it without --ranks"
        )
    r_max = max(evaluable)
    ranks: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        try:
            if part == "all":
                ranks.update(evaluable)
            elif "-" in part:
                low, high = (int(x) for x in part.split("-", 1))
                ranks.update(range(low, high + 1))
            else:
                ranks.add(int(part))
        except ValueError:
            raise TunelabError(
                f"--ranks '{spec}': '{part}' is not a rank; write all, 1,2,4,8 or 1-{r_max}"
            ) from None
    if not ranks:
        raise TunelabError(f"--ranks '{spec}' names no rank")
    bad = sorted(ranks - set(evaluable))
    if bad:
        raise TunelabError(f"--ranks '{spec}': rank {bad[0]} is outside 1..{r_max} (this run's r)")
    return sorted(ranks)


def evaluate_ranks(
    tuned: TunedModel,
    dataset: TokenizedDataset,
    ranks: list[int] | None,
    with_exact_match: bool,
    batch_size: int = 8,
    progress: Progress | None = None,
    generated: list[list[str]] | None = None,
) -> list[dict[str, Any]]:
    """The one way a trained model is evaluated (`tunelab eval`, the quickstart, sweep trials): at
    each of `ranks` (None: the model as trained), one row of metrics per rank. With exact match, the
    texts each rank generated are added to `generated`, one list per rank."""
    rows = []
    for rank in ranks or [None]:
        tuned.method.set_rank(tuned.model, rank)
        texts: list[str] = []
        metrics = evaluate(
            tuned.model, tuned.tokenizer, dataset, with_exact_match, batch_size, progress, texts
        )
        rows.append({"rank": rank, **metrics} if rank is not None else metrics)
        if generated is not None:
            generated.append(texts)
    return rows


def elbow_index(values: list[float]) -> int:
    """Index of the elbow of a curve: the point farthest from the chord joining its ends, after
    scaling both axes to [0, 1] (the 'knee' heuristic)."""
    if len(values) < 3:
        return len(values) - 1
    y = np.asarray(values, dtype=float)
    x = np.linspace(0.0, 1.0, len(y))
    span = y.max() - y.min()
    if span == 0:
        return 0
    y = (y - y.min()) / span
    # distance of each point to the line through the first and last points
    dx, dy = x[-1] - x[0], y[-1] - y[0]
    distance = np.abs(dy * (x - x[0]) - dx * (y - y[0])) / math.hypot(dx, dy)
    return int(distance.argmax())


def summarize_ranks(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """best_rank and elbow_rank of the metric-vs-rank curve. The metric is exact match where it was
    measured and differs between ranks (all 0 on a small slice says nothing), else loss; ranks tied on
    exact match are told apart by loss."""
    exact = [row.get("exact_match") for row in rows]
    metric = "exact_match" if None not in exact and len(set(exact)) > 1 else "loss"
    values = [row[metric] for row in rows]
    if metric == "exact_match":
        best = min(range(len(rows)), key=lambda i: (-rows[i]["exact_match"], rows[i]["loss"]))
    else:
        best = int(np.argmin(values))
    return {
        "ranks": rows,
        "metric": metric,
        "best_rank": rows[best]["rank"],
        "elbow_rank": rows[elbow_index(values)]["rank"],
    }
