"""End to end on a tiny random Llama: train, metrics, eval, PEFT and merged exports."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL, random_causal_lm, run_cli_output, tiny_config, write_qa_jsonl
from tunelab.assemble import load_run
from tunelab.errors import TunelabError
from tunelab.export import export_run
from tunelab.rundir import RunDir
from tunelab.train import train


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("lora-run")
    data = write_qa_jsonl(tmp / "qa.jsonl")
    config = tiny_config(tiny_model_dir, data, tmp / "run", **{"train.max_steps": 16, "train.lr": 3e-2})
    return train(config).run_dir


def _records(run_dir):
    return RunDir(run_dir).metrics()


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


# other architectures' projections: Qwen2's carry biases, Phi-3's are fused (qkv_proj, gate_up_proj),
# Gemma's norms scale by 1 + weight
@pytest.mark.parametrize("architecture", ["Qwen2", "Phi3", "Gemma"])
def test_peft_loads_a_lora_of_each_architecture_with_the_same_logits(tmp_path, smollm2_dir, architecture):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    shape = {"head_dim": 16} if architecture == "Gemma" else {}
    model = random_causal_lm(architecture, vocab_size=len(tokenizer), pad_token_id=0, **TINY_MODEL | shape)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    data = write_qa_jsonl(tmp_path / "qa.jsonl")
    config = tiny_config(str(tmp_path / "base"), data, tmp_path / "run", **{"train.max_steps": 4})
    run_dir = train(config).run_dir
    _, built = load_run(run_dir, precision="fp32")
    with torch.no_grad():
        ours = built.model(input_ids=_tokens()).logits
    adapter = export_run(run_dir, "peft", tmp_path / "peft")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        assert (ours - base(input_ids=_tokens()).logits).abs().max() > 1e-3  # the adapter changed something
        theirs = PeftModel.from_pretrained(base, adapter).eval()(input_ids=_tokens()).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_merged_export_equals_the_adapter_forward(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    _, built = load_run(lora_run, precision="fp32")
    with torch.no_grad():
        ours = built.model(input_ids=_tokens()).logits
    out = export_run(lora_run, "Merged", tmp_path / "merged", dtype="float32")  # other tools' spellings
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=_tokens()).logits, ours, atol=1e-4, rtol=1e-4)
    # also what transformers 4 reads (checked by hand with 4.57.6: the same logits; without rope_theta
    # it took 10000 for a model trained at 100000, and it knows no TokenizersBackend class)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert (
        json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"]
        == "PreTrainedTokenizerFast"
    )


def test_export_refuses_bad_requests(lora_run, tmp_path):
    with pytest.raises(TunelabError, match="exports as peft, merged or gguf, not 'spiel'"):
        export_run(lora_run, "spiel", tmp_path / "x")
    # other tools' spellings are read in any case, and an error echoes what was written
    with pytest.raises(TunelabError, match="exports as peft, merged or gguf, not 'GUFF'; did you mean gguf"):
        export_run(lora_run, "GUFF", tmp_path / "x")
    with pytest.raises(TunelabError, match="--dtype Float8: use one of fp32, bf16, fp16"):
        export_run(lora_run, "merged", tmp_path / "x", dtype="Float8")
    with pytest.raises(TunelabError, match="--gguf-type Q4_K: use one of"):
        export_run(lora_run, "gguf", tmp_path / "x", gguf_type="Q4_K")
    with pytest.raises(TunelabError, match="trains one rank; drop --rank"):
        export_run(lora_run, "peft", tmp_path / "y", rank=2)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("keep")
    with pytest.raises(TunelabError, match="exists and is not empty"):
        export_run(lora_run, "peft", tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "keep"
    with pytest.raises(TunelabError, match="not a tunelab run directory"):
        export_run(tmp_path, "peft", tmp_path / "z")
    with pytest.raises(
        TunelabError, match=r"--out .*model\.safetensors reads as a file name; --out names a dir"
    ):
        export_run(lora_run, "peft", tmp_path / "exp" / "model.safetensors")
    assert not (tmp_path / "exp").exists()


def test_eval_command_writes_json(lora_run, tmp_path):
    from typer.testing import CliRunner

    from tunelab.cli import app

    out = tmp_path / "eval.json"
    result = CliRunner().invoke(
        app, ["eval", str(lora_run), "--limit", "8", "--exact-match", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    # what was evaluated, in one line however long its path (a table title would wrap inside it)
    assert f"{lora_run.name} on {metrics['data']}: 8 examples\n" in result.output
    assert metrics["examples"] == 8 and 0 <= metrics["exact_match"] <= 1 and metrics["perplexity"] > 1
    # what was scored is there to read: each example's prompt, reference and generated text
    first = metrics["generations"][0]
    assert first["reference"] == " 0" and first["prompt"].endswith(
        "Q: 0+0=<|im_end|>\n<|im_start|>assistant\n"
    )
    assert isinstance(first["generated"], str) and len(metrics["generations"]) == 8


def _greedy(tokenizer, model, text: str, new_tokens: int) -> str:
    """Greedy decoding by hand (argmax of the forward pass), independent of model.generate."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(new_tokens):
            token = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
            if token == tokenizer.eos_token_id:
                break
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True)


def test_generate_and_chat_answer_as_the_run_trained(lora_run, tmp_path, capsys):
    from conftest import run_cli

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Q: 1+2=\n\nQ: 3+4=\n")
    out = tmp_path / "out.jsonl"
    code, err = run_cli(
        capsys, "generate", str(lora_run), "--file", str(prompts), "--out", str(out), "--max-new-tokens", "4"
    )
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    _, built = load_run(lora_run)
    chat = [
        built.tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in ("Q: 1+2=", "Q: 3+4=")
    ]
    expected = [_greedy(built.tokenizer, built.model, text, 4) for text in chat]
    assert [row["prompt"] for row in rows] == ["Q: 1+2=", "Q: 3+4="]
    assert [row["generated"] for row in rows] == expected

    from typer.testing import CliRunner

    from tunelab.cli import app

    result = CliRunner().invoke(
        app, ["chat", str(lora_run), "--max-new-tokens", "4"], input="Q: 1+2=\n/rest\n/quit\n"
    )
    assert result.exit_code == 0, result.output
    assert expected[0].strip() in result.output and "you>" in result.output
    assert "unknown command /rest; commands: /reset clears" in result.output
    assert result.output.count("you>") == 3  # the mistyped command reached no model


def test_chat_ctrl_c_stops_a_reply_and_the_conversation_goes_on(lora_run):
    """Ctrl-C while a reply streams ends that reply, not the session; replies stop at the model's
    positions whatever --max-new-tokens asks; /reset says it cleared."""
    import select
    import signal
    import subprocess
    import sys

    process = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "chat", str(lora_run), "--max-new-tokens", "100000"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},
        # started with Ctrl-C ignored, as a background job or a runner may start it (the full test suite
        # did): chat makes it stop a reply all the same
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    shown = b""

    def read_until(predicate, seconds: float = 120.0) -> None:
        nonlocal shown
        deadline = time.monotonic() + seconds
        while not predicate(shown) and time.monotonic() < deadline:
            if select.select([process.stdout], [], [], 0.5)[0]:
                shown += os.read(process.stdout.fileno(), 4096) or b""
        assert predicate(shown), shown.decode(errors="replace")

    prompts = 1
    read_until(lambda text: text.count(b"you>") == prompts)
    for _ in range(5):  # the tiny model may finish a reply before the test can stop it: ask again
        process.stdin.write(b"Q: 1+2=\n")
        process.stdin.flush()
        read_until(lambda text: len(text.split(b"you>")[-1].strip()) > 0)  # the reply has begun
        process.send_signal(signal.SIGSTOP)  # held mid-reply while the test looks
        time.sleep(0.2)
        while select.select([process.stdout], [], [], 0)[0]:
            shown += os.read(process.stdout.fileno(), 4096)
        if shown.count(b"you>") == prompts:  # still replying: Ctrl-C lands mid-reply
            process.send_signal(signal.SIGINT)
            process.send_signal(signal.SIGCONT)
            break
        process.send_signal(signal.SIGCONT)
        prompts += 1
    read_until(lambda text: b"(stopped" in text and text.count(b"you>") == prompts + 1)
    process.stdin.write(b"/reset\nQ: 3+4=\n/quit\n")
    process.stdin.close()
    assert process.wait(timeout=120) == 0
    shown += process.stdout.read()
    text = shown.decode()
    assert "(stopped; this turn is left out of the conversation)" in text and "conversation cleared" in text
    assert text.count("you>") == prompts + 3  # after the stop, after /reset, after the second (whole) reply


def test_generate_refuses_bad_requests(lora_run, tmp_path, capsys):
    from conftest import assert_one_line_error, run_cli

    assert_one_line_error(*run_cli(capsys, "generate", str(lora_run)), "--prompt TEXT", "--file FILE")
    assert_one_line_error(
        *run_cli(capsys, "generate", str(lora_run), "--file", str(tmp_path / "nope.jsonl")), "file not found"
    )
    assert_one_line_error(
        *run_cli(capsys, "generate", str(lora_run), "--prompt", "hi", "--rank", "2"),
        "trains one rank; drop --rank",
    )


def test_prompt_files_read_the_runs_column_names(tmp_path):
    from tunelab.generate import read_prompt_rows, row_messages

    questions = tmp_path / "questions.csv"  # like the training data, without its answer column
    questions.write_text("question\nWhat is 2+2?\n")
    (row,) = read_prompt_rows(questions, {"instruction": "question", "output": "answer"})
    assert row_messages(*row, None, None) == [{"role": "user", "content": "What is 2+2?"}]


def test_prompt_files_name_their_prompt_column(lora_run, tmp_path, capsys):
    from conftest import assert_one_line_error, run_cli
    from tunelab.generate import read_prompt_rows, row_messages

    questions = tmp_path / "qa.jsonl"  # a run trained with no data.columns; the file has its own names
    questions.write_text('{"question": "What is 2+2?", "answer": "4"}\n')
    (row,) = read_prompt_rows(questions, {}, "question")
    assert row_messages(*row, None, None) == [{"role": "user", "content": "What is 2+2?"}]
    generate = ["generate", str(lora_run), "--file", str(questions), "--max-new-tokens", "1"]
    assert_one_line_error(
        *run_cli(capsys, *generate),
        "qa.jsonl:1: a prompt row needs a 'prompt', 'instruction' or 'messages' field (this one has "
        "question, answer); name the column that holds the prompt with --prompt-column NAME",
    )
    assert_one_line_error(
        *run_cli(capsys, *generate, "--prompt-column", "questoin"),
        "--prompt-column questoin: ",
        "qa.jsonl:1 has no such column (its columns: question, answer); did you mean question?",
    )
    assert run_cli(capsys, *generate, "--prompt-column", "question")[0] == 0


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
    out = tmp_path / "adapter"
    code, err = run_cli(capsys, "export", str(lora_run), "--format", "peft", "--out", str(out), "--rank", "2")
    assert_one_line_error(code, err, "--rank 2: this run's method trains one rank; drop --rank")
    assert not out.exists()


def _tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of the TensorBoard event files below `folder`, read from the record format itself
    (length, crc, event proto, crc), not through a tensorboard reader."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_receives_the_losses_metrics_jsonl_holds(tmp_path, tiny_model_dir, qa_jsonl):
    config = tiny_config(
        tiny_model_dir, qa_jsonl, tmp_path / "run", **{"train.max_steps": 4, "train.report_to": "tensorboard"}
    )
    run_dir = train(config).run_dir
    losses = [(r["step"], r["loss"]) for r in _records(run_dir) if "loss" in r]
    logged = _tensorboard_scalars(run_dir / "logs")["train/loss"]
    assert [step for step, _ in logged] == [step for step, _ in losses]
    assert [value for _, value in logged] == pytest.approx([value for _, value in losses], rel=1e-6)


def test_a_tracker_that_is_not_installed_is_named(tmp_path, tiny_model_dir, qa_jsonl):
    from tunelab.errors import TunelabError

    with pytest.raises(
        TunelabError, match="train.report_to.*wandb needs the wandb package: pip install wandb"
    ):
        tiny_config(tiny_model_dir, qa_jsonl, tmp_path / "run", **{"train.report_to": ["wandb"]})


def test_an_alpaca_trained_run_exports_its_own_prompt_format(tmp_path, tiny_model_dir, qa_jsonl, capsys):
    from transformers import AutoTokenizer

    from conftest import assert_one_line_error, run_cli
    from tunelab.data import alpaca_prompt
    from tunelab.gguf_export import modelfile

    config = tiny_config(
        tiny_model_dir, qa_jsonl, tmp_path / "run", **{"train.max_steps": 2, "data.template": "alpaca"}
    )
    run_dir = train(config).run_dir
    export_run(run_dir, "merged", tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    turns = [{"role": "user", "content": "Q: 1+2="}, {"role": "assistant", "content": " 3"}]
    # what a server renders is what the run trained on: the alpaca prompt, the response, end of sequence
    assert (
        tokenizer.apply_chat_template(turns, tokenize=False) == alpaca_prompt("Q: 1+2=", "") + " 3<|im_end|>"
    )
    assert 'TEMPLATE """### Instruction:\n{{ .Prompt }}\n\n### Response:\n"""' in modelfile(
        "m.gguf", tokenizer, "alpaca"
    )
    assert_one_line_error(
        *run_cli(
            capsys,
            "export",
            str(run_dir),
            "--format",
            "peft",
            "--dtype",
            "bf16",
            "--out",
            str(tmp_path / "p"),
        ),
        "--dtype applies to --format merged, not peft",
    )


def test_an_export_is_replaced_only_when_it_holds_nothing_else(lora_run, tmp_path, capsys):
    """A re-run export script: --overwrite replaces the folder an earlier export wrote, never one with a
    file added to it or a folder tunelab did not write."""
    from conftest import assert_one_line_error, run_cli

    out = tmp_path / "adapter"
    command = ["export", str(lora_run), "--format", "peft", "--out", str(out)]
    assert run_cli(capsys, *command)[0] == 0
    assert_one_line_error(*run_cli(capsys, *command), "exists and is not empty", "--overwrite")
    first = (out / "adapter_model.safetensors").stat().st_mtime_ns
    assert run_cli(capsys, *command, "--overwrite")[0] == 0
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns != first
    (out / "notes.txt").write_text("mine")
    assert_one_line_error(
        *run_cli(capsys, *command, "--overwrite"), "holds files tunelab export did not write (notes.txt)"
    )
    assert (out / "notes.txt").read_text() == "mine"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.safetensors").write_text("not an export")
    command[-1] = str(mine)
    assert_one_line_error(*run_cli(capsys, *command, "--overwrite"), "was not written by tunelab export")
    assert (mine / "model.safetensors").read_text() == "not an export"


def test_a_merged_export_in_bf16_is_half_the_size(lora_run, tmp_path):
    from safetensors import safe_open

    export_run(lora_run, "merged", tmp_path / "fp32")
    export_run(lora_run, "merged", tmp_path / "bf16", dtype="bf16")
    sizes = [(tmp_path / kind / "model.safetensors").stat().st_size for kind in ("fp32", "bf16")]
    assert sizes[1] < 0.51 * sizes[0]
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}
    umask = os.umask(0)
    os.umask(umask)
    # readable as the umask says (safetensors itself writes 0600: a server as another user could not read it)
    assert (tmp_path / "bf16" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_eval_on_other_data_uses_the_runs_column_names_where_they_apply(tmp_path, tiny_model_dir, capsys):
    from conftest import run_cli

    data = tmp_path / "qa.csv"
    data.write_text("question,answer\n" + "".join(f"Q: {a}+1=,{a + 1}\n" for a in range(8)))
    columns = {"instruction": "question", "output": "answer"}
    config = tiny_config(
        tiny_model_dir, data, tmp_path / "run", **{"train.max_steps": 2, "data.columns": columns}
    )
    run_dir = train(config).run_dir
    for other in (str(data), "addition:dev"):  # the run's own columns; a dataset without them
        out = tmp_path / "eval.json"
        code, err = run_cli(capsys, "eval", str(run_dir), "--data", other, "--limit", "4", "--json", str(out))
        assert code == 0, err
        assert json.loads(out.read_text())["examples"] == 4


def test_what_the_terminal_shows_while_training(tmp_path, tiny_model_dir, qa_jsonl, capsys):
    import yaml

    from conftest import run_cli

    config = tiny_config(
        tiny_model_dir, qa_jsonl, tmp_path / "run", **{"train.max_steps": 4, "train.log_steps": 2}
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    code, err = run_cli(capsys, "train", str(path))
    assert code == 0, err
    lines = err.splitlines()
    step_lines = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in step_lines] == ["1/4", "2/4", "4/4"]
    assert all(" lr " in line and " tok/s " in line and " eta 0:00:" in line for line in step_lines)
    assert any(
        line.startswith("trained 4 steps in ")
        and "(mean of the last 2 steps); peak memory " in line
        and line.endswith(" GiB")
        for line in lines
    )
    assert any(line.startswith(f"next: tunelab eval {tmp_path / 'run'} | tunelab chat") for line in lines)


def test_time_left_is_not_swung_by_one_suspended_step():
    from datetime import timedelta

    from tunelab.reporting import time_left

    # 2 s steps, one of which spanned an hour's pause: 10 steps left are ~20 s, not ~2 hours
    assert time_left([2.0, 2.0, 3600.0, 2.0, 2.0], 10) == timedelta(seconds=20)
    assert time_left([1.0, 3.0], 4) == timedelta(seconds=8)


def test_a_spiel_export_loads_as_printed_into_the_merged_model(tmp_path, tiny_model_dir, qa_jsonl, capsys):
    """`--format spiel` says how to apply the deltas to the base; run as printed, that gives the very model
    `--format merged` writes."""
    import re

    import transformers

    import tunelab.methods.spiel.method

    method = {"name": "spiel", "num_tunable": 3000, "reselection_steps": 4, "accumulation_steps": 1}
    config = tiny_config(tiny_model_dir, qa_jsonl, tmp_path / "run", method=method, **{"train.lr": 1e-2})
    run_dir = str(train(config).run_dir)
    code, out, err = run_cli_output(
        capsys, "export", run_dir, "--format", "spiel", "--out", str(tmp_path / "s")
    )
    assert code == 0, err
    load = re.search(r"^load it: (.*)$", out, re.M).group(1)
    applied = eval(load, {"tunelab": tunelab, "transformers": transformers})
    code, _, err = run_cli_output(
        capsys, "export", run_dir, "--format", "merged", "--out", str(tmp_path / "m")
    )
    assert code == 0, err
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").state_dict()
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    changed = [name for name, weight in applied.state_dict().items() if not torch.equal(weight, base[name])]
    assert len(changed) == 14  # every linear of the 2 layers
    for name, weight in applied.state_dict().items():
        assert torch.equal(weight, merged[name]), name


def test_a_run_on_one_file_evaluates_on_the_rows_it_held_out(tmp_path, tiny_model_dir, qa_jsonl, capsys):
    """data.holdout: eval during training, `tunelab eval` and `tunelab data` read the same held-out rows
    (also from the file moved), and an eval that would pick other rows of it is refused."""
    from conftest import assert_one_line_error, run_cli, run_cli_output

    overrides = {"data.eval": None, "data.holdout": 0.2, "train.max_steps": 2, "train.eval_steps": 2}
    result = train(tiny_config(tiny_model_dir, qa_jsonl, tmp_path / "run", **overrides))
    evals = [record for record in _records(result.run_dir) if "eval_loss" in record]
    out = tmp_path / "eval.json"
    code, err = run_cli(capsys, "eval", str(result.run_dir), "--json", str(out))
    assert code == 0, err
    report = json.loads(out.read_text())
    assert (report["examples"], report["data"], report["holdout"]) == (13, str(qa_jsonl), 0.2)  # 12.8 of 64
    assert report["loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-6)
    recorded = json.loads((result.run_dir / "holdout.json").read_text())
    assert (recorded["train_rows"], recorded["held_out"]) == (64, 13)
    moved, grown = tmp_path / "moved.jsonl", tmp_path / "grown.jsonl"
    moved.write_text(qa_jsonl.read_text())
    grown.write_text(qa_jsonl.read_text() + '{"prompt": "Q: 9+9=", "completion": " 18"}\n')
    code, err = run_cli(capsys, "eval", str(result.run_dir), f"data.train={moved}", "--json", str(out))
    assert code == 0 and json.loads(out.read_text())["loss"] == report["loss"], err
    for override, message in [
        ("data.holdout=0.5", "data.holdout: the run's eval set is the rows data.holdout=0.2 kept out of"),
        ("data.holdout=null", "data.holdout: the run's eval set is the rows data.holdout=0.2 kept out of"),
        (f"data.train={grown}", "are not the 13 it held out of 64 (the file has 65 now), and may include"),
        (f"data.eval={qa_jsonl}", "data.eval: the run's eval set is the rows data.holdout=0.2 kept out"),
    ]:
        code, err = run_cli(capsys, "eval", str(result.run_dir), override)
        assert_one_line_error(code, err, message)
    for same in (qa_jsonl, moved):  # there, or a copy elsewhere (its rows are those in data.json)
        code, err = run_cli(capsys, "eval", str(result.run_dir), "--data", str(same), "--limit", "2")
        assert code == 0 and "holds the rows the run trained on: these scores include rows it" in err
    code, err = run_cli(capsys, "eval", str(result.run_dir), "--data", str(grown), "--limit", "2")
    assert code == 0 and "trained on" not in err
    # rows held out now of a run that trained on all of its data are no eval set
    overrides = {"data.eval": None, "train.max_steps": 1}
    whole = train(tiny_config(tiny_model_dir, qa_jsonl, tmp_path / "whole", **overrides)).run_dir
    code, err = run_cli(capsys, "eval", str(whole), "data.holdout=0.2")
    assert_one_line_error(code, err, "data.holdout: the run trained on all of data.train, and other rows")
    code, out_text, err = run_cli_output(capsys, "data", str(result.run_dir), "--examples", "0")
    assert code == 0, err
    assert "data.train: " in out_text and "51 rows (13 more held out: data.holdout)" in out_text
    assert f"data.eval: {qa_jsonl} (data.holdout=0.2) — 13 rows" in out_text
    # resumed (a stopped run: no final weights) with a setting that may change, which it says
    shutil.rmtree(result.run_dir / "final")
    config_file = str(result.run_dir / "config.yaml")
    code, out_text, err = run_cli_output(
        capsys, "train", config_file, "--resume", "train.gradient_checkpointing=true"
    )
    note = f"resuming with train.gradient_checkpointing True (auto in {config_file})"
    assert code == 0 and note in out_text + err, out_text + err
    code, err = run_cli(capsys, "train", config_file, "--resume", "--overwrite")
    assert_one_line_error(
        code, err, "--resume continues the run in ", " and --overwrite replaces it; give one"
    )
    # resumed after its file grew, it would train on rows it held out
    shutil.rmtree(result.run_dir / "final")
    qa_jsonl.write_text(grown.read_text())
    code, err = run_cli(capsys, "train", config_file, "--resume")
    assert_one_line_error(
        code,
        err,
        "not the 13 it held out of 64 (the file has 65 now), and may include rows it trained on; put ",
    )
    # the run's data moved since: `tunelab data RUN` says how to name it
    elsewhere = qa_jsonl.rename(tmp_path / "elsewhere.jsonl")
    code, err = run_cli(capsys, "data", str(result.run_dir))
    assert_one_line_error(code, err, "(the run's data.train; moved: data.train=NEWPATH)")
    code, err = run_cli(capsys, "data", str(result.run_dir), f"data.train={elsewhere}", "--examples", "0")
    assert code == 0, err
