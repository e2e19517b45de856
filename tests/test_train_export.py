"""End to end on a tiny random Llama: train, metrics, eval, PEFT and merged exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_config, write_qa_jsonl
from tunelab.assemble import load_run
from tunelab.errors import TunelabError
from tunelab.export import export_run
from tunelab.train import train


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("lora-run")
    data = write_qa_jsonl(tmp / "qa.jsonl")
    config = tiny_config(tiny_model_dir, data, tmp / "run", **{"train.max_steps": 16, "train.lr": 3e-2})
    return train(config).run_dir


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_goes_down_and_metrics_are_written(lora_run):
    records = _records(lora_run)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 17))
    assert all(r["step_time_s"] > 0 and r["lr"] is not None for r in steps)
    first, last = sum(r["loss"] for r in steps[:3]) / 3, sum(r["loss"] for r in steps[-3:]) / 3
    assert last < first - 0.5, (first, last)
    summary = records[-1]
    assert (
        summary["event"] == "summary" and summary["peak_memory_bytes"] > 0 and summary["train_runtime_s"] > 0
    )
    assert (lora_run / "config.yaml").is_file() and (lora_run / "final" / "trained.safetensors").is_file()


def _tokens():
    return torch.tensor([[1, 48, 34, 15, 29, 30, 31, 100, 200, 2]])


def test_peft_loads_our_export_with_the_same_logits(lora_run, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, built = load_run(lora_run, precision="fp32")
    with torch.no_grad():
        ours = built.model(input_ids=_tokens()).logits
    out = export_run(lora_run, "peft", tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert Path(config["base_model_name_or_path"]).is_absolute()  # loads from any folder, no hub lookup
    from transformers import AutoTokenizer

    shipped, original = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tiny_model_dir)
    assert shipped.chat_template == original.chat_template and shipped.vocab == original.vocab
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=_tokens()).logits
    base_logits = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=_tokens()).logits
    assert (ours - base_logits).abs().max() > 1e-3  # the adapter changed something
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_merged_export_equals_the_adapter_forward(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    _, built = load_run(lora_run, precision="fp32")
    with torch.no_grad():
        ours = built.model(input_ids=_tokens()).logits
    out = export_run(lora_run, "merged", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=_tokens()).logits, ours, atol=1e-4, rtol=1e-4)


def test_export_refuses_bad_requests(lora_run, tmp_path):
    with pytest.raises(TunelabError, match="exports as peft or merged, not 'spiel'"):
        export_run(lora_run, "spiel", tmp_path / "x")
    with pytest.raises(TunelabError, match="needs a dylora run"):
        export_run(lora_run, "peft", tmp_path / "y", rank=2)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("keep")
    with pytest.raises(TunelabError, match="exists and is not empty"):
        export_run(lora_run, "peft", tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "keep"
    with pytest.raises(TunelabError, match="not a tunelab run directory"):
        export_run(tmp_path, "peft", tmp_path / "z")


def test_eval_command_writes_json(lora_run, tmp_path):
    from typer.testing import CliRunner

    from tunelab.cli import app

    out = tmp_path / "eval.json"
    result = CliRunner().invoke(
        app, ["eval", str(lora_run), "--limit", "8", "--exact-match", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert metrics["examples"] == 8 and 0 <= metrics["exact_match"] <= 1 and metrics["perplexity"] > 1


def test_full_fine_tuning_trains_every_weight(tmp_path, tiny_model_dir, qa_jsonl):
    config = tiny_config(
        tiny_model_dir,
        qa_jsonl,
        tmp_path / "full",
        **{"method": {"name": "full"}, "train.max_steps": 3, "train.lr": 1e-3},
    )
    run_dir = train(config).run_dir
    _, built = load_run(run_dir)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [
        name
        for (name, p), (_, q) in zip(built.model.named_parameters(), base.named_parameters(), strict=True)
        if not torch.equal(p, q)
    ]
    assert len(changed) == len(list(base.parameters()))


@pytest.mark.parametrize(
    "method",
    [
        {"name": "dylora", "r": 4, "alpha": 8},
        {"name": "spiel", "num_tunable": 3000, "reselection_steps": 4, "accumulation_steps": 1},
    ],
)
@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_the_model_train_hands_back_is_the_saved_run(
    tmp_path, tiny_model_dir, qa_jsonl, method, quantization
):
    """Callers evaluate what train() returns instead of loading the run again: it must be the same model."""
    from tunelab.data import build_dataset
    from tunelab.evaluate import loss_and_perplexity

    config = tiny_config(
        tiny_model_dir,
        qa_jsonl,
        tmp_path / "run",
        method=method,
        quantization=quantization,
        **{"train.max_steps": 9, "train.lr": 1e-2},
    )
    result = train(config)
    _, loaded = load_run(result.run_dir)
    dataset = build_dataset(str(qa_jsonl), loaded.tokenizer, config.data, limit=16)
    in_memory = loss_and_perplexity(result.tuned.model, dataset, result.tuned.tokenizer)["loss"]
    assert in_memory == pytest.approx(
        loss_and_perplexity(loaded.model, dataset, loaded.tokenizer)["loss"], rel=1e-5
    )


def test_eval_loss_during_training_is_what_tunelab_eval_reports(tmp_path, tiny_model_dir, qa_jsonl):
    from tunelab.data import build_dataset
    from tunelab.evaluate import loss_and_perplexity

    config = tiny_config(tiny_model_dir, qa_jsonl, tmp_path / "run", **{"train.eval_steps": 6})
    result = train(config)
    evals = [r for r in _records(result.run_dir) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    dataset = build_dataset(str(qa_jsonl), result.tuned.tokenizer, config.data)
    final = loss_and_perplexity(result.tuned.model, dataset, result.tuned.tokenizer)
    assert evals[-1]["eval_loss"] == pytest.approx(final["loss"], rel=1e-6)
    assert evals[-1]["eval_perplexity"] == pytest.approx(final["perplexity"], rel=1e-6)


def test_ranks_on_a_one_rank_run_fail_before_the_model_loads(lora_run, tmp_path, capsys, monkeypatch):
    import tunelab.assemble
    from conftest import assert_one_line_error, run_cli

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the request was checked")

    monkeypatch.setattr(tunelab.assemble, "build", no_loading)
    code, err = run_cli(capsys, "eval", str(lora_run), "--ranks", "all")
    assert_one_line_error(code, err, "this run's method trains one rank")
