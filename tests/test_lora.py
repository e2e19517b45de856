"""LoRA / DyLoRA layer against a dense float64 reference; rank sampling; frozen-mode updates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import random_llama
from tunelab.errors import TunelabError
from tunelab.evaluate import parse_ranks
from tunelab.methods.lora.config import DyLoraConfig, LoraConfig
from tunelab.methods.lora.dylora import DyLoraMethod, rank_probabilities, sample_rank
from tunelab.methods.lora.layer import LoRALinear, dropout_mask, keep_bits, lora_layers, zero_dropped
from tunelab.methods.lora.method import LoraMethod


def _layer(r=8, alpha=16.0, in_features=12, out_features=10) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(in_features, out_features, dtype=torch.float64), r, alpha).double()
    nn.init.normal_(layer.lora_B)  # B starts at zero; make the update visible
    return layer


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_truncated_forward_equals_dense_reference(rank):
    layer = _layer()
    layer.rank = rank
    x = torch.randn(5, 12, dtype=torch.float64)
    W, bias = layer.base_layer.weight, layer.base_layer.bias
    dense = W + (layer.alpha / rank) * layer.lora_B[:, :rank] @ layer.lora_A[:rank]
    torch.testing.assert_close(layer(x), x @ dense.T + bias)


def test_scale_is_alpha_over_active_rank():
    layer = _layer(r=4, alpha=8.0)
    x = torch.randn(3, 12, dtype=torch.float64)
    base = layer.base_layer(x)
    layer.rank = 2
    update_rank2 = layer(x) - base
    manual = (x @ layer.lora_A[:2].T @ layer.lora_B[:, :2].T) * (8.0 / 2)
    torch.testing.assert_close(update_rank2, manual)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradients_match_dense_reference(dropout):
    layer = _layer(r=6)
    layer.rank, layer.dropout = 4, dropout
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    layer(x).pow(2).sum().backward()
    # the reference: nn.functional ops in float64 on the same dropout mask (drawn from the same seed)
    torch.manual_seed(1)
    keep = ~dropout_mask(x.shape, dropout, x.device)
    x_ref = x.detach().clone().requires_grad_(True)
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    dropped = x_ref * keep / (1 - dropout) if dropout else x_ref
    reference = layer.base_layer(x_ref) + (layer.alpha / 4) * (dropped @ A[:4].T @ B[:, :4].T)
    reference.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.lora_A.grad, A.grad)
    torch.testing.assert_close(layer.lora_B.grad, B.grad)
    assert layer.lora_A.grad[4:].abs().sum() == 0  # ranks above b get nothing
    if dropout:
        assert not keep.all()  # the mask did drop something


def test_dropout_drops_each_input_entry_with_probability_p():
    layer = _layer(r=2)
    layer.dropout = 0.05
    x = torch.ones(200, 500, 12, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    # an entry's input gradient is the base weight's column sum, plus the adapter's unless dropped
    base_only = layer.base_layer.weight.sum(0).expand_as(x.grad)
    share = torch.isclose(x.grad, base_only).double().mean().item()
    assert abs(share - 0.05) < 0.002, share  # 1.2M entries: the standard error is 2e-4


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_dropout_mask_is_unbiased_in_every_lane(p):
    # four 16-bit draws share one 64-bit word: each of the four positions must drop at rate p
    torch.manual_seed(0)
    lanes = dropout_mask(torch.Size([400_000]), p, torch.device("cpu")).view(-1, 4).double().mean(0)
    within = 5 * math.sqrt(p * (1 - p) / 100_000)  # 5 standard errors of a lane's 100k entries
    torch.testing.assert_close(lanes, torch.full((4,), p, dtype=torch.float64), atol=within, rtol=0)


def test_dropout_mask_follows_torch_seed():
    cpu = torch.device("cpu")
    torch.manual_seed(3)
    first = dropout_mask(torch.Size([600_001]), 0.05, cpu)  # a tail that is not a whole 64-bit word
    assert first.dtype == torch.bool and first.shape == (600_001,) and first.is_contiguous()
    torch.manual_seed(3)
    assert torch.equal(first, dropout_mask(torch.Size([600_001]), 0.05, cpu))
    assert not torch.equal(first, dropout_mask(torch.Size([600_001]), 0.05, cpu))  # the generator moved on
    torch.manual_seed(3)  # the tail's entry is the one a whole last word gives it
    assert torch.equal(first, dropout_mask(torch.Size([600_004]), 0.05, cpu)[:600_001])
    for part in first.chunk(4):  # every part drops at rate p (SE ~6e-4)
        assert abs(part.double().mean().item() - 0.05) < 0.003


def test_gradient_checkpointing_recomputes_the_same_dropout_masks(monkeypatch):
    """The recompute draws its masks again from torch's restored RNG state: the gradients must be those
    of the first forward, bit for bit."""
    import tunelab.methods.lora.layer as lora_layer

    grads, draws = [], []

    def counted_mask(*args):
        draws[-1] += 1
        return dropout_mask(*args)

    monkeypatch.setattr(lora_layer, "dropout_mask", counted_mask)
    for checkpointing in (False, True):
        model = random_llama(hidden_size=64, intermediate_size=128)
        LoraMethod(LoraConfig(r=4, dropout=0.3)).attach(model)
        for layer in lora_layers(model).values():
            nn.init.normal_(layer.lora_B)  # B = 0 would hide a wrong mask from A's gradient
        if checkpointing:  # transformers 5 renamed it; 4.x only has the old name
            enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
            enable({"use_reentrant": False})
        model.train()
        torch.manual_seed(7)
        draws.append(0)
        model(input_ids=torch.randint(0, 64, (2, 48)), labels=torch.randint(0, 64, (2, 48))).loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert draws == [14, 28]  # 7 adapters in each of 2 layers; checkpointed, each mask is drawn again
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_zeroing_dropped_entries_by_their_bits_equals_masked_fill(dtype):
    torch.manual_seed(0)
    x = torch.randn(64, 33).to(dtype)
    x[0, :3] = torch.tensor([float("nan"), float("-inf"), -0.0])
    drop = dropout_mask(x.shape, 0.3, x.device)
    drop[0, :3] = True
    bits = keep_bits(drop, dtype)
    zeroed = zero_dropped(x, bits)
    assert zeroed.dtype == dtype
    # bit for bit, the dropped NaN, -inf and -0.0 included: +0.0 where dropped, x elsewhere
    assert torch.equal(zeroed.view(bits.dtype), x.masked_fill(drop, 0).view(bits.dtype))


def test_attach_trains_only_lora_parameters():
    model = random_llama()
    LoraMethod(LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).attach(model)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert len(lora_layers(model)) == 4  # q and v in 2 layers


def test_all_linear_skips_the_output_head():
    model = random_llama()
    LoraMethod(LoraConfig(r=2)).attach(model)
    assert len(lora_layers(model)) == 2 * 7
    assert isinstance(model.lm_head, nn.Linear)


def test_unknown_target_module_is_a_clear_error():
    with pytest.raises(TunelabError, match="matches no linear layer; available: .*q_proj"):
        LoraMethod(LoraConfig(target_modules=["qproj"])).attach(random_llama())


def test_rank_sampler_is_seeded_and_uniform():
    probs = rank_probabilities(1, 8, "uniform")
    draws = [sample_rank(step, 7, probs, 1) for step in range(4000)]
    assert draws == [sample_rank(step, 7, probs, 1) for step in range(4000)]  # same seed, same sequence
    assert draws != [sample_rank(step, 8, probs, 1) for step in range(4000)]
    counts = np.bincount(draws, minlength=9)[1:]
    assert set(draws) == set(range(1, 9))
    assert counts.min() > 400 and counts.max() < 600  # 500 expected each (chance of failure ~1e-6)


def test_geometric_distribution_formula():
    probs = rank_probabilities(2, 5, "geometric", geometric_p=0.5)
    np.testing.assert_allclose(probs, np.array([1, 0.5, 0.25, 0.125]) / 1.875)
    draws = [sample_rank(step, 0, probs, 2) for step in range(3000)]
    assert min(draws) == 2 and max(draws) <= 5
    assert draws.count(2) > draws.count(3) > draws.count(4)


def test_parse_ranks():
    assert parse_ranks("all", [1, 2, 3, 4]) == [1, 2, 3, 4]
    assert parse_ranks("1,2,4,8", list(range(1, 9))) == [1, 2, 4, 8]
    assert parse_ranks("1-3,8", list(range(1, 9))) == [1, 2, 3, 8]
    with pytest.raises(TunelabError, match="outside 1..8"):
        parse_ranks("1-16", list(range(1, 9)))
    with pytest.raises(TunelabError, match="not a rank"):
        parse_ranks("x", list(range(1, 9)))


def _frozen_step(update: str):
    """One optimizer step of DyLoRA at a fixed rank after a step at a higher rank."""
    model = random_llama()
    method = DyLoraMethod(DyLoraConfig(r=6, r_min=1, update=update, dropout=0.0, target_modules=["q_proj"]))
    method.attach(model)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B, std=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    tokens = torch.randint(0, 64, (2, 10))
    for rank in (6, 3):  # first step fills optimizer state everywhere, second is at rank 3
        method.current_rank = rank
        for layer in lora_layers(model).values():
            layer.rank = rank
        model(input_ids=tokens, labels=tokens).loss.backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        state = {
            n: optimizer.state[p]["exp_avg"].clone()
            for n, p in model.named_parameters()
            if p.requires_grad and p in optimizer.state
        }
        method.on_before_optimizer_step(model, 0, optimizer)
        optimizer.step()
        method.on_after_optimizer_step(model, 0, optimizer)
        optimizer.zero_grad()
    after = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    moments = {n: optimizer.state[p]["exp_avg"] for n, p in model.named_parameters() if p.requires_grad}
    return before, after, grads, state, moments


def test_frozen_mode_updates_only_row_b():
    before, after, grads, state, moments = _frozen_step("frozen")
    for name in before:
        dim = 0 if name.endswith("lora_A") else 1
        changed = (after[name] != before[name]).any(dim=1 - dim).nonzero().flatten().tolist()
        assert changed == [2], (name, changed)  # only rank 3 (index 2) moved: no momentum/decay drift
        grad_rows = (grads[name] != 0).any(dim=1 - dim).nonzero().flatten().tolist()
        assert grad_rows == [2]
        keep = [i for i in range(6) if i != 2]
        torch.testing.assert_close(
            moments[name].index_select(dim, torch.tensor(keep)),
            state[name].index_select(dim, torch.tensor(keep)),
        )


def test_unfrozen_mode_updates_the_first_b():
    before, after, grads, _, _ = _frozen_step("unfrozen")
    for name in before:
        dim = 0 if name.endswith("lora_A") else 1
        grad_rows = (grads[name] != 0).any(dim=1 - dim).nonzero().flatten().tolist()
        assert grad_rows == [0, 1, 2]


def test_autocast_computes_in_the_autocast_dtype():
    """Under bf16 autocast (the GPU training path) the adapter computes in bf16, like the plain ops
    would, and its gradients stay close to the float32 ones."""
    layer = LoRALinear(nn.Linear(32, 16), r=4, alpha=8.0)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 5, 32, requires_grad=True)
    layer(x).pow(2).sum().backward()
    grads = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)]
    for t in (x, layer.lora_A, layer.lora_B):
        t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = layer(x)
    assert output.dtype == torch.bfloat16
    output.float().pow(2).sum().backward()
    for grad, t in zip(grads, (x, layer.lora_A, layer.lora_B), strict=True):
        assert t.grad.dtype == torch.float32
        torch.testing.assert_close(t.grad, grad, rtol=0.05, atol=0.05 * grad.abs().max().item())
