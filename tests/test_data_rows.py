"""Nothing silent: every data format scores a perfect answer as exact, malformed rows are errors naming
file:line (or skipped and counted), truncation is reported, and files as people save them are read."""

from __future__ import annotations

import json

import pytest

from conftest import assert_one_line_error, run_cli, tiny_config
from tunelab.config import DataConfig, load_config, validate
from tunelab.data import IGNORE_INDEX, build_dataset, load_rows
from tunelab.errors import TunelabError
from tunelab.evaluate import score_exact_match


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from tunelab.models import load_tokenizer

    return load_tokenizer(smollm2_dir)


def _jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _response_ids(feature) -> list[int]:
    pairs = zip(feature["input_ids"], feature["labels"], strict=True)
    return [token for token, label in pairs if label != IGNORE_INDEX]


FORMATS = {
    "alpaca": [
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Add.", "input": 123, "output": 42},  # numbers are text as written
    ],
    "prompt-completion": [{"prompt": "2+3=", "completion": " 5\nbecause 2+3 is 5"}],
    "messages": [
        {"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": "Hello there", "weight": 0},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": [{"type": "text", "text": "4"}]},
            ]
        },
    ],
    "sharegpt": [
        {"conversations": [{"from": "human", "value": "2+3?"}, {"from": "gpt", "value": "5"}]},
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello there", "weight": 0},
                {"from": "human", "value": "2+2?"},
                {"from": "gpt", "value": "4"},
            ]
        },
    ],
    "text": [{"text": "The answer is 5."}],
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_the_training_responses_themselves_score_exact_match_one(tmp_path, tokenizer, fmt):
    dataset = build_dataset(str(_jsonl(tmp_path, FORMATS[fmt])), tokenizer, DataConfig(max_length=256))
    # decoded as generation decodes them
    responses = [tokenizer.decode(_response_ids(f), skip_special_tokens=True) for f in dataset.features]
    assert score_exact_match(dataset, responses) == 1.0
    assert score_exact_match(dataset, ["something else"] * len(responses)) == 0.0


def test_messages_weight_zero_turns_are_not_trained_and_parts_are_joined(tmp_path, tokenizer):
    dataset = build_dataset(str(_jsonl(tmp_path, FORMATS["messages"][1:])), tokenizer)
    feature = dataset.features[0]
    trained = tokenizer.decode(_response_ids(feature))
    assert trained == "4<|im_end|>" and "Hello there" in tokenizer.decode(feature["input_ids"])
    assert dataset.examples[0].reference == "4"


def test_sharegpt_trains_exactly_what_the_same_messages_would(tmp_path, tokenizer):
    """A JSON array of ShareGPT conversations is detected and read as the equivalent OpenAI messages."""
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(FORMATS["sharegpt"]))
    sharegpt = build_dataset(str(path), tokenizer)
    assert sharegpt.format == "sharegpt"
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    as_messages = [
        {"messages": [{**t, "role": roles[t["from"]], "content": t["value"]} for t in row["conversations"]]}
        for row in FORMATS["sharegpt"]
    ]
    for row in as_messages:
        for turn in row["messages"]:
            del turn["from"], turn["value"]
    messages = build_dataset(str(_jsonl(tmp_path, as_messages)), tokenizer)
    assert sharegpt.features == messages.features
    assert "Hello there" in tokenizer.decode(sharegpt.features[1]["input_ids"])
    assert tokenizer.decode(_response_ids(sharegpt.features[1])) == "4<|im_end|>"  # weight 0 not trained


def test_chat_turns_in_either_shape_under_either_key_train_the_same(tmp_path, tokenizer):
    """Hub datasets keep {role, content} turns under 'conversations' and {from, value} under 'messages'."""
    turns = [("user", "human", "2+2?"), ("assistant", "gpt", "4")]
    openai = [{"role": role, "content": text} for role, _, text in turns]
    sharegpt = [{"from": speaker, "value": text} for _, speaker, text in turns]
    rows = [
        {"messages": openai},
        {"messages": sharegpt},
        {"conversations": openai},
        {"conversations": sharegpt},
    ]
    features = [
        build_dataset(str(_jsonl(tmp_path, [row], f"{i}.jsonl")), tokenizer).features
        for i, row in enumerate(rows)
    ]
    assert all(each == features[0] for each in features)
    no_from = _jsonl(tmp_path, [{"conversations": [{"speaker": "human", "text": "hi"}]}], "odd.jsonl")
    with pytest.raises(TunelabError, match="turn 1 has no 'from' \\(its keys: speaker, text\\)"):
        build_dataset(str(no_from), tokenizer)


def test_chat_rows_from_parquet_read_as_the_same_rows_in_json_lines(tmp_path, tokenizer):
    """Arrow gives every turn every key some turn has: weight None where a turn had none."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    turns = [("user", "2+2?"), ("assistant", "3"), ("user", "sure?"), ("assistant", "4")]
    messages = [{"role": role, "content": text} for role, text in turns]
    messages[1]["weight"] = 0  # the only turn with a weight
    rows = [{"messages": messages}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    assert pa.Table.from_pylist(rows).to_pylist()[0]["messages"][0]["weight"] is None
    from_parquet = build_dataset(str(tmp_path / "chat.parquet"), tokenizer)
    assert from_parquet.features == build_dataset(str(_jsonl(tmp_path, rows)), tokenizer).features


def test_a_conversation_that_opens_with_the_assistant_trains_the_replies_after_it(tmp_path, tokenizer):
    """Real ShareGPT dumps often start with the assistant's greeting: it answers nothing, so it is the
    prompt's; the conversation failed with "Cannot apply chat template to an empty conversation"."""
    turns = [("assistant", "Hi! How can I help?"), ("user", "2+2?"), ("assistant", "4")]
    row = {"messages": [{"role": role, "content": text} for role, text in turns]}
    dataset = build_dataset(str(_jsonl(tmp_path, [row])), tokenizer)
    assert tokenizer.decode(_response_ids(dataset.features[0])) == "4<|im_end|>"
    assert "Hi! How can I help?" in dataset.examples[0].prompt and dataset.examples[0].reference == "4"
    greeting_only = _jsonl(tmp_path, [{"messages": row["messages"][:1]}], "greeting.jsonl")
    with pytest.raises(TunelabError, match="no assistant turn to train on"):
        build_dataset(str(greeting_only), tokenizer)


def test_numbers_are_kept_in_the_prompt(tmp_path, tokenizer):
    dataset = build_dataset(
        str(_jsonl(tmp_path, FORMATS["alpaca"][1:])), tokenizer, DataConfig(template="alpaca")
    )
    assert "### Input:\n123" in dataset.examples[0].prompt and dataset.examples[0].reference == "42"


BAD_ROWS = [
    ({"instruction": "x", "output": None}, "field 'output' is null", "null field"),
    ({"instruction": "x", "output": ["a"]}, "must be text, got list", "non-text field"),
    ({"prompt": "x"}, "no 'completion' field", "missing field"),
    (
        {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        "has role 'human'",
        "unknown role",
    ),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn", "no assistant turn"),
    (
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]},
        "turn 2 has from 'bot'; ShareGPT speakers are system, human",
        "unknown role",
    ),
    (
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]},
        "turn 2 has no 'value'",
        "message without content",
    ),
    (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a", "weight": 2}]},
        "weight must be 0 or 1",
        "bad weight",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [{"type": "function"}]},
            ]
        },
        "chat template cannot render",
        "tool calls unsupported",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
                {"role": "assistant", "content": "a"},
            ]
        },
        "only text content parts",
        "non-text content",
    ),
]


@pytest.mark.parametrize(("row", "message", "reason"), BAD_ROWS)
def test_a_malformed_row_is_an_error_naming_file_and_line_or_is_skipped_and_counted(
    tmp_path, tokenizer, capsys, row, message, reason
):
    good = {"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]}
    if "conversations" in row:
        good = FORMATS["sharegpt"][0]
    elif "messages" not in row:
        good = FORMATS["alpaca"][0] if "instruction" in row else FORMATS["prompt-completion"][0]
    path = _jsonl(tmp_path, [good, row, row])
    with pytest.raises(TunelabError, match=rf"{path}:2: .*{message}.*data.skip_bad_rows=true"):
        build_dataset(str(path), tokenizer)
    dataset = build_dataset(str(path), tokenizer, DataConfig(skip_bad_rows=True))
    assert len(dataset) == 1
    summary = capsys.readouterr().err.replace("\n", "")
    assert f"1 of 3 rows used; 2 skipped: {reason} (first: {path}:2)" in summary


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])  # JSON lines in a .json file too
def test_a_line_that_is_no_json_object_is_an_error_or_is_skipped_and_counted(
    tmp_path, tokenizer, capsys, suffix
):
    path = tmp_path / f"rows{suffix}"
    path.write_text('{"q": "2+3?", "a": "5"}\n{"q": "1+1?", a: 2}\n[1, 2]\n{"q": "2+2?", "a": "4"}\n')
    options = DataConfig(columns={"instruction": "q", "output": "a"})
    with pytest.raises(TunelabError, match=rf"{path}:2: invalid JSON .*, or set data.skip_bad_rows=true"):
        build_dataset(str(path), tokenizer, options)
    dataset = build_dataset(str(path), tokenizer, options.model_copy(update={"skip_bad_rows": True}))
    assert [example.reference for example in dataset.examples] == ["5", "4"]
    limited = build_dataset(str(path), tokenizer, options.model_copy(update={"skip_bad_rows": True}), limit=2)
    assert [example.reference for example in limited.examples] == ["5", "4"]  # 2 rows, not 2 lines
    summary = capsys.readouterr().err.replace("\n", "")
    assert (
        f"2 of 4 rows used; 1 skipped: invalid JSON (first: {path}:2); 1 skipped: not a JSON object"
        in summary
    )
    if suffix == ".json":  # a pretty-printed document with a typo is broken whole, not lines to skip
        path.write_text('{\n  "rows": [\n    {"q": "a", "a": "b"}\n    {"q": "c", "a": "d"}\n  ]\n}\n')
        with pytest.raises(TunelabError, match=rf"{path}:4: invalid JSON"):
            build_dataset(str(path), tokenizer, options.model_copy(update={"skip_bad_rows": True}))
        return
    path.write_text("{x\n[1]\n")
    with pytest.raises(
        TunelabError, match=rf"{path}:1: no line holds a row \(2 skipped as bad, the first for"
    ):
        build_dataset(str(path), tokenizer, DataConfig(skip_bad_rows=True))


def test_an_empty_response_is_kept_and_counted(tmp_path, tokenizer, capsys):
    path = _jsonl(tmp_path, [FORMATS["alpaca"][0], {"instruction": "hi", "output": ""}])
    assert len(build_dataset(str(path), tokenizer)) == 2
    summary = capsys.readouterr().err.replace("\n", "")
    assert (
        f"2 of 2 rows used; 1 with an empty response (only its end token is a target) (first: {path}:2)"
        in summary
    )


def test_truncated_and_dropped_rows_are_counted(tmp_path, tokenizer, capsys):
    long_prompt = {"prompt": "word " * 80, "completion": " 5"}  # the response lies beyond max_length
    long_answer = {"prompt": "2+3=", "completion": " five" * 80}  # kept, cut short
    path = _jsonl(tmp_path, [FORMATS["prompt-completion"][0], long_prompt, long_answer, long_prompt])
    dataset = build_dataset(str(path), tokenizer, DataConfig(max_length=32, template="none"))
    assert len(dataset) == 2
    summary = capsys.readouterr().err.replace("\n", "")
    assert "2 of 4 rows used" in summary
    assert f"2 dropped: response beyond data.max_length=32 (first: {path}:2)" in summary
    assert f"1 truncated to data.max_length=32 (first: {path}:3)" in summary


def test_files_as_people_save_them(tmp_path, tokenizer):
    bom = tmp_path / "excel.csv"  # Excel's "CSV UTF-8" starts with a byte-order mark
    bom.write_bytes("\ufeffprompt,completion\n2+3=, 5\n".encode())
    assert build_dataset(str(bom), tokenizer).examples[0].reference == " 5"
    semicolons = tmp_path / "european.csv"
    semicolons.write_text('instruction;input;output\n"Add; then stop";2,5;7,5\n')
    example = build_dataset(str(semicolons), tokenizer).examples[0]
    assert "Add; then stop" in example.prompt and "2,5" in example.prompt and example.reference == "7,5"
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("prompt,completion\n1+1=,2\n1+2=,3,extra\n")
    with pytest.raises(TunelabError, match=rf"{ragged}:3: row has 3 cells, the header has 2; quote"):
        build_dataset(str(ragged), tokenizer)
    short = tmp_path / "short.csv"  # a cell left out: its count, and no advice about quoting
    short.write_text("prompt,completion\n1+1=,2\n2+2=\n1+2=,3\n")
    with pytest.raises(TunelabError, match=rf"{short}:3: row has 1 cells, the header has 2; fill in"):
        build_dataset(str(short), tokenizer)
    # both are bad rows that data.skip_bad_rows skips
    for path, kept_references in ((ragged, ["2"]), (short, ["2", "3"])):
        kept = build_dataset(str(path), tokenizer, DataConfig(skip_bad_rows=True), quiet=True)
        assert [example.reference for example in kept.examples] == kept_references
        assert kept.report.counts == {"skipped: wrong number of cells": 1}
    # Excel: CRLF line ends, also inside a quoted cell of several lines; the row after it still named
    # by the line it starts on
    multiline = tmp_path / "multiline.csv"
    multiline.write_bytes(b'prompt,completion\r\n"Sum:\r\n1+1=","2\r\nexactly"\r\n1+2=,3,extra\r\n')
    with pytest.raises(TunelabError, match=rf"{multiline}:5: row has 3 cells"):
        build_dataset(str(multiline), tokenizer)
    multiline.write_bytes(multiline.read_bytes().replace(b",extra", b""))
    dataset = build_dataset(str(multiline), tokenizer)
    assert dataset.examples[0].reference == "2\nexactly" and "\r" not in dataset.examples[0].prompt
    assert [where for where, _ in load_rows(str(multiline))[0]] == [f"{multiline}:2", f"{multiline}:5"]
    # a JSON object holding the rows beside other keys; JSON lines with the array's commas left in
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 2, "data": [{"prompt": "1+1=", "completion": "2"}]}))
    assert build_dataset(str(wrapped), tokenizer).examples[0].reference == "2"
    commas = tmp_path / "commas.jsonl"
    commas.write_text('{"prompt": "1+1=", "completion": "2"},\n{"prompt": "1+2=", "completion": "3"}\n')
    with pytest.raises(TunelabError, match=rf"{commas}:1: invalid JSON \(Extra data\); remove the ',' after"):
        build_dataset(str(commas), tokenizer)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
def test_invalid_utf8_names_file_line_and_byte(tmp_path, capsys, tiny_model_dir, suffix):
    path = tmp_path / f"latin1{suffix}"
    header = {".jsonl": b"", ".csv": b"prompt,completion\n", ".json": b"[\n"}[suffix]
    path.write_bytes(header + b'{"prompt": "caf\xe9", "completion": "x"}\n')
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {{train: {path.name}}}\n")
    code, err = run_cli(capsys, "train", str(config), f"output_dir={tmp_path / 'out'}")
    line = 2 if suffix in (".csv", ".json") else 1
    assert_one_line_error(code, err, f"{path}:{line}: not valid UTF-8 (byte 0xe9 at column ", "iconv")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "text, encoding, advice",
    [
        ('{"prompt": "café", "completion": "x"}\n', "latin-1", "iconv -f latin1 -t utf-8 data.jsonl"),
        # Excel's CSV on Windows: – “ ” € are bytes 0x80-0x9f, which latin1 reads as control characters
        ('{"prompt": "“café” – 5 €", "completion": "x"}\n', "cp1252", "iconv -f CP1252 -t utf-8 data.jsonl"),
        # PowerShell's and Notepad's "Unicode", with its byte-order mark and without
        ('{"prompt": "café", "completion": "x"}\n' * 3, "utf-16", "UTF-16 text (as PowerShell and Notepad's"),
        ('{"prompt": "café", "completion": "x"}\n', "utf-16-le", "iconv -f UTF-16LE -t utf-8 data.jsonl"),
        # UTF-8 but for one stray byte: converting it all would garble the right characters
        (
            '{"prompt": "“café”", "completion": "x"}\n',
            "utf-8",
            "the rest is UTF-8: retype the character there",
        ),
    ],
)
def test_text_that_is_not_utf8_gets_the_conversion_that_reads_it(tmp_path, tokenizer, text, encoding, advice):
    path = tmp_path / "data.jsonl"
    path.write_bytes(text.encode(encoding) + (b"\xe9\n" if encoding == "utf-8" else b""))
    with pytest.raises(TunelabError) as caught:
        build_dataset(str(path), tokenizer)
    assert advice in str(caught.value)


def test_data_columns_apply_to_an_eval_file_that_has_those_columns(tmp_path, tokenizer):
    """Training rows that need a mapping beside an eval file in chat format: the mapping named a column
    the eval file does not have, and training stopped."""
    from tunelab.data import eval_dataset

    train = _jsonl(tmp_path, [{"question": "1+1=", "answer": "2"}], "train.jsonl")
    chat = _jsonl(
        tmp_path,
        [{"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]}],
        "chat.jsonl",
    )
    options = DataConfig(
        train=str(train), eval=str(chat), columns={"prompt": "question", "completion": "answer"}
    )
    assert eval_dataset(options, tokenizer).examples[0].reference == "2"
    like_train = options.model_copy(update={"eval": str(train)})  # an eval file like the training data
    assert eval_dataset(like_train, tokenizer).examples[0].reference == "2"


def test_eval_set_is_what_the_user_named(tmp_path):
    assert DataConfig().eval == "gsm8k:eval"
    assert DataConfig(train="addition:train").eval == "addition:eval"
    assert DataConfig(train="mine.jsonl").eval is None  # never another task than the user's
    assert DataConfig(train="gsm8k:train", eval=None).eval is None
    assert load_config(None, ["data.train=mine.jsonl"]).data.eval is None


def test_config_mistakes_get_clear_errors(tmp_path, capsys, tiny_model_dir, qa_jsonl):
    config = load_config(None, ["method.name=lora", "method.target_modules=q_proj, v_proj"])
    assert config.method.target_modules == ["q_proj", "v_proj"]
    path = tmp_path / "run.yaml"
    path.write_text("method:\n  name: lora\n  r: 8\n")
    with pytest.raises(TunelabError, match=r"^override method.r=0: 'method.r'"):  # not the file's line 3
        load_config(path, ["method.r=0"])
    with pytest.raises(TunelabError, match="'train.max_steps': 0 trains nothing"):
        load_config(None, ["train.max_steps=0"])
    too_long = tiny_config(tiny_model_dir, qa_jsonl, tmp_path / "x", **{"data.max_length": 4096})
    path.write_text(json.dumps(too_long.model_dump(mode="json")))
    code, err = run_cli(capsys, "train", str(path))
    assert_one_line_error(code, err, "data.max_length=4096 is beyond the model's 512 positions")
    assert validate({"train": {"max_steps": -1}}).train.max_steps == -1


def test_the_summary_line_shows_names_as_written(tokenizer, capsys):
    build_dataset("addition:eval", tokenizer, DataConfig(max_length=48))  # `:eval:` is no emoji code
    assert "data addition:eval: " in capsys.readouterr().err


def test_mistakes_in_a_config_file_are_errors(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(TunelabError, match=r"empty.yaml: the file is empty"):
        load_config(empty)
    twice = tmp_path / "twice.yaml"
    twice.write_text("train: {max_steps: 10}\nmethod: lora\ntrain: {lr: 1e-3}\n")
    with pytest.raises(TunelabError, match=r"twice.yaml:3: key 'train' appears twice \(also on line 1\)"):
        load_config(twice)


def test_data_mistakes_get_the_right_advice(tmp_path, tokenizer):
    allbad = _jsonl(tmp_path, [{"instruction": "x", "output": None}] * 3)
    with pytest.raises(TunelabError, match=r"no usable row \(.*3 skipped: null field") as caught:
        build_dataset(str(allbad), tokenizer, DataConfig(skip_bad_rows=True))
    assert "raise data.max_length" not in str(caught.value)
    array = tmp_path / "rows.json"
    array.write_text('[\n  {"prompt": "a", "completion": "b"},\n]\n')
    with pytest.raises(TunelabError, match=rf"{array}:3: invalid JSON"):
        build_dataset(str(array), tokenizer)


def test_data_as_a_new_user_mistakes_it(tmp_path, tokenizer, capsys):
    # every response empty (the wrong column): nothing to learn, though each row alone is allowed
    empty = _jsonl(tmp_path, [{"prompt": f"{i}+1=", "completion": ""} for i in range(3)], "empty.jsonl")
    with pytest.raises(TunelabError, match=rf"every response is empty \(3 rows, the first {empty}:1\)"):
        build_dataset(str(empty), tokenizer)
    # a spreadsheet's empty rows at the end are no examples
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("prompt,completion\n1+1=,2\n,\n , \n")
    assert len(build_dataset(str(sheet), tokenizer)) == 1
    # a split named for one file: it was read whole without a word (a sweep's base may name a split
    # that only its hub datasets have: said, not refused)
    build_dataset(str(sheet), tokenizer, split="test")
    assert (
        f"note: data.split=test does not apply to '{sheet}', which has no splits" in capsys.readouterr().err
    )
    with pytest.raises(TunelabError, match="is a URL; tunelab reads local files and hub datasets"):
        build_dataset("https://example.com/train.jsonl", tokenizer)
    workbook = tmp_path / "data.xlsx"
    workbook.write_bytes(b"PK\x03\x04")
    with pytest.raises(
        TunelabError, match="unsupported file type '.xlsx'.*; save a spreadsheet as 'CSV UTF-8'"
    ):
        build_dataset(str(workbook), tokenizer)


def test_the_rows_digest_of_a_moved_file_with_a_bad_line_is_the_same(tmp_path):
    """A bad line kept by data.skip_bad_rows is hashed by its reason, not its message (which names the
    file): a moved copy is known as the same rows."""
    from tunelab.data import rows_digest

    text = '{"prompt": "1+1=", "completion": "2"}\n{not json\n'
    digests = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "qa.jsonl").write_text(text)
        rows = load_rows(str(tmp_path / folder / "qa.jsonl"), DataConfig(skip_bad_rows=True))[0]
        digests.append(rows_digest(rows))
    assert len(rows) == 2 and digests[0] == digests[1]
