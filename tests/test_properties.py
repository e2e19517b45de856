"""Property-based: any config value or data row either works or fails with a TunelabError (one clear
line), never with another exception."""

from __future__ import annotations

import json

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
        dataset = build_dataset(str(path), load_tokenizer(tokenizer_dir), DataConfig(max_length=32))
    except TunelabError as exc:
        assert "\n" not in str(exc)
        return
    assert all(any(label != IGNORE_INDEX for label in f["labels"]) for f in dataset.features)
