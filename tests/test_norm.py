"""tunelab's RMSNorm function: transformers' forward bit for bit, gradients against a float64 reference,
and only norms that compute the same are switched."""

import pytest
import torch
from torch import nn

from conftest import random_llama
from tunelab.norm import rms_norm, use_rms_norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_gradients_match_a_float64_reference(dtype):
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 24) * 3).to(dtype).requires_grad_()
    weight = torch.randn(24).to(dtype).requires_grad_()
    grad_out = torch.randn(3, 5, 24).to(dtype)
    rms_norm(x, weight, 1e-5).backward(grad_out)

    x64, weight64 = (t.detach().double().requires_grad_() for t in (x, weight))
    reference = weight64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    reference.backward(grad_out.double())
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0.02, "atol": 0.02}
    torch.testing.assert_close(x.grad.double(), x64.grad, **tolerance)
    torch.testing.assert_close(weight.grad.double(), weight64.grad, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_switched_model_gives_the_same_logits_and_close_gradients(dtype):
    model, switched = random_llama().to(dtype), random_llama().to(dtype)
    assert use_rms_norm(switched) == 2 * 2 + 1  # two per layer and the final norm
    assert use_rms_norm(switched) == 0  # already switched: left as it is
    input_ids = torch.randint(0, 64, (2, 9))
    grads = []
    for m in (model, switched):
        logits = m(input_ids=input_ids).logits
        logits.float().pow(2).mean().backward()
        grads.append((logits, m.model.layers[0].self_attn.q_proj.weight.grad, m.model.norm.weight.grad))
    (logits, q_grad, norm_grad), (logits_switched, q_grad_switched, norm_grad_switched) = grads
    assert torch.equal(logits, logits_switched)  # the forward is transformers', bit for bit
    # the backward is written out, so it rounds differently from autograd's in bf16
    tolerance = {} if dtype == torch.float32 else {"rtol": 0.05, "atol": 0.01}
    torch.testing.assert_close(q_grad_switched, q_grad, **tolerance)
    torch.testing.assert_close(norm_grad_switched, norm_grad, **tolerance)


class VariantRMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.variance_epsilon = 1e-6

    def normed(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


class OnePlusWeightRMSNorm(VariantRMSNorm):
    """Gemma's norm: (1 + weight) scales the rows, so rms_norm would compute something else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.normed(x) * (1.0 + self.weight.float())).to(x.dtype)


class WeightBeforeRoundingRMSNorm(VariantRMSNorm):
    """Olmo2's norm: the weight multiplies before the rounding to the input's dtype. With weights of 1, or
    inputs as wide as the weights, it agrees with Llama's; with fp32 weights and bf16 inputs it does not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight * self.normed(x)).to(x.dtype)


def test_a_norm_that_computes_something_else_keeps_its_forward():
    model = nn.Sequential(
        OnePlusWeightRMSNorm(torch.randn(8)), WeightBeforeRoundingRMSNorm(torch.ones(8)), nn.LayerNorm(8)
    )
    assert use_rms_norm(model) == 0
    assert not any("forward" in vars(module) for module in model)


def test_a_model_without_weights_yet_is_left_alone():
    with torch.device("meta"):
        model = random_llama()
    assert use_rms_norm(model) == 0
