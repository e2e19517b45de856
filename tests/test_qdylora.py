"""QLoRA / QDyLoRA on a bitsandbytes NF4 base: round trip, the CPU repack trap, rank eval/export."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from torch import nn

from conftest import run_cli_output, tiny_config, write_qa_jsonl
from tunelab.assemble import build
from tunelab.evaluate import summarize_ranks
from tunelab.export import export_run
from tunelab.methods.lora.layer import lora_layers
from tunelab.methods.surgery import replace_module
from tunelab.quant import dequantize_weight, dequantized_linear, guard_cpu_repack, is_4bit
from tunelab.rundir import RunDir
from tunelab.train import train

bnb = pytest.importorskip("bitsandbytes")


def _nf4_built(model_dir, data, tmp_path, method=None, precision="auto"):
    config = tiny_config(
        model_dir,
        data,
        tmp_path / "run",
        quantization="nf4",
        method=method or {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        **{"train.precision": precision},
    )
    built = build(config)
    for layer in lora_layers(built.model).values():
        nn.init.normal_(layer.lora_B, std=0.05)
    return built


def test_nf4_storage_and_round_trip_error(tiny_model_dir, qa_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    built = _nf4_built(tiny_model_dir, qa_jsonl, tmp_path)
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    layer = built.model.model.layers[0].self_attn.q_proj.base_layer
    assert is_4bit(layer) and layer.weight.quant_type == "nf4"
    assert layer.weight.quant_state.nested  # double quantization of the absmax constants
    assert layer.weight.quant_state.blocksize == 64
    assert isinstance(built.model.lm_head, nn.Linear) and not is_4bit(built.model.lm_head)
    original = full.model.layers[0].self_attn.q_proj.weight
    dequantized = dequantize_weight(layer)
    relative = ((dequantized - original).norm() / original.norm()).item()
    assert 0 < relative < 0.15, relative  # 4-bit NF4 on Gaussian weights: ~0.1


def _lora_grads(model, tokens):
    model.zero_grad()
    model(input_ids=tokens, labels=tokens).loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def _dense_reference(model):
    """The same model with every 4-bit linear replaced by its dequantized fp32 weights."""
    reference = copy.deepcopy(model)
    for name, module in list(reference.named_modules()):
        if is_4bit(module):
            replace_module(reference, name, dequantized_linear(module))
    for name, param in reference.named_parameters():
        param.requires_grad_("lora_" in name)
    return reference


def _train_eval_train(model, tokens):
    model.train()
    _lora_grads(model, tokens)  # a first training step
    model.eval()
    with torch.no_grad():
        prompt = tokens[:, :4]
        model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False
        )
        model(input_ids=tokens)
    model.train()
    return _lora_grads(model, tokens)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gradients_stay_exact_after_an_eval_forward(tiny_model_dir, qa_jsonl, tmp_path, precision):
    """The guard works whatever the compute dtype (bf16 is the default on CPUs that have it)."""
    built = _nf4_built(tiny_model_dir, qa_jsonl, tmp_path, precision=precision)
    assert dequantize_weight(built.model.model.layers[0].mlp.up_proj.base_layer).dtype == (
        torch.float32 if precision == "fp32" else torch.bfloat16
    )
    tokens = torch.randint(3, 1000, (2, 12))
    reference = _dense_reference(built.model)
    reference.train()
    expected = _lora_grads(reference, tokens)
    got = _train_eval_train(built.model, tokens)
    relative = ((got - expected).norm() / expected.norm()).item()
    assert relative < 1e-4, relative


def test_the_trap_is_real_without_the_guard(tiny_model_dir, qa_jsonl, tmp_path):
    """On CPUs with avx512_bf16 the unguarded layer gives wrong gradients after an eval forward:
    this is what guard_cpu_repack prevents (and shows the test above can fail)."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no avx512_bf16: bitsandbytes never repacks here")
    built = _nf4_built(tiny_model_dir, qa_jsonl, tmp_path)
    tokens = torch.randint(3, 1000, (2, 12))
    reference = _dense_reference(built.model)
    expected = _lora_grads(reference.train(), tokens)
    for module in built.model.modules():
        if is_4bit(module):
            module.support_avx512bf16_for_cpu = True  # undo the guard
    with pytest.warns(UserWarning):
        got = _train_eval_train(built.model, tokens)
    assert ((got - expected).norm() / expected.norm()).item() > 0.1
    assert guard_cpu_repack(built.model) == 14


@pytest.fixture(scope="module")
def qdylora_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("qdylora")
    data = write_qa_jsonl(tmp / "qa.jsonl")
    config = tiny_config(
        tiny_model_dir,
        data,
        tmp / "run",
        quantization="nf4",
        method={"name": "dylora", "r": 6, "alpha": 12, "dropout": 0.0},
        **{"train.max_steps": 10, "train.lr": 2e-2},
    )
    return train(config).run_dir


def test_rank_sequence_is_logged_and_reproducible(qdylora_run):
    from tunelab.methods.lora.dylora import rank_probabilities, sample_rank

    records = RunDir(qdylora_run).metrics()
    ranks = [r["rank"] for r in records if "rank" in r]
    probs = rank_probabilities(1, 6, "uniform")
    assert ranks == [sample_rank(step, 42, probs, 1) for step in range(10)]
    assert len(set(ranks)) > 1


def test_eval_every_rank_writes_table_json_and_plot(qdylora_run, tmp_path):
    from typer.testing import CliRunner

    from tunelab.cli import app

    out = tmp_path / "ranks.json"
    result = CliRunner().invoke(
        app, ["eval", str(qdylora_run), "--ranks", "all", "--limit", "8", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert [row["rank"] for row in summary["ranks"]] == [1, 2, 3, 4, 5, 6]
    losses = [row["loss"] for row in summary["ranks"]]
    assert len(set(losses)) == 6  # each truncation is a different model
    assert summary["best_rank"] == summary["ranks"][losses.index(min(losses))]["rank"]
    assert 1 <= summary["elbow_rank"] <= 6
    assert (qdylora_run / "rank_curve.png").stat().st_size > 1000
    bad = CliRunner().invoke(app, ["eval", str(qdylora_run), "--ranks", "1-9"])
    assert bad.exit_code != 0 and "outside 1..6" in str(bad.exception)


@pytest.mark.parametrize(
    "exact_match, loss, expected",
    [
        ([0.25, 0.5, 0.5, 0.25], [2.0, 1.9, 1.8, 1.7], ("exact_match", 4)),  # a tie on exact match: loss
        ([0.25, 0.5, 0.25, 0.25], [2.0, 1.9, 1.8, 1.7], ("exact_match", 2)),
        ([0.0, 0.0, 0.0, 0.0], [10.3442, 10.3404, 10.3452, 10.35], ("loss", 2)),  # exact match says nothing
        (None, [1.2, 1.1, 1.0, 1.05], ("loss", 4)),
    ],
)
def test_the_best_rank_is_chosen_by_exact_match_then_loss(exact_match, loss, expected):
    rows = [
        {"rank": rank, "loss": value} | ({"exact_match": exact_match[i]} if exact_match else {})
        for i, (rank, value) in enumerate(zip([1, 2, 4, 8], loss, strict=True))
    ]
    summary = summarize_ranks(rows)
    assert (summary["metric"], summary["best_rank"]) == expected


@pytest.mark.parametrize("rank", [2, 6])
def test_peft_on_an_nf4_base_matches_our_rank_b_forward(qdylora_run, tmp_path, tiny_model_dir, rank):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.assemble import load_run
    from tunelab.quant import nf4_config

    _, built = load_run(qdylora_run, precision="fp32")
    built.method.set_rank(built.model, rank)
    tokens = torch.randint(3, 1000, (1, 10))
    with torch.no_grad():
        ours = built.model(input_ids=tokens).logits
    out = export_run(qdylora_run, "peft", tmp_path / f"peft-{rank}", rank=rank)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == rank and adapter["lora_alpha"] / adapter["r"] == 12 / rank
    base = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=nf4_config(torch.float32), device_map="cpu"
    )
    guard_cpu_repack(base)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=tokens).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_merged_export_from_nf4_is_a_plain_model(qdylora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunelab.assemble import load_run

    _, built = load_run(qdylora_run, precision="fp32")
    built.method.set_rank(built.model, 3)
    tokens = torch.randint(3, 1000, (1, 10))
    with torch.no_grad():
        ours = built.model(input_ids=tokens).logits
    out = export_run(qdylora_run, "merged", tmp_path / "merged", rank=3)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=tokens).logits, ours, atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_on_an_nf4_base_trains(tmp_path, tiny_model_dir, qa_jsonl):
    """The QLoRA memory recipe: activations recomputed in backward, adapter gradients still flow."""
    config = tiny_config(
        tiny_model_dir,
        qa_jsonl,
        tmp_path / "gc",
        quantization="nf4",
        **{"train.gradient_checkpointing": True, "train.max_steps": 6, "train.lr": 2e-2},
    )
    run_dir = train(config).run_dir
    losses = [record["loss"] for record in RunDir(run_dir).metrics() if "loss" in record]
    assert losses[-1] < losses[0] - 0.3


def test_checkpointing_every_nth_layer_recomputes_those_layers_and_trains_the_same(
    tmp_path, tiny_model_dir, qa_jsonl
):
    """train.gradient_checkpointing_every: 2 recomputes the first of the 2 layers only (called twice a
    step), and the recompute changes no number: the losses equal those without checkpointing."""
    from tunelab.assemble import build
    from tunelab.data import train_dataset
    from tunelab.train import make_trainer

    calls, losses = {}, {}
    for setting, every in ((False, 1), (True, 1), (True, 2)):
        config = tiny_config(
            tiny_model_dir,
            qa_jsonl,
            tmp_path / f"{setting}-{every}",
            method={"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
            **{
                "train.gradient_checkpointing": setting,
                "train.gradient_checkpointing_every": every,
                "train.max_steps": 3,
            },
        )
        built = build(config)
        counts = calls[setting, every] = [0, 0]
        for index, layer in enumerate(built.model.model.layers):
            # inside the layer's forward, which is what the recompute runs again (a layer's own hooks are not)
            layer.self_attn.register_forward_pre_hook(
                lambda *_, i=index, c=counts: c.__setitem__(i, c[i] + 1)
            )
        trainer = make_trainer(
            config,
            built,
            tmp_path / f"{setting}-{every}",
            train_dataset(config.data, built.tokenizer, quiet=True),
        )
        trainer.train()
        losses[setting, every] = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    assert calls == {(False, 1): [3, 3], (True, 1): [6, 6], (True, 2): [6, 3]}
    assert losses[True, 1] == losses[False, 1] == losses[True, 2]


def test_releasing_checkpoint_pages_keeps_every_value(tiny_model_dir):
    """The pages advised away are those only the 4-bit weights were read from: afterwards the
    unquantized tensors (views into the same mapping) and the logits are unchanged."""
    from tunelab.models import load_model
    from tunelab.quant import nf4_config, release_loading_memory

    model = load_model(tiny_model_dir, quantization_config=nf4_config(torch.float32), device_map="cpu").eval()
    guard_cpu_repack(model)
    tokens = torch.arange(3, 40).unsqueeze(0)
    unquantized = {
        name: t.detach().clone() for name, t in model.state_dict().items() if t.dtype == torch.float32
    }
    with torch.no_grad():
        before = model(input_ids=tokens).logits
    assert release_loading_memory(model) > 0
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tokens).logits, before, rtol=0, atol=0)
    for name, value in model.state_dict().items():
        if name in unquantized:
            torch.testing.assert_close(value, unquantized[name], rtol=0, atol=0)


def test_releasing_pages_leaves_other_models_alone(tiny_model_dir):
    """Another model loaded from the same kind of file and changed in place (as full fine-tuning
    does) keeps its changes: only the NF4 model's own mapping is advised."""
    from tunelab.models import load_model
    from tunelab.quant import nf4_config, release_loading_memory

    trained = load_model(tiny_model_dir)
    weight = trained.get_input_embeddings().weight
    with torch.no_grad():
        weight += 1.0  # written into its copy-on-write pages of the memory map
    expected = weight.detach().clone()
    quantized = load_model(tiny_model_dir, quantization_config=nf4_config(torch.float32), device_map="cpu")
    release_loading_memory(quantized)
    torch.testing.assert_close(weight.detach(), expected, rtol=0, atol=0)


def test_any_tunelab_trainer_drives_the_method(tmp_path, tiny_model_dir, qa_jsonl):
    """A trainer made outside train() (as the benchmarks make theirs) still runs the method's hooks:
    DyLoRA draws a rank per step."""
    from transformers import TrainerCallback

    from tunelab.data import build_dataset
    from tunelab.train import make_trainer

    config = tiny_config(
        tiny_model_dir,
        qa_jsonl,
        tmp_path / "run",
        **{"method.name": "dylora", "method.r": 8, "train.max_steps": 6},
    )
    built = build(config)
    ranks = []

    class RankSeen(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            ranks.append({layer.rank for layer in lora_layers(model).values()})

    data = build_dataset(str(qa_jsonl), built.tokenizer, config.data)
    trainer = make_trainer(config, built, tmp_path / "run", data, callbacks=[RankSeen()])
    trainer.train()
    assert all(len(seen) == 1 for seen in ranks)  # one rank for every layer at each step
    assert len({next(iter(seen)) for seen in ranks}) > 1  # and it changes from step to step


def test_the_training_header_says_the_base_is_4_bit(tiny_model_dir, qa_jsonl, tmp_path, capsys):
    """...and which of its 2 layers gradient checkpointing recomputes (on by default with nf4)."""
    for every, says in [(1, "gradient checkpointing"), (2, "gradient checkpointing (layer 0 of 2 only)")]:
        overrides = {"train.max_steps": 1, "train.gradient_checkpointing_every": every}
        train(tiny_config(tiny_model_dir, qa_jsonl, tmp_path / str(every), quantization="nf4", **overrides))
        header = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("training "))
        assert re.search(rf"examples, (bf16|fp32), base in 4-bit nf4, {re.escape(says)}\) -> ", header), (
            header
        )


def test_checkpointing_every_nth_layer_is_refused_before_loading_by_a_transformers_without_it(
    tiny_model_dir, qa_jsonl, tmp_path, monkeypatch
):
    from transformers import PreTrainedModel

    from tunelab.errors import TunelabError

    def as_before_every_n_layers(self, enable=True, gradient_checkpointing_func=None):
        raise AssertionError("refused before the model loads")

    monkeypatch.setattr(PreTrainedModel, "_set_gradient_checkpointing", as_before_every_n_layers)
    config = tiny_config(
        tiny_model_dir,
        qa_jsonl,
        tmp_path / "run",
        quantization="nf4",
        **{"train.gradient_checkpointing_every": 2},
    )
    with pytest.raises(
        TunelabError, match=r"every_n_layers \(5.23 does; this is .*\): upgrade it or drop the key"
    ):
        train(config)
    assert not (tmp_path / "run").exists()


def test_eval_and_export_without_a_rank_say_which_rank_they_used(qdylora_run, tmp_path, capsys):
    code, out, _ = run_cli_output(capsys, "eval", str(qdylora_run), "--limit", "2")
    assert code == 0 and "at rank 6 (the run's r; --ranks all evaluates every rank)" in out
    code, out, _ = run_cli_output(
        capsys, "export", str(qdylora_run), "--format", "PEFT", "--out", str(tmp_path / "a")
    )
    assert code == 0 and "at rank 6 (the run's r; --rank N exports another)" in out
    # the line that says how to load it loads the base in 4-bit, as it trained, and runs as printed
    load = re.search(
        r"^load it: (.*\)) \(its base model is named in adapter_config.json\)$", out, re.M
    ).group(1)
    assert (
        "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True)"
        in load
    )
    import peft
    import transformers

    loaded = eval(load, {"peft": peft, "transformers": transformers})
    stored = [module.weight.quant_state for module in loaded.modules() if is_4bit(module)]
    assert stored and all(state.quant_type == "nf4" and state.nested for state in stored)  # double quant
    code, out, _ = run_cli_output(capsys, "eval", str(qdylora_run), "--limit", "2", "--ranks", "1,6")
    assert code == 0 and "at rank" not in out
