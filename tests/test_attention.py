"""tunelab's CPU attention: its gradients against a float64 reference, and in a model the logits and
gradients of eager attention, with the fused kernel left to keys beyond the length limit."""

import pytest
import torch
import torch.nn.functional as F

from tunelab import attention
from tunelab.attention import ENV, NAME, grouped_attention
from tunelab.errors import TunelabError
from tunelab.models import load_model


@pytest.mark.parametrize("rows_per_chunk", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_attention_matches_a_float64_reference(monkeypatch, rows_per_chunk, dtype):
    batch, heads, groups, length, dim = 3, 6, 2, 12, 16
    # a chunk's scores are batch rows × heads × length² × 4 bytes
    monkeypatch.setattr(attention, "CHUNK_SCORES_BYTES", rows_per_chunk * heads * length * length * 4)
    torch.manual_seed(0)
    query = torch.randn(batch, heads, length, dim, dtype=dtype, requires_grad=True)
    key, value = (torch.randn(batch, groups, length, dim, dtype=dtype, requires_grad=True) for _ in range(2))
    keep = torch.ones(length, length, dtype=torch.bool).tril().repeat(batch, 1, 1, 1)
    keep[1, ..., :4] = False  # left padding on the second row: its first 4 queries see no key
    grad_output = torch.randn(batch, heads, length, dim, dtype=dtype)
    output = grouped_attention(query, key, value, keep, 0.3)

    # the reference: repeat_kv's head order, float64, the padded queries' rows left out (SDPA gives NaN)
    reference_inputs = [t.detach().double().requires_grad_() for t in (query, key, value)]
    q64, k64, v64 = reference_inputs
    reference = F.scaled_dot_product_attention(
        q64,
        k64.repeat_interleave(heads // groups, 1),
        v64.repeat_interleave(heads // groups, 1),
        keep,
        scale=0.3,
    )
    real = keep.any(-1, keepdim=True).expand_as(reference)
    (reference * grad_output.double()).where(real, 0).sum().backward()
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0.02, "atol": 0.02}
    torch.testing.assert_close(output.double().where(real, 0), reference.detach().where(real, 0), **tolerance)
    # a query with no key to attend to spreads evenly over the keys, as eager attention's does: no NaN
    assert torch.isfinite(output).all()
    torch.testing.assert_close(
        output[1, :, 0].float(), value[1].float().mean(1).repeat_interleave(3, 0), **tolerance
    )
    # gradients of the real rows' loss: the padded rows' outputs get a zero gradient
    output.backward(grad_output.where(real, 0))
    for ours, expected in zip((query, key, value), reference_inputs, strict=True):
        torch.testing.assert_close(ours.grad.double(), expected.grad, **tolerance)


def _flash_calls(model, input_ids, attention_mask) -> tuple[int, torch.Tensor, torch.Tensor]:
    """How many times the fused CPU kernel ran in a forward + backward, the logits and the gradient of
    the first layer's q_proj weight (of a loss over the real tokens: padded rows differ by kernel)."""
    model.zero_grad()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        real = logits[attention_mask.bool()]
        (real * torch.linspace(-1, 1, real.shape[-1])).sum().backward()
    calls = sum(event.count for event in profile.key_averages() if "flash_attention" in event.key)
    grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    return calls, logits.detach(), grad


# 24 tokens: within the default limit, beyond a limit of 20 or 0. Unpadded, no mask is passed (causal).
# Gradients are compared as a whole (norm of the difference over the norm): this model's reach 1e3, and
# fp32 sums in another order differ by ~1e-4 there. The fused kernel accumulates blockwise: ~1e-4 relative.
@pytest.mark.parametrize(
    ("padded", "limit", "fused", "grad_rtol"),
    [
        (True, "512", False, 1e-5),
        (False, "512", False, 1e-5),
        (True, "20", True, 1e-3),
        (False, "0", True, 1e-3),
    ],
)
def test_keys_within_the_limit_take_tunelabs_kernel_with_eager_results(
    tiny_model_dir, monkeypatch, padded, limit, fused, grad_rtol
):
    monkeypatch.setenv(ENV, limit)
    length = 24
    model = load_model(tiny_model_dir)
    assert model.config._attn_implementation == NAME
    torch.manual_seed(0)
    input_ids = torch.randint(0, 100, (2, length))
    attention_mask = torch.ones_like(input_ids)
    if padded:
        attention_mask[1, : length // 3] = 0  # left padding on the second row
    calls, logits, grad = _flash_calls(model, input_ids, attention_mask)
    assert (calls > 0) == fused

    model.set_attn_implementation("eager")  # the reference: matmul, softmax, matmul
    _, eager_logits, eager_grad = _flash_calls(model, input_ids, attention_mask)
    real = attention_mask.bool()
    torch.testing.assert_close(logits[real], eager_logits[real], rtol=1e-5, atol=1e-5)
    assert (grad - eager_grad).norm() / eager_grad.norm() < grad_rtol


def test_the_choice_is_not_saved(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir)
    model.save_pretrained(tmp_path)
    assert NAME not in (tmp_path / "config.json").read_text()
    assert load_model(str(tmp_path)).config._attn_implementation == NAME


def test_a_bad_switch_length_is_refused_at_load(tiny_model_dir, monkeypatch):
    monkeypatch.setenv(ENV, "short")
    with pytest.raises(TunelabError, match=f"{ENV}='short' is not a number of tokens"):
        load_model(tiny_model_dir)
