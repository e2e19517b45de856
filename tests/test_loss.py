"""The chunked head loss equals transformers' own loss, with the same gradients (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import random_llama
from tunelab.data import IGNORE_INDEX
from tunelab.loss import causal_lm_loss, linear_cross_entropy


@pytest.mark.parametrize("softmax_rows", [4, 16])
@pytest.mark.parametrize("chunk", [3, 1024])
def test_linear_cross_entropy_matches_dense(monkeypatch, chunk, softmax_rows):
    # 10 rows: several chunks and softmax blocks, the last of each partly filled
    monkeypatch.setattr("tunelab.loss.SOFTMAX_BLOCK_ROWS", softmax_rows)
    torch.manual_seed(0)
    hidden = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(17, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 17, (10,))
    got = linear_cross_entropy(hidden, weight, targets, chunk_tokens=chunk) * 0.5
    got.backward()
    got_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = F.cross_entropy(hidden @ weight.T, targets, reduction="sum") * 0.5
    expected.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_grads[0], hidden.grad)
    torch.testing.assert_close(got_grads[1], weight.grad)


@pytest.mark.parametrize("num_items", [None, 7])
def test_causal_lm_loss_equals_the_models_loss(num_items):
    model = random_llama(vocab_size=50, tie_word_embeddings=True).double()
    input_ids = torch.randint(0, 50, (2, 9))
    labels = input_ids.clone()
    labels[0, :4] = IGNORE_INDEX  # a masked prompt
    labels[1, :2] = IGNORE_INDEX
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -1] = 0
    labels[1, -1] = IGNORE_INDEX
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    kwargs = {"num_items_in_batch": torch.tensor(num_items)} if num_items else {}
    expected = model(**inputs, **kwargs).loss
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = causal_lm_loss(model, inputs, num_items)
    got.backward()
    # transformers upcasts the logits to fp32 even for an fp64 model: compare at fp32 precision
    torch.testing.assert_close(got, expected, check_dtype=False, rtol=1e-6, atol=1e-6)
    for got_grad, expected_grad in zip((p.grad for p in model.parameters()), expected_grads, strict=True):
        torch.testing.assert_close(got_grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_bf16_gradients_are_close_to_float64():
    # bf16 GEMMs (as under autocast), softmax and sums in fp32: within bf16 rounding of the reference
    torch.manual_seed(0)
    hidden64, weight64 = torch.randn(40, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64)
    targets = torch.randint(0, 50, (40,))
    hidden, weight = (t.bfloat16().requires_grad_() for t in (hidden64, weight64))
    linear_cross_entropy(hidden, weight, targets, chunk_tokens=16).backward()
    reference = [t.bfloat16().double().requires_grad_() for t in (hidden64, weight64)]
    F.cross_entropy(reference[0] @ reference[1].T, targets, reduction="sum").backward()
    for got, expected in zip((hidden.grad, weight.grad), reference, strict=True):
        torch.testing.assert_close(got.double(), expected.grad, rtol=0.02, atol=0.02)
