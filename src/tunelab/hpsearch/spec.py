"""Sweep spec: a base train config, a grid of dotted-key values, zipped groups, arms, and datasets.

    base: configs/quickstart.yaml        # or an inline mapping; a path is relative to this file
    grid:                                # cartesian product over the keys
      train.lr: [1.0e-5, 5.0e-5, 1.0e-4]
      train.epochs: [1, 3]
    zip:                                 # each group: values taken together, index by index
      - {method.r: [8, 64], method.alpha: [16, 128]}
    arms:                                # each arm a grid of its own; the arms take turns
      - {method: [{name: lora, r: 8}], train.lr: [3.0e-4, 1.0e-3]}
      - {method: [{name: spiel, regrowth: ma}], train.lr: [1.0e-3, 3.0e-3], train.weight_decay: [0, 30]}
    datasets:                            # eval: the dev split (every choice); test: reported only
      - {name: addition, train: "addition:train", eval: "addition:dev", test: "addition:test"}
    seeds: [1, 2]                        # each point trained once per seed (train.seed)
    confirm_seeds: [3]                   # then each arm's best config again, with these seeds
    ranks: [1, 2, 4, 8, 16]              # dylora points: every rank evaluated, each a config of its own

Points = (the arms' points, taking turns) × product(grid keys) × product(zip groups); trials = points ×
datasets × seeds. A key set in an arm keeps its base value in the other arms. A dataset without `test`
has its eval rows split in two by a fixed seed: dev (the first half of a seeded permutation) and test
(the rest). `recommend` groups results into arms of its own: one method's configs that differ only in
the learning rate (and a DyLoRA row's rank), see hpsearch.ranking.arms; a spec arm that is one method
and its lr list is one of those.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from tunelab.config import (
    FILE_SUFFIXES,
    YAML_FILES,
    check_source,
    data_suffix,
    deep_merge,
    flatten,
    known_fields,
    nest,
    read_yaml,
    share_or_count,
    validate,
    yaml_keys,
)
from tunelab.errors import TunelabError, closest, did_you_mean
from tunelab.tasks import builtin_tasks, parse_builtin

# metric name -> higher is better (DatasetSpec.metric lists the same names); sweep trials compute
# TRIAL_METRICS themselves, `accuracy` only comes from results tables
HIGHER_IS_BETTER = {"exact_match": True, "accuracy": True, "loss": False, "perplexity": False}
TRIAL_METRICS = ("exact_match", "loss", "perplexity")
# keys that place a trial (its run folder and name, its dataset, its seed) rather than configure it:
# they are set per trial, and left out of config ids and of the hyperparameters a recommendation lists
# (data.columns: how a dataset's files name the format's fields, so datasets in different shapes line up)
PLACEMENT_KEYS = (
    "name",
    "output_dir",
    "data.train",
    "data.eval",
    "data.holdout",
    "data.columns",
    "train.seed",
)
PLACEMENT_FIXES = {  # where a spec sets what a grid may not
    "data.train": "list datasets under 'datasets'",
    "data.eval": "list datasets under 'datasets'",
    "data.holdout": "give a dataset its own under 'datasets' (holdout: 0.1)",
    "data.columns": "give a dataset its own under 'datasets' (columns: {instruction: question, ...})",
    "train.seed": "list seeds under 'seeds' (each point trains once per seed)",
}


def placement_key(key: str) -> str | None:
    """The one of PLACEMENT_KEYS that dotted `key` is or lies under (data.columns.output: data.columns);
    None for a hyperparameter."""
    return next((placed for placed in PLACEMENT_KEYS if key == placed or key.startswith(placed + ".")), None)


EVAL_RANK_KEY = "method.rank"  # the rank a dylora trial's row was evaluated at
# config keys added after sweeps had run, with their defaults: at the default a key stays out of the
# config id, so a database written before the key existed still matches its spec (every key is in a
# resolved config, so a new one would otherwise change every id and restart every trial)
KEYS_ADDED_LATER = {"train.keep_checkpoints": 0, "train.gradient_checkpointing_every": 1}
# keys that change what a run logs and saves, or how much memory it takes, not what it learns. They are
# in config ids all the same (databases written with them must keep matching their specs); the sweep
# refuses to train a finished trial again for them alone (bookkeeping_changes)
BOOKKEEPING_KEYS = (
    "train.log_steps", "train.save_steps", "train.keep_checkpoints", "train.eval_steps", "train.report_to",
    "train.gradient_checkpointing", "train.gradient_checkpointing_every",
)  # fmt: skip


class DatasetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    train: str
    eval: str | None = None  # dev: what every choice is made on
    # or: its data.holdout, rows of train kept out as the eval set (in place of base's)
    holdout: float | int | None = None
    test: str | None = None  # reported only; None: eval's rows are split into dev and test
    columns: dict[str, str] = Field(default_factory=dict)  # its data.columns, in place of base's

    @model_validator(mode="before")
    @classmethod
    def _a_mapping(cls, given: Any) -> Any:
        if isinstance(given, str):  # `datasets: [mydata.jsonl]`: what to write instead, with its file
            task, _, _ = given.partition(":")
            builtin = task in builtin_tasks()
            name = task if builtin else Path(given).stem or "data"
            held_out = f"eval: {task}:eval" if builtin else "holdout: 0.1"
            raise ValueError(
                f"{given!r} alone is not a dataset; write it as {{name: {name}, train: {given}, {held_out}, "
                "metric: loss} (metric: exact_match, accuracy, loss or perplexity; eval: FILE or holdout: "
                "the rows to choose configs on)"
            )
        return given

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, columns: dict[str, str]) -> dict[str, str]:
        return known_fields(columns)  # a typo found before any trial, not in each one

    @field_validator("holdout", mode="before")
    @classmethod
    def _share_or_count(cls, holdout: Any) -> float | int | None:
        try:
            return share_or_count(holdout)
        except ValueError as exc:
            raise ValueError(f"holdout: {exc}") from None

    # required: exact_match, once the default, scored 0 on every trial of data no model answers exactly
    metric: Literal["exact_match", "accuracy", "loss", "perplexity"]

    @field_validator("metric")
    @classmethod
    def _computed_by_trials(cls, metric: str) -> str:
        if metric not in TRIAL_METRICS:
            raise ValueError(
                f"metric {metric}, which sweep trials do not compute; use one of: {', '.join(TRIAL_METRICS)}"
            )
        return metric


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: dict[str, Any] = Field(default_factory=dict)  # a path in the YAML is read into a mapping
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    zip: list[dict[str, list[Any]]] = Field(default_factory=list)
    arms: list[dict[str, list[Any]]] = Field(default_factory=list)  # each a grid of its own; they take turns
    datasets: list[DatasetSpec]
    seeds: list[int] = Field(default_factory=list)  # empty: the base config's train.seed
    confirm_seeds: list[int] = Field(default_factory=list)  # each arm's best config: these seeds too
    ranks: list[int] = Field(default_factory=list)  # dylora trials: evaluate each of these ranks
    _source: str = PrivateAttr("sweep spec")  # the spec file, for error messages
    _keys: list[tuple[str, int, int]] = PrivateAttr(default_factory=list)  # its keys' lines (yaml_keys)
    _base_lines: dict[str, str] = PrivateAttr(default_factory=dict)  # base's keys -> file:line

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        if not self.datasets:
            raise ValueError("'datasets' is empty; list at least one {name, train, eval, metric}")
        names = [dataset.name for dataset in self.datasets]
        repeated = [name for name in names if names.count(name) > 1]
        if repeated:
            raise ValueError(f"dataset name '{repeated[0]}' appears twice in 'datasets'; make names unique")
        swept: set[str] = set()
        zipped = [(f"zip[{i}]", group) for i, group in enumerate(self.zip)]
        for where, group in [("grid", self.grid), *zipped]:
            _check_keys(where, group, swept)
            swept |= set(group)
        for i, arm in enumerate(self.arms):
            if not arm:
                raise ValueError(f"'arms[{i}]' is empty; give each arm at least one key and its values")
            _check_keys(f"arms[{i}]", arm, swept)
        for key in ("seeds", "confirm_seeds"):
            if len(set(getattr(self, key))) != len(getattr(self, key)):
                raise ValueError(f"'{key}' repeats a seed; list each once")
        if self.seeds:
            overlap = sorted(set(self.confirm_seeds) & set(self.seeds))
            if overlap:
                raise ValueError(
                    f"'confirm_seeds' lists seed {overlap[0]}, which every point already trains with; "
                    "list other seeds"
                )
        if any(rank < 1 for rank in self.ranks) or len(set(self.ranks)) != len(self.ranks):
            raise ValueError("'ranks' must list distinct ranks of 1 or more")
        # base's data.columns, the mapping of every dataset that names none of its own: part of how its
        # files read (data_fingerprint), like a dataset's own
        base_columns = {
            key.removeprefix("data.columns."): value
            for key, value in flatten(self.base).items()
            if key.startswith("data.columns.")
        }
        try:  # for each dataset with no eval set
            base_holdout = share_or_count(flatten(self.base).get("data.holdout"))
        except ValueError as exc:
            raise ValueError(f"'base.data.holdout': {exc}") from None
        for i, dataset in enumerate(self.datasets):
            dataset.columns = dataset.columns or base_columns
            if dataset.eval and dataset.holdout is not None:
                raise ValueError(
                    f"'datasets[{i}].holdout' keeps rows of train out as the eval set, and eval names "
                    "another; keep one of the two"
                )
            if not dataset.eval:
                dataset.holdout = dataset.holdout if dataset.holdout is not None else base_holdout
            if not dataset.eval and dataset.holdout is None:
                raise ValueError(f"'datasets[{i}].eval' is required{DATASET_KEY_HINTS['eval']}")
        for i, group in enumerate(self.zip):
            lengths = {key: len(values) for key, values in group.items()}
            if len(set(lengths.values())) > 1:
                listed = ", ".join(f"{key} has {n}" for key, n in lengths.items())
                raise ValueError(f"'zip[{i}]' lists must have equal lengths ({listed}); make them match")
        return self


def _check_keys(where: str, group: dict[str, list[Any]], swept: set[str]) -> None:
    """Refuse a key of `group` that is placed per trial, empty, or already swept in `group` or `swept`
    (the same key, or one nested in the other)."""
    seen = set(swept)
    for key, values in group.items():
        if (placed := placement_key(key)) is not None:
            fix = PLACEMENT_FIXES.get(placed, "the sweep sets it")
            raise ValueError(f"'{where}.{key}' is set per dataset and trial; {fix}")
        if key in seen:
            raise ValueError(f"'{where}.{key}' is swept twice; keep it in one place")
        nested = [other for other in seen if other.startswith(key + ".") or key.startswith(other + ".")]
        if nested:
            raise ValueError(f"'{where}.{key}' overlaps '{nested[0]}'; sweep only the inner keys")
        if not values:
            raise ValueError(f"'{where}.{key}' is an empty list; give a value or remove the key")
        seen.add(key)


@dataclass(frozen=True)
class Trial:
    """One training run: a point on a dataset with a seed; evaluated on dev and test, at each of
    `ranks` (dylora) or as trained, each evaluation a result row with its own config id."""

    config_id: str
    dataset: str
    metric: str
    config: dict[str, Any]  # resolved train config (every default filled in), ready for RunConfig
    seed: int = 0
    test: str | None = None  # the test split; None: eval's rows split into dev and test
    ranks: tuple[int, ...] = ()  # dylora: the evaluated ranks; empty: the model as trained
    data_sha256: str | None = None  # its dataset's local files (data_fingerprint); None: none, or not read

    @property
    def run_name(self) -> str:
        return f"{self.config_id}-s{self.seed}"

    def row_ids(self) -> list[str]:
        """The config id of each result row: the trial's own, or one per evaluated rank."""
        return [config_id(rank_config(self.config, rank)) for rank in self.ranks or [None]]


def rank_config(config: dict[str, Any], rank: int | None) -> dict[str, Any]:
    """The config of a result row evaluated at `rank`: the rank is a hyperparameter of its own."""
    return config if rank is None else deep_merge(config, nest({EVAL_RANK_KEY: rank}))


def _line(text: str, loc: tuple) -> int | None:
    """The line of the key at a pydantic error's location (('datasets', 1, 'evel')) in the YAML `text`;
    for a key that is missing, the line of the deepest part of its location that is there."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line, parts = None, list(loc)
    while parts:
        part = parts.pop(0)
        if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        elif isinstance(node, yaml.MappingNode):
            # a key may hold dots itself (the grid's 'train.lr' when a message names 'grid.train.lr')
            for count in range(len(parts), -1, -1):
                name = ".".join(map(str, [part, *parts[:count]]))
                found = next(((key, value) for key, value in node.value if key.value == name), None)
                if found:
                    parts = parts[count:]
                    break
            else:
                return line
            key, node = found
            line = key.start_mark.line + 1
        else:
            return line
    return line


DATASET_KEY_HINTS = {  # what a dataset entry lacks, said with what to write
    "metric": "; add metric: loss (lower is better, for any data) or exact_match (a generated answer must "
    "equal the reference: short answers)",
    "eval": "; give held-out rows to choose configs on, e.g. eval: data/my_eval.jsonl, or holdout: 0.1 to "
    "keep that share of train's rows out for it (split into dev and test halves unless the dataset has "
    "test:)",
}


def _as_list(value: Any) -> str:
    """A grid's one value as the list to write: '1e-3, 1e-2' (a list written as a string) -> [1e-3, 1e-2]."""
    if not isinstance(value, str):
        return f"[{json.dumps(value)}] for that one value"
    parts = [part.strip() for part in value.split(",")]
    items = ", ".join(part if _is_number(part) else json.dumps(part) for part in parts)
    return f"[{items}]" + (" for that one value" if len(parts) == 1 else "")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _format_error(err: dict, source: str, text: str = "") -> str:
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in err["loc"]).lstrip(".")
    kind = err["type"]
    loc = err["loc"]
    # a check of the whole spec names the key its message starts with: "'arms[0].train.lr' is swept twice"
    if not loc and (named := re.match(r"Value error, '([\w.\[\]]+)'", err["msg"])):
        parts = re.findall(r"\[\d+\]|[^.\[\]]+", named[1])  # 'arms[0].train.lr' -> arms, 0, train, lr
        loc = tuple(int(part[1:-1]) if part.startswith("[") else part for part in parts)
    line = _line(text, loc)
    source = f"{source}:{line}" if line else source
    if kind == "value_error":
        return f"{source}: {err['msg'].removeprefix('Value error, ')}"
    if kind == "extra_forbidden":
        allowed = list(DatasetSpec.model_fields if err["loc"][0] == "datasets" else SweepSpec.model_fields)
        close = closest(str(err["loc"][-1]), allowed)
        hint = f"did you mean '{close}'?" if close else f"valid keys here: {', '.join(allowed)}"
        return f"{source}: unknown key '{key}'; {hint}"
    if kind == "missing":
        hint = DATASET_KEY_HINTS.get(str(loc[-1]), "") if loc[0] == "datasets" else ""
        return f"{source}: '{key}' is required{hint}"
    if kind in ("list_type", "dict_type"):
        shape = "list" if kind == "list_type" else "mapping of key: value"
        # a grid's or an arm's key lists its values: one value is still a list (JSON is YAML too)
        one_value = kind == "list_type" and err["loc"][0] in ("grid", "arms", "zip")
        fix = f"; write {_as_list(err['input'])}" if one_value else ""
        return f"{source}: '{key}' must be a {shape} (got {err['input']!r}){fix}"
    return f"{source}: '{key}': {err['msg']} (got {err['input']!r})"


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep spec; `base` given as a path is read relative to the spec file."""
    path = Path(path)
    if data_suffix(path) in FILE_SUFFIXES and path.suffix.lower() != ".json":  # a .json spec is valid YAML
        raise TunelabError(
            f"{path} is a data file, not a sweep spec: list it under datasets: in a spec YAML (see "
            "examples/sweep.yaml)"
        )
    data, text = read_yaml(path)
    base = data.get("base")
    base_where, base_text, base_prefix = path, text, "base."
    if isinstance(base, str):
        base_path = path.parent / base
        if not base_path.is_file():
            hint = did_you_mean(base_path, keep=YAML_FILES) or f"; give it relative to {path.name}"
            raise TunelabError(f"{path}: 'base' file not found: {base_path}{hint}")
        base, base_text = read_yaml(base_path)
        data, base_where, base_prefix = {**data, "base": base}, base_path, ""
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        # a misspelt key is also a missing one: name the misspelling, which the fix is about
        errors = sorted(exc.errors(), key=lambda error: error["type"] != "extra_forbidden")
        raise TunelabError(_format_error(errors[0], str(path), text)) from None
    for dataset in spec.datasets:  # read from the spec's folder, as a train config reads its paths
        for split in ("train", "eval", "test"):
            if (value := getattr(dataset, split)) is not None:
                setattr(dataset, split, _from_folder(value, path.parent))
    spec._source, spec._keys = str(path), yaml_keys(text)
    spec._base_lines = {
        dotted.removeprefix(base_prefix): f"{base_where}:{line}"
        for dotted, line, _ in yaml_keys(base_text)
        if dotted.startswith(base_prefix)
    }
    return spec


def _point_lines(spec: SweepSpec, point: dict[str, Any]) -> dict[str, str]:
    """Where each value of a sweep point is written, as file:line, for its errors: the grid's, zip's or
    arm's key for the values the point sets, the base's key for the others."""
    lines = dict(spec._base_lines)
    for key in point:
        written = [line for dotted, line, _ in spec._keys if dotted in (f"grid.{key}", f"zip.{key}")]
        arm_lines = [line for dotted, line, _ in spec._keys if dotted == f"arms.{key}"]
        arms = [arm for arm in spec.arms if key in arm]  # in the file's order, as arm_lines
        written += [
            line
            for line, arm in zip(arm_lines, arms, strict=False)
            if all(point.get(name) in values for name, values in arm.items())
        ]
        if written:
            lines[key] = f"{spec._source}:{written[0]}"
        if isinstance(point[key], dict) and (line := _item_line(spec, key, point[key])):
            lines[key] = f"{spec._source}:{line}"  # the listed mapping's own line: {name: lora, rank: 8}
    return lines


def _item_line(spec: SweepSpec, key: str, value: dict[str, Any]) -> int | None:
    """The line of `value`, one of the mappings listed under `key` in the grid, zip or arms (the first equal
    to it), where its keys are written (method: [{name: lora, rank: 8}, ...]): not `key`'s own line."""
    listed = {
        "grid": spec.grid.get(key, []),
        "zip": [value for group in spec.zip for value in group.get(key, [])],
        "arms": [value for arm in spec.arms for value in arm.get(key, [])],
    }
    sections = {dotted: line for dotted, line, _ in spec._keys if dotted in listed}
    mappings = [
        v for section in sorted(sections, key=sections.get) for v in listed[section] if isinstance(v, dict)
    ]
    first_lines: dict[int, int] = {}  # each listed mapping's first line, by its YAML node
    for dotted, line, node in spec._keys:
        section, _, rest = dotted.partition(".")
        if section in listed and rest.startswith(f"{key}.") and rest.count(".") == key.count(".") + 1:
            first_lines.setdefault(node, line)
    if len(first_lines) != len(mappings) or value not in mappings:
        return None  # written in a shape this does not follow: the key's own line stands
    return sorted(first_lines.values())[mappings.index(value)]


def _points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every point of the sweep as a flat {dotted key: value}: the arms' points × product(grid keys) ×
    product(zip groups). The arms take turns (every arm's first point, then every arm's second, ...), so
    that a sweep stopped early has tried every arm."""
    factors = [_product(spec.grid)]
    for group in spec.zip:
        keys = list(group)
        factors.append([dict(zip(keys, values, strict=True)) for values in zip(*group.values(), strict=True)])
    if spec.arms:
        per_arm = [_product(arm) for arm in spec.arms]
        turns = itertools.zip_longest(*per_arm)
        factors.insert(0, [point for turn in turns for point in turn if point is not None])
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*factors)]


def _product(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def config_id(config: dict[str, Any]) -> str:
    """A stable 12-hex id of the hyperparameters: sha256 of the sorted-key JSON of `config`.

    PLACEMENT_KEYS are left out: the same hyperparameters on different datasets share an id. Pass
    resolved configs (as `expand` makes them), so that a default written out and a default left
    implicit give the same id.
    """
    hyperparameters = nest(
        {
            key: value
            for key, value in flatten(config).items()
            if placement_key(key) is None and not (key in KEYS_ADDED_LATER and value == KEYS_ADDED_LATER[key])
        }
    )
    canonical = json.dumps(hyperparameters, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def training_id(config: dict[str, Any]) -> str:
    """config_id without BOOKKEEPING_KEYS: configs that train the same model share it."""
    return config_id({key: value for key, value in flatten(config).items() if key not in BOOKKEEPING_KEYS})


def bookkeeping_changes(trial_config: dict[str, Any], recorded: dict[str, Any]) -> dict[str, tuple] | None:
    """{key: (recorded value, trial's value)} when two configs differ in BOOKKEEPING_KEYS alone (so they
    train the same model; PLACEMENT_KEYS aside); None when they differ in anything else, or in nothing."""
    ours, theirs = flatten(trial_config), {**KEYS_ADDED_LATER, **flatten(recorded)}  # as config_id reads it
    keys = {key for key in ours.keys() | theirs.keys() if placement_key(key) is None}
    differing = {key for key in keys if ours.get(key) != theirs.get(key)}
    if not differing or not differing <= set(BOOKKEEPING_KEYS):
        return None
    return {key: (theirs.get(key), ours.get(key)) for key in sorted(differing)}


def _trial_data(value: str) -> str:
    """A dataset file as an absolute path, read from the sweep's working directory: each trial's config is
    saved under the runs folder and loaded from there, where a relative path would name another file.
    Built-in names (also with a bad split, which check_datasets reports) stay as they are."""
    try:
        builtin = parse_builtin(value) is not None
    except TunelabError:
        builtin = True
    return value if builtin else str(Path(value).expanduser().absolute())


def expand(spec: SweepSpec, seeds: list[int] | None = None) -> list[Trial]:
    """All trials, point by point (datasets, then seeds inner), each config validated as a RunConfig;
    `seeds` replaces the spec's (confirm_seeds).

    Each trial's `name` is '<dataset>-<config_id>-s<seed>', so default run directories do not collide.
    """
    trials: list[Trial] = []
    seen_ids: dict[str, int] = {}
    any_ranks = False  # whether 'ranks' applies to any point
    base = spec.base
    # `method: full` is shorthand for `method: {name: full}`; spell it out so `method.*` points merge into it;
    # no method at all is the default one, named, so that a grid over `method.r` alone tunes it
    if isinstance(base.get("method"), str) or "method" not in base:
        name = base.get("method") or validate({}, "the defaults").method.name
        base = {**base, "method": {"name": name}}
    for index, point in enumerate(_points(spec)):
        merged = deep_merge(base, nest(point))
        settings = " ".join(f"{key}={value}" for key, value in flatten(nest(point)).items())  # as overrides
        where = f"{spec._source} (sweep point {index}: {settings})"
        resolved = validate(merged, where, located=_point_lines(spec, point)).model_dump(mode="json")
        point_id = config_id(resolved)
        if point_id in seen_ids:
            raise TunelabError(
                f"{spec._source}: sweep points {seen_ids[point_id]} and {index} are the same "
                f"configuration ({settings}); remove the repeated value"
            )
        seen_ids[point_id] = index
        if seeds and not spec.seeds and resolved["train"]["seed"] in seeds:
            raise TunelabError(
                f"{spec._source}: 'confirm_seeds' lists seed {resolved['train']['seed']}, the train.seed "
                "every point already trains with; list other seeds"
            )
        evaluable = validate(resolved, spec._source).method.evaluable_ranks()
        ranks = tuple(spec.ranks) if evaluable else ()
        beyond = [rank for rank in ranks if rank not in evaluable]
        if beyond:
            raise TunelabError(
                f"{spec._source}: 'ranks' lists {beyond[0]}, beyond sweep point {index} ({settings}), which "
                f"trains ranks {evaluable[0]}..{evaluable[-1]}"
            )
        any_ranks = any_ranks or bool(ranks)
        for dataset in spec.datasets:
            for seed in seeds or spec.seeds or [resolved["train"]["seed"]]:
                config = deep_merge(
                    resolved,
                    {
                        "data": {
                            "train": _trial_data(dataset.train),
                            "eval": _trial_data(dataset.eval) if dataset.eval else None,
                            "holdout": dataset.holdout,
                        },
                        "train": {"seed": seed},
                        "name": f"{dataset.name}-{point_id}-s{seed}",
                    },
                )
                if dataset.columns:
                    config["data"]["columns"] = dict(dataset.columns)
                test = _trial_data(dataset.test) if dataset.test else None
                trials.append(Trial(point_id, dataset.name, dataset.metric, config, seed, test, ranks))
    if spec.ranks and not any_ranks:
        line = next(number for dotted, number, _ in spec._keys if dotted == "ranks")
        raise TunelabError(
            f"{spec._source}:{line}: 'ranks' evaluates dylora trials at those ranks, and no point of this "
            "sweep trains dylora; remove 'ranks', or sweep method.r to compare LoRA ranks"
        )
    return trials


def _from_folder(value: str, folder: Path) -> str:
    """A dataset path relative to `folder` (the spec's) as an absolute path when it is there; else as
    written: a built-in, a hub id, an absolute path, or one read from the working directory (as specs
    before this were)."""
    path = Path(value).expanduser()
    if path.is_absolute() or not (folder / path).exists():  # a built-in, hub id or file found from here
        return value
    return str((folder / path).resolve())


def beside_the_spec(value: str, spec_dir: Path) -> str:
    """'; paths in a spec are relative to ...: use P' when `value`, not found from the working directory,
    is a path beside the spec (as in a train config, which reads them from its own folder); else ''."""
    path = Path(value).expanduser()
    beside = spec_dir / path
    if path.is_absolute() or not beside.exists():
        return ""
    where = os.path.normpath(beside)
    return f"; paths in a spec are relative to the working directory, not the spec: use {where}"


def _dataset_problem(value: str, spec_dir: Path) -> str | None:
    """Why `value` names no dataset that `tunelab.data.load_rows` can read (None when it does)."""
    try:
        check_source(value)
    except TunelabError as exc:
        return str(exc) + beside_the_spec(value, spec_dir)
    return None


def _data_files(folder: Path) -> list[Path]:
    """A folder's files, without what git, an editor or a file browser keeps beside them (.git, .DS_Store,
    __pycache__): their changes are no change of the data."""
    return sorted(
        file
        for file in folder.rglob("*")
        if file.is_file() and not any(part.startswith((".", "__")) for part in file.relative_to(folder).parts)
    )


def data_fingerprint(dataset: DatasetSpec) -> str | None:
    """sha256 of the contents of a dataset's local files (train, eval, test; a folder's files by their
    relative paths), so that a result on data since edited is told from one on today's data; None when
    every split is a built-in or a hub id (fixed by its package or revision), or a file is not found from
    the working directory (unknown here). Paths are not hashed: a copied sweep folder keeps its results."""
    digest, local = hashlib.sha256(), False
    if dataset.columns:  # how the files are read is part of the data: another mapping is other data
        digest.update(json.dumps(dataset.columns, sort_keys=True).encode())
        local = True
    if dataset.holdout is not None:  # which rows train: other rows are other data
        digest.update(f"holdout={dataset.holdout:g}".encode())
        local = True
    for split in ("train", "eval", "test"):
        value = getattr(dataset, split)
        path = Path(value).expanduser() if value is not None else None
        if path is None or not path.exists():
            if (
                path is not None and data_suffix(path) in FILE_SUFFIXES
            ):  # a file not found from here (recommend run elsewhere)
                return None  # unknown, which is not other data
            continue  # a built-in or a hub id
        local = True
        files = [path] if path.is_file() else _data_files(path)
        for file in files:
            digest.update(f"{split}:{file.relative_to(path) if path.is_dir() else ''}\0".encode())
            try:
                with open(file, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
            except OSError:  # gone or unreadable now: the trial that reads it will say so
                return None
    return digest.hexdigest() if local else None


def check_datasets(spec: SweepSpec) -> None:
    """Fail before any trial starts when a dataset of the spec cannot be found: every trial on it would fail.

    Only existence and file type (as `tunelab.data.load_rows` checks them): `tunelab sweep` then reads
    the rows of local files as the trials' data options say (commands._check_rows).
    """
    spec_dir = Path(spec._source).parent
    for dataset in spec.datasets:
        for split in ("train", "eval", "test"):
            if getattr(dataset, split) is None:
                continue
            problem = _dataset_problem(getattr(dataset, split), spec_dir)
            if problem:
                raise TunelabError(f"{spec._source}: dataset '{dataset.name}' {split}: {problem}")
