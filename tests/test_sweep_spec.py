"""Sweep spec loading, expansion (grid × zip × datasets), config ids and error messages."""

import hashlib
import json
import sqlite3
import textwrap
from contextlib import closing
from pathlib import Path

import pytest

from tunelab.errors import TunelabError
from tunelab.hpsearch.spec import config_id, expand, load_spec

DATASETS = """
datasets:
  - {name: add, train: "addition:train", eval: "addition:eval", metric: exact_match}
  - {name: rev, train: "reverse:train", eval: "reverse:eval", metric: loss}
"""


def write(tmp_path, text, name="sweep.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_grid_times_zip_times_datasets(tmp_path):
    write(tmp_path, "method: {name: lora, dropout: 0.0}\ntrain: {seed: 7}\n", "base.yaml")
    path = write(
        tmp_path,
        textwrap.dedent("""
        base: base.yaml
        grid:
          train.lr: [1.0e-4, 2.0e-4]
          train.epochs: [1, 2]
        zip:
          - {method.r: [4, 8, 16], method.alpha: [8, 16, 32]}
        """)
        + DATASETS,
    )
    trials = expand(load_spec(path))
    assert len(trials) == 2 * 2 * 3 * 2
    # points in product order (last factor fastest), datasets innermost
    first, second = trials[0], trials[1]
    assert (first.dataset, first.metric, second.dataset, second.metric) == (
        "add",
        "exact_match",
        "rev",
        "loss",
    )
    assert first.config_id == second.config_id
    assert first.config["train"]["lr"] == 1e-4 and first.config["train"]["epochs"] == 1
    assert first.config["method"] == {
        "name": "lora", "r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all-linear",
    }  # fmt: skip
    assert first.config["train"]["seed"] == 7  # from the base file
    assert (first.config["data"]["train"], first.config["data"]["eval"]) == (
        "addition:train",
        "addition:eval",
    )
    assert (second.config["data"]["train"], second.config["data"]["eval"]) == (
        "reverse:train",
        "reverse:eval",
    )
    assert first.config["name"] == f"add-{first.config_id}-s{first.seed}"
    # the zip group moves r and alpha together
    assert [(t.config["method"]["r"], t.config["method"]["alpha"]) for t in trials[:6:2]] == [
        (4, 8.0), (8, 16.0), (16, 32.0),
    ]  # fmt: skip
    last = trials[-1].config
    assert (last["train"]["lr"], last["train"]["epochs"], last["method"]["r"]) == (2e-4, 2, 16)
    assert len({trial.config_id for trial in trials}) == 12


def test_inline_base_and_no_grid_gives_one_point(tmp_path):
    path = write(tmp_path, "base: {method: full, train: {lr: 1.0e-5}}\n" + DATASETS)
    trials = expand(load_spec(path))
    assert len(trials) == 2
    assert trials[0].config["method"] == {"name": "full"}
    assert trials[0].config["train"]["lr"] == 1e-5


def test_method_shorthand_in_base_keeps_its_name(tmp_path):
    path = write(tmp_path, "base: {method: dylora}\ngrid: {method.r: [16]}\n" + DATASETS)
    method = expand(load_spec(path))[0].config["method"]
    assert (method["name"], method["r"]) == ("dylora", 16)


def test_a_grid_over_method_keys_alone_tunes_the_default_method(tmp_path):
    trials = expand(load_spec(write(tmp_path, "grid: {method.r: [4, 16]}\n" + DATASETS)))
    methods = [(trial.config["method"]["name"], trial.config["method"]["r"]) for trial in trials[::2]]
    assert methods == [("lora", 4), ("lora", 16)]


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.tsv", "rows.jsonl.gz", "rows.CSV"])
def test_a_data_file_given_as_the_spec_is_named_as_such(tmp_path, name):
    with pytest.raises(
        TunelabError, match=rf"{name} is a data file, not a sweep spec: list it under datasets"
    ):
        load_spec(write(tmp_path, '{"prompt": "1+1=", "completion": "2"}\n', name=name))


def test_config_id_is_sha256_of_sorted_json_without_placement_keys():
    config = {
        "train": {"lr": 1e-4, "epochs": 1.0},
        "method": {"name": "lora", "r": 8},
        "data": {"max_length": 64},
    }
    expected = hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[
        :12
    ]
    assert config_id(config) == expected
    reordered = {
        "method": {"r": 8, "name": "lora"},
        "data": {"max_length": 64},
        "train": {"epochs": 1.0, "lr": 1e-4},
    }
    assert config_id(reordered) == expected
    placed = {
        **config,
        "name": "x",
        "output_dir": "runs/x",
        "data": {"max_length": 64, "train": "a", "eval": "b"},
    }
    assert config_id(placed) == expected
    assert config_id({**config, "train": {"lr": 2e-4, "epochs": 1.0}}) != expected
    assert config_id({**config, "data": {"max_length": 128}}) != expected


def test_a_key_added_later_keeps_the_ids_at_its_default():
    config = {"train": {"lr": 1e-4}, "method": {"name": "lora"}}
    before = config_id(config)  # as a tunelab without train.keep_checkpoints resolved it
    assert config_id({**config, "train": {"lr": 1e-4, "keep_checkpoints": 0}}) == before
    assert config_id({**config, "train": {"lr": 1e-4, "keep_checkpoints": 2}}) != before
    assert config_id({**config, "train": {"lr": 1e-4, "gradient_checkpointing_every": 1}}) == before
    assert config_id({**config, "train": {"lr": 1e-4, "gradient_checkpointing_every": 2}}) != before


def test_defaults_written_or_not_give_the_same_id(tmp_path):
    implicit = write(tmp_path, "grid: {train.lr: [2.0e-4]}\n" + DATASETS, "a.yaml")
    explicit = write(
        tmp_path, "base: {train: {batch_size: 8, lr: 0.0002}, method: {name: lora}}\n" + DATASETS, "b.yaml"
    )
    assert expand(load_spec(implicit))[0].config_id == expand(load_spec(explicit))[0].config_id


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("grid: {train.lr: []}\n" + DATASETS, "'grid.train.lr' is an empty list"),
        ("grdi: {train.lr: [1]}\n" + DATASETS, "unknown key 'grdi'; did you mean 'grid'?"),
        ("grid: {train.lr: 0.001}\n" + DATASETS, "'grid.train.lr' must be a list"),
        (  # a list written as a string: the list it meant, not a list of that one string
            "grid: {train.lr: '1e-3, 1e-2', method.target_modules: 'q_proj'}\n" + DATASETS,
            "'grid.train.lr' must be a list (got '1e-3, 1e-2'); write [1e-3, 1e-2]",
        ),
        ("grid: {method.name: 'lora, full'}\n" + DATASETS, '(got \'lora, full\'); write ["lora", "full"]'),
        (
            "zip: [{method.r: [4, 8], method.alpha: [8]}]\n" + DATASETS,
            "'zip[0]' lists must have equal lengths",
        ),
        ("grid: {train.lr: [1]}\n", "'datasets' is required"),
        ("datasets: []\n", "'datasets' is empty"),
        (
            "datasets:\n  - {name: a, train: x, eval: y, metric: loss}\n"
            "  - {name: a, train: z, eval: w, metric: loss}\n",
            "dataset name 'a' appears twice",
        ),
        ("datasets:\n  - {name: a, train: x, eval: y, metrc: loss}\n", "unknown key 'datasets[0].metrc'"),
        ("datasets:\n  - {name: a, train: x, eval: y, metric: bleu}\n", "datasets[0].metric"),
        ("grid: {train.lr: [1]}\nzip: [{train.lr: [2]}]\n" + DATASETS, "'zip[0].train.lr' is swept twice"),
        ("grid: {method: [lora], method.r: [4]}\n" + DATASETS, "'grid.method.r' overlaps 'method'"),
        ("grid: {data.train: [a]}\n" + DATASETS, "'grid.data.train' is set per dataset"),
        ("base: missing.yaml\n" + DATASETS, "'base' file not found"),
        ("seeds: [1]\nconfirm_seeds: [2, 1]\n" + DATASETS, "'confirm_seeds' lists seed 1, which every point"),
        ("confirm_seeds: [2, 2]\n" + DATASETS, "'confirm_seeds' repeats a seed"),
        ("grid: {train.seed: [1, 2]}\n" + DATASETS, "set per dataset and trial; list seeds under 'seeds'"),
    ],
)
def test_load_errors_name_the_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(TunelabError, match="sweep.yaml") as caught:
        load_spec(path)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("grid: {train.lrr: [1.0e-4]}\n", "sweep.yaml:1: unknown key 'train.lrr'; did you mean 'train.lr'?"),
        # the value's own line, not the point: the base's, the grid's, a zip group's, the arm's that made it
        ("base:\n  train: {lr: 0}\n", "sweep.yaml:2: 'train.lr': Input should be greater than 0 (got 0)"),
        ("grid:\n  method.r: [4]\n  train.lr: [1.0e-3, fast]\n", "sweep.yaml:3: 'train.lr' is 'fast': input"),
        (
            "zip:\n  - {method.r: [4, 8], method.alpha: [8, x]}\n",
            "sweep.yaml:2: 'method.alpha' is 'x': input",
        ),
        (
            "arms:\n  - {method.r: [4], train.lr: [1.0e-3]}\n  - {method.r: [8], train.lr: [1.0e-3, -3]}\n",
            "sweep.yaml:3: 'train.lr': Input should be greater than 0 (got -3)",
        ),
        (
            "base: base.yaml\ngrid: {method.r: [4]}\n",
            "base.yaml:3: 'train.lr': Input should be greater than 0",
        ),
        # a listed method's own line, in the grid or an arm, block style or flow style
        (
            "grid:\n  method:\n    - {name: lora, r: 4}\n    - name: lora\n      rank: 8\n",
            "sweep.yaml:4: unknown key 'method.rank'; tunelab calls it 'method.r'",
        ),
        (
            "arms:\n  - {train.lr: [1.0e-3]}\n  - method: [{name: full}, {name: lora, rnk: 8}]\n",
            "sweep.yaml:3: unknown key 'method.rnk'",
        ),
    ],
)
def test_a_bad_value_of_a_sweep_point_names_the_line_that_wrote_it(tmp_path, text, message):
    write(tmp_path, "method: lora\ntrain:\n  lr: 0\n", name="base.yaml")
    with pytest.raises(TunelabError) as caught:
        expand(load_spec(write(tmp_path, text + DATASETS)))
    assert str(caught.value).startswith(f"{tmp_path}/{message}"), str(caught.value)


@pytest.mark.parametrize(
    "text, message",
    [
        # a misspelt key is a missing one too: the misspelling is named, on its line
        (
            "datasets:\n  - {name: a, train: x, eval: y, metric: loss}\n"
            "  - name: b\n    train: x\n    evel: y\n",
            "sweep.yaml:5: unknown key 'datasets[1].evel'; did you mean 'eval'?",
        ),
        ("datasets:\n  - {name: a, eval: y}\n", "sweep.yaml:2: 'datasets[0].train' is required"),
        (  # without a metric, exact_match scored 0 on every trial of such data: it is asked for
            "datasets:\n  - {name: a, train: x, eval: y}\n",
            "sweep.yaml:2: 'datasets[0].metric' is required; add metric: loss (lower is better, for any "
            "data) or exact_match",
        ),
        (
            "datasets:\n  - {name: a, train: x, metric: loss}\n",
            "sweep.yaml:2: 'datasets[0].eval' is required; give held-out rows to choose configs on, "
            "e.g. eval:",
        ),
        ("grid: {}\nseeds: [1, 1]\n" + DATASETS, "sweep.yaml:2: 'seeds' repeats a seed"),
        # the item itself, whichever keys it holds (an empty one, dotted ones only, a plain string)
        ("arms:\n  - {}\n  - {train.lr: [1.0e-3]}\n" + DATASETS, "sweep.yaml:2: 'arms[0]' is empty"),
        (
            "arms:\n  - {train.lr: [1.0e-3]}\n  - {train.lr: 1.0e-3}\n" + DATASETS,
            "sweep.yaml:3: 'arms[1].train.lr'",
        ),
        (  # a dataset named by its file or built-in name alone: the mapping to write instead
            "datasets:\n  - add.jsonl\n  - {name: a, train: x, eval: y, metric: loss}\n",
            "sweep.yaml:2: 'add.jsonl' alone is not a dataset; write it as {name: add, train: add.jsonl, "
            "holdout: 0.1, metric: loss} (metric: exact_match, accuracy, loss or perplexity; eval: FILE or "
            "holdout: the rows to choose configs on)",
        ),
        (
            "datasets:\n  - {name: a, train: x, eval: y, metric: loss}\n  - gsm8k:train\n",
            "sweep.yaml:3: 'gsm8k:train' alone is not a dataset; write it as {name: gsm8k, "
            "train: gsm8k:train, eval: gsm8k:eval, metric: loss}",
        ),
        # a grid key that holds dots, named whole by the message
        (
            "grid:\n  train.lr: [1.0e-3]\narms:\n  - {train.lr: [2.0e-3]}\n" + DATASETS,
            "sweep.yaml:4: 'arms[0].train.lr' is swept twice",
        ),
        (  # a message that quotes a value, not a key, names no line
            "datasets:\n  - {name: seeds, train: x, eval: y, metric: loss}\n"
            "  - {name: seeds, train: z, eval: y, metric: loss}\n",
            "sweep.yaml: dataset name 'seeds' appears twice",
        ),
    ],
)
def test_load_errors_name_the_line(tmp_path, text, message):
    with pytest.raises(TunelabError) as caught:
        load_spec(write(tmp_path, text))
    assert str(caught.value) == f"{tmp_path}/{message}" or str(caught.value).startswith(
        f"{tmp_path}/{message}"
    )


def test_ranks_for_a_sweep_without_dylora_is_an_error(tmp_path):
    """LoRA trials are not evaluated at ranks: the list was silently ignored."""
    path = write(tmp_path, "grid: {method.r: [4, 8]}\nranks: [2, 4]\n" + DATASETS)
    with pytest.raises(TunelabError, match="'ranks' evaluates dylora trials at those ranks, and no point"):
        expand(load_spec(path))


def test_repeated_point_is_an_error(tmp_path):
    path = write(tmp_path, "grid: {train.lr: [1.0e-4, 0.0001]}\n" + DATASETS)
    with pytest.raises(TunelabError, match=r"points 0 and 1 are the same configuration \(train.lr=0.0001\)"):
        expand(load_spec(path))
    # a point is named as its settings, not as a Python dict
    path = write(tmp_path, "grid: {method: [{name: dylora, r: 4}]}\nranks: [8]\n" + DATASETS)
    with pytest.raises(TunelabError, match=r"beyond sweep point 0 \(method.name=dylora method.r=4\), which"):
        expand(load_spec(path))


def test_confirm_seeds_without_seeds_must_differ_from_the_train_seed(tmp_path):
    spec = load_spec(write(tmp_path, "base: {train: {seed: 7}}\nconfirm_seeds: [8, 7]\n" + DATASETS))
    with pytest.raises(TunelabError, match="'confirm_seeds' lists seed 7, the train.seed every point"):
        expand(spec, seeds=spec.confirm_seeds)
    assert {trial.seed for trial in expand(spec)} == {7}


def test_dataset_files_become_absolute_paths_from_the_working_directory(tmp_path, monkeypatch):
    """A trial's config is saved under the runs folder and loaded from there: its data paths must not
    depend on where that config lies."""
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "datasets: [{name: a, train: data/a.jsonl, eval: addition:eval, metric: loss}]\n")
    (trial,) = expand(load_spec(path))
    assert trial.config["data"] == {**trial.config["data"], "train": str(tmp_path / "data" / "a.jsonl"),
                                    "eval": "addition:eval"}  # fmt: skip


def test_an_eval_set_without_a_test_split_is_halved_by_a_fixed_permutation():
    from tunelab.hpsearch.trial import dev_test_indices

    dev, test = dev_test_indices(7)
    assert len(dev) == 4 and len(test) == 3 and sorted(dev + test) == list(range(7))
    assert dev_test_indices(7) == (dev, test)  # the same split in every trial and every session
    assert dev != [0, 1, 2, 3]  # a permutation, not the file's first rows


def test_arms_add_up_and_cross_the_grid(tmp_path):
    path = write(
        tmp_path,
        textwrap.dedent("""
        base: {train: {weight_decay: 0.1}}
        grid: {train.epochs: [1, 2]}
        arms:
          - {method: [{name: lora, r: 8}], train.lr: [1.0e-4, 1.0e-3]}
          - {method: [{name: full}], train.lr: [1.0e-5], train.weight_decay: [0.0]}
          - {method: [{name: lora, r: 4}], train.lr: [3.0e-4]}
        """)
        + DATASETS,
    )
    points = [
        (t.config["method"].get("r"), *(t.config["train"][key] for key in ("lr", "epochs", "weight_decay")))
        for t in expand(load_spec(path))[::2]
    ]  # fmt: skip
    # the arms take turns (each arm's own product), the grid inside; weight_decay keeps its base value in
    # the lora arms
    assert points == [
        (8, 1e-4, 1, 0.1), (8, 1e-4, 2, 0.1), (None, 1e-5, 1, 0.0), (None, 1e-5, 2, 0.0),
        (4, 3e-4, 1, 0.1), (4, 3e-4, 2, 0.1), (8, 1e-3, 1, 0.1), (8, 1e-3, 2, 0.1),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("arms: [{}]\n", "'arms[0]' is empty"),
        ("arms: [{train.lr: []}]\n", "'arms[0].train.lr' is an empty list"),
        ("grid: {train.lr: [1]}\narms: [{train.lr: [2]}]\n", "'arms[0].train.lr' is swept twice"),
        ("grid: {method: [lora]}\narms: [{method.r: [4]}]\n", "'arms[0].method.r' overlaps 'method'"),
        ("arms: [{train.seed: [3]}]\n", "'arms[0].train.seed' is set per dataset and trial"),
        ("arms: [{train.lr: 0.001}]\n", "'arms[0].train.lr' must be a list (got 0.001); write [0.001] for"),
    ],
)
def test_arm_errors(tmp_path, text, message):
    with pytest.raises(TunelabError, match="sweep.yaml") as caught:
        load_spec(write(tmp_path, text + DATASETS))
    assert message in str(caught.value)


def test_the_committed_comparison_spec_resumes_its_database():
    # RESULTS.md's tables come from this database; re-running the spec must find its trials, not start
    # new configs beside them (an edited spec would give other config ids)
    results = Path(__file__).parent.parent / "results"
    trials = expand(load_spec(results / "comparison-small-tasks.yaml"))
    spec_rows = {row_id for trial in trials for row_id in trial.row_ids()}
    database = results / "comparison-small-tasks.sqlite"
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        stored = {config for (config,) in db.execute("SELECT DISTINCT config_id FROM trials")}
    assert len(stored) > 20 and stored <= spec_rows


def test_the_gpu_comparison_spec_is_the_cpu_one_at_twice_the_steps():
    # RESULTS.md compares the two: they must differ in the budget alone
    results = Path(__file__).parent.parent / "results"
    cpu = expand(load_spec(results / "comparison-gsm8k.yaml"))
    gpu = expand(load_spec(results / "comparison-gsm8k-gpu.yaml"))
    assert [t.config["train"]["max_steps"] for t in cpu] == [300] * len(cpu)
    assert [t.config["train"]["max_steps"] for t in gpu] == [600] * len(gpu)
    at_gpu_steps = [{**t.config, "train": {**t.config["train"], "max_steps": 600}, "name": ""} for t in cpu]
    assert at_gpu_steps == [{**t.config, "name": ""} for t in gpu]  # the name holds the config id


def test_a_datasets_fingerprint_follows_its_data_not_its_folder_or_what_lies_beside_it(tmp_path, monkeypatch):
    from tunelab.hpsearch.spec import DatasetSpec, data_fingerprint

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n')
    dataset = DatasetSpec(name="add", train="shards", eval="addition:eval", metric="loss")
    first = data_fingerprint(dataset)
    (folder / ".DS_Store").write_bytes(b"finder")  # a file browser, git, an editor: not data
    (folder / ".git").mkdir()
    (folder / ".git" / "index").write_bytes(b"git")
    assert data_fingerprint(dataset) == first
    (folder / "a.jsonl").write_text('{"prompt": "1+1=", "completion": "3"}\n')  # the data edited
    assert data_fingerprint(dataset) != first
    copied = tmp_path / "copy"
    copied.mkdir()
    (copied / "a.jsonl").write_text((folder / "a.jsonl").read_text())
    copy = DatasetSpec(name="add", train="copy", eval="addition:eval", metric="loss")
    assert data_fingerprint(copy) == data_fingerprint(dataset)
    builtin = DatasetSpec(name="add", train="addition:train", eval="addition:eval", metric="loss")
    assert data_fingerprint(builtin) is None


def _beside_addition(tmp_path, dataset: str) -> Path:
    """A spec of two learning rates on the built-in addition task and on `dataset` (a YAML list item)."""
    text = 'grid: {train.lr: [1.0e-4, 1.0e-3]}\ndatasets:\n  - {name: add, train: "addition:train", '
    return write(
        tmp_path,
        text + 'eval: "addition:eval", metric: loss}\n' + textwrap.indent(textwrap.dedent(dataset), "  "),
    )


def test_each_dataset_may_name_its_own_columns_and_the_configs_still_line_up(tmp_path, monkeypatch):
    """A question/answer CSV beside alpaca rows: columns per dataset, not in base (which would apply them
    to every dataset) nor in the config id (the same config on both datasets is one config for CBS)."""
    from tunelab.hpsearch.spec import DatasetSpec, data_fingerprint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "qa.csv").write_text("question,answer\n1+1=,2\n")
    path = _beside_addition(
        tmp_path,
        """
          - name: qa
            train: qa.csv
            eval: qa.csv
            metric: loss
            columns: {instruction: question, output: answer}
        """,
    )
    trials = expand(load_spec(path))
    add, qa = trials[0], trials[1]
    assert add.config["data"]["columns"] == {}
    assert qa.config["data"]["columns"] == {"instruction": "question", "output": "answer"}
    assert add.config_id == qa.config_id and len({trial.config_id for trial in trials}) == 2
    # another mapping reads other data from the same file: the dataset's results are not today's
    mapped = load_spec(path).datasets[1]
    other = DatasetSpec(**{**mapped.model_dump(), "columns": {"instruction": "answer", "output": "question"}})
    assert data_fingerprint(mapped) != data_fingerprint(other)
    assert data_fingerprint(mapped) != data_fingerprint(DatasetSpec(**{**mapped.model_dump(), "columns": {}}))
    # base's mapping is that of every dataset naming none: part of how its files read, too
    based = path.read_text().replace("grid:", "base: {data: {columns: {output: answer}}}\ngrid:")
    first = load_spec(write(tmp_path, based, "based.yaml"))
    assert [dataset.columns for dataset in first.datasets] == [
        {"output": "answer"}, {"instruction": "question", "output": "answer"},
    ]  # fmt: skip
    other = load_spec(write(tmp_path, based.replace("output: answer}}}", "output: question}}}"), "b2.yaml"))
    assert data_fingerprint(other.datasets[0]) != data_fingerprint(first.datasets[0])
    # a misspelt field is found when the spec loads, not in each trial
    with pytest.raises(TunelabError, match=r"sweep.yaml:9: unknown field 'instrucion'; did you mean 'instr"):
        load_spec(write(tmp_path, path.read_text().replace("{instruction:", "{instrucion:")))
    # a grid over columns, or columns in a zip, is told where they go
    for swept in ("grid: {data.columns.output: [answer]}", "zip: [{data.columns: [{output: answer}]}]"):
        text = swept + "\n" + DATASETS
        with pytest.raises(TunelabError, match=r"is set per dataset and trial; give a dataset its own under"):
            load_spec(write(tmp_path, text))


def test_a_dataset_may_hold_out_rows_of_its_training_data_as_its_eval_set(tmp_path, monkeypatch):
    """One file per dataset, as users have it: holdout in place of eval, per dataset or from base, part
    of the data (its fingerprint) and not of the config id."""
    from tunelab.hpsearch.spec import data_fingerprint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "qa.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n' * 4)
    path = _beside_addition(tmp_path, "- {name: qa, train: qa.jsonl, holdout: 0.25, metric: loss}\n")
    trials = expand(load_spec(path))
    add, qa = trials[0], trials[1]
    assert (qa.config["data"]["eval"], qa.config["data"]["holdout"]) == (None, 0.25)
    assert (add.config["data"]["eval"], add.config["data"]["holdout"]) == ("addition:eval", None)
    assert add.config_id == qa.config_id
    spec = load_spec(path)
    other = load_spec(write(tmp_path, path.read_text().replace("0.25", "2"), "other.yaml"))
    assert other.datasets[1].holdout == 2 and data_fingerprint(other.datasets[1]) != data_fingerprint(
        spec.datasets[1]
    )
    # base's holdout is that of each dataset with no eval set of its own
    based = load_spec(write(tmp_path, "base: {data: {holdout: 0.5}}\n" + path.read_text().replace(
        ", holdout: 0.25", ""), "based.yaml"))  # fmt: skip
    assert [dataset.holdout for dataset in based.datasets] == [None, 0.5]
    for text, message in [
        (
            "datasets:\n  - {name: a, train: x, eval: y, holdout: 0.1, metric: loss}\n",
            "sweep.yaml:2: 'datasets[0].holdout' keeps rows of train out as the eval set, and eval names "
            "another; keep one of the two",
        ),
        (
            "datasets:\n  - {name: a, train: x, holdout: 1.5, metric: loss}\n",
            "sweep.yaml:2: holdout: 1.5 is neither a share of the rows",
        ),
        ("datasets:\n  - {name: a, train: x, metric: loss}\n", "or holdout: 0.1 to keep that share of train"),
        ("grid: {data.holdout: [0.1]}\n" + DATASETS, "set per dataset and trial; give a dataset its own"),
    ]:
        with pytest.raises(TunelabError) as caught:
            load_spec(write(tmp_path, text))
        assert message in str(caught.value)
