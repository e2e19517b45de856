"""Config validation errors: one line naming the file, line and key, and how to fix it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from huggingface_hub import constants

from conftest import assert_one_line_error, run_cli
from tunelab.config import check_source, dump_config, load_config, parse_overrides, validate
from tunelab.errors import TunelabError, closest, did_you_mean, one_edit_apart
from tunelab.hub import offline_unless_reachable


def _write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_and_typed_overrides(tmp_path):
    config = load_config(
        _write(tmp_path, "method: {name: lora, r: 4}\ndata: {train: gsm8k:train}\n"),
        ["train.lr=1e-4", "method.r=16", "data.train_on_prompt=true"],
    )
    assert config.train.lr == 1e-4 and config.method.r == 16 and config.data.train_on_prompt is True
    assert config.name == "run" and str(config.resolved_output_dir()) == "runs/run"
    assert load_config(_write(tmp_path, "method: full\ndata: {train: gsm8k:train}\n")).method.name == "full"


def test_unknown_key_names_line_and_suggests(tmp_path):
    path = _write(tmp_path, "model: smollm2-135m\ntrain:\n  lr: 1e-4\n  batchsize: 8\n")
    with pytest.raises(
        TunelabError,
        match=r"run\.yaml:4: unknown key 'train\.batchsize'; did you mean "
        r"'train\.batch_size'\?",
    ):
        load_config(path)


def test_unknown_method_key_and_method_name(tmp_path):
    with pytest.raises(TunelabError, match=r"unknown key 'method\.alph'; did you mean 'method\.alpha'"):
        load_config(_write(tmp_path, "method: {name: lora, alph: 8}\n"))
    with pytest.raises(TunelabError, match=r"unknown key 'method\.ranks'; valid keys here: name, r, alpha"):
        load_config(_write(tmp_path, "method: {name: lora, ranks: 8}\n"))
    with pytest.raises(
        TunelabError,
        match=r"unknown method 'lorax'; did you mean lora\? choose one of: lora, dylora, full, spiel",
    ):
        load_config(_write(tmp_path, "method: {name: lorax}\n"))
    with pytest.raises(
        TunelabError,
        match=r"unknown method 'QLoRA'; QLoRA is method lora with quantization: nf4; choose one of: lora,",
    ):
        load_config(_write(tmp_path, "method: {name: QLoRA}\n"))


def test_every_misspelt_key_at_once_and_other_tools_names_translated(tmp_path):
    path = _write(
        tmp_path,
        "model: smollm2-135m\nlearning_rate: 1e-4\nmethod: {name: lora, lora_r: 8}\n"
        "train:\n  max_step: 3\n  per_device_train_batch_size: 4\n",
    )
    with pytest.raises(TunelabError) as raised:
        load_config(path)
    assert str(raised.value) == (
        f"{path}:2: unknown key 'learning_rate'; tunelab calls it 'train.lr'; "
        f"also {path}:3: unknown key 'method.lora_r'; tunelab calls it 'method.r'; "
        f"also {path}:5: unknown key 'train.max_step'; did you mean 'train.max_steps'?; "
        f"also {path}:6: unknown key 'train.per_device_train_batch_size'; tunelab calls it 'train.batch_size'"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: {bf16: false}\n", "unknown key 'train.bf16'; tunelab writes it 'train.precision: fp32'"),
        ("load_in_4bit: true\n", "unknown key 'load_in_4bit'; tunelab writes it 'quantization: nf4'"),
        ("max_steps: 10\n", "unknown key 'max_steps'; did you mean 'train.max_steps'?"),
        ("method: {name: dylora, rank: 8}\n", "unknown key 'method.rank'; tunelab calls it 'method.r'"),
        # a translation only where its key exists: SpIEL has no rank
        ("method: {name: spiel, rank: 8}\n", "unknown key 'method.rank'; valid keys here: name, density,"),
        # the valid keys of a section once, however many of its keys are unknown
        (
            "train: {foo: 1, bar: 2}\n",
            "unknown key 'train.foo'; valid keys here: lr, epochs,",
        ),
    ],
)
def test_what_an_unknown_key_probably_meant(tmp_path, text, message):
    with pytest.raises(TunelabError) as raised:
        load_config(_write(tmp_path, text))
    assert message in str(raised.value)
    assert str(raised.value).count("valid keys here") <= 1


def test_wrong_type_and_out_of_range(tmp_path):
    with pytest.raises(TunelabError, match=r"run\.yaml:2: 'train\.lr' is 'fast'"):
        load_config(_write(tmp_path, "train:\n  lr: fast\n"))
    with pytest.raises(TunelabError, match=r"'method\.r': Input should be greater than 0"):
        load_config(_write(tmp_path, "method: {name: lora, r: 0}\n"))
    with pytest.raises(TunelabError, match=r"r_min \(9\) must be <= r \(8\)"):
        load_config(_write(tmp_path, "method: {name: dylora, r: 8, r_min: 9}\n"))
    with pytest.raises(TunelabError, match=r"'train\.lr': Input should be greater than 0"):
        load_config(None, ["train.lr=-1"])


def test_yaml_syntax_error_names_the_line(tmp_path):
    with pytest.raises(TunelabError, match=r"run\.yaml:4: YAML syntax error"):
        load_config(_write(tmp_path, "model: x\ntrain:\n  lr: [1e-4\n  seed: 3\n"))


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(TunelabError, match="not of the form key.sub=value"):
        parse_overrides(["train.lr"])
    with pytest.raises(TunelabError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_an_override_given_first_is_told_where_it_goes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.jsonl").write_text('{"text": "a"}\n')
    for command in (["train"], ["data"], ["eval"], ["export", "--format", "merged", "--out", "x"]):
        code, err = run_cli(capsys, *command, "data.train=data/mine.jsonl")
        assert_one_line_error(
            code,
            err,
            "; data.train=data/mine.jsonl is an override: put it after the config, run folder or data",
        )
        assert "did you mean" not in err
    # a name with '=' that is no config key gets no such hint: lr is not one, and a=b.jsonl exists
    assert_one_line_error(*run_cli(capsys, "train", "lr=1e-4"), "config file not found: lr=1e-4")
    assert "override" not in run_cli(capsys, "train", "lr=1e-4")[1]
    (tmp_path / "a=b.jsonl").write_text('{"text": "a"}\n')
    assert "override" not in run_cli(capsys, "data", "a=b.jsonl", "model=nothere")[1]


def test_a_config_named_without_its_suffix_or_by_its_folder_gets_a_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lora.yaml").write_text("model: smollm2-135m\n")
    (tmp_path / "runs" / "a").mkdir(parents=True)
    assert_one_line_error(
        *run_cli(capsys, "train", "lora"), "config file not found: lora; did you mean lora.yaml?"
    )
    message = "runs is a folder with no config.yaml, not a run; give a config file, or a run folder to resume"
    assert_one_line_error(*run_cli(capsys, "train", "runs"), message)
    (tmp_path / "runs" / "a" / "config.yaml").write_text(dump_config(load_config(None, [])))
    assert_one_line_error(*run_cli(capsys, "train", "runs"), "not a run (runs in it: runs/a); give a config")
    assert_one_line_error(
        *run_cli(capsys, "data", "runs"), "runs is a folder of runs (runs in it: runs/a), not"
    )
    for given in (["--train.lr=1e-3"], ["--train.lr", "1e-3"]):
        code, err = run_cli(capsys, "train", "lora.yaml", *given)
        assert_one_line_error(
            code, err, "No such option: --train.lr; overrides take no dashes: train.lr=VALUE"
        )
    for spaced in (["train.lr", "=", "1e-3"], ["train.lr", "=1e-3"]):
        code, err = run_cli(capsys, "train", "lora.yaml", *spaced)
        assert_one_line_error(
            code, err, "not of the form key.sub=value, with no spaces around = (train.lr=...)"
        )


def test_a_mistyped_path_or_name_gets_the_one_meant(tmp_path, monkeypatch, capsys):
    from tunelab.data import load_rows
    from tunelab.models import load_tokenizer, resolve_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "run.yaml").write_text("model: smollm2-135m\n")
    with pytest.raises(TunelabError, match=r"config file not found: run\.yml; did you mean run\.yaml\?$"):
        load_config("run.yml")
    (tmp_path / "qa.py").write_text("")  # a script is not the config meant by qa.yaml
    with pytest.raises(TunelabError, match=r"config file not found: qa\.yaml$"):
        load_config("qa.yaml")
    for written, meant in [("data/trian.jsonl", "data/train.jsonl"), ("dta/train.jsonl", "data/train.jsonl")]:
        spec = load_config(None, [f"data.train={written}"]).data.train  # made absolute, as a config does
        with pytest.raises(TunelabError, match=f"did you mean {tmp_path / meant}\\?$"):
            load_rows(spec)
    # a mistyped suffix is no hub id (data/train.jsnl: owner 'data'), and the config beside is no data file
    with pytest.raises(
        TunelabError, match=r"^dataset not found: data/train\.jsnl; did you mean data/train\.jsonl\?$"
    ):
        check_source("data/train.jsnl")
    (tmp_path / "train.yaml").write_text("model: smollm2-135m\n")
    with pytest.raises(TunelabError, match=r"\(owner/name\) nor a built-in .*:test\)$"):
        check_source("train.jsnl")
    with pytest.raises(TunelabError, match=r"'gsm9k:train' is neither .* did you mean gsm8k:train\?$"):
        load_rows(load_config(None, ["data.train=gsm9k:train"]).data.train)
    with pytest.raises(TunelabError, match=r"model not found: smollm2-13m; .* did you mean smollm2-135m\?$"):
        resolve_model("smollm2-13m")
    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "models" / "mine" / "config.json").write_text("{}")
    # models/mines may be a hub id, or a typo of models/mine: with a hub, tried there, with a note said at
    # once; without one (and not in its cache), an error at once
    offline_unless_reachable()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    capsys.readouterr()
    assert resolve_model("models/mines") == "models/mines"
    assert "models/mines is no local path, so it is tried as a hub id; did you mean models/mine?" in (
        capsys.readouterr().err.replace("\n", "")
    )
    assert resolve_model("owner/name") == "owner/name" and capsys.readouterr().err == ""  # nothing near
    resolve_model("models/other")  # beside models/ that holds no such folder
    assert "models/other is no local path, so it is tried as a hub id; models/ has no other" in (
        capsys.readouterr().err.replace("\n", "")
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        TunelabError,
        match=r"^model not found: models/mines is no local folder, and as a hub id it is not in the hub "
        r"cache, with no hub to reach; .* did you mean models/mine\?$",
    ):
        resolve_model("models/mines")
    with pytest.raises(TunelabError, match=r"models/mine has no tokenizer \(tokenizer.json, "):
        load_tokenizer(resolve_model("models/mine"))
    with pytest.raises(TunelabError, match=r"or :eval, :dev, :test\)$"):  # nothing near: no guess
        load_rows(str(tmp_path / "other" / "rows.csv"))


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "tunelab", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def test_cli_errors_are_one_line_exit_2_no_traceback(tmp_path):
    path = _write(tmp_path, "train:\n  lr: 0\n")
    result = _cli("train", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {path}:2: 'train.lr': Input should be greater than 0 (got 0)"
    ]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["trian"], "error: No such command 'trian'. Did you mean 'train'? (see 'tunelab --help')"),
        (["train"], "error: Missing argument 'config' (see 'tunelab train --help')"),
        (["recommend", "--topp", "2"], "error: No such option: --topp (Possible options: --top) (see "),
        (["recommend", "x.yaml", "--top", "0"], "error: Invalid value for '--top': "),
    ],
)
def test_usage_errors_are_one_line_exit_2_naming_the_help(capsys, args, expected):
    code, err = run_cli(capsys, *args)
    assert_one_line_error(code, err)
    assert err.startswith(expected), err


def test_cli_never_overwrites_an_existing_run(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "runs" / "old"
    run_dir.mkdir(parents=True)
    saved = dump_config(validate({"model": tiny_model_dir, "output_dir": str(run_dir)}))
    (run_dir / "config.yaml").write_text(saved)  # as tunelab writes a run's config
    (run_dir / "metrics.jsonl").write_text("")
    path = _write(tmp_path, f"model: {tiny_model_dir}\ndata: {{train: gsm8k:train}}\noutput_dir: {run_dir}\n")
    result = _cli("train", str(path), cwd=tmp_path)
    assert result.returncode == 2 and "already holds a run; use --resume" in result.stderr
    assert (run_dir / "config.yaml").read_text() == saved


@pytest.mark.parametrize(
    ("quantization", "setting", "expected"),
    [("nf4", "auto", True), ("none", "auto", False), ("nf4", "false", False), ("none", "true", True)],
)
def test_gradient_checkpointing_auto_follows_the_qlora_recipe(tmp_path, quantization, setting, expected):
    from tunelab.train import training_arguments

    config = load_config(None, [f"quantization={quantization}", f"train.gradient_checkpointing={setting}"])
    args = training_arguments(config, tmp_path, has_eval=False)
    assert bool(getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing) is expected


def test_checkpointing_every_nth_layer_needs_checkpointing_on():
    assert load_config(None, ["quantization=nf4", "train.gradient_checkpointing_every=2"])
    for overrides, at, why in [
        ([], "train.gradient_checkpointing_every=2", "auto, on only with quantization: nf4"),
        (
            ["quantization=nf4", "train.gradient_checkpointing=false"],
            "train.gradient_checkpointing=false",
            "false",
        ),
    ]:
        with pytest.raises(TunelabError) as caught:
            load_config(None, [*overrides, "train.gradient_checkpointing_every=2"])
        assert str(caught.value) == (
            f"override {at}: train.gradient_checkpointing_every: 2 picks the layers that gradient "
            f"checkpointing recomputes, and it is off here (train.gradient_checkpointing: {why}); set "
            "train.gradient_checkpointing to true, or train.gradient_checkpointing_every to 1"
        )


def test_gradient_checkpointing_rejects_other_values_naming_the_choices():
    with pytest.raises(
        TunelabError, match=r"'train.gradient_checkpointing' is 'Auto'; expected 'auto', True or"
    ):
        load_config(None, ["train.gradient_checkpointing=Auto"])


def test_what_a_method_can_do_is_checked_with_the_config(tmp_path):
    path = _write(tmp_path, "model: x\nquantization: nf4\nmethod: full\n")
    with pytest.raises(
        TunelabError, match=rf"^{path}:2: quantization: nf4 cannot be combined with method full"
    ):
        load_config(path)
    with pytest.raises(TunelabError, match=r"^override quantization=nf4: quantization: nf4 cannot"):
        load_config(_write(tmp_path, "method: full\n"), ["quantization=nf4"])
    assert load_config(None, ["method.name=dylora", "method.r=3"]).method.evaluable_ranks() == [1, 2, 3]
    assert load_config(None, ["method.name=lora"]).method.evaluable_ranks() == []


def test_version_is_the_installed_one(tmp_path):
    from importlib.metadata import version

    result = _cli("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"tunelab {version('tunelab')}"


@pytest.mark.parametrize(
    "text, message",
    [
        # a config without data would train on data.train's default, a built-in task, without a word
        ("model: smollm2-135m\nmethod: lora\n", "run.yaml: no data.train; name the data to train on"),
        ("method: lora\ndata: {eval: gsm8k:eval}\n", "no data.train"),
        (
            "method: lora\ndata: my.jsonl\n",
            "run.yaml:2: 'data' is 'my.jsonl'; data is a section: write data: {train: my.jsonl}",
        ),
        ("method: lroa\n", "run.yaml:1: unknown method 'lroa'; did you mean lora? choose one of"),
        ("method: lora\n\tdata: {train: x.jsonl}\n", "run.yaml:2: YAML syntax error: found character '\\t'"),
        ("method:\n  name: lora\n   r: 8\n", "mapping values are not allowed here; check the indentation"),
    ],
)
def test_what_a_config_mistake_is_told(tmp_path, text, message):
    with pytest.raises(TunelabError) as raised:
        load_config(_write(tmp_path, text))
    assert message in str(raised.value)
    if "\\t" in message:
        assert str(raised.value).endswith("indent with spaces, not tabs")


def test_a_data_file_given_as_the_config_is_told_how_to_name_it(tmp_path, capsys):
    data = tmp_path / "train.jsonl.gz"
    data.write_bytes(b"")
    code, err = run_cli(capsys, "train", str(data))
    assert_one_line_error(
        code, err, f"{data} is a data file, not a config; name it in one: data: {{train: {data}}}"
    )


@pytest.mark.parametrize(
    "typed, meant",
    [
        ("trian.jsonl", "train.jsonl"),
        ("train.json", "train.jsonl"),  # another suffix, the same stem
        ("run.yml", "run.yaml"),
        ("opena.jsonl", "openai.jsonl"),
        # a shared suffix alone is no likeness: nothing is suggested
        ("nothere.jsonl", None),
        ("eval.jsonl", None),
    ],
)
def test_a_missing_file_is_told_only_a_name_near_its_own(tmp_path, monkeypatch, typed, meant):
    from tunelab.errors import did_you_mean

    for name in ("train.jsonl", "openai.jsonl", "alpaca.json", "run.yaml"):
        (tmp_path / name).touch()
    monkeypatch.chdir(tmp_path)
    assert did_you_mean(typed) == (f"; did you mean {meant}?" if meant else "")


def test_another_method_named_on_the_command_line_is_told_how_to_replace_the_section(tmp_path):
    path = _write(tmp_path, "method: {name: lora, r: 8, alpha: 16}\ndata: {train: gsm8k:train}\n")
    with pytest.raises(TunelabError) as raised:
        load_config(path, ["method.name=spiel"])
    assert str(raised.value) == (
        f"{path}:1: unknown key 'method.r' for method spiel; override method.name=spiel keeps the file's "
        "other method keys, method=spiel replaces its method section; "
        f"also {path}:1: unknown key 'method.alpha'"
    )
    assert load_config(path, ["method=spiel"]).method.name == "spiel"


def test_a_typo_is_matched_by_one_edit_where_difflib_misses_it():
    pairs = {
        "tyni": True,
        "tiny": False,
        "tny": True,
        "tinny": True,
        "tinx": True,
        "ytni": False,
        "tixx": False,
    }
    assert {other: one_edit_apart("tiny", other) for other in pairs} == pairs
    assert closest("tyni", ["data", "runs", "tiny"]) == "tiny"
    assert closest("ab", ["ba"]) is None  # two letters: anything is one edit from something
    assert closest("lroa", ["lora", "dylora", "spiel"]) == "lora"


def test_a_file_named_with_another_suffix_is_suggested_before_a_near_name(tmp_path):
    for name in ("alp_eval.json", "chat_eval.jsonl"):
        (tmp_path / name).write_text("[]")
    assert did_you_mean(tmp_path / "alp_eval.jsonl") == f"; did you mean {tmp_path / 'alp_eval.json'}?"
    assert did_you_mean(tmp_path / "chat_evl.jsonl") == f"; did you mean {tmp_path / 'chat_eval.jsonl'}?"
    (tmp_path / "sweep.sqlite").write_text("")  # beside its spec, as every sweep leaves it
    (tmp_path / "sweep.yaml").write_text("")
    assert did_you_mean(tmp_path / "sweep.yml") == f"; did you mean {tmp_path / 'sweep.yaml'}?"
