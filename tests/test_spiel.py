"""SpIEL: schedule, prune/regrow, optimizers, the sparse-delta layer and the method on a tiny Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import random_llama
from tunelab.methods import create_method
from tunelab.methods.spiel import selection
from tunelab.methods.spiel.config import SpielConfig
from tunelab.methods.spiel.layer import SparseDeltaLinear, dense_weight_grad, weight_grad_at
from tunelab.methods.spiel.method import parameter_count
from tunelab.methods.spiel.optim import SparseAdamW, SparseSM3, adamw_seed_state
from tunelab.methods.spiel.selection import (
    ag_candidates,
    ag_regrow,
    is_phase_start,
    is_selection_step,
    ma_regrow,
    ma_scores,
    merge_selection,
    prune,
    replace_fraction,
    split_budget,
)

# torch warns once that sparse CSR tensors are beta; the layer filters it, but pytest resets filters
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")

BETAS = (0.9, 0.999)


@pytest.fixture(autouse=True)
def one_thread():
    """The tensors here are tiny: one thread is as fast, and does not spin against other processes
    sharing the cores (two threads were 100x slower under such contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ints(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


# -- schedule and budget -----------------------------------------------------------------------------------


def test_selection_steps_and_phase_starts():
    selections = [t for t in range(200) if is_selection_step(t, 20, 5, total_steps=100)]
    assert selections == [5, 25, 45, 65, 85]
    assert [t for t in range(200) if is_selection_step(t, 20, 5, total_steps=85)] == [5, 25, 45, 65]
    assert [t for t in range(100) if is_phase_start(t, 20, 5, total_steps=100)] == [0, 19, 39, 59, 79]
    # the phase starting at 79 would select at 85 = T: skipped
    assert [t for t in range(100) if is_phase_start(t, 20, 5, total_steps=85)] == [0, 19, 39, 59]


def test_replace_fraction_policies():
    assert replace_fraction(5, 100, 0.2, "linear", first=True) == 1.0
    assert replace_fraction(25, 100, 0.2, "linear", first=False) == pytest.approx(0.15)
    assert replace_fraction(85, 100, 0.2, "linear", first=False) == pytest.approx(0.03)
    assert replace_fraction(0, 100, 0.2, "cosine", first=False) == pytest.approx(0.2)
    assert replace_fraction(50, 100, 0.2, "cosine", first=False) == pytest.approx(0.1)
    assert replace_fraction(25, 100, 0.2, "cosine", first=True) == pytest.approx(0.1 * (1 + math.sqrt(0.5)))


def test_split_budget_is_floor_of_proportional_share():
    assert split_budget(10, [6, 3, 1]) == [6, 3, 1]
    assert split_budget(7, [3, 3, 4]) == [2, 2, 2]  # floor(2.1), floor(2.1), floor(2.8)


# -- prune and regrow ------------------------------------------------------------------------------------


def test_prune_drops_smallest_magnitudes():
    kept = prune(torch.tensor([0.5, -0.1, 0.3, 0.05, -2.0]), 2)
    assert kept.tolist() == [True, False, True, False, True]
    assert prune(torch.tensor([1.0, 2.0]), 0).all()


def test_ag_candidates_are_sorted_top_k():
    grad = torch.tensor([[0.1, -5.0, 0.0], [3.0, 0.2, -4.0]])
    candidates = ag_candidates(grad, 3)
    assert candidates.tolist() == [1, 3, 5]
    assert candidates.dtype == torch.int32


def test_ag_regrow_excludes_kept_and_lets_dropped_return():
    active = ints([1, 4, 7, 9])
    kept = torch.tensor([True, False, True, False])  # keep positions 1 and 7, drop 4 and 9
    candidates = ints([0, 1, 2, 4, 8])
    grad_sum = torch.tensor([0.1, 5.0, -3.0, 2.0, 0.5])  # position 1 is the largest but already kept
    grown = ag_regrow(active, kept, candidates, grad_sum, 2)
    assert grown.tolist() == [2, 4]
    new_indices, source = merge_selection(active, kept, grown)
    assert new_indices.tolist() == [1, 2, 4, 7]
    assert source.tolist() == [0, -1, 1, 2]  # 4 was dropped and regrown: it keeps old slot 1
    assert len(set(new_indices.tolist())) == len(new_indices)


def test_sm3_step_matches_hand_computation():
    layer = nn.Module()
    layer.values = nn.Parameter(torch.zeros(3))
    layer.indices = ints([0, 4, 5])  # (0,0), (1,1), (1,2) of a 3 x 3 matrix; row 2 has no entry
    layer.weight_shape = (3, 3)
    optimizer = SparseSM3([layer], lr=0.1, eps=0.0)
    optimizer.param_state(layer.values)["row"][[0, 2]] = 7.0

    layer.values.grad = torch.tensor([1.0, 2.0, 3.0])
    optimizer.step()
    state = optimizer.state[layer.values]
    # nu = [min(7, 0), min(0, 0), min(0, 0)] + g^2 = [1, 4, 9]; update = g / sqrt(nu) = 1 everywhere
    # row 0 stays max(7, 1) = 7 (accumulators never decrease); row 2 has no active entry: unchanged
    assert state["row"].tolist() == [7.0, 9.0, 7.0]
    assert state["col"].tolist() == [1.0, 4.0, 9.0]
    torch.testing.assert_close(layer.values.detach(), torch.full((3,), -0.1))

    layer.values.grad = torch.ones(3)
    optimizer.step()
    # nu = [min(7, 1) + 1, min(9, 4) + 1, min(9, 9) + 1] = [2, 5, 10]
    assert state["row"].tolist() == [7.0, 10.0, 7.0]
    assert state["col"].tolist() == [2.0, 5.0, 10.0]
    expected = -0.1 - 0.1 / torch.tensor([2.0, 5.0, 10.0]).sqrt()
    torch.testing.assert_close(layer.values.detach(), expected)


def test_sm3_momentum_is_used():
    layer = nn.Module()
    layer.values = nn.Parameter(torch.zeros(1))
    layer.indices, layer.weight_shape = ints([0]), (1, 1)
    optimizer = SparseSM3([layer], lr=1.0, beta=0.5, eps=0.0)
    layer.values.grad = torch.tensor([2.0])
    optimizer.step()  # nu = 4, update 1, momentum 0.5 * 0 + 0.5 * 1
    assert layer.values.item() == pytest.approx(-0.5)
    optimizer.step()  # nu = 4 + 4, update 2 / sqrt(8), momentum 0.5 * 0.5 + 0.5 * 0.7071
    assert layer.values.item() == pytest.approx(-0.5 - (0.25 + 0.5 * 2 / math.sqrt(8)))


def test_ma_scores_and_regrow(monkeypatch):
    row, col = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0, 1.0])
    torch.testing.assert_close(ma_scores(row, col), torch.tensor([[3.0, 0.0, 1.0], [6.0, 0.0, 2.0]]))
    active = ints([0, 4, 5])  # scores 3, 0, 2 excluded; inactive: 1 -> 0, 2 -> 1, 3 -> 6
    assert ma_regrow(active, row, col, 2).tolist() == [2, 3]
    monkeypatch.setattr(selection, "MA_BLOCK_ELEMENTS", 3)  # one row per block: same answer
    assert ma_regrow(active, row, col, 2).tolist() == [2, 3]
    assert ma_regrow(active, row, col, 3).tolist() == [1, 2, 3]


# -- AdamW with per-element age ------------------------------------------------------------------------


def test_adamw_seed_state_formula():
    grad_sum, grad_sq_sum = torch.tensor([4.0, -8.0]), torch.tensor([8.0, 20.0])
    seeds = adamw_seed_state(grad_sum, grad_sq_sum, samples=4, age=2.0, betas=BETAS)
    assert seeds["age"].tolist() == [2.0, 2.0]
    torch.testing.assert_close(seeds["exp_avg"], torch.tensor([1.0, -2.0]) * (1 - 0.9**2))
    torch.testing.assert_close(seeds["exp_avg_sq"], torch.tensor([2.0, 5.0]) * (1 - 0.999**2))


def test_adamw_bias_corrects_each_slot_with_its_own_age():
    values = nn.Parameter(torch.zeros(3))
    optimizer = SparseAdamW([values], lr=0.01, eps=0.0)
    values.grad = torch.ones(3)
    optimizer.step()  # a first Adam step moves each value by lr * sign(g)
    torch.testing.assert_close(values.detach(), torch.full((3,), -0.01))

    # slot 0 stays (age 1); slots 1 and 2 are new, seeded with 2 steps of gradient statistics
    mean_grad = torch.tensor([0.0, -2.0, 0.5])
    seeds = adamw_seed_state(mean_grad * 3, mean_grad**2 * 3, samples=3, age=2.0, betas=BETAS)
    optimizer.remap_slots(values, torch.tensor([0, -1, -1]), seeds)
    state = optimizer.state[values]
    assert state["age"].tolist() == [1.0, 2.0, 2.0]
    with torch.no_grad():
        values[1:] = 0.0
    values.grad = mean_grad.clone()
    values.grad[0] = 1.0
    optimizer.step()
    # a seeded slot fed its mean gradient bias-corrects to exactly that mean: update = lr * sign(mean)
    torch.testing.assert_close(values.detach()[1:], torch.tensor([0.01, -0.01]))
    torch.testing.assert_close(values.detach()[0], torch.tensor(-0.02))
    assert state["age"].tolist() == [2.0, 3.0, 3.0]


def test_adamw_age_advances_in_bf16_and_weight_decay_pulls_to_zero():
    values = nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
    optimizer = SparseAdamW([values], lr=0.1, weight_decay=1.0)
    for _ in range(3):
        values.grad = torch.zeros(2, dtype=torch.bfloat16)
        optimizer.step()
    assert optimizer.state[values]["age"].dtype == torch.float32
    assert optimizer.state[values]["age"].tolist() == [3.0, 3.0]
    assert values.float().tolist() == pytest.approx([0.9**3] * 2, rel=1e-2)  # zero gradient: decay only


# -- the layer -----------------------------------------------------------------------------------------------


def random_layer(base: nn.Module, k: int, seed: int = 0) -> SparseDeltaLinear:
    generator = torch.Generator().manual_seed(seed)
    numel = base.in_features * base.out_features
    layer = SparseDeltaLinear(base, torch.randperm(numel, generator=generator)[:k].sort().values.int())
    with torch.no_grad():
        layer.values.copy_(torch.randn(k, generator=generator))
    return layer


def assert_matches_dense_reference(layer, effective: torch.Tensor, bias: torch.Tensor, x, probe) -> None:
    """The layer's output, input gradient and delta gradients (at its k indices) equal float64
    dense ones of y = x W^T + bias with W = `effective`."""
    y = layer(x)
    x64 = x.detach().double().requires_grad_()
    w64 = effective.clone().requires_grad_()
    y64 = torch.nn.functional.linear(x64, w64, bias.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    (y * probe).sum().backward()
    (y64 * probe.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    delta_grad = w64.grad.flatten()[layer.indices.long()]
    torch.testing.assert_close(layer.values.grad.double(), delta_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # the SDDMM path; one 16-bit GEMM
def test_weight_gradient_at_positions_matches_the_dense_product(dtype):
    torch.manual_seed(0)
    grad_out, inputs = torch.randn(40, 12), torch.randn(40, 9)
    first, second = (torch.randperm(12 * 9)[:k].sort().values for k in (20, 7))
    got = weight_grad_at(grad_out.to(dtype), inputs.to(dtype), (12, 9), first, second)
    dense = (grad_out.to(dtype).double().T @ inputs.to(dtype).double()).flatten()
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0.01, "atol": 0.05}
    for grad, indices in zip(got, (first, second), strict=True):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad.double(), dense[indices], **tolerance)
    whole = dense_weight_grad(grad_out.to(dtype), inputs.to(dtype))  # a SpIEL-AG phase's first micro-batch
    assert whole.dtype == torch.float32 and whole.shape == (12, 9)
    torch.testing.assert_close(whole.double().flatten(), dense, **tolerance)


def test_delta_gradient_matches_dense_reference():
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=True)
    pretrained = base.weight.detach().double().clone()
    layer = random_layer(base, k=25)
    x, probe = torch.randn(2, 5, 12, requires_grad=True), torch.randn(2, 5, 10)
    effective = pretrained + layer.delta_weight().double()
    assert_matches_dense_reference(layer, effective, base.bias, x, probe)
    assert base.weight.grad is None  # no dense weight gradient


def test_ag_window_accumulates_candidate_statistics():
    torch.manual_seed(1)
    layer = random_layer(nn.Linear(8, 6, bias=False), k=10)
    layer.start_phase()
    dense_grads = []
    for _ in range(2):
        x, probe = torch.randn(4, 8), torch.randn(4, 6)
        layer.values.grad = None
        (layer(x) * probe).sum().backward()
        grad_w = probe.double().T @ x.double()  # d sum(probe * x W^T) / dW
        dense_grads.append(grad_w.flatten())
        torch.testing.assert_close(layer.values.grad.double(), grad_w.flatten()[layer.indices.long()])
    stats = layer.candidates
    assert stats.indices.tolist() == sorted(dense_grads[0].abs().topk(10).indices.tolist())
    candidates = stats.indices.long()
    torch.testing.assert_close(
        stats.grad_sum.double(), (dense_grads[0] + dense_grads[1])[candidates], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        stats.grad_sq_sum.double(),
        (dense_grads[0] ** 2 + dense_grads[1] ** 2)[candidates],
        rtol=1e-5,
        atol=1e-5,
    )
    assert stats.samples == 2


def linear_4bit(base: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    quantized = bnb.nn.Linear4bit(
        base.in_features,
        base.out_features,
        bias=base.bias is not None,
        compute_dtype=torch.float32,
        quant_type="nf4",
        compress_statistics=True,
    )
    quantized.load_state_dict(base.state_dict())
    quantized = quantized.to("cpu")  # quantizes the weight
    quantized.support_avx512bf16_for_cpu = False  # see quant.guard_cpu_repack
    return quantized


def test_4bit_base_delta_gradient_and_merge():
    from tunelab.quant import dequantize_weight

    torch.manual_seed(2)
    plain = nn.Linear(64, 32)
    quantized = linear_4bit(plain)
    model = nn.Sequential(plain)
    model_4bit = nn.Sequential(quantized)
    assert parameter_count(model_4bit) == parameter_count(model)  # 4-bit weights at full size

    layer = random_layer(quantized, k=100)
    effective = dequantize_weight(quantized).double() + layer.delta_weight().double()
    x, probe = torch.randn(3, 64, requires_grad=True), torch.randn(3, 32)
    assert_matches_dense_reference(layer, effective, quantized.bias, x, probe)
    merged = layer.merged_linear()
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged.weight.double(), effective)


# -- the method on a tiny Llama ----------------------------------------------------------------------------


def tiny_llama():
    return random_llama(hidden_size=64, intermediate_size=128, vocab_size=256)


def spiel(model, total_steps: int, lr: float = 1e-2, **config):
    method = create_method(
        SpielConfig(**{"density": 0.05, "reselection_steps": 4, "accumulation_steps": 2, **config}), seed=0
    )
    method.attach(model)
    optimizer = method.create_optimizer(model, lr, weight_decay=0.0)
    method.on_train_begin(model, total_steps)
    return method, optimizer


BATCHES = torch.randint(0, 256, (3, 2, 4, 16), generator=torch.Generator().manual_seed(0))  # step, micro


def run(method, model, optimizer, steps, after_step=None) -> list[float]:
    """The engine's hook order, 2 micro-batches per optimizer step; returns each step's loss."""
    losses = []
    for t in steps:
        method.on_step_begin(model, t)
        loss_sum = 0.0
        for micro in BATCHES[t % len(BATCHES)]:
            loss = model(input_ids=micro, labels=micro).loss / len(BATCHES[0])
            loss.backward()
            loss_sum += loss.item()
        method.on_before_optimizer_step(model, t, optimizer)
        optimizer.step()
        method.on_after_optimizer_step(model, t, optimizer)
        optimizer.zero_grad()
        losses.append(loss_sum)
        if after_step:
            after_step(t)
    return losses


@pytest.mark.parametrize("regrowth", ["ag", "ma"])
def test_training_keeps_budget_and_lowers_loss(regrowth):
    model = tiny_llama()
    all_parameters = parameter_count(model)
    total = 24
    method, optimizer = spiel(model, total, lr={"ag": 1e-2, "ma": 5e-2}[regrowth], regrowth=regrowth)
    layers = method.layers
    budget = {name: len(layer.values) for name, layer in layers.items()}
    assert int(0.05 * all_parameters) - len(layers) < sum(budget.values()) <= int(0.05 * all_parameters)

    def check(t):
        for name, layer in layers.items():
            indices = layer.indices
            assert len(indices) == len(layer.values) == budget[name]
            assert indices.dtype == torch.int32
            assert bool((indices[1:] > indices[:-1]).all())  # sorted and unique
            assert 0 <= int(indices[0]) and int(indices[-1]) < layer.in_features * layer.out_features

    losses = run(method, model, optimizer, range(total), after_step=check)
    events = method.pop_events()
    assert [e["step"] for e in events] == [2, 6, 10, 14, 18, 22]
    assert events[0]["fraction"] == 1.0 and events[0]["replaced"] > 0
    assert events[1]["fraction"] == pytest.approx(0.2 * (1 - 6 / 24))
    assert method.pop_events() == []
    assert sum(losses[-3:]) < 0.97 * sum(losses[:3])


def test_merge_equals_base_plus_deltas(tmp_path):
    model = tiny_llama()
    pretrained = {name: p.detach().clone() for name, p in model.named_parameters()}
    method, optimizer = spiel(model, total_steps=8)
    run(method, model, optimizer, range(4))
    batch = BATCHES[0, 0]
    with torch.no_grad():
        logits = model(input_ids=batch).logits
    deltas = {name: layer.delta_weight() for name, layer in method.layers.items()}
    assert any(bool(delta.abs().sum() > 0) for delta in deltas.values())

    method.export(model, "spiel", tmp_path, base_model="tiny")
    exported = load_file(tmp_path / "spiel_deltas.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(exported[f"{name}.values"], method.layers[name].values.detach())
    assert torch.equal(exported[f"{name}.indices"], method.layers[name].indices)
    assert json.loads((tmp_path / "spiel_config.json").read_text())["shapes"][name] == [64, 64]

    merged = method.merge(model)
    assert not any(isinstance(m, SparseDeltaLinear) for m in merged.modules())
    for name, delta in deltas.items():
        torch.testing.assert_close(merged.get_submodule(name).weight, pretrained[f"{name}.weight"] + delta)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=batch).logits, logits)


@pytest.mark.parametrize("regrowth", ["ag", "ma"])
def test_save_load_continue_equals_uninterrupted(tmp_path, regrowth):
    total = 12  # selections after 2 and 7 steps; the checkpoint after 5 falls inside the phase begun at 4
    model = tiny_llama()
    method, optimizer = spiel(model, total, regrowth=regrowth, sm3_beta=0.5)
    run(method, model, optimizer, range(total))

    model_a = tiny_llama()
    method_a, optimizer_a = spiel(model_a, total, regrowth=regrowth, sm3_beta=0.5)
    run(method_a, model_a, optimizer_a, range(5))
    method_a.save(model_a, tmp_path)
    optimizer_state = optimizer_a.state_dict()

    model_b = tiny_llama()
    method_b, optimizer_b = spiel(model_b, total, regrowth=regrowth, sm3_beta=0.5)
    method_b.load(model_b, tmp_path)
    optimizer_b.load_state_dict(optimizer_state)
    run(method_b, model_b, optimizer_b, range(5, total))

    for name, layer in method.layers.items():
        assert torch.equal(method_b.layers[name].indices, layer.indices)
        assert torch.equal(method_b.layers[name].values, layer.values)
    for (name, p), p_b in zip(model.named_parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, p_b), name  # merged base weights too


def test_budget_from_density_and_num_tunable():
    model = tiny_llama()
    method = create_method(SpielConfig(num_tunable=1000, target_modules=["q_proj", "down_proj"]))
    method.attach(model)
    numels = {name: layer.in_features * layer.out_features for name, layer in method.layers.items()}
    assert sorted(numels) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    for name, layer in method.layers.items():
        assert len(layer.values) == 1000 * numels[name] // sum(numels.values())
    assert [name for name, p in model.named_parameters() if p.requires_grad] == [
        f"{name}.values" for name in method.layers
    ]
