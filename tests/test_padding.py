"""Batches grouped by length (train.group_by_length, the default) carry little padding, and padding
never changes the loss per real token."""

from __future__ import annotations

import json

import torch

from conftest import random_llama, tiny_config
from tunelab.assemble import build
from tunelab.data import build_dataset, collator, padded_fraction
from tunelab.loss import causal_lm_loss
from tunelab.train import make_trainer


def test_padded_fraction_counts_the_padding_of_each_batch():
    # batches [3, 5] -> 2 of 10 padded; [4] -> 0 of 4
    assert padded_fraction([3, 5, 4], [0, 1, 2], batch_size=2) == 2 / 14
    assert padded_fraction([3, 5, 4], [0, 2, 1], batch_size=2) == 1 / 13  # [3, 4]: 1 of 8; [5]: 0


def _varied_lengths(path):
    rows = [{"prompt": "Q: " + "word " * (i % 17), "completion": " answer " * (1 + i % 5)} for i in range(96)]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def test_grouped_batches_carry_far_less_padding(tmp_path, tiny_model_dir):
    data = _varied_lengths(tmp_path / "varied.jsonl")
    fractions = {}
    for grouped in (False, True):
        config = tiny_config(
            tiny_model_dir, data, tmp_path / "run", **{"train.group_by_length": grouped, "train.seed": 3}
        )
        built = build(config)
        dataset = build_dataset(str(data), built.tokenizer, config.data)
        trainer = make_trainer(config, built, tmp_path / "run", dataset)
        order = list(trainer._get_train_sampler(dataset))  # the sampler the training loop draws from
        assert sorted(order) == list(range(len(dataset)))  # every example once per epoch
        lengths = [len(f["input_ids"]) for f in dataset.features]
        fractions[grouped] = padded_fraction(lengths, order, config.train.batch_size)
    # short rows (6-40 tokens) leave some padding even in sorted batches; gsm8k's leave 2%
    assert fractions[True] < fractions[False] / 2, fractions


def test_loss_per_real_token_does_not_depend_on_the_padding(tmp_path, tokenizer_dir):
    """The same examples batched with little or much padding: the token-weighted loss over all of them
    is the same, so grouping changes which examples share a batch, never what a token costs."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = _varied_lengths(tmp_path / "varied.jsonl")
    dataset = build_dataset(str(data), tokenizer, tiny_config(tokenizer_dir, data, tmp_path).data)
    model = random_llama(vocab_size=len(tokenizer)).eval()
    lengths = [len(f["input_ids"]) for f in dataset.features]
    by_length = sorted(range(len(dataset)), key=lengths.__getitem__)
    half = len(by_length) // 2
    mixed = [i for pair in zip(by_length[:half], by_length[half:][::-1], strict=True) for i in pair]
    collate = collator(tokenizer)

    def token_weighted_loss(order):
        total = tokens = 0.0
        for start in range(0, len(order), 8):
            batch = collate([dataset[i] for i in order[start : start + 8]])
            count = int((batch["labels"][:, 1:] != -100).sum())
            with torch.no_grad():
                total += causal_lm_loss(model, batch).item() * count
            tokens += count
        return total / tokens

    assert padded_fraction(lengths, mixed, 8) > 3 * padded_fraction(lengths, by_length, 8)
    torch.testing.assert_close(token_weighted_loss(mixed), token_weighted_loss(by_length), rtol=1e-5, atol=0)


def test_evaluation_loss_is_transformers_own_loss_token_weighted(tmp_path, tokenizer_dir):
    """`loss_and_perplexity` (head at labelled positions only) against the model's own loss."""
    from transformers import AutoTokenizer

    from tunelab.evaluate import loss_and_perplexity

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = _varied_lengths(tmp_path / "varied.jsonl")
    dataset = build_dataset(str(data), tokenizer, tiny_config(tokenizer_dir, data, tmp_path).data)
    model = random_llama(vocab_size=len(tokenizer)).eval()
    collate = collator(tokenizer)
    total = tokens = 0.0
    for start in range(0, len(dataset), 8):
        batch = collate([dataset[i] for i in range(start, min(start + 8, len(dataset)))])
        count = int((batch["labels"][:, 1:] != -100).sum())
        with torch.no_grad():
            total += model(**batch).loss.item() * count
        tokens += count
    got = loss_and_perplexity(model, dataset, tokenizer, batch_size=8)["loss"]
    torch.testing.assert_close(got, total / tokens, rtol=1e-5, atol=0)


def test_free_memory_is_released_before_each_longer_batch_only(tmp_path, tiny_model_dir, monkeypatch):
    data = _varied_lengths(tmp_path / "varied.jsonl")
    releases = []
    monkeypatch.setattr("tunelab.train.release_free_memory", lambda: releases.append(1))
    for grouped in (True, False):
        releases.clear()
        config = tiny_config(
            tiny_model_dir, data, tmp_path / "run", **{"train.group_by_length": grouped, "train.seed": 3}
        )
        built = build(config)
        dataset = build_dataset(str(data), built.tokenizer, config.data)
        trainer = make_trainer(config, built, tmp_path / "run", dataset)
        order = list(trainer._get_train_sampler(dataset))
        size = config.train.batch_size
        lengths = [
            max(len(dataset.features[i]["input_ids"]) for i in order[start : start + size])
            for start in range(0, config.train.max_steps * size, size)
        ]
        trainer.train()
        longer = sum(1 for before, now in zip([0, *lengths[:-1]], lengths, strict=True) if now > before)
        # grouped: before the first batch and at each group's return to long batches, not every step
        assert len(releases) == (longer if grouped else 0)
        if grouped:
            assert 1 < longer < config.train.max_steps, lengths
