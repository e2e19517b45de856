"""Property-based: any config value or data row either works or fails with a TunelabError (one clear
line), never with another exception; corrupted data, configs and model folders never change a run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tunelab.config import DataConfig, load_config
from tunelab.data import IGNORE_INDEX, build_dataset
from tunelab.errors import TunelabError

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
KEYS = [
    "train.lr",
    "train.batch_size",
    "train.epochs",
    "train.warmup_ratio",
    "method.r",
    "method.alpha",
    "method.dropout",
    "data.max_length",
    "quantization",
    "method.name",
    "train.scheduler",
    "train.seed",
]


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(KEYS), value=scalars)
@example(key="method.name", value="\n")  # a line break in a quoted value once split the error
def test_any_config_value_is_accepted_or_rejected_cleanly(key, value):
    try:
        config = load_config(None, [f"{key}={json.dumps(value)}"])
    except TunelabError as exc:
        assert "\n" not in str(exc) and key.split(".")[0] in str(exc)
        return
    assert config.train.lr > 0 and config.train.batch_size > 0 and 0 <= config.train.warmup_ratio < 1
    if config.method.name in ("lora", "dylora"):
        assert config.method.r > 0 and 0 <= config.method.dropout < 1


rows = st.lists(
    st.dictionaries(
        st.sampled_from(["prompt", "completion", "text", "instruction", "output", "x"]), scalars, max_size=4
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data_rows=rows)
def test_any_data_rows_load_or_fail_cleanly(tmp_path_factory, tokenizer_dir, data_rows):
    from tunelab.models import load_tokenizer

    path = tmp_path_factory.mktemp("rows") / "d.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in data_rows) + "\n")
    try:
        dataset = build_dataset(str(path), load_tokenizer(tokenizer_dir), DataConfig(max_length=64))
    except TunelabError as exc:
        assert "\n" not in str(exc)
        return
    assert all(any(label != IGNORE_INDEX for label in f["labels"]) for f in dataset.features)


@pytest.fixture(scope="module")
def project_with_a_run(tmp_path_factory, tiny_model_dir):
    """A user's folder: a model, data, a config, and a finished run trained from them."""
    from conftest import write_qa_jsonl
    from tunelab.config import load_config
    from tunelab.train import train

    project = tmp_path_factory.mktemp("project")
    shutil.copytree(tiny_model_dir, project / "model")
    write_qa_jsonl(project / "data.jsonl")
    (project / "run.yaml").write_text(
        "model: model\nmethod: {name: lora, r: 2}\ndata: {train: data.jsonl, max_length: 64}\n"
        f"train: {{max_steps: 2, batch_size: 4}}\noutput_dir: {project / 'run'}\n"
    )
    train(load_config(project / "run.yaml"))
    return project


CORRUPTIBLE = [
    "data.jsonl",
    "run.yaml",
    "model/config.json",
    "model/model.safetensors",
    "model/tokenizer.json",
]


def _corrupt(path: Path, how: str, where: float, byte: int) -> None:
    data = path.read_bytes()
    cut = int(len(data) * where)
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(data[:cut])
    elif how == "flip":
        path.write_bytes(data[:cut] + bytes([byte]) + data[cut + 1 :])
    else:  # garbage inserted
        path.write_bytes(data[:cut] + b"\xff\x00{\x9c" + data[cut:])


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    target=st.sampled_from(CORRUPTIBLE),
    how=st.sampled_from(["delete", "truncate", "flip", "garbage"]),
    where=st.floats(0, 1),
    byte=st.integers(0, 255),
)
@example(target="model/model.safetensors", how="truncate", where=0.5, byte=0)
@example(target="data.jsonl", how="flip", where=0.3, byte=0xE9)
def test_corrupted_inputs_fail_cleanly_and_never_touch_a_run(
    project_with_a_run, tmp_path_factory, capsys, target, how, where, byte
):
    from conftest import run_cli, tree_digest

    project = tmp_path_factory.mktemp("copy") / "project"
    shutil.copytree(project_with_a_run, project)
    run = project / "run"
    config = run / "config.yaml"  # the copied run uses the copied model and data
    config.write_text(config.read_text().replace(str(project_with_a_run), str(project)))
    _corrupt(project / target, how, where, byte)
    before = tree_digest(run)
    for command in (
        # pinned: an emptied run.yaml is a valid config that would train the default model for an epoch
        ["train", str(project / "run.yaml"), f"output_dir={project / 'new'}", "train.max_steps=2"]
        + [f"model={project / 'model'}", "data.max_length=64", "train.batch_size=4"],
        ["eval", str(run), "--data", str(project / "data.jsonl"), "--limit", "4", "--no-exact-match"],
        ["train", str(config), "--resume"],
        ["export", str(run), "--format", "peft", "--out", str(project / "export")],
    ):
        code, err = run_cli(capsys, *command)
        lines = err.strip().splitlines()
        assert code in (0, 2), (command, err[-3000:])
        if code == 2:
            assert len(lines) == 1 and lines[0].startswith("error: "), (command, err[-3000:])
        assert tree_digest(run) == before, command
