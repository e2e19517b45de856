"""A CBS ranking of recorded sweep results: the pure functions of cbs.py applied to a ScoreMatrix,
with each ranked config's hyperparameters and dataset names (what `recommend` prints and writes)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from tunelab.config import flatten
from tunelab.hpsearch.cbs import cbs_rank, held_out_curve, normalized, orient, top_k_curve
from tunelab.hpsearch.spec import EVAL_RANK_KEY, placement_key
from tunelab.hpsearch.store import ScoreMatrix


def hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """A config as flat dotted keys, without the keys that only place a trial."""
    return {key: value for key, value in flatten(config).items() if placement_key(key) is None}


def varying_keys(hyperparameters: list[dict[str, Any]]) -> list[str]:
    """The dotted keys whose values differ among the configs that set them: a key only one method has,
    at one value (SpIEL's accumulation_steps next to LoRA configs), tells configs apart no better than
    method.name does."""
    keys = list(dict.fromkeys(key for config in hyperparameters for key in config))
    return [
        key
        for key in keys
        if len({json.dumps(config[key]) for config in hyperparameters if config.get(key) is not None}) > 1
    ]


TUNED_KEYS = ("train.lr", EVAL_RANK_KEY)  # what an arm's best config is chosen over


def usual_values(hyperparameters: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    """For each of `keys` but the method's and TUNED_KEYS, the value most configs that set it share,
    where more than half of them do (max_grad_norm=1.0 beside one recipe arm's 0.0): a table can name
    it once instead of on every row."""
    usual = {}
    for key in keys:
        if key in TUNED_KEYS or key.startswith("method.") or key == "quantization":
            continue
        values = [json.dumps(config[key]) for config in hyperparameters if config.get(key) is not None]
        top = max(set(values), key=values.count)
        if values.count(top) * 2 > len(values):
            usual[key] = json.loads(top)
    return usual


def method_label(hyperparameters: dict[str, Any]) -> str:
    """'lora', 'nf4 dylora', 'spiel-ag', ...: the method, its SpIEL regrowth rule and a 4-bit base."""
    name = hyperparameters.get("method.name", "?")
    if name == "spiel":
        name = f"spiel-{hyperparameters.get('method.regrowth', 'ag')}"
    return f"nf4 {name}" if hyperparameters.get("quantization") == "nf4" else name


def arms(entries: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Ranking entries grouped into arms: the configs of one method that differ only in TUNED_KEYS (the
    learning rate, a DyLoRA row's evaluated rank). An arm is named by its method and the other keys
    that vary within that method, e.g. 'nf4 lora r=16' or 'spiel-ag weight_decay=3.0 max_grad_norm=0.0'."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        by_method.setdefault(method_label(entry["hyperparameters"]), []).append(entry)
    grouped: dict[str, list[dict[str, Any]]] = {}
    for label, group in by_method.items():
        keys = [key for key in varying_keys([e["hyperparameters"] for e in group]) if key not in TUNED_KEYS]
        for entry in group:
            named = [f"{key.rsplit('.', 1)[-1]}={entry['hyperparameters'].get(key)}" for key in keys]
            grouped.setdefault(" ".join([label, *named]), []).append(entry)
    return grouped


def best_per_arm(groups: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each arm's best entry (`groups` from `arms`): highest mean dev s/best, a missing trial counting 0."""
    return {label: max(group, key=lambda entry: entry["mean_normalized"]) for label, group in groups.items()}


def scores_by_lr(groups: dict[str, list[dict[str, Any]]]) -> dict[str, list[tuple[float, float]]]:
    """Each arm's mean dev s/best at each learning rate it tried (its best rank there, for a DyLoRA arm),
    in lr order (`groups` from `arms`); an arm without `train.lr` is left out."""
    curves = {}
    for label, group in groups.items():
        best_at: dict[float, float] = {}
        for entry in group:
            lr = entry["hyperparameters"].get("train.lr")
            if lr is not None:
                best_at[lr] = max(best_at.get(lr, -np.inf), entry["mean_normalized"])
        if best_at:
            curves[label] = sorted(best_at.items())
    return curves


def best_lr_at_grid_edge(curves: dict[str, list[tuple[float, float]]]) -> dict[str, str]:
    """The arms whose best learning rate is the lowest or the highest of the two or more they tried:
    {arm: 'lowest' | 'highest'}. Their best may lie beyond the grid, which wants widening first."""
    edges = {}
    for label, points in curves.items():
        scores = [score for _, score in points]
        for edge, index in (("lowest", 0), ("highest", len(points) - 1)):
            # strictly best: a tie with a point inside the grid (exact match on a few rows) brackets it
            if len(points) > 1 and all(scores[index] > other for i, other in enumerate(scores) if i != index):
                edges[label] = edge
    return edges


@dataclass
class Ranking:
    tau: float
    datasets: list[str]
    entries: list[dict[str, Any]]  # in CBS order: config id, covers, coverage, scores, hyperparameters
    top_k_curve: list[float]  # mean over datasets of the best normalized score among the top K
    uncovered: list[str]  # datasets no config covers (no positive score recorded)
    missing_trials: int  # results of ranked configs missing (failed or not run), covering nothing
    held_out_curve: list[float] | None = None  # the same curve, each dataset ranked without itself

    def as_json(self) -> dict[str, Any]:
        return {
            "tau": self.tau,
            "datasets": self.datasets,
            "ranking": self.entries,
            "top_k_curve": self.top_k_curve,
            "held_out_curve": self.held_out_curve,
        }


def _cells(matrix: ScoreMatrix, values: np.ndarray | None, row: int) -> dict[str, float | None]:
    """One config's values by dataset name (None where missing)."""
    if values is None:
        return {}
    return {d: (None if np.isnan(v) else float(v)) for d, v in zip(matrix.datasets, values[row], strict=True)}


def rank_matrix(matrix: ScoreMatrix, tau: float, cross_validate: bool = False) -> Ranking:
    """The CBS ranking of the dev scores, each entry with its dev and test scores, their spread over
    seeds and its cost; with `cross_validate`, the leave-one-dataset-out curve too."""
    oriented = orient(matrix.scores, matrix.higher_is_better)
    ranked = cbs_rank(oriented, tau)
    curve = top_k_curve(oriented, [entry.config for entry in ranked])
    test_normalized = (
        normalized(orient(matrix.test_scores, matrix.higher_is_better))
        if matrix.test_scores is not None
        else None
    )
    entries = [
        {
            "rank": rank,
            "config": matrix.config_ids[entry.config],
            "covers": [matrix.datasets[d] for d in entry.newly_covered],
            "covered_total": entry.covered_total,
            "coverage": entry.covered_total / len(matrix.datasets),
            "mean_normalized": entry.mean_normalized,
            "top_k": float(curve[rank - 1]),
            "hyperparameters": hyperparameters(matrix.configs[matrix.config_ids[entry.config]]),
            "dev": _cells(matrix, matrix.scores, entry.config),
            "dev_normalized": _cells(matrix, normalized(oriented), entry.config),
            "test": _cells(matrix, matrix.test_scores, entry.config),
            # None for a row with no test score at all (its trials failed): 0 would read as a score
            "test_mean_normalized": (
                float(test_normalized[entry.config].mean())
                if test_normalized is not None and not np.isnan(matrix.test_scores[entry.config]).all()
                else None
            ),
            "spread": _cells(matrix, matrix.spread, entry.config),
            "test_spread": _cells(matrix, matrix.test_spread, entry.config),
            "seeds": _cells(matrix, matrix.seeds, entry.config),
            "cost": (matrix.costs or {}).get(matrix.config_ids[entry.config]),
        }
        for rank, entry in enumerate(ranked, start=1)
    ]
    return Ranking(
        tau=tau,
        datasets=list(matrix.datasets),
        entries=entries,
        top_k_curve=curve.tolist(),
        uncovered=[name for j, name in enumerate(matrix.datasets) if not np.any(oriented[:, j] > 0)],
        missing_trials=int(np.isnan(matrix.scores).sum()),
        held_out_curve=held_out_curve(oriented, tau).tolist() if cross_validate else None,
    )
