"""SpIEL's optimizers against the rules of the authors' reference implementation (`AlanAnsell/peft`,
`src/peft/tuners/sft/optimizer.py`), on hand-made tensors.

Every expected value is written out as a number, derived in the comments from the reference's
formulas; none comes from the code under test. The rules:
- SftAdamW: update = (m / bc1) / ((sqrt(v) + eps) / sqrt(bc2)), bc_i = 1 - beta_i^age, eps = 1e-6;
- SftSM3: nu = min(row[r], col[c]) + g^2, row[r] <- max(row[r], nu) (never decreases), update =
  g / sqrt(nu + eps), eps = 1e-8;
- both: decoupled weight decay after the update, p <- (p - lr * u) * (1 - lr * wd).
tunelab's one deliberate difference: a seeded slot of age a is bias-corrected with age a + 1 at its
first step (the reference uses a); see the README.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tunelab.methods.spiel.config import SpielConfig
from tunelab.methods.spiel.layer import SparseDeltaLinear
from tunelab.methods.spiel.optim import SparseAdamW, SparseSM3, adamw_seed_state

# torch warns once that sparse CSR tensors are beta; the layer filters it, but pytest resets filters
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")

BETAS = (0.9, 0.999)


def close(actual: torch.Tensor, expected: list[float]) -> None:
    """5e-5 relative: the ages are fp32 (as the reference's), so 1 - 0.999^age is off by ~1e-5; still
    5x tighter than the smallest rule difference tested here (weight decay order, 2.6e-4)."""
    torch.testing.assert_close(actual.detach(), torch.tensor(expected), rtol=5e-5, atol=1e-12)


def one_value_sm3(value: float, **kwargs) -> tuple[nn.Module, SparseSM3]:
    layer = nn.Module()
    layer.values = nn.Parameter(torch.tensor([value]))
    layer.indices, layer.weight_shape = torch.tensor([0], dtype=torch.int32), (1, 1)
    return layer, SparseSM3([layer], **kwargs)


def test_epsilon_defaults_are_the_references():
    config = SpielConfig()
    assert (config.adam_epsilon, config.sm3_eps) == (1e-6, 1e-8)
    assert SparseAdamW([nn.Parameter(torch.zeros(1))]).defaults["eps"] == 1e-6
    assert one_value_sm3(0.0)[1].defaults["eps"] == 1e-8


# -- SM3 (SpIEL-MA) ------------------------------------------------------------------------------------------


def test_sm3_accumulators_never_decrease_across_a_reselection():
    # a 2 x 3 weight; active (0, 0) and (1, 1), i.e. flat positions 0 and 4
    layer = SparseDeltaLinear(nn.Linear(3, 2, bias=False), torch.tensor([0, 4], dtype=torch.int32))
    optimizer = SparseSM3([layer], lr=0.1)  # eps 1e-8: below fp32 resolution next to these nu
    state = optimizer.param_state(layer.values)

    layer.values.grad = torch.tensor([2.0, 1.0])
    optimizer.step()
    # nu = [min(0, 0) + 4, min(0, 0) + 1] = [4, 1]; update = g / sqrt(nu) = [1, 1]
    assert state["row"].tolist() == [4.0, 1.0]
    assert state["col"].tolist() == [4.0, 1.0, 0.0]
    close(layer.values, [-0.1, -0.1])

    # reselection: both entries are replaced by (0, 1) and (1, 2), flat 1 and 5; new values start at 0
    source_slot = torch.tensor([-1, -1])
    layer.set_indices(torch.tensor([1, 5], dtype=torch.int32), source_slot)
    optimizer.remap_slots(layer.values, source_slot)
    assert state["row"].tolist() == [4.0, 1.0]  # the accumulators are not reset

    layer.values.grad = torch.tensor([0.5, 3.0])
    optimizer.step()
    # nu = [min(row0 4, col1 1) + 0.25, min(row1 1, col2 0) + 9] = [1.25, 9]
    # row0 = max(4, 1.25) = 4: it keeps the old row's 4 (a max over the active entries alone: 1.25)
    # row1 = max(1, 9) = 9; col0 has no active entry and keeps 4; col1 = max(1, 1.25); col2 = max(0, 9)
    assert state["row"].tolist() == [4.0, 9.0]
    assert state["col"].tolist() == [4.0, 1.25, 9.0]
    # update = [0.5 / sqrt(1.25), 3 / sqrt(9)] = [0.4472136, 1]
    close(layer.values, [-0.04472136, -0.1])


def test_sm3_epsilon_is_under_the_square_root():
    layer, optimizer = one_value_sm3(0.0, lr=1.0)  # default eps 1e-8
    layer.values.grad = torch.tensor([1e-4])
    optimizer.step()
    # nu = 1e-8; update = 1e-4 / sqrt(1e-8 + 1e-8) = 1 / sqrt(2) (eps added to sqrt(nu): 0.9999)
    close(layer.values, [-0.70710678])


def test_sm3_weight_decay_after_the_update():
    layer, optimizer = one_value_sm3(0.5, lr=2e-3, weight_decay=30.0)
    layer.values.grad = torch.tensor([2.0])
    optimizer.step()
    # nu = 4, update = 2 / sqrt(4 + 1e-8) = 1; (0.5 - 0.002 * 1) * (1 - 0.002 * 30) = 0.498 * 0.94
    # = 0.46812 (decay first: 0.5 * 0.94 - 0.002 = 0.468)
    close(layer.values, [0.46812])


# -- AdamW (SpIEL-AG) -------------------------------------------------------------------------------------


def test_adamw_seeded_slots_at_age_1_and_6():
    # seeds from SpIEL-AG's statistics: 5 micro-batches per optimizer step, so 5 samples = age 1 and
    # 30 samples = age 6. m = mean_g * (1 - 0.9^age), v = mean_g2 * (1 - 0.999^age):
    # age 1: mean_g = 1e-4 / 5 = 2e-5, mean_g2 = 2e-9 / 5 = 4e-10 -> m = 2e-6, v = 4e-13
    # age 6: mean_g = -3e-4 / 30 = -1e-5, mean_g2 = 9e-9 / 30 = 3e-10, 1 - 0.9^6 = 0.468559,
    #        1 - 0.999^6 = 0.005985019985006 -> m = -4.68559e-6, v = 1.7955059955018e-12
    seed_1 = adamw_seed_state(torch.tensor([1e-4]), torch.tensor([2e-9]), samples=5, age=1.0, betas=BETAS)
    seed_6 = adamw_seed_state(torch.tensor([-3e-4]), torch.tensor([9e-9]), samples=30, age=6.0, betas=BETAS)
    seeds = {key: torch.cat([seed_1[key], seed_6[key]]) for key in seed_1}
    close(seeds["age"], [1.0, 6.0])
    close(seeds["exp_avg"], [2e-6, -4.68559e-6])
    close(seeds["exp_avg_sq"], [4e-13, 1.7955059955018e-12])

    values = nn.Parameter(torch.zeros(2))
    optimizer = SparseAdamW([values], lr=1e-3)  # eps 1e-6
    optimizer.param_state(values)
    optimizer.remap_slots(values, torch.tensor([-1, -1]), seeds)
    values.grad = torch.tensor([3e-5, -2e-5])
    optimizer.step()
    # the moments now hold age + 1 gradients, and are bias-corrected with that age:
    # slot 0, age 2: m = 0.9 * 2e-6 + 0.1 * 3e-5 = 4.8e-6; v = 0.999 * 4e-13 + 0.001 * 9e-10
    #   = 1.2996e-12, sqrt(v) = 1.14e-6; bc1 = 1 - 0.81 = 0.19; bc2 = 1 - 0.998001 = 0.001999
    #   u = (4.8e-6 / 0.19) / ((1.14e-6 + 1e-6) / sqrt(0.001999)) = 0.52781322
    #   (the reference's age 1: 0.70929592; eps 1e-8 after bias correction: 0.99041883)
    # slot 1, age 7: m = 0.9 * -4.68559e-6 + 0.1 * -2e-5 = -6.217031e-6;
    #   v = 0.999 * 1.7955059955018e-12 + 0.001 * 4e-10 = 2.1937104895063e-12;
    #   bc1 = 1 - 0.9^7 = 0.5217031; bc2 = 1 - 0.999^7 = 0.006979034965021
    #   u = (-6.217031e-6 / 0.5217031) / ((sqrt(v) + 1e-6) / sqrt(bc2)) = -0.40124523
    #   (the reference's age 6: -0.41371773; eps 1e-8 after bias correction: -0.67177333)
    close(values, [-1e-3 * 0.52781322, 1e-3 * 0.40124523])
    close(optimizer.state[values]["age"], [2.0, 7.0])


def test_adamw_epsilon_is_added_before_bias_correction():
    values = nn.Parameter(torch.zeros(1))
    optimizer = SparseAdamW([values], lr=1.0)  # eps 1e-6
    values.grad = torch.tensor([1e-6])
    optimizer.step()
    # age 1: m = 1e-7, v = 1e-15; u = (1e-7 / 0.1) / ((sqrt(1e-15) + 1e-6) / sqrt(0.001))
    # = 1e-6 * 0.0316227766 / 1.0316227766e-6 = 0.03065343 (the effective eps is 1e-6 / sqrt(bc2))
    close(values, [-0.03065343])


def test_adamw_weight_decay_after_the_update():
    values = nn.Parameter(torch.tensor([0.5]))
    optimizer = SparseAdamW([values], lr=2e-3, weight_decay=30.0)  # eps 1e-6
    values.grad = torch.tensor([1.0])
    optimizer.step()
    # age 1: m / bc1 = 1, (sqrt(v) + eps) / sqrt(bc2) = (sqrt(0.001) + 1e-6) / sqrt(0.001), so
    # u = 1 / (1 + 1e-6 / 0.0316227766) = 0.99996838;
    # (0.5 - 0.002 * 0.99996838) * (1 - 0.002 * 30) = 0.49800006 * 0.94 = 0.46812006
    # (decay first: 0.5 * 0.94 - 0.002 * 0.99996838 = 0.46800006)
    close(values, [0.46812006])
