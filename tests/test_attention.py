"""SDPA by sequence length: short keys take the math path on CPU, long ones the fused kernel, and both
give eager attention's logits and gradients."""

import pytest
import torch

from tunelab.attention import ENV, NAME
from tunelab.errors import TunelabError
from tunelab.models import load_model


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


# 24 and 200 tokens: either side of the default switch at 192. Unpadded, SDPA runs with is_causal and no
# mask. The fused kernel accumulates blockwise in fp32: its gradients differ from eager's by ~1e-3 relative.
@pytest.mark.parametrize(
    ("length", "padded", "fused", "grad_rtol"),
    [(24, True, False, 1e-5), (24, False, False, 1e-5), (200, True, True, 5e-3)],
)
def test_short_sequences_take_the_math_path_with_eager_results(
    tiny_model_dir, length, padded, fused, grad_rtol
):
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
    torch.testing.assert_close(grad, eager_grad, rtol=grad_rtol, atol=1e-5)


def test_the_choice_is_not_saved(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir)
    model.save_pretrained(tmp_path)
    assert NAME not in (tmp_path / "config.json").read_text()
    assert load_model(str(tmp_path)).config._attn_implementation == NAME


def test_a_bad_switch_length_is_refused_at_load(tiny_model_dir, monkeypatch):
    monkeypatch.setenv(ENV, "short")
    with pytest.raises(TunelabError, match=f"{ENV}='short' is not a number of tokens"):
        load_model(tiny_model_dir)
