"""Formats, response masking, and clear errors for bad data files."""

from __future__ import annotations

import json

import pytest

from tunelab.config import DataConfig, dump_config, load_config
from tunelab.data import IGNORE_INDEX, build_dataset, load_rows
from tunelab.errors import TunelabError


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from tunelab.models import load_tokenizer

    return load_tokenizer(smollm2_dir)


def _write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def _trained_text(tokenizer, feature) -> str:
    return tokenizer.decode(
        [t for t, label in zip(feature["input_ids"], feature["labels"], strict=True) if label != IGNORE_INDEX]
    )


@pytest.mark.parametrize(
    "rows, response",
    [
        ([{"instruction": "Add 2 and 3.", "input": "", "output": "5"}], "5<|im_end|>"),
        ([{"instruction": "Add.", "input": "2 and 3", "output": "five"}], "five<|im_end|>"),
        ([{"prompt": "2+3=", "completion": " 5"}], " 5<|im_end|>"),
    ],
)
def test_loss_only_on_the_response(tmp_path, tokenizer, rows, response):
    dataset = build_dataset(str(_write(tmp_path, "d.jsonl", rows)), tokenizer)
    feature = dataset[0]
    assert _trained_text(tokenizer, feature) == response
    assert feature["labels"][0] == IGNORE_INDEX


def test_messages_mask_all_but_assistant_turns(tmp_path, tokenizer):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there"},
                {"role": "user", "content": "sum 2 3"},
                {"role": "assistant", "content": "5"},
            ]
        }
    ]
    dataset = build_dataset(str(_write(tmp_path, "m.jsonl", rows)), tokenizer)
    assert dataset.format == "messages"
    trained = _trained_text(tokenizer, dataset[0])
    assert "hello there" in trained and "5" in trained
    assert "hi" not in trained.replace("hello there", "") and "sum 2 3" not in trained
    full = tokenizer.decode(dataset[0]["input_ids"])
    assert "sum 2 3" in full


def test_text_format_trains_every_token(tmp_path, tokenizer):
    dataset = build_dataset(str(_write(tmp_path, "t.jsonl", [{"text": "plain words here"}])), tokenizer)
    assert dataset[0]["labels"] == dataset[0]["input_ids"]


def test_train_on_prompt(tmp_path, tokenizer):
    path = _write(tmp_path, "p.jsonl", [{"prompt": "2+3=", "completion": " 5"}])
    dataset = build_dataset(str(path), tokenizer, DataConfig(train_on_prompt=True))
    assert dataset[0]["labels"] == dataset[0]["input_ids"]


def test_csv_and_json_files(tmp_path, tokenizer):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("prompt,completion\n1+1=, 2\n2+2=, 4\n")
    assert len(build_dataset(str(csv_path), tokenizer)) == 2
    json_path = tmp_path / "d.json"
    json_path.write_text(json.dumps([{"text": "a"}, {"text": "b"}, {"text": "c"}]))
    assert len(build_dataset(str(json_path), tokenizer)) == 3


def test_tsv_and_compressed_files_read_as_the_plain_file(tmp_path, tokenizer):
    import bz2
    import gzip
    import lzma

    rows = [
        {"instruction": "what is 2+2, say", "output": "4; four"},
        {"instruction": "hi", "output": "hello"},
    ]
    plain = build_dataset(str(_write(tmp_path, "d.jsonl", rows)), tokenizer)
    tsv = tmp_path / "d.tsv"  # commas and semicolons in the cells: a .tsv splits on tabs only
    tsv.write_text("instruction\toutput\n" + "".join(f"{r['instruction']}\t{r['output']}\n" for r in rows))
    files = [tsv]
    for module, suffix in ((gzip, ".gz"), (bz2, ".bz2"), (lzma, ".xz")):
        for source in (tmp_path / "d.jsonl", tsv):
            files.append(source.with_name(source.name + suffix))
            files[-1].write_bytes(module.compress(source.read_bytes()))
    for path in files:
        assert build_dataset(str(path), tokenizer).features == plain.features, path.name
    hidden = tmp_path / "hidden.jsonl"  # gzip under a plain name: said so, not "invalid UTF-8"
    hidden.write_bytes(gzip.compress(b"{}"))
    with pytest.raises(TunelabError, match=r"hidden\.jsonl is gzip-compressed; name it hidden\.jsonl\.gz"):
        build_dataset(str(hidden), tokenizer)
    for suffix in (".gz", ".bz2", ".xz"):
        damaged = tmp_path / f"damaged.jsonl{suffix}"
        damaged.write_bytes(b"not compressed")
        with pytest.raises(TunelabError, match=rf"damaged\.jsonl\{suffix}: cannot decompress as \{suffix}"):
            build_dataset(str(damaged), tokenizer)
    latin1 = tmp_path / "latin1.jsonl.gz"  # iconv is told the text, not the archive
    latin1.write_bytes(gzip.compress('{"text": "caf\u00e9"}\n'.encode("latin-1")))
    with pytest.raises(
        TunelabError, match=r"e\.g\. zcat latin1\.jsonl\.gz \| iconv -f latin1 -t utf-8 > fixed\.jsonl$"
    ):
        build_dataset(str(latin1), tokenizer)


def test_openai_developer_messages_are_system_messages(tmp_path, tokenizer):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    as_system = build_dataset(
        str(_write(tmp_path, "s.jsonl", [{"messages": [{"role": "system", "content": "Be brief."}, *chat]}])),
        tokenizer,
    )
    as_developer = build_dataset(
        str(
            _write(
                tmp_path, "d.jsonl", [{"messages": [{"role": "developer", "content": "Be brief."}, *chat]}]
            )
        ),
        tokenizer,
    )
    assert as_developer.features == as_system.features
    assert "Be brief." in tokenizer.decode(as_developer[0]["input_ids"])


def test_truncation(tmp_path, tokenizer):
    path = _write(tmp_path, "long.jsonl", [{"prompt": "x", "completion": " word" * 100}])
    assert len(build_dataset(str(path), tokenizer, DataConfig(max_length=48))[0]["input_ids"]) == 48


def test_malformed_jsonl_names_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n')
    with pytest.raises(TunelabError, match=r"bad\.jsonl:2: invalid JSON"):
        build_dataset(str(path), tokenizer)


def test_missing_field_names_the_row(tmp_path, tokenizer):
    path = _write(tmp_path, "miss.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    with pytest.raises(TunelabError, match=r"miss\.jsonl:2: row has no 'output' field"):
        build_dataset(str(path), tokenizer)


def test_unknown_columns_and_empty_files(tmp_path, tokenizer):
    with pytest.raises(TunelabError, match="cannot tell the format.*e.g. {instruction: question"):
        build_dataset(str(_write(tmp_path, "odd.jsonl", [{"question": "a"}])), tokenizer)
    (tmp_path / "odd.csv").write_text("question,answer\na,b\n")  # the columns are named on its line 1
    with pytest.raises(
        TunelabError, match=r"odd.csv:1, its header: cannot tell the format from columns \['answer"
    ):
        build_dataset(str(tmp_path / "odd.csv"), tokenizer)
    for name in ("empty.jsonl", "empty.json", "empty.csv"):  # told alike, whatever the type
        (tmp_path / name).write_text("\n")
        with pytest.raises(TunelabError, match=f"{name}: the dataset has no rows"):
            build_dataset(str(tmp_path / name), tokenizer)
    with pytest.raises(TunelabError, match="dataset not found"):
        build_dataset(str(tmp_path / "nope.jsonl"), tokenizer)
    with pytest.raises(TunelabError, match="no example keeps a response token"):
        build_dataset(
            str(_write(tmp_path, "cut.jsonl", [{"prompt": "word " * 50, "completion": "x"}])),
            tokenizer,
            DataConfig(max_length=8),
        )


@pytest.mark.parametrize(
    "row, mapping",
    [  # Dolly; a Q&A sheet's capitals; prompt/response pairs
        (
            {"instruction": "Add", "context": "2 and 3", "response": "5", "category": "math"},
            {"output": "response", "input": "context"},
        ),
        ({"Question": "2+3?", "Answer": "5"}, {"instruction": "Question", "output": "Answer"}),
        ({"prompt": "2+3=", "response": "5"}, {"instruction": "prompt", "output": "response"}),
    ],
)
def test_common_column_names_are_told_the_mapping_that_reads_them(tmp_path, tokenizer, row, mapping):
    import shlex

    path = _write(tmp_path, "rows.jsonl", [row])
    with pytest.raises(TunelabError) as refused:
        build_dataset(str(path), tokenizer)
    told = str(refused.value)
    assert "{" + ", ".join(f"{field}: {column}" for field, column in mapping.items()) + "}" in told
    overrides = shlex.split(told.split("(on the command line: ")[1].removesuffix(")"))
    config = load_config(None, [f"data.train={path}", *overrides])
    assert build_dataset(str(path), tokenizer, config.data).examples[0].reference == "5"


def test_gsm8k_builtin_split():
    train_rows, task = load_rows("gsm8k:train")
    eval_rows, _ = load_rows("gsm8k:eval")
    assert (len(train_rows), len(eval_rows)) == (1119, 200)
    assert not {r["prompt"] for _, r in train_rows} & {r["prompt"] for _, r in eval_rows}
    _, first = eval_rows[0]
    assert "<<" not in first["completion"] and "####" in first["completion"]
    assert task.extract_answer(first["completion"]) is not None
    assert task.extract_answer("so the total is 1,234.0 dollars") == "1234"
    assert task.extract_answer("#### -7") == "-7"
    # dev and test: the two halves of eval (choose on one, report on the other)
    dev_rows, test_rows = load_rows("gsm8k:dev")[0], load_rows("gsm8k:test")[0]
    assert [r for _, r in dev_rows + test_rows] == [r for _, r in eval_rows] and len(dev_rows) == 100
    with pytest.raises(TunelabError, match="unknown split 'valid'; use gsm8k:train, gsm8k:eval, gsm8k:dev"):
        load_rows("gsm8k:valid")


def test_a_large_dataset_says_it_is_being_tokenized(tmp_path, tokenizer, capfd, monkeypatch):
    """40,000 rows took a minute to tokenize in silence; off a terminal one line says what is going on
    (a terminal gets a progress bar), and the examples are the same as without it."""
    from tunelab.data import PROGRESS_ROWS

    path = tmp_path / "big.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"{i}+1=", "completion": f"{i + 1}"}) + "\n" for i in range(PROGRESS_ROWS)
        )
    )
    shown = build_dataset(str(path), tokenizer, DataConfig(train=str(path)))
    assert capfd.readouterr().err.splitlines() == [f"tokenizing {PROGRESS_ROWS} rows of {path} ..."]
    small = build_dataset(str(path), tokenizer, DataConfig(train=str(path)), limit=PROGRESS_ROWS - 1)
    assert capfd.readouterr().err == ""  # fewer rows: no line
    assert [shown[i]["input_ids"] for i in range(len(small))] == [
        small[i]["input_ids"] for i in range(len(small))
    ]
    monkeypatch.setenv("RANK", "1")  # under accelerate launch, the first process alone says it
    build_dataset(str(path), tokenizer, DataConfig(train=str(path)))
    assert capfd.readouterr().err == ""


def test_a_bad_row_at_the_end_of_a_large_file_is_found_before_any_tokenizing(tmp_path, tokenizer, capfd):
    """It was found after every row before it had been tokenized: 40 s into a 40,000-row file."""
    from tunelab.data import PROGRESS_ROWS

    path = tmp_path / "big.jsonl"
    rows = [{"prompt": f"{i}+1=", "completion": f"{i + 1}"} for i in range(PROGRESS_ROWS)] + [{"prompt": "x"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(TunelabError, match=rf"{path}:{PROGRESS_ROWS + 1}: row has no 'completion' field"):
        build_dataset(str(path), tokenizer, DataConfig(train=str(path)))
    assert "tokenizing" not in capfd.readouterr().err


def test_segments_tokenized_in_batches_are_tokenized_as_one_by_one(tokenizer):
    """tokenize_examples batches every segment of many examples: the ids are those of a call per segment
    (special tokens only at an example's start), empty segments and cuts included."""
    from tunelab.data import adds_special_tokens, tokenize_examples

    examples = [
        [("Q: 1+1=", False), ("2", True)],
        [("", False), ("only a response", True), ("", False)],
        [(f"{tokenizer.bos_token or ''}starts with the template's own BOS", False), (" yes", True)],
        [("a long prompt " * 20, False), ("cut", True)],
    ]
    batched = tokenize_examples(examples, tokenizer, max_length=32, train_on_prompt=False)
    for segments, (feature, cut) in zip(examples, batched, strict=True):
        ids, labels = [], []
        for position, (text, is_response) in enumerate(segments):
            special = position == 0 and adds_special_tokens(tokenizer, text)
            segment_ids = tokenizer(text, add_special_tokens=special)["input_ids"]
            ids += segment_ids
            labels += segment_ids if is_response else [IGNORE_INDEX] * len(segment_ids)
        assert feature == {"input_ids": ids[:32], "labels": labels[:32]} and cut == (len(ids) > 32)
    assert batched[3][1] and not batched[0][1]


def test_holdout_keeps_a_seeded_share_of_the_training_rows_out_for_eval(tmp_path, tokenizer):
    from tunelab.data import eval_dataset, holdout_indices, train_dataset

    # the first rows of numpy's default_rng(0).permutation(n), in file order: the same in every run
    assert holdout_indices(10, 0.3) == holdout_indices(10, 3) == [2, 4, 6]
    assert holdout_indices(64, 0.1) == [8, 16, 23, 27, 36, 44]  # 6.4 rows rounded
    assert holdout_indices(5, 0.01) == [2]  # at least one
    path = _write(tmp_path, "all.jsonl", [{"prompt": f"Q{i}", "completion": f" {i}"} for i in range(10)])
    options = load_config(None, [f"data.train={path}", "data.holdout=30%"]).data
    held, trained = eval_dataset(options, tokenizer), train_dataset(options, tokenizer)
    assert [example.reference for example in held.examples] == [" 2", " 4", " 6"]
    assert [example.reference for example in trained.examples] == [f" {i}" for i in (0, 1, 3, 5, 7, 8, 9)]
    assert options.eval_name == f"{path} (data.holdout=0.3)"
    # a built-in's own eval split is not added beside the held-out rows
    assert load_config(None, ["data.train=gsm8k:train", "data.holdout=0.1"]).data.eval is None
    with pytest.raises(TunelabError, match=r"data.holdout=10 keeps 10 of data.train's 10 rows for eval"):
        train_dataset(options.model_copy(update={"holdout": 10}), tokenizer)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.holdout=1.5"], "data.holdout=1.5: 'data.holdout': 1.5 is neither a share of the rows"),
        (
            ["data.holdout=0"],
            "'data.holdout': 0 is neither a share of the rows, below 1 (e.g. 0.1 or 10%), nor a co",
        ),
        (["data.holdout=ten"], "'data.holdout': ten is neither a share of the rows"),
        (["data.holdout=100%"], "'data.holdout': 100% keeps all the rows out; a share is below 1 (e.g. 0.1"),
        (["data.holdout=1.0"], "'data.holdout': 1.0 keeps all the rows out; a share is below 1 (e.g. 0.1"),
        (["data.holdout=inf"], "'data.holdout': inf is neither a share of the rows"),
        (
            ["data.eval=gsm8k:eval", "data.holdout=0.1"],
            "override data.holdout=0.1: data.holdout keeps rows of data.train out as the eval set, and "
            "data.eval names another (gsm8k:eval); keep one of the two",
        ),
    ],
)
def test_holdout_takes_a_share_or_a_count_and_no_eval_set_beside_it(overrides, message):
    with pytest.raises(TunelabError) as caught:
        load_config(None, overrides)
    assert message in str(caught.value)


def test_a_holdout_count_stays_a_count_in_the_saved_config():
    saved = {
        value: dump_config(load_config(None, [f"data.holdout={value}"])) for value in ("200", "10%", "0.1")
    }
    assert "holdout: 200\n" in saved["200"]
    assert "holdout: 0.1\n" in saved["0.1"] and saved["10%"] == saved["0.1"]


def test_an_eval_set_given_beside_a_configs_holdout_is_told_how_to_drop_that(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  holdout: 0.1\n")
    with pytest.raises(TunelabError) as caught:
        load_config(config, ["data.eval=gsm8k:eval"])
    assert str(caught.value).startswith("override data.eval=gsm8k:eval: data.holdout keeps rows")
    assert str(caught.value).endswith(
        "keep one of the two; data.holdout=null drops the config's data.holdout"
    )
