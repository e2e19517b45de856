"""tunelab's CPU attention: its gradients against a float64 reference, and in a model the logits and
gradients of eager attention, with the fused kernel left to keys beyond the length limit."""

import pytest
import torch
import torch.nn.functional as F

from tunelab import attention
from tunelab.attention import ENV, NAME, cpu_attention_forward, grouped_attention
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


def _run(model, input_ids, attention_mask) -> tuple[dict[str, int], torch.Tensor, torch.Tensor]:
    """How many times tunelab's kernel and SDPA's fused kernel ran in a forward + backward (the profiler
    counts them), the logits and the gradient of the first layer's q_proj weight (of a loss over the
    real tokens: padded rows differ by kernel)."""
    model.zero_grad()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        real = logits[attention_mask.bool()].float()
        (real * torch.linspace(-1, 1, real.shape[-1])).sum().backward()
    events = profile.key_averages()
    calls = {
        kernel: sum(event.count for event in events if name in event.key)
        for kernel, name in (("tunelab", "GroupedAttention"), ("fused", "flash_attention"))
    }
    grad = model.model.layers[0].self_attn.q_proj.weight.grad.float().clone()
    return calls, logits.detach().float(), grad


def _inputs(padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    input_ids = torch.randint(0, 100, (2, 24))
    attention_mask = torch.ones_like(input_ids)
    if padded:
        attention_mask[1, :8] = 0  # left padding on the second row
    return input_ids, attention_mask


# 24 tokens, within the default limit. Unpadded, no mask is passed (causal).
@pytest.mark.parametrize("padded", [True, False])
def test_bf16_attention_takes_tunelabs_kernel_and_is_as_exact_as_eager(tiny_model_dir, monkeypatch, padded):
    monkeypatch.delenv(ENV, raising=False)
    inputs = _inputs(padded)
    real = inputs[1].bool()
    model = load_model(tiny_model_dir)
    model.set_attn_implementation("eager")
    _, _, fp32_grad = _run(model, *inputs)  # the reference: eager attention in fp32

    model = load_model(tiny_model_dir).to(torch.bfloat16)
    assert model.config._attn_implementation == NAME
    calls, logits, grad = _run(model, *inputs)
    assert calls["tunelab"] and not calls["fused"]
    model.set_attn_implementation("eager")
    _, eager_logits, eager_grad = _run(model, *inputs)
    # the forward computes what eager's does in bf16, to the bit
    assert torch.equal(logits[real], eager_logits[real])
    # the backward starts from bf16 probabilities (eager's from fp32): its gradient is as close to fp32's
    # as eager's own bf16 gradient (both ~3% here)
    error, eager_error = ((g - fp32_grad).norm() / fp32_grad.norm() for g in (grad, eager_grad))
    assert error < 1.2 * eager_error


@pytest.mark.parametrize(
    ("limit", "dtype", "logits_tol"),
    [
        ("20", torch.bfloat16, 0.25),  # 24 tokens, beyond the limit
        ("0", torch.bfloat16, 0.25),  # never
        (None, torch.float32, 1e-5),  # tunelab's kernel is no faster than SDPA in fp32
    ],
)
def test_sdpa_runs_the_rest(tiny_model_dir, monkeypatch, limit, dtype, logits_tol):
    if limit is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, limit)
    inputs = _inputs(padded=True)
    model = load_model(tiny_model_dir).to(dtype)
    calls, logits, _ = _run(model, *inputs)
    assert calls["fused"] and not calls["tunelab"]
    model.set_attn_implementation("eager")
    _, eager_logits, _ = _run(model, *inputs)
    real = inputs[1].bool()
    torch.testing.assert_close(logits[real], eager_logits[real], rtol=logits_tol, atol=logits_tol)


def test_the_choice_is_not_saved(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir)
    model.save_pretrained(tmp_path)
    assert NAME not in (tmp_path / "config.json").read_text()
    assert load_model(str(tmp_path)).config._attn_implementation == NAME


def test_a_bad_length_limit_is_refused_at_load(tiny_model_dir, monkeypatch):
    monkeypatch.setenv(ENV, "short")
    with pytest.raises(TunelabError, match=f"{ENV}='short' is not a number of tokens"):
        load_model(tiny_model_dir)


@pytest.mark.parametrize("case", ["supported", "dropout", "float mask", "decoding", "narrower value heads"])
def test_what_the_kernel_does_not_do_goes_to_sdpa(case):
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    torch.manual_seed(0)
    length, keys = (1, 6) if case == "decoding" else (6, 6)
    query = torch.randn(2, 4, length, 8, dtype=torch.bfloat16)
    key = torch.randn(2, 2, keys, 8, dtype=torch.bfloat16)
    value = torch.randn(2, 2, keys, 4 if case == "narrower value heads" else 8, dtype=torch.bfloat16)
    mask = torch.zeros(2, 1, length, keys, dtype=torch.bfloat16) if case == "float mask" else None
    dropout = 0.1 if case == "dropout" else 0.0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        output, _ = cpu_attention_forward(module, query, key, value, mask, dropout, max_length=512)
    assert output.shape == (2, length, 4, value.shape[-1])
    ran = any("GroupedAttention" in event.key for event in profile.key_averages())
    assert ran == (case == "supported")
