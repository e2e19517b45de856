"""`tunelab data`: what training will see, before it trains — rows used and skipped, token lengths
against data.max_length, and examples with their trained tokens marked."""

from __future__ import annotations

import statistics

from rich.console import Console
from rich.text import Text

from tunelab.console import plural
from tunelab.data import IGNORE_INDEX, TokenizedDataset

BAR_WIDTH = 40


def length_histogram(lengths: list[int], max_length: int, bins: int = 8) -> list[tuple[int, int, int]]:
    """(low, high, count) per bin of equal width over 1..max_length: how many examples have a
    length in low..high (inclusive); the last bin ends at max_length, where truncated examples are."""
    width = -(-max_length // bins)  # ceil: every length up to max_length falls in a bin
    counts = [0] * bins
    for length in lengths:
        counts[min((length - 1) // width, bins - 1)] += 1
    return [(i * width + 1, min((i + 1) * width, max_length), count) for i, count in enumerate(counts)]


def spans(feature: dict[str, list[int]]) -> list[tuple[list[int], bool]]:
    """An example's tokens in runs of (token ids, trained)."""
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(feature["input_ids"], feature["labels"], strict=True):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(token)
        else:
            runs.append(([token], trained))
    return runs


def print_dataset_report(
    console: Console,
    key: str,
    spec: str,
    dataset: TokenizedDataset,
    tokenizer,
    max_length: int,
    examples: int,
) -> None:
    """Rows, skip reasons, a token-length histogram and `examples` examples of one dataset."""
    console.print(
        Text.assemble(
            (f"{key}: ", "bold"),
            f"{spec} — {plural(dataset.rows, 'row')}"
            f"{f' ({dataset.held_out} more held out: data.holdout)' if dataset.held_out else ''}, "
            f"format {dataset.format}, "
            f"template {dataset.template}; "
            f"{len(dataset)} used",
        ),
        soft_wrap=True,
    )
    for reason, count in dataset.report.counts.items():
        console.print(
            f"  {reason}: {count} (first: {dataset.report.first[reason]})", highlight=False, soft_wrap=True
        )
    lengths = [len(feature["input_ids"]) for feature in dataset.features]
    trained = sum(label != IGNORE_INDEX for feature in dataset.features for label in feature["labels"])
    console.print(
        f"  tokens per example: min {min(lengths)}, median {statistics.median(lengths):g}, "
        f"max {max(lengths)} (data.max_length {max_length}); trained tokens {trained:,} of {sum(lengths):,} "
        f"({trained / sum(lengths):.0%})",
        highlight=False,
        soft_wrap=True,
    )
    histogram = length_histogram(lengths, max_length)
    peak = max(count for _, _, count in histogram)
    for low, high, count in histogram:
        bar = "█" * round(BAR_WIDTH * count / peak) if count else ""
        console.print(f"  {low:>6}–{high:<6} {bar} {count}", highlight=False)
    if examples:
        legend = "trained tokens in green" if console.is_terminal else "trained tokens between [[ and ]]"
        shown = min(examples, len(dataset))
        console.print(f"  the first {'example' if shown == 1 else f'{shown} examples'} ({legend}):")
    for index in range(min(examples, len(dataset))):
        text = Text()
        for tokens, is_trained in spans(dataset.features[index]):
            decoded = tokenizer.decode(tokens)
            if console.is_terminal:
                text.append(decoded, style="bold green" if is_trained else "dim")
            else:
                text.append(f"[[{decoded}]]" if is_trained else decoded)
        console.rule(f"example {index + 1}", style="dim")
        console.print(text, highlight=False, soft_wrap=True)
