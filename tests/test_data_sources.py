"""Data from Hugging Face datasets, column mappings, and the prompt template (chat, alpaca, none)."""

from __future__ import annotations

import json

import pytest

from tunelab.config import DataConfig, load_config
from tunelab.data import IGNORE_INDEX, build_dataset, eval_dataset, train_dataset
from tunelab.errors import TunelabError

ROWS = [{"question": f"Add {a} and {b}.", "answer": str(a + b)} for a in range(3) for b in range(3)]

# Qwen3's pattern: only assistant turns after the last user turn get a (here empty) reasoning block,
# so the conversation up to an earlier assistant turn is not a prefix of the whole conversation
QWEN3_STYLE = (
    "{%- set ns = namespace(last=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' and loop.index0 > ns.last -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from tunelab.models import load_tokenizer

    return load_tokenizer(smollm2_dir)


def _responses(tokenizer, feature) -> list[str]:
    """The trained spans of an example, decoded one by one."""
    spans, current = [], []
    for token, label in zip(feature["input_ids"], feature["labels"], strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans, current = [*spans, current], []
    return [tokenizer.decode(span) for span in [*spans, *([current] if current else [])]]


def _prompt(tokenizer, feature) -> str:
    return tokenizer.decode(
        [t for t, lab in zip(feature["input_ids"], feature["labels"], strict=True) if lab == -100]
    )


@pytest.fixture
def saved_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "my_dataset"
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:4])}).save_to_disk(folder)
    return folder


def test_a_save_to_disk_dataset_dict_with_a_column_mapping(saved_dict, tokenizer):
    options = DataConfig(
        train=str(saved_dict), eval=str(saved_dict), columns={"instruction": "question", "output": "answer"}
    )
    train = train_dataset(options, tokenizer)
    assert (len(train), train.format) == (9, "alpaca")
    assert _responses(tokenizer, train[5]) == ["3<|im_end|>"]  # Add 1 and 2.
    assert len(eval_dataset(options, tokenizer)) == 4  # eval_split unset: the test split


def test_a_save_to_disk_dataset_without_splits(tmp_path, tokenizer):
    from datasets import Dataset

    Dataset.from_list([{"prompt": "2+3=", "completion": " 5"}]).save_to_disk(tmp_path / "one")
    dataset = build_dataset(str(tmp_path / "one"), tokenizer, DataConfig(template="none"))
    assert _responses(tokenizer, dataset[0]) == [" 5<|im_end|>"]


def test_a_folder_whose_files_disagree_names_the_reason(tmp_path, tokenizer):
    """datasets reads a folder of files; its error was 'An error occurred while generating the dataset'."""
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    (folder / "b.jsonl").write_text(json.dumps({"question": "1+2=", "answer": "3"}) + "\n")
    with pytest.raises(
        TunelabError, match=r"could not load it from the folder \(.* because column names don't match\)"
    ):
        build_dataset(str(folder), tokenizer)


def test_a_missing_split_names_the_splits_there_are(saved_dict, tokenizer):
    with pytest.raises(TunelabError, match=r"has splits train, test, not validation; set data.split"):
        train_dataset(DataConfig(train=str(saved_dict), split="validation"), tokenizer)


def test_a_column_mapping_to_a_missing_column_is_named(tmp_path, tokenizer):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    options = DataConfig(train=str(path), columns={"instruction": "query", "output": "answer"})
    with pytest.raises(TunelabError, match=r"qa.jsonl:1: data.columns.instruction names column 'query'"):
        train_dataset(options, tokenizer)


def test_an_unknown_field_in_the_column_mapping_is_a_config_error(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  columns:\n    instructions: question\n")
    with pytest.raises(
        TunelabError,
        match=r"run.yaml:2: .data.columns.: unknown field 'instructions'; did you mean 'instruction'",
    ):
        load_config(config)


def test_a_hub_id_is_left_as_an_id_and_a_missing_file_is_made_absolute(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  train: openai/gsm8k\n  eval: data/missing.jsonl\n")
    loaded = load_config(config)
    assert loaded.data.train == "openai/gsm8k"
    assert loaded.data.eval == str(tmp_path / "data" / "missing.jsonl")


@pytest.mark.parametrize(
    "template, prompt",
    [
        ("auto", "<|im_start|>user\nAdd 2 and 3.\n\nquickly<|im_end|>\n<|im_start|>assistant\n"),
        ("alpaca", "### Instruction:\nAdd 2 and 3.\n\n### Input:\nquickly\n\n### Response:\n"),
        ("none", "Add 2 and 3.\n\nquickly"),
    ],
)
def test_the_template_decides_how_an_instruction_becomes_text(tmp_path, tokenizer, template, prompt):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"instruction": "Add 2 and 3.", "input": "quickly", "output": "5"}) + "\n")
    feature = build_dataset(str(path), tokenizer, DataConfig(template=template))[0]
    assert prompt in _prompt(tokenizer, feature)
    assert _responses(tokenizer, feature)[0].startswith("5<|im_end|>")


def test_chat_needs_a_chat_template(tmp_path, tokenizer):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"prompt": "2+3=", "completion": "5"}) + "\n")
    bare = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(TunelabError, match="data.template: chat needs a tokenizer with a chat template"):
        build_dataset(str(path), bare, DataConfig(template="chat"))
    feature = build_dataset(str(path), bare, DataConfig())[0]  # auto: alpaca
    assert "### Response:" in _prompt(bare, feature)


def test_a_reasoning_template_trains_every_assistant_turn(tmp_path, smollm2_dir):
    from tunelab.models import load_tokenizer

    template = tmp_path / "qwen3-style.jinja"
    template.write_text(QWEN3_STYLE)
    tokenizer = load_tokenizer(smollm2_dir, str(template))
    conversation = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "sum 2 3"},
        {"role": "assistant", "content": "5"},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"messages": conversation}) + "\n")
    feature = build_dataset(str(path), tokenizer)[0]
    assert _responses(tokenizer, feature) == ["hello there<|im_end|>", "<think>\n\n</think>\n\n5<|im_end|>"]
    assert tokenizer.decode(feature["input_ids"]) == tokenizer.apply_chat_template(
        conversation, tokenize=False
    )


@pytest.mark.parametrize(
    "template, message",
    [
        (None, "nope.jinja file not found"),
        ("{% for m in messages %}{{ m.content }", "cannot render a user and an assistant turn"),
        ("{% for m in messages %}{{ m.role }}{% endfor %}", "does not write the assistant's content"),
    ],
)
def test_a_bad_chat_template_file_is_named_not_the_data(smollm2_dir, tmp_path, template, message):
    from tunelab.models import load_tokenizer

    path = tmp_path / "nope.jinja"
    if template is not None:
        path.write_text(template)
    with pytest.raises(TunelabError, match=f"data.chat_template: .*{message}"):
        load_tokenizer(smollm2_dir, str(path))


def test_a_format_the_columns_do_not_have_blames_the_setting(tmp_path, tokenizer):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    with pytest.raises(
        TunelabError, match=r"qa.jsonl:1: data.format=prompt-completion reads prompt, completion"
    ):
        train_dataset(DataConfig(train=str(path), format="prompt-completion"), tokenizer)


def test_the_data_command_shows_rows_lengths_and_trained_tokens(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from tunelab.cli import app
    from tunelab.preview import length_histogram

    rows = [{"instruction": f"Add {a} and 1.", "output": str(a + 1)} for a in range(3)] + [
        {"instruction": "x"}
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\ndata:\n  train: d.jsonl\n  skip_bad_rows: true\n  max_length: 64\n"
    )
    result = CliRunner().invoke(app, ["data", str(config), "--examples", "1"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"data.train: {tmp_path / 'd.jsonl'} — 4 rows, format alpaca, template chat; 3 used" in out
    assert f"skipped: missing field: 1 (first: {tmp_path / 'd.jsonl'}:4)" in out
    assert "[[1<|im_end|>]]" in out  # not a terminal: the trained tokens between markers
    assert "Add 0 and 1.<|im_end|>" in out.split("example 1")[1]
    assert length_histogram([1, 8, 9, 64, 64], 64) == [(1, 8, 2), (9, 16, 1)] + [
        (lo, lo + 7, 0) for lo in range(17, 57, 8)
    ] + [(57, 64, 2)]
    # a data file given alone is checked as data.train of a default config, with the same report
    alone = CliRunner().invoke(
        app,
        [
            "data",
            str(tmp_path / "d.jsonl"),
            f"model={tiny_model_dir}",
            "data.skip_bad_rows=true",
            "data.max_length=64",
            "--examples",
            "1",
        ],
    )
    assert alone.exit_code == 0, alone.output
    assert alone.output == out
    # a run directory: its config.yaml (as `tunelab train RUN_DIR --resume` reads it)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(config.read_text().replace("d.jsonl", "../d.jsonl"))
    assert CliRunner().invoke(app, ["data", str(tmp_path / "run"), "--examples", "1"]).output == out


def test_a_dataset_repository_folder_is_read_by_datasets(tmp_path, tokenizer):
    # a hub dataset cloned with git: data files by split name, no save_to_disk metadata
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    (folder / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS[:3]))
    options = DataConfig(
        train=str(folder), eval=str(folder), columns={"instruction": "question", "output": "answer"}
    )
    assert (len(train_dataset(options, tokenizer)), len(eval_dataset(options, tokenizer))) == (9, 3)
